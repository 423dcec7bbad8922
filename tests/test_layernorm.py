"""LayerNorm kernels against the float64 reference."""
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from tests.helpers.norms import BF16, F16, F32, LOOP_BLOCK, SHAPE, column_loop, torch_layer_norm
from tests.helpers.ops import check_op
from triformer.layernorm import LayerNorm, LayerNormFunction, TritonLayerNorm, layer_norm, layer_norm_reference
from triformer.testing import assert_close, kernel_device, random_tensor


def ln_inputs(shape, dtype, param_dtype, contiguous, weight=True, bias=True, scale=1.0, offset=0.0):
    n = shape[-1]
    x = random_tensor(shape, dtype, contiguous=contiguous, scale=scale)
    x.add_(offset * scale)  # in place: keeps x's strides
    w = random_tensor((n,), param_dtype) if weight else None
    b = random_tensor((n,), param_dtype) if bias else None
    return [x, w, b]


@pytest.mark.parametrize("block_n", [None, LOOP_BLOCK], ids=["one_tile", "column_loop"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("dtype,param_dtype", [(F32, F32), (F16, F16), (BF16, BF16), (BF16, F32)],
                         ids=["fp32", "fp16", "bf16", "bf16_fp32params"])
def test_layer_norm_matches_reference(dtype, param_dtype, contiguous, block_n):
    inputs = ln_inputs(SHAPE, dtype, param_dtype, contiguous)
    with column_loop(block_n):
        check_op("layer_norm", layer_norm, layer_norm_reference, torch_layer_norm, inputs, contiguous)


@pytest.mark.parametrize("weight,bias", [(True, False), (False, True), (False, False)])
def test_layer_norm_without_affine_parts(weight, bias):
    inputs = ln_inputs(SHAPE, F32, F32, contiguous=False, weight=weight, bias=bias)
    check_op("layer_norm", layer_norm, layer_norm_reference, torch_layer_norm, inputs, contiguous=False)


@pytest.mark.parametrize("shape", [(300,), (45, 300), (2, 3, 5, 300)], ids=["1d", "2d", "4d"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
def test_layer_norm_input_ranks(shape, contiguous):
    inputs = ln_inputs(shape, F32, F32, contiguous)
    check_op("layer_norm", layer_norm, layer_norm_reference, torch_layer_norm, inputs, contiguous)


@pytest.mark.parametrize("block_n", [None, 4096], ids=["default_blocks", "column_loop"])
def test_layer_norm_wide_rows(block_n):
    # N = 32768 + 5: wider than any GPU tile, and not a power of two.
    inputs = ln_inputs((3, 32773), F32, F32, contiguous=False, offset=4.0)
    with column_loop(block_n):
        check_op("layer_norm", layer_norm, layer_norm_reference, torch_layer_norm, inputs, contiguous=False)


def test_layer_norm_large_mean_stays_accurate():
    # |mean| = 30 std: var = E[x^2] - mean^2 in fp32 would be off by ~1e-4 here. The blockwise merge must not.
    # (Much larger offsets exceed fp32 itself: rounding the mean costs |mean| * 6e-8.)
    inputs = ln_inputs((40, 300), F32, F32, contiguous=True, offset=30.0)
    with column_loop(LOOP_BLOCK):
        check_op("layer_norm", layer_norm, layer_norm_reference, torch_layer_norm, inputs)


def test_layer_norm_no_rows():
    x = torch.randn(0, 300, device=kernel_device(), requires_grad=True)
    w = torch.randn(300, device=kernel_device(), requires_grad=True)
    b = torch.randn(300, device=kernel_device(), requires_grad=True)
    y = layer_norm(x, w, b)
    assert y.shape == (0, 300)
    y.sum().backward()
    assert x.grad.shape == (0, 300)
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_layer_norm_module_matches_torch_module():
    dev = kernel_device()
    ref = torch.nn.LayerNorm(300, eps=1e-4, device=dev)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(300))
        ref.bias.copy_(torch.randn(300))
    ours = TritonLayerNorm((300,), eps=1e-4, device=dev)
    assert TritonLayerNorm is LayerNorm and ours.normalized_shape == ref.normalized_shape
    ours.load_state_dict(ref.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = random_tensor((7, 300), F32)
    assert_close("LayerNorm module", ours(x), ref.double()(x.double()))

    no_bias, ref_no_bias = LayerNorm(300, bias=False), torch.nn.LayerNorm(300, bias=False)
    assert no_bias.bias is None and no_bias.state_dict().keys() == ref_no_bias.state_dict().keys()
    plain = LayerNorm([300], elementwise_affine=False, dtype=torch.float16)
    assert plain.weight is None and plain.bias is None and len(plain.state_dict()) == 0
    assert LayerNorm(300, dtype=torch.bfloat16).weight.dtype == torch.bfloat16


@pytest.mark.parametrize("make,error,match", [
    (lambda d: (torch.randn(4, 8, dtype=torch.float64, device=d),), TypeError, "x must be float32"),
    (lambda d: ([[1.0, 2.0]],), TypeError, "x must be a torch.Tensor"),
    (lambda d: (torch.randn(4, 0, device=d),), ValueError, "non-empty last dimension"),
    (lambda d: (torch.tensor(1.0, device=d),), ValueError, "non-empty last dimension"),
    (lambda d: (torch.randn(4, 8, device=d), torch.randn(7, device=d)), ValueError, r"weight must have shape \(8,\)"),
    (lambda d: (torch.randn(4, 8, device=d), None, torch.randn(8, 1, device=d)), ValueError, "bias must have shape"),
    (lambda d: (torch.randn(4, 8, device=d), torch.ones(8, dtype=torch.int32, device=d)), TypeError, "weight must be"),
    (lambda d: (torch.randn(4, 8, device=d), None, None, -1e-5), ValueError, "eps must be finite and >= 0"),
    (lambda d: (torch.randn(4, 8, device=d), None, None, float("nan")), ValueError, "eps must be finite"),
    (lambda d: (torch.randn(4, 8, device=d), None, None, "1e-5"), TypeError, "eps must be a float"),
    (lambda d: (torch.randn(4, 8, device=d), torch.ones(8, device="meta")), ValueError, "share a device"),
])
def test_layer_norm_rejects_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        layer_norm(*make(kernel_device()))


def test_layer_norm_module_rejects_bad_shapes():
    with pytest.raises(ValueError, match="normalized_shape"):
        LayerNorm((4, 8))
    with pytest.raises(ValueError, match="normalized_shape"):
        LayerNorm(0)
    with pytest.raises(ValueError, match="last dimension to be 8"):
        LayerNorm(8, device=kernel_device())(torch.randn(2, 9, device=kernel_device()))


def test_layer_norm_compiles_without_graph_break():
    x, w, b = ln_inputs((37, 300), F32, F32, contiguous=False)
    seed = random_tensor((37, 300), F32)

    def loss(x, w, b):
        return (layer_norm(x, w, b) * seed).sum()

    results = []
    for f in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        leaves = [t.detach().requires_grad_() for t in (x, w, b)]
        out = f(*leaves)
        results.append([out, *torch.autograd.grad(out, leaves)])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


def test_layer_norm_function_is_the_autograd_path():
    x = random_tensor((5, 300), F32).requires_grad_()
    assert type(layer_norm(x).grad_fn).__name__ == LayerNormFunction.__name__ + "Backward"


def test_sm90_codegen_of_the_backward():
    """benchmarks.layernorm_sm90 compiles the backward for sm_90 on this machine (no GPU needed); its first
    variant (GPT-2's 768-wide rows) spills nothing."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]  # `python -m benchmarks.layernorm_sm90` runs from the repository root
    proc = subprocess.run([sys.executable, "-m", "benchmarks.layernorm_sm90", "--first"], cwd=root,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cells = [c.strip() for c in proc.stdout.strip().splitlines()[-1].strip("|").split("|")]
    assert cells[:2] == ["layer_norm", "768"] and cells[5] == "0" and int(cells[7]) > 0, cells


@given(
    lead=st.sampled_from([(), (2,)]),
    rows=st.integers(1, 70),
    cols=st.integers(1, 200),
    dtypes=st.sampled_from([(F32, F32), (F16, F16), (BF16, BF16), (F16, F32), (F32, BF16)]),
    contiguous=st.booleans(),
    affine=st.sampled_from([(True, True), (True, False), (False, False)]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    offset=st.sampled_from([0.0, 8.0, -4.0]),
    eps=st.sampled_from([1e-5, 1e-2, 0.0]),
    block_n=st.sampled_from([None, 16]),
    seed=st.integers(0, 2**31 - 1),
)
@example(lead=(), rows=1, cols=2, dtypes=(F32, F32), contiguous=False, affine=(True, True), scale=1.0, offset=0.0,
         eps=1e-5, block_n=None, seed=0)
@example(lead=(2,), rows=1, cols=1, dtypes=(F32, F32), contiguous=False, affine=(True, True), scale=1e-3, offset=0.0,
         eps=1e-5, block_n=None, seed=0)
def test_layer_norm_property(lead, rows, cols, dtypes, contiguous, affine, scale, offset, eps, block_n, seed):
    torch.manual_seed(seed)  # the inputs are a function of the example, so a failure replays
    contiguous = contiguous or cols == 1  # random_tensor cannot stride some one-column shapes, e.g. (3, 1, 1)
    if cols == 1:
        # one column: the gradient in x is exactly 0 (g - mean(g) with x_hat = 0), so what is compared is rounding
        # noise times rstd = (var + eps)^(-1/2) with var = 0: on an H200 a one-ulp difference between g and mean(g)
        # gave 1.7e-5 at eps = 1e-5. eps >= 1 keeps that noise below 1e-7.
        eps = max(eps, 1.0)
    elif cols == 2:
        # with two columns, x_hat = +-(var / (var + eps))^(1/2)
        # and the gradient in x is eps / (var + eps) times the terms the backward subtracts, so fp32 keeps
        # 6e-8 (var + eps) / eps of it (1.4e-3 at var 1, eps 1e-5; PyTorch's fp32 2.4e-3), and at eps = 0 it is 0
        # against float64 rounding noise. eps ~ var keeps it well-conditioned.
        eps = max(eps, scale ** 2)
    inputs = ln_inputs(lead + (rows, cols), *dtypes, contiguous, *affine, scale=scale, offset=offset)

    def ours(x, w, b):
        return layer_norm(x, w, b, eps)

    def ref(x, w, b):
        return layer_norm_reference(x, w, b, eps)

    def peer(x, w, b):
        return torch_layer_norm(x, w, b, eps)

    with column_loop(block_n):
        check_op("layer_norm", ours, ref, peer, inputs, contiguous)
