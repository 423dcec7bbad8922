"""Softmax (scaled, causal) against its float64 reference: values, gradients, masking, -inf rows, bad input."""
import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers.ops import NoLaunch
from triformer import INTERPRET, Softmax, TritonSoftmax, softmax, softmax_reference
from triformer import testing
from triformer.testing import assert_close, kernel_device, poison_, random_tensor

# The module, not the function triformer.softmax that shadows it as a package attribute.
sm = importlib.import_module("triformer.softmax")
DEV = kernel_device()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Column counts for each kernel path: one tile per row, and two sweeps in the backward only / in both.
SHORT = 777
LONG_BWD = sm.MAX_SINGLE_BLOCK_BWD + 301
LONG = sm.MAX_SINGLE_BLOCK + 301


def visible_mask(tq: int, tk: int) -> torch.Tensor:
    """Bottom-right-aligned causal mask, written out independently of the code under test."""
    i = torch.arange(tq).view(-1, 1)
    j = torch.arange(tk).view(1, -1)
    return (j <= i + (tk - tq)).to(DEV)


def run_and_check(x, is_causal=False, scale=1.0, dy=None):
    """Forward and backward of ours against the float64 reference, with PyTorch's own result in x's dtype as
    the low-precision bar. Returns (y, dx) of ours."""
    dy = random_tensor(x.shape, x.dtype) if dy is None else dy
    ours = x.detach().clone() if x.is_contiguous() else x.detach()
    ours.requires_grad_()
    y = softmax(ours, is_causal, scale)
    y.backward(dy)

    x64 = x.detach().to(torch.float64).requires_grad_()
    y64 = softmax_reference(x64, is_causal, scale)
    y64.backward(dy.to(torch.float64))
    peer = softmax_reference(x.detach(), is_causal, scale)
    # PyTorch's backward from *our* y: both then start from the same rounded probabilities, so the bar does
    # not depend on which of the two forwards happened to round luckier on a tiny row.
    peer_dx = scale * torch._softmax_backward_data(dy, y.detach(), -1, x.dtype)

    assert y.shape == x.shape and y.dtype == x.dtype and ours.grad.dtype == x.dtype
    assert_close("y", y, y64, peer)
    # dx = y * (dy - sum(dy * y)) cancels catastrophically on near one-hot rows whatever the order of
    # operations (y rounds to 1); where PyTorch's own fp32 misses 1e-5 there, it sets the fp32 bar too.
    rtol = None
    if x.dtype == torch.float32:
        rtol = max(testing.FP32_RTOL, testing.LOW_PRECISION_SLACK * testing.rel_error(peer_dx, x64.grad))
    assert_close("dx", ours.grad, x64.grad, peer_dx, rtol=rtol)
    return y, ours.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shape", [(5, 3, SHORT), (2, 3, LONG_BWD), (1, 2, LONG)], ids=["short", "long_bwd", "long"])
def test_matches_reference(dtype, is_causal, shape):
    x = random_tensor(shape, dtype, scale=2.0)
    y, dx = run_and_check(x, is_causal, scale=0.37)
    if is_causal:
        hidden = ~visible_mask(shape[-2], shape[-1])
        assert (y[..., hidden] == 0).all() and (dx[..., hidden] == 0).all()


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("cols", [SHORT, LONG], ids=["short", "long"])
def test_non_contiguous_input_and_grad(is_causal, cols):
    x = random_tensor((3, 5, cols), torch.float32, contiguous=False)
    dy = random_tensor((3, 5, cols), torch.float32, contiguous=False)
    run_and_check(x, is_causal, scale=1.7, dy=dy)


def test_four_dim_permuted_input():
    x = random_tensor((2, 3, 9, 41), torch.float32, contiguous=False)  # leading dims cannot merge: copied
    run_and_check(x, True, scale=0.125)


