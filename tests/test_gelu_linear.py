"""gelu_linear: GELU then a linear layer, keeping only GELU's input for backward."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from triformer.gelu_linear import GELULinear, gelu_linear, gelu_linear_reference
from tests.helpers.ops import check_against_float64
from triformer.testing import kernel_device, random_tensor

DEV = kernel_device()
pytestmark = pytest.mark.usefixtures("poisoned_outputs")
F32 = torch.float32


def check(x, weight, bias, gelu_bias, approximate="tanh"):
    check_against_float64(lambda x_, w_, b_, gb_: gelu_linear(x_, w_, b_, approximate, gb_),
                          lambda x_, w_, b_, gb_: gelu_linear_reference(x_, w_, b_, approximate, gb_),
                          (x, weight, bias, gelu_bias), ("dx", "dweight", "dbias", "dgelu_bias"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("biases", [(True, True), (False, False), (True, False)])
def test_matches_reference(dtype, approximate, biases):
    x = random_tensor((2, 37, 48), dtype, contiguous=False)
    weight = random_tensor((23, 48), dtype) * 0.2
    bias = random_tensor((23,), dtype) if biases[0] else None
    gelu_bias = random_tensor((48,), dtype) if biases[1] else None
    check(x, weight, bias, gelu_bias, approximate)


def test_fp32_parameters_with_low_precision_activations():
    """Autocast's layout: bf16 activations, fp32 master weights and biases; gradients come back in fp32."""
    x = random_tensor((40, 64), torch.bfloat16)
    check(x, random_tensor((30, 64), F32) * 0.2, random_tensor((30,), F32), random_tensor((64,), F32))


def test_under_autocast_matches_separate_ops():
    """Inside torch.autocast, the same output and gradients as GELU then F.linear (which autocast casts)."""
    dtype = torch.bfloat16
    x = random_tensor((3, 11, 32), dtype)
    lin = torch.nn.Linear(32, 16).to(DEV)
    gb = torch.nn.Parameter(random_tensor((32,), F32))
    outs = []
    for fused in (True, False):
        for p in (*lin.parameters(), gb):
            p.grad = None
        xx = x.clone().requires_grad_()
        with torch.autocast(DEV.type, dtype=dtype):
            if fused:
                y = gelu_linear(xx, lin.weight, lin.bias, "tanh", gb)
            else:
                y = lin(F.gelu(xx.float() + gb, approximate="tanh").to(dtype))
        y.float().square().sum().backward()
        outs.append([y.float(), xx.grad.float(), lin.weight.grad, lin.bias.grad, gb.grad])
    for name, a, b in zip(("y", "dx", "dweight", "dbias", "dgelu_bias"), *outs):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2, msg=name)


def test_keeps_only_gelu_input_for_backward():
    """What autograd holds for backward: x (and the parameters), not the activation of the hidden width."""
    x = random_tensor((64, 96), F32).requires_grad_()
    weight = random_tensor((8, 96), F32).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gelu_linear(x, weight, None, "tanh", None)
    assert sum(t.numel() for t in saved if t is not None) == x.numel() + weight.numel()


def test_only_requested_gradients():
    x = random_tensor((5, 16), F32)
    weight = random_tensor((4, 16), F32).requires_grad_()
    gelu_linear(x, weight).sum().backward()
    assert weight.grad is not None and x.grad is None


@given(rows=st.integers(1, 40), k=st.integers(1, 70), n=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_property_shapes(rows, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    check(random_tensor((rows, k), F32, generator=g), random_tensor((n, k), F32, generator=g),
          random_tensor((n,), F32, generator=g), random_tensor((k,), F32, generator=g))


def test_bad_arguments():
    x, w = random_tensor((4, 8), F32), random_tensor((3, 8), F32)
    with pytest.raises(ValueError, match=r"weight must have shape \[N, 8\]"):
        gelu_linear(x, w.t())
    with pytest.raises(ValueError, match=r"bias must have shape \[3\]"):
        gelu_linear(x, w, random_tensor((4,), F32))
    with pytest.raises(ValueError, match=r"gelu_bias must have shape \[8\]"):
        gelu_linear(x, w, None, "tanh", random_tensor((3,), F32))
    with pytest.raises(ValueError, match="approximate must be 'tanh' or 'none'"):
        gelu_linear(x, w, approximate="fast")
    with pytest.raises(TypeError):
        gelu_linear(x.long(), w)
    with pytest.raises(ValueError, match="approximate must be 'tanh' or 'none'"):
        GELULinear(8, 3, approximate="fast")


def test_module():
    m = GELULinear(16, 5, gelu_bias=True).to(DEV)
    x = random_tensor((3, 16), F32)
    torch.testing.assert_close(m(x), gelu_linear_reference(x, m.linear.weight, m.linear.bias, "tanh", m.gelu_bias))
    assert "gelu_bias=True" in repr(m)
