"""glu_linear: a gated unit (SwiGLU / GeGLU) then a linear layer, keeping only gate and up for backward."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from triformer.glu_linear import GLULinear, glu_linear, glu_linear_reference
from tests.helpers.ops import check_against_float64
from triformer.testing import assert_close, kernel_device, random_tensor

DEV = kernel_device()
pytestmark = pytest.mark.usefixtures("poisoned_outputs")
F32 = torch.float32


def check(gate, up, weight, bias, activation="silu"):
    """``up=None``: ``gate`` is packed."""
    check_against_float64(lambda *a: glu_linear(*a, activation), lambda *a: glu_linear_reference(*a, activation),
                          (gate, up, weight, bias), ("dgate", "dup", "dweight", "dbias"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("packed", [False, True])
def test_matches_reference(dtype, activation, packed):
    weight = random_tensor((23, 40), dtype) * 0.2
    bias = random_tensor((23,), dtype) if activation != "gelu" else None
    if packed:  # [..., 2F] read in place through its strides: a non-contiguous view of a wider buffer
        gate = random_tensor((2, 37, 90), dtype)[..., 5:85]
        check(gate, None, weight, bias, activation)
    else:
        check(random_tensor((2, 37, 40), dtype, contiguous=False), random_tensor((2, 37, 40), dtype), weight, bias,
              activation)


def test_fp32_parameters_with_low_precision_activations():
    """Autocast's layout: bf16 activations, fp32 master weights and bias; gradients come back in fp32."""
    check(random_tensor((40, 64), torch.bfloat16), random_tensor((40, 64), torch.bfloat16),
          random_tensor((30, 64), F32) * 0.2, random_tensor((30,), F32))


def test_under_autocast_matches_separate_ops():
    """Inside torch.autocast, HF Llama's MLP tail: the same output and gradients as silu(gate) * up then the
    nn.Linear (which autocast casts)."""
    dtype = torch.bfloat16
    lin = torch.nn.Linear(32, 16, bias=False).to(DEV)
    g0, u0 = random_tensor((3, 11, 32), dtype), random_tensor((3, 11, 32), dtype)
    outs = []
    for fused in (True, False):
        lin.weight.grad = None
        gate, up = g0.clone().requires_grad_(), u0.clone().requires_grad_()
        with torch.autocast(DEV.type, dtype=dtype):
            y = glu_linear(gate, up, lin.weight) if fused else lin(F.silu(gate) * up)
        y.float().square().sum().backward()
        outs.append([y.float(), gate.grad.float(), up.grad.float(), lin.weight.grad])
    for name, a, b in zip(("y", "dgate", "dup", "dweight"), *outs):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2, msg=name)


@pytest.mark.parametrize("packed", [False, True])
def test_keeps_only_gate_and_up_for_backward(packed):
    """What autograd holds for backward: gate and up (and the weight), not their product."""
    gate = random_tensor((64, 96 * (2 if packed else 1)), F32).requires_grad_()
    up = None if packed else random_tensor((64, 96), F32).requires_grad_()
    weight = random_tensor((8, 96), F32).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        glu_linear(gate, up, weight)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved if t is not None}
    assert sum(storages.values()) == 4 * (64 * 96 * 2 + weight.numel())


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("up_grad", [False, True])
def test_only_requested_gradients(packed, up_grad):
    """Gradients only where asked, and the weight's right with gate and up frozen (the product computed alone)."""
    gate = random_tensor((5, 32 if packed else 16), F32)
    up = None if packed else random_tensor((5, 16), F32).requires_grad_(up_grad)
    weight = random_tensor((4, 16), F32).requires_grad_()
    glu_linear(gate, up, weight).sum().backward()
    assert gate.grad is None and (packed or (up.grad is not None) == up_grad)
    ref = weight.detach().double().requires_grad_()
    glu_linear_reference(gate.double(), None if packed else up.detach().double(), ref).sum().backward()
    assert_close("dweight", weight.grad, ref.grad)


@settings(deadline=None, max_examples=20)
@given(rows=st.integers(1, 40), f=st.integers(1, 70), n=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_property_shapes(rows, f, n, seed):
    g = torch.Generator().manual_seed(seed)
    check(random_tensor((rows, f), F32, generator=g), random_tensor((rows, f), F32, generator=g),
          random_tensor((n, f), F32, generator=g), random_tensor((n,), F32, generator=g))


def test_bad_arguments():
    g, w = random_tensor((4, 8), F32), random_tensor((3, 8), F32)
    with pytest.raises(ValueError, match=r"weight must have shape \[N, 8\]"):
        glu_linear(g, g, w.t())
    with pytest.raises(ValueError, match=r"weight must have shape \[N, 4\]"):
        glu_linear(g, None, w)
    with pytest.raises(ValueError, match=r"bias must have shape \[3\]"):
        glu_linear(g, g, w, random_tensor((4,), F32))
    with pytest.raises(ValueError, match="gate and up must have the same shape"):
        glu_linear(g, g[:, :4], w)
    with pytest.raises(ValueError, match="even last dim"):
        glu_linear(random_tensor((4, 7), F32), None, w)
    with pytest.raises(ValueError, match="activation must be one of"):
        glu_linear(g, g, w, activation="relu")
    with pytest.raises(TypeError):
        glu_linear(g.long(), g, w)
    with pytest.raises(TypeError, match="gate and up must have the same dtype"):
        glu_linear(g, g.half(), w)
    with pytest.raises(ValueError, match="activation must be one of"):
        GLULinear(8, 3, activation="relu")


def test_module():
    m = GLULinear(16, 5, bias=True, activation="gelu_tanh").to(DEV)
    gate, up = random_tensor((3, 16), F32), random_tensor((3, 16), F32)
    torch.testing.assert_close(m(gate, up), glu_linear_reference(gate, up, m.linear.weight, m.linear.bias,
                                                                 "gelu_tanh"))
    assert "gelu_tanh" in repr(m)
