import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from tests.helpers.ops import check_aot_eager_matches_eager
from triformer.gelu import GELU, BiasGELU, GELUFunction, gelu, gelu_reference
from triformer.testing import assert_close, kernel_device, random_tensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
APPROXIMATIONS = ["tanh", "none"]


# The ops allocate their outputs with torch.empty: NaN there shows any element a kernel skips.
pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def check_gelu(x, approximate, bias=None):
    """Output and gradients (x, bias) against float64; torch's own result in x's dtype sets the fp16/bf16 bar."""
    leaves = [t.requires_grad_() for t in (x, bias) if t is not None]
    y = gelu(x, approximate, bias)
    assert y.dtype == x.dtype and y.shape == x.shape
    dy = random_tensor(y.shape, y.dtype)
    grads = torch.autograd.grad(y, leaves, dy)

    def run_reference(dtype):
        ins = [t.detach().to(torch.float64 if dtype is None else t.dtype).requires_grad_() for t in leaves]
        out = gelu_reference(ins[0], approximate, ins[1] if bias is not None else None)
        return out, torch.autograd.grad(out, ins, dy.to(out.dtype))

    y64, grads64 = run_reference(None)
    y_peer, grads_peer = run_reference(x.dtype)
    assert_close("y", y, y64, y_peer)
    for name, g, g64, g_peer in zip(("dx", "dbias"), grads, grads64, grads_peer):
        assert g.dtype == (x.dtype if name == "dx" else bias.dtype)
        assert_close(name, g, g64, g_peer)


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gelu_matches_reference(approximate, dtype, contiguous, with_bias):
    # 700 rows of 131: several row tiles (and several per program in the bias gradient's row groups)
    x = random_tensor((7, 100, 131), dtype, contiguous=contiguous, scale=2.0)
    bias = random_tensor((131,), dtype, contiguous=contiguous) if with_bias else None
    check_gelu(x, approximate, bias)


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_gelu_wide_rows_span_column_tiles(approximate):
    x = random_tensor((3, 16411), torch.float32, contiguous=False)
    check_gelu(x, approximate, random_tensor((16411,), torch.float32))


def test_gelu_bias_gradient_many_row_groups():
    # enough rows that the bias gradient's programs loop over several tiles and its partial sums take
    # several steps to reduce, on the interpreter and on an H100 alike
    check_gelu(random_tensor((9000, 131), torch.float32), "none", random_tensor((131,), torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gelu_low_precision_activation_with_fp32_bias(dtype):
    """Autocast case: activation in fp16/bf16, parameter in fp32; each gradient in its input's dtype."""
    check_gelu(random_tensor((37, 259), dtype), "tanh", random_tensor((259,), torch.float32))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # exp(+big) = inf is intended there
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_gelu_extreme_values(approximate):
    vals = torch.tensor([-1e4, -60.0, -9.5, -3.0, -1e-3, -1e-30, 0.0, 1e-30, 1e-3, 0.7, 3.0, 9.5, 60.0, 1e4])
    x = (vals[:, None] * (1 + 0.01 * torch.rand(vals.numel(), 33))).to(kernel_device())
    check_gelu(x, approximate)


def test_gelu_scalar_and_empty():
    x = random_tensor((), torch.float32)
    check_gelu(x, "tanh")
    empty = random_tensor((0, 5), torch.float32).requires_grad_()
    y = gelu(empty, "none", random_tensor((5,), torch.float32))
    assert y.shape == (0, 5)


def test_gelu_layout_needing_three_leading_dims_is_handled():
    # a 4-D tensor permuted so no two leading dims merge: the op copies it once, the result is still exact
    x = random_tensor((5, 4, 3, 9), torch.float32).permute(2, 0, 1, 3)[..., ::2]
    check_gelu(x, "none", random_tensor((5,), torch.float32))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@given(
    shape=st.lists(st.integers(1, 70), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    contiguous=st.booleans(),
    approximate=st.sampled_from(APPROXIMATIONS),
    with_bias=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 6.0, 200.0]),
)
@example(shape=[1, 2, 1], dtype=torch.float32, contiguous=False, approximate="tanh", with_bias=False, scale=1.0)
def test_gelu_property(shape, dtype, contiguous, approximate, with_bias, scale):
    # random_tensor cannot stride some one-column shapes, e.g. (1, 2, 1)
    x = random_tensor(shape, dtype, contiguous=contiguous or shape[-1] == 1, scale=scale)
    bias = random_tensor(shape[-1:], dtype, scale=scale) if with_bias else None
    check_gelu(x, approximate, bias)


def test_modules():
    x = random_tensor((9, 45), torch.float32)
    module = GELU("none")
    assert_close("GELU", module(x), gelu_reference(x.double(), "none"))
    biased = BiasGELU(45, device=kernel_device())
    y = biased(x)
    y.sum().backward()
    b64 = biased.bias.detach().double().requires_grad_()
    gelu_reference(x.double(), "tanh", b64).sum().backward()
    assert_close("BiasGELU", y, gelu_reference(x.double(), "tanh", biased.bias.double()))
    assert_close("BiasGELU.bias.grad", biased.bias.grad, b64.grad)


def test_torch_compile_fullgraph_matches_eager():
    x = random_tensor((33, 70), torch.float32).requires_grad_()
    bias = random_tensor((70,), torch.float32).requires_grad_()

    def f(x, b):
        y = gelu(x * 1.5, "tanh", b)
        return (y * y).sum(), y

    check_aot_eager_matches_eager(f, x, bias)


def test_function_class_is_the_autograd_entry():
    x = random_tensor((4, 6), torch.float32).requires_grad_()
    y = gelu(x)
    assert y.grad_fn.name() == GELUFunction.__name__ + "Backward"


def test_bad_input():
    x = random_tensor((4, 6), torch.float32)
    with pytest.raises(TypeError, match="x must be float32"):
        gelu(x.to(torch.int32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        gelu([1.0, 2.0])
    with pytest.raises(ValueError, match="approximate must be"):
        gelu(x, "erf")
    with pytest.raises(ValueError, match="bias must have shape"):
        gelu(x, "tanh", random_tensor((5,), torch.float32))
    with pytest.raises(ValueError, match="bias must have shape"):
        gelu(x, "tanh", random_tensor((1, 6), torch.float32))
    with pytest.raises(TypeError, match="bias must be float32"):
        gelu(x, "tanh", torch.ones(6, dtype=torch.float64, device=x.device))
    with pytest.raises(ValueError, match="bias is on meta"):
        gelu(x, "tanh", torch.empty(6, device="meta"))
    with pytest.raises(ValueError, match="approximate must be"):
        GELU("exact")
