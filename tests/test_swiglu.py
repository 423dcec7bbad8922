import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from tests.helpers.ops import check_aot_eager_matches_eager
from triformer.swiglu import (GLUFunction, SwiGLU, SwiGLUMLP, geglu, geglu_reference, swiglu,
                              swiglu_reference)
from triformer.testing import assert_close, kernel_device, random_tensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (name, triformer op, reference) for each gating activation
GLUS = {
    "swiglu": (swiglu, swiglu_reference),
    "geglu_tanh": (lambda g, u=None: geglu(g, u, "tanh"), lambda g, u=None: geglu_reference(g, u, "tanh")),
    "geglu_erf": (lambda g, u=None: geglu(g, u, "none"), lambda g, u=None: geglu_reference(g, u, "none")),
}


# The ops allocate their outputs with torch.empty: NaN there shows any element a kernel skips.
pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def check_glu(kind, *inputs):
    """Output and the gradient of every input against float64; torch in the inputs' dtype sets the
    fp16/bf16 bar. ``inputs`` is (gate, up), or the packed (x,)."""
    op, ref = GLUS[kind]
    leaves = [t.requires_grad_() for t in inputs]
    y = op(*leaves)
    gate_shape = inputs[0].shape if len(inputs) == 2 else inputs[0].shape[:-1] + (inputs[0].shape[-1] // 2,)
    assert y.dtype == inputs[0].dtype and y.shape == gate_shape
    dy = random_tensor(y.shape, y.dtype)
    grads = torch.autograd.grad(y, leaves, dy)

    def run_reference(dtype):
        ins = [t.detach().to(dtype).requires_grad_() for t in leaves]
        out = ref(*ins)
        return out, torch.autograd.grad(out, ins, dy.to(dtype))

    y64, grads64 = run_reference(torch.float64)
    y_peer, grads_peer = run_reference(inputs[0].dtype)
    assert_close(f"{kind} y", y, y64, y_peer)
    for i, (g, g64, g_peer) in enumerate(zip(grads, grads64, grads_peer)):
        assert g.dtype == inputs[i].dtype and g.shape == inputs[i].shape
        assert_close(f"{kind} grad of input {i}", g, g64, g_peer)


@pytest.mark.parametrize("kind", list(GLUS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_glu_separate_inputs(kind, dtype, contiguous):
    shape = (3, 150, 139)  # 450 rows: two row tiles on the interpreter
    check_glu(kind, random_tensor(shape, dtype, contiguous=contiguous, scale=2.0),
              random_tensor(shape, dtype, contiguous=contiguous))


@pytest.mark.parametrize("kind", list(GLUS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_glu_packed_input(kind, dtype):
    x = random_tensor((2, 301, 2 * 139), dtype, scale=2.0)
    check_glu(kind, x)


def test_glu_packed_non_contiguous_and_wide():
    # F = 16411 spans two column tiles on the interpreter; the packed input itself is a strided view
    check_glu("swiglu", random_tensor((3, 2 * 16411), torch.float32, contiguous=False))


def test_packed_matches_separate_halves():
    x = random_tensor((37, 2 * 97), torch.float32)
    gate, up = x[:, :97], x[:, 97:]
    assert torch.equal(swiglu(x), swiglu(gate, up))
    assert torch.equal(geglu(x, approximate="none"), geglu(gate, up, approximate="none"))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # exp(+big) = inf is intended there
@pytest.mark.parametrize("kind", list(GLUS))
def test_glu_extreme_values(kind):
    vals = torch.tensor([-1e4, -80.0, -9.5, -3.0, -1e-3, -1e-30, 0.0, 1e-30, 1e-3, 0.7, 3.0, 9.5, 80.0, 1e4])
    gate = (vals[:, None] * (1 + 0.01 * torch.rand(vals.numel(), 33))).to(kernel_device())
    check_glu(kind, gate, random_tensor(gate.shape, torch.float32))


def test_shared_input_gets_both_gradients():
    x = random_tensor((11, 29), torch.float32).requires_grad_()
    swiglu(x, x).sum().backward()
    x64 = x.detach().double().requires_grad_()
    swiglu_reference(x64, x64).sum().backward()
    assert_close("d x (as gate and up)", x.grad, x64.grad)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@given(
    shape=st.lists(st.integers(1, 60), min_size=1, max_size=3),
    kind=st.sampled_from(list(GLUS)),
    dtype=st.sampled_from(DTYPES),
    contiguous=st.booleans(),
    packed=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 5.0, 40.0]),
)
@example(shape=[1, 2, 1], kind="swiglu", dtype=torch.float32, contiguous=False, packed=False, scale=1e-3)
def test_glu_property(shape, kind, dtype, contiguous, packed, scale):
    # random_tensor cannot stride some one-column shapes, e.g. (1, 2, 1); the packed input has two columns or more
    contiguous = contiguous or (shape[-1] == 1 and not packed)
    if packed:
        check_glu(kind, random_tensor(shape[:-1] + [2 * shape[-1]], dtype, contiguous=contiguous, scale=scale))
    else:
        check_glu(kind, random_tensor(shape, dtype, contiguous=contiguous, scale=scale),
                  random_tensor(shape, dtype, contiguous=contiguous, scale=scale))


@pytest.mark.parametrize("fused", [True, False])
def test_swiglu_mlp_matches_reference(fused):
    mlp = SwiGLUMLP(48, 70, bias=True, fused=fused, device=kernel_device())
    x = random_tensor((5, 7, 48), torch.float32).requires_grad_()
    y = mlp(x)
    dy = random_tensor(y.shape, torch.float32)
    params = list(mlp.parameters())
    grads = torch.autograd.grad(y, [x] + params, dy)

    x64 = x.detach().double().requires_grad_()
    p64 = {name: p.detach().double().requires_grad_() for name, p in mlp.named_parameters()}
    lin = torch.nn.functional.linear
    if fused:
        h = swiglu_reference(lin(x64, p64["w13.weight"], p64["w13.bias"]))
    else:
        h = swiglu_reference(lin(x64, p64["w1.weight"], p64["w1.bias"]), lin(x64, p64["w3.weight"], p64["w3.bias"]))
    y64 = lin(h, p64["w2.weight"], p64["w2.bias"])
    grads64 = torch.autograd.grad(y64, [x64] + list(p64.values()), dy.double())
    assert_close("SwiGLUMLP y", y, y64)
    for name, g, g64 in zip(["x"] + list(p64), grads, grads64):
        assert_close(f"SwiGLUMLP d {name}", g, g64)


def test_fused_mlp_packs_w1_then_w3():
    mlp = SwiGLUMLP(16, 24, fused=True, device=kernel_device())
    x = random_tensor((9, 16), torch.float32)
    w1, w3 = mlp.w13.weight.detach().double().chunk(2, dim=0)
    y64 = (torch.nn.functional.silu(x.double() @ w1.T) * (x.double() @ w3.T)) @ mlp.w2.weight.detach().double().T
    assert_close("fused MLP", mlp(x), y64)


def test_swiglu_module():
    gate, up = random_tensor((6, 50), torch.float32), random_tensor((6, 50), torch.float32)
    assert_close("SwiGLU", SwiGLU()(gate, up), swiglu_reference(gate.double(), up.double()))


def test_torch_compile_fullgraph_matches_eager():
    x = random_tensor((21, 2 * 45), torch.float32).requires_grad_()
    up = random_tensor((21, 45), torch.float32).requires_grad_()

    def f(x, up):
        y = swiglu(x) + geglu(x[:, :45] * 2, up)
        return (y * y).sum(), y

    check_aot_eager_matches_eager(f, x, up)


def test_empty_input():
    gate = random_tensor((0, 8), torch.float32).requires_grad_()
    y = swiglu(gate)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert gate.grad.shape == (0, 8)


def test_function_class_is_the_autograd_entry():
    y = geglu(random_tensor((4, 6), torch.float32).requires_grad_())
    assert y.grad_fn.name() == GLUFunction.__name__ + "Backward"


def test_bad_input():
    g = random_tensor((4, 6), torch.float32)
    with pytest.raises(TypeError, match="gate must be float32"):
        swiglu(g.to(torch.int64))
    with pytest.raises(TypeError, match="up must be a torch.Tensor"):
        swiglu(g, 3.0)
    with pytest.raises(ValueError, match="same shape"):
        swiglu(g, random_tensor((4, 5), torch.float32))
    with pytest.raises(TypeError, match="same dtype"):
        swiglu(g, g.half())
    with pytest.raises(ValueError, match="even last dim"):
        swiglu(random_tensor((4, 7), torch.float32))
    with pytest.raises(ValueError, match="approximate must be"):
        geglu(g, g, approximate="erf")
    with pytest.raises(ValueError, match="up is on meta"):
        swiglu(g, torch.empty(4, 6, device="meta"))
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        SwiGLUMLP(8, 0)