def test_broadcast_grad_with_zero_strides():
    x = random_tensor((6, 4, 53), torch.float32)
    dy = random_tensor((53,), torch.float32).expand(6, 4, 53)  # strides (0, 0, 1)
    run_and_check(x, True, dy=dy)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("cols", [SHORT, LONG_BWD, LONG], ids=["short", "long_bwd", "long"])
def test_launchers_fill_poisoned_strided_outputs(is_causal, cols):
    """Every element of the (non-contiguous) output buffers is written, masked ones with exact zeros."""
    x = random_tensor((2, 7, cols), torch.float32)
    dy = random_tensor((2, 7, cols), torch.float32)
    y = poison_(torch.empty(2, 7, 2 * cols, device=DEV))[..., ::2]
    sm._launch_fwd(x, y, is_causal, 0.5)
    dx = poison_(torch.empty(2, 7, 2 * cols, device=DEV))[..., ::2]
    sm._launch_bwd(y, dy, dx, is_causal, 0.5)
    x64 = x.to(torch.float64).requires_grad_()
    y64 = softmax_reference(x64, is_causal, 0.5)
    y64.backward(dy.to(torch.float64))
    assert_close("y", y, y64)
    assert_close("dx", dx, x64.grad)


@pytest.mark.parametrize("tq, tk", [
    (9, 5), (5, 9), (4, LONG),
    # fully masked rows on the two-sweep path need tq > tk > MAX_SINGLE_BLOCK: a GB-sized case on a GPU
    pytest.param(LONG + 2, LONG, marks=[] if INTERPRET else [pytest.mark.slow]),
], ids=["tq>tk", "tq<tk", "tq<tk_long", "tq>tk_long"])
def test_causal_alignment_and_fully_masked_rows(tq, tk):
    """Row i sees keys j <= i + tk - tq; with tk < tq the first rows see nothing and output exact zeros."""
    x = random_tensor((1 if tq > 9 else 2, tq, tk), torch.float32)
    y, dx = run_and_check(x, True)
    visible = visible_mask(tq, tk)
    assert torch.equal(y != 0, visible.expand_as(y))  # visible entries of a softmax are > 0
    empty_rows = ~visible.any(-1)
    assert empty_rows.sum() == max(tq - tk, 0)
    assert (y[:, empty_rows] == 0).all() and (dx[:, empty_rows] == 0).all()
    assert torch.allclose(y[:, ~empty_rows].sum(-1), torch.ones((), device=DEV))


