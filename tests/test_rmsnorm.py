"""RMSNorm kernels against the float64 reference."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from tests.helpers.norms import BF16, F16, F32, LOOP_BLOCK, SHAPE, column_loop, torch_rms_norm
from tests.helpers.ops import check_op
from triformer.rmsnorm import RMSNorm, RMSNormFunction, rms_norm, rms_norm_reference
from triformer.testing import assert_close, kernel_device, random_tensor


def rms_inputs(shape, dtype, param_dtype, contiguous, weight=True, scale=1.0):
    x = random_tensor(shape, dtype, contiguous=contiguous, scale=scale)
    return [x, random_tensor(shape[-1:], param_dtype) if weight else None]


@pytest.mark.parametrize("block_n", [None, LOOP_BLOCK], ids=["one_tile", "column_loop"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("dtype,param_dtype", [(F32, F32), (F16, F16), (BF16, BF16), (BF16, F32)],
                         ids=["fp32", "fp16", "bf16", "bf16_fp32params"])
def test_rms_norm_matches_reference(dtype, param_dtype, contiguous, block_n):
    inputs = rms_inputs(SHAPE, dtype, param_dtype, contiguous)
    with column_loop(block_n):
        check_op("rms_norm", rms_norm, rms_norm_reference, torch_rms_norm, inputs, contiguous)


@pytest.mark.parametrize("block_n", [None, LOOP_BLOCK], ids=["one_tile", "column_loop"])
def test_rms_norm_without_weight(block_n):
    inputs = rms_inputs(SHAPE, F32, F32, contiguous=False, weight=False)
    with column_loop(block_n):
        check_op("rms_norm", rms_norm, rms_norm_reference, torch_rms_norm, inputs, contiguous=False)


@pytest.mark.parametrize("shape", [(300,), (2, 3, 5, 300)], ids=["1d", "4d"])
def test_rms_norm_input_ranks(shape):
    check_op("rms_norm", rms_norm, rms_norm_reference, torch_rms_norm, rms_inputs(shape, F32, F32, False), False)


@pytest.mark.parametrize("block_n", [None, 4096], ids=["default_blocks", "column_loop"])
def test_rms_norm_wide_rows(block_n):
    inputs = rms_inputs((3, 32773), BF16, F32, contiguous=False)
    with column_loop(block_n):
        check_op("rms_norm", rms_norm, rms_norm_reference, torch_rms_norm, inputs, contiguous=False)


def test_rms_norm_default_eps_follows_torch():
    # eps=None: machine epsilon of x's dtype, as torch.nn.functional.rms_norm; visible on tiny inputs.
    x, w = rms_inputs((9, 300), F16, F16, contiguous=True, scale=1e-3)

    def ours(x, w):
        return rms_norm(x, w, eps=None)

    def ref(x, w):
        return rms_norm_reference(x, w, eps=torch.finfo(F16).eps)

    def peer(x, w):
        return F.rms_norm(x, x.shape[-1:], w, eps=None)

    check_op("rms_norm", ours, ref, peer, [x, w])


def test_rms_norm_module_matches_torch_module():
    dev = kernel_device()
    ref = torch.nn.RMSNorm(300, eps=1e-6, device=dev)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(300))
    ours = RMSNorm([300], device=dev)
    assert ours.eps == 1e-6 and ours.normalized_shape == ref.normalized_shape
    ours.load_state_dict(ref.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = random_tensor((7, 300), F32)
    assert_close("RMSNorm module", ours(x), ref.double()(x.double()))
    assert RMSNorm(300, elementwise_affine=False).weight is None
    assert RMSNorm(300, dtype=torch.bfloat16).weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="normalized_shape"):
        RMSNorm((3, 300))
    with pytest.raises(ValueError, match="last dimension to be 300"):
        ours(torch.randn(2, 301, device=dev))


@pytest.mark.parametrize("make,error,match", [
    (lambda d: (torch.randn(4, 8, dtype=torch.float64, device=d),), TypeError, "x must be float32"),
    (lambda d: (torch.randn(4, 0, device=d),), ValueError, "non-empty last dimension"),
    (lambda d: (torch.randn(4, 8, device=d), torch.randn(4, 8, device=d)), ValueError,
     r"weight must have shape \(8,\)"),
    (lambda d: (torch.randn(4, 8, device=d), None, -1.0), ValueError, "eps must be finite and >= 0"),
    (lambda d: (torch.randn(4, 8, device=d), None, True), TypeError, "eps must be a float"),
])
def test_rms_norm_rejects_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        rms_norm(*make(kernel_device()))


def test_rms_norm_compiles_without_graph_break():
    x, w = rms_inputs((37, 300), BF16, F32, contiguous=False)
    seed = random_tensor((37, 300), BF16)

    def loss(x, w):
        return (rms_norm(x, w).float() * seed).sum()

    results = []
    for f in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        leaves = [t.detach().requires_grad_() for t in (x, w)]
        out = f(*leaves)
        results.append([out, *torch.autograd.grad(out, leaves)])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)
    assert type(rms_norm(x.requires_grad_()).grad_fn).__name__ == RMSNormFunction.__name__ + "Backward"


@given(
    lead=st.sampled_from([(), (3,)]),
    rows=st.integers(1, 70),
    cols=st.integers(1, 200),
    dtypes=st.sampled_from([(F32, F32), (F16, F16), (BF16, BF16), (BF16, F32), (F16, F32)]),
    contiguous=st.booleans(),
    weight=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    eps=st.sampled_from([1e-6, 1e-2, 0.0]),
    block_n=st.sampled_from([None, 16]),
)
@example(lead=(), rows=2, cols=1, dtypes=(F32, F32), contiguous=False, weight=False, scale=1e-3, eps=0.0, block_n=None)
@example(lead=(), rows=2, cols=1, dtypes=(F32, F32), contiguous=False, weight=False, scale=1.0, eps=0.0, block_n=None)
def test_rms_norm_property(lead, rows, cols, dtypes, contiguous, weight, scale, eps, block_n):
    contiguous = contiguous or cols == 1  # random_tensor cannot stride some one-column shapes, e.g. (3, 1, 1)
    if cols == 1:
        # one column: y = w x / (x^2 + eps)^(1/2), whose gradient in x is eps / (x^2 + eps) times the two terms the
        # backward subtracts, so fp32 keeps 6e-8 (x^2 + eps) / eps of it (3e-2 at x ~ 1, eps 1e-6), and at
        # eps = 0 it is 0 against float64 rounding noise (9e-13). eps ~ x^2 keeps it well-conditioned.
        eps = max(eps, scale ** 2)
    inputs = rms_inputs(lead + (rows, cols), *dtypes, contiguous, weight, scale=scale)

    def ours(x, w):
        return rms_norm(x, w, eps)

    def ref(x, w):
        return rms_norm_reference(x, w, eps)

    def peer(x, w):
        return torch_rms_norm(x, w, eps)

    with column_loop(block_n):
        check_op("rms_norm", ours, ref, peer, inputs, contiguous)