@pytest.mark.parametrize("cols", [SHORT, LONG], ids=["short", "long"])
def test_all_minus_inf_rows_give_zeros_not_nan(cols):
    x = random_tensor((6, cols), torch.float32)
    x[1] = float("-inf")
    x[4, ::3] = float("-inf")
    y, dx = run_and_check(x)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert (y[1] == 0).all() and (dx[1] == 0).all()
    assert (y[4, ::3] == 0).all() and (dx[4, ::3] == 0).all()
    # causal on top: the row of -inf must not resurrect the masked part either
    run_and_check(x.view(2, 3, cols), True)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nan_and_plus_inf_rows_propagate_like_torch():
    x = random_tensor((4, 19), torch.float32)
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    y = softmax(x)
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
    torch.testing.assert_close(y[[0, 3]], torch.softmax(x[[0, 3]], -1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_large_scores_keep_precision(scale):
    """Scores of magnitude ~1e4: the max is subtracted before scaling, so fp32 keeps its 1e-5 bar."""
    run_and_check(random_tensor((5, 333), torch.float32, scale=1e4), scale=scale)


def test_one_dim_and_empty_inputs():
    run_and_check(random_tensor((1001,), torch.float32))
    for shape in [(0, 5), (3, 0), (2, 0, 4)]:
        x = torch.randn(shape, device=DEV, requires_grad=True)
        y = softmax(x, is_causal=True)
        y.sum().backward()
        assert y.shape == shape and x.grad.shape == shape


def test_module_and_seed_name():
    assert TritonSoftmax is Softmax
    x = random_tensor((3, 11, 11), torch.float32)
    m = TritonSoftmax(is_causal=True)
    assert torch.equal(m(x), softmax(x, True))
    m = Softmax(is_causal=True, scale=0.25)
    assert torch.equal(m(x), softmax(x, True, 0.25))
    assert "is_causal=True" in repr(m) and "scale=0.25" in repr(m)
    with pytest.raises(ValueError, match="scale"):
        Softmax(scale=-1.0)


def test_torch_compile_fullgraph_matches_eager():
    def f(x, w):
        return (softmax(x * w, True, 0.5) * w).sum()

    x = random_tensor((3, 5, 37), torch.float32).requires_grad_()
    w = random_tensor((37,), torch.float32)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out_c = compiled(x, w)
    (g_c,) = torch.autograd.grad(out_c, x)
    out_e = f(x, w)
    (g_e,) = torch.autograd.grad(out_e, x)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    torch.testing.assert_close(g_c, g_e, rtol=0, atol=0)


@pytest.mark.parametrize("make_args, error, words", [
    (lambda x: (x.to(torch.int32),), TypeError, "x must be float32"),
    (lambda x: (x.double(),), TypeError, "x must be float32"),
    (lambda x: ("scores",), TypeError, "x must be a torch.Tensor"),
    (lambda x: (x[0, 0], True), ValueError, "x must have at least 2"),
    (lambda x: (x.sum(),), ValueError, "x must have at least 1"),
    (lambda x: (x, 1), TypeError, "is_causal must be a bool"),
    (lambda x: (x, False, 0.0), ValueError, "scale must be a finite number > 0"),
    (lambda x: (x, False, float("nan")), ValueError, "scale must be a finite number > 0"),
    (lambda x: (x, False, float("inf")), ValueError, "scale must be a finite number > 0"),
    (lambda x: (x, False, True), TypeError, "scale must be a real number"),
    (lambda x: (x, False, "1"), TypeError, "scale must be a real number"),
], ids=["int", "float64", "str", "causal_1d", "0d", "causal_int", "scale0", "scale_nan", "scale_inf",
        "scale_bool", "scale_str"])
def test_bad_input_raises_before_launch(monkeypatch, make_args, error, words):
    monkeypatch.setattr(sm, "_softmax_fwd_kernel", NoLaunch())
    x = random_tensor((2, 3, 4), torch.float32)
    with pytest.raises(error, match=words):
        softmax(*make_args(x))


@given(
    batch=st.integers(1, 3),
    tq=st.integers(1, 9),
    tk=st.integers(1, sm.MAX_SINGLE_BLOCK + 300),
    dtype=st.sampled_from(DTYPES),
    contiguous=st.booleans(),
    is_causal=st.booleans(),
    scale=st.sampled_from([0.05, 0.125, 1.0, 4.0]),
    magnitude=st.sampled_from([1e-3, 1.0, 20.0, 400.0]),
    extremes=st.sampled_from(["none", "minus_inf", "empty_rows", "huge"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes_strides_dtypes_extremes(batch, tq, tk, dtype, contiguous, is_causal, scale,
                                                         magnitude, extremes, seed):
    g = torch.Generator().manual_seed(seed)
    x = random_tensor((batch, tq, tk), dtype, contiguous=contiguous or tk == 1,  # one column: contiguous anyway
                      scale=magnitude, generator=g)
    if extremes == "minus_inf":
        x[torch.rand(x.shape, generator=g).to(DEV) < 0.3] = float("-inf")
    elif extremes == "empty_rows":
        x[:, torch.rand(tq, generator=g).to(DEV) < 0.5] = float("-inf")
    elif extremes == "huge" and dtype != torch.float16:  # fp16 cannot hold 1e30
        x[torch.rand(x.shape, generator=g).to(DEV) < 0.01] = 1e30
        x[torch.rand(x.shape, generator=g).to(DEV) < 0.01] = -1e30
    dy = random_tensor((batch, tq, tk), dtype, contiguous=contiguous or tk == 1, generator=g)
    y, dx = run_and_check(x, is_causal, scale, dy=dy)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
