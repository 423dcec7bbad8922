import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import triformer
from triformer.cross_entropy import (CrossEntropyLoss, TritonCrossEntropyLoss, cross_entropy,
                                     cross_entropy_reference, launch_cross_entropy, loss_total, mean_scale,
                                     scale_rows_)
from triformer.testing import (LOW_PRECISION_FLOOR, assert_close, kernel_device, poison_, poisoned_empty,
                               random_tensor)

DEV = kernel_device()
ce_module = sys.modules["triformer.cross_entropy"]  # the package attribute of that name is the function
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 111 rows over 1531 classes: more than one row tile and more than one column block on the interpreter
# (64 x 1024 tiles) and on the GPU (1 x 1024 or more).
SHAPE = (3, 37, 1531)


def make_targets(shape, n_cols, ignore_index=-100, ignore_frac=0.2, generator=None):
    t = torch.randint(0, n_cols, shape, generator=generator)
    t[torch.rand(shape, generator=generator) < ignore_frac] = ignore_index
    return t.to(DEV)


def torch_peer(logits, targets, ignore_index, reduction, label_smoothing):
    """PyTorch's own cross-entropy in the logits' dtype (class dim last)."""
    n_cols = logits.shape[-1]
    loss = F.cross_entropy(logits.reshape(-1, n_cols), targets.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)
    return loss.view(targets.shape) if reduction == "none" else loss


def upstream(loss, generator=None):
    return (torch.rand(loss.shape, dtype=torch.float32, generator=generator) + 0.5).to(loss.dtype).to(loss.device)


def check_against_reference(logits, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                            n_chunks=1, check_peer=True, generator=None):
    """Loss and gradient of ``cross_entropy`` vs float64 reference (and PyTorch's own in low precision).
    ``generator`` draws the upstream gradient (reproducible property-test examples)."""
    x = logits.detach().clone().requires_grad_()
    loss = cross_entropy(x, targets, ignore_index, reduction, label_smoothing, n_chunks)
    x64 = logits.detach().double().requires_grad_()
    ref = cross_entropy_reference(x64, targets, ignore_index, reduction, label_smoothing)
    assert loss.dtype == logits.dtype and loss.shape == ref.shape
    g = upstream(loss, generator)
    loss.backward(g)
    ref.backward(g.double())
    peer_loss = peer_grad = None
    if check_peer and logits.dtype != torch.float32:
        xp = logits.detach().clone().requires_grad_()
        peer_loss = torch_peer(xp, targets, ignore_index, reduction, label_smoothing)
        peer_loss.backward(g)
        peer_grad = xp.grad
    assert_close("loss", loss, ref, peer_loss)
    assert_close("grad logits", x.grad, x64.grad, peer_grad)
    return loss, x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_matches_reference(dtype, reduction, contiguous):
    logits = random_tensor(SHAPE, dtype, contiguous=contiguous, scale=3.0)
    targets = make_targets(SHAPE[:-1], SHAPE[-1])
    check_against_reference(logits, targets, reduction=reduction, label_smoothing=0.1 if contiguous else 0.0)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.25, 1.0])
def test_reference_is_torch_semantics(label_smoothing):
    """The reference agrees with torch.nn.functional.cross_entropy wherever that is defined."""
    logits = torch.randn(53, 211, dtype=torch.float64)
    targets = torch.randint(0, 211, (53,))
    targets[::7] = 3
    for reduction in ("mean", "sum", "none"):
        ours = cross_entropy_reference(logits, targets, 3, reduction, label_smoothing)
        theirs = F.cross_entropy(logits, targets, ignore_index=3, reduction=reduction, label_smoothing=label_smoothing)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_ignore_index_and_all_ignored():
    logits = random_tensor((41, 1100), torch.float32)
    targets = make_targets((41,), 1100, ignore_index=7, ignore_frac=0.5)
    loss, grad = check_against_reference(logits, targets, ignore_index=7)
    ignored = targets == 7
    assert ignored.any() and torch.all(grad[ignored] == 0)
    # every target ignored: "mean" is 0 (not NaN) with a zero gradient, "none" is all zeros
    all_ignored = torch.full((41,), 7, device=DEV)
    for reduction in ("mean", "sum", "none"):
        x = logits.clone().requires_grad_()
        loss = cross_entropy(x, all_ignored, ignore_index=7, reduction=reduction)
        loss.sum().backward()
        assert torch.all(loss == 0) and torch.all(x.grad == 0)


def test_row_longer_than_many_blocks():
    """A 256k+ vocabulary streams through hundreds of column blocks (online log-sum-exp)."""
    n_cols = (1 << 18) + 3
    logits = random_tensor((3, n_cols), torch.float32, scale=4.0)
    logits[1, 5] = 40.0  # a dominant logit late in the rescaling sequence
    targets = torch.tensor([n_cols - 1, 5, 0], device=DEV)
    check_against_reference(logits, targets, label_smoothing=0.05)


def test_extreme_logits():
    logits = random_tensor((70, 1100), torch.float32, scale=1e4)
    logits[3, :600] = float("-inf")  # a whole first column block of -inf, finite values later
    targets = make_targets((70,), 1100, ignore_frac=0.0)
    targets[3] = 900
    check_against_reference(logits, targets)


@pytest.mark.parametrize("scale", [1e-3, 1e-2])
def test_label_smoothing_on_near_uniform_rows(scale):
    """Small logits make every p_j close to 1/V, so the smoothing gradient eps (p_j - 1/V) is ~scale times the
    terms it is the difference of: formed as that difference in fp32 it lost log10(1/scale) digits (grad error
    2.4e-4 at scale 1e-3, 2.1e-5 at 1e-2; found by the long fuzz profile at V = 3). 37 rows over two column
    blocks: the sums behind log(s / V) are also rescaled across tiles."""
    logits = random_tensor((37, 2000), torch.float32, scale=scale)
    check_against_reference(logits, make_targets((37,), 2000, ignore_frac=0.0), label_smoothing=1.0)


@pytest.mark.parametrize("grad_output", [0.77, 1.23])
def test_bf16_gradient_rounded_twice_stays_within_the_floor(grad_output):
    """The bf16 gradient is rounded when the forward stores it and again when backward scales it by a
    grad_output that is not a power of two: (1 + 2**-8)**2 - 1 = 7.8e-3 relative at most, within the bf16 floor,
    if both roundings are to nearest, as on the GPU. The interpreter truncated (9.2e-3 here, found by the long
    profile; 8.7e-4 now) until triformer._runtime made it round to nearest even."""
    logits = random_tensor((25, 1063), torch.bfloat16, scale=30.0)
    targets = make_targets((25,), 1063, ignore_frac=0.0)
    x = logits.clone().requires_grad_()
    cross_entropy(x, targets).backward(torch.tensor(grad_output, dtype=torch.bfloat16, device=DEV))
    x64 = logits.double().requires_grad_()
    cross_entropy_reference(x64, targets).backward(torch.tensor(grad_output, dtype=torch.bfloat16).double().to(DEV))
    assert_close("grad logits", x.grad, x64.grad, rtol=LOW_PRECISION_FLOOR[torch.bfloat16])


def test_n_chunks_only_splits_launches():
    logits = random_tensor((23, 1031), torch.float32)
    targets = make_targets((23,), 1031)
    results = []
    for n_chunks in (1, 4, 40):  # uneven chunks, and more chunks than rows
        x = logits.clone().requires_grad_()
        loss = cross_entropy(x, targets, n_chunks=n_chunks)
        loss.backward()
        results.append((loss, x.grad))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def force_plan(monkeypatch, n_splits, max_block_v=256):
    """Launch every row set with ``n_splits`` column ranges (0: the fused kernel) and tiles of at most
    ``max_block_v`` columns, whatever the device's own choice; the kernels run for real."""
    chosen = ce_module._plan

    def plan(n_rows, n_cols, dtype, device, unmasked):
        p = chosen(n_rows, n_cols, dtype, device, unmasked)
        return dataclasses.replace(p, block_v=min(p.block_v, max_block_v), programs=p.programs or 4,
                                   n_splits=n_splits)
    monkeypatch.setattr(ce_module, "_plan", plan)


@pytest.mark.parametrize("n_splits", [0, 1, 4, 40])  # fused; split into 1, 4 and more ranges than tiles (6)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launch_shapes_match_reference(monkeypatch, n_splits, label_smoothing, dtype):
    """Both launch shapes on every device: the fused kernel and the split pair, whose range statistics (max,
    exp-sum, and for smoothing the logit sum and expm1 sum) are merged per row."""
    force_plan(monkeypatch, n_splits)
    logits = random_tensor(SHAPE, dtype, contiguous=False)
    check_against_reference(logits, make_targets(SHAPE[:-1], SHAPE[-1]), reduction="none",
                            label_smoothing=label_smoothing)


@pytest.mark.parametrize("n_splits", [0, 4])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmasked_whole_tiles_match_reference(monkeypatch, n_splits, label_smoothing, dtype):
    """Logits laid out like the LM head's (rows padded to a multiple of 64, viewed at V = 1531, not a multiple of
    16): whole tiles load without a column mask and only each range's last tile is masked."""
    force_plan(monkeypatch, n_splits)
    n_cols = SHAPE[-1]
    padded = random_tensor(SHAPE[:-1] + (1536,), dtype).requires_grad_()
    logits = padded[..., :n_cols]
    assert ce_module._unmasked_tiles(ce_module.rows_view(logits, "logits", copy_ok=False))
    assert not ce_module._unmasked_tiles(ce_module.rows_view(logits.contiguous(), "logits", copy_ok=False))
    targets = make_targets(SHAPE[:-1], n_cols)
    loss = cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
    x64 = logits.detach().double().requires_grad_()
    ref = cross_entropy_reference(x64, targets, reduction="none", label_smoothing=label_smoothing)
    g = upstream(loss)
    loss.backward(g)
    ref.backward(g.double())
    assert_close("loss", loss, ref, torch_peer(logits.detach(), targets, -100, "none", label_smoothing))
    assert_close("grad logits", padded.grad[..., :n_cols], x64.grad)
    assert torch.all(padded.grad[..., n_cols:] == 0)


@pytest.mark.parametrize("n", [0, 1, 8192, 20001])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32])
def test_loss_reductions_match_torch(n, target_dtype):
    """The mean's 1 / count and the summed loss (one-program kernels looping over 8K-row tiles): any length, int32
    or int64 targets, strided targets; all ignored gives 1 / 1 (loss 0, not NaN)."""
    gen = torch.Generator().manual_seed(n)
    targets = torch.randint(0, 7, (2 * n,), generator=gen).to(target_dtype)
    targets[torch.rand(2 * n, generator=gen) < 0.3] = -100
    strided = targets.to(DEV)[::2]
    count = int((strided != -100).sum())
    assert mean_scale(strided, -100).item() == pytest.approx(1.0 / max(count, 1), rel=1e-7)
    assert mean_scale(torch.full((n,), -100, dtype=target_dtype, device=DEV), -100).item() == 1.0
    rows = torch.rand(n, generator=gen, dtype=torch.float64)
    scale = torch.tensor([0.37], device=DEV)
    for dtype in (torch.float32, torch.bfloat16):
        for s in (None, scale):
            got = loss_total(rows.float().to(DEV), s, dtype)
            expected = rows.sum() * (0.37 if s is not None else 1.0)
            assert got.dtype == dtype and got.dim() == 0
            tol = 1e-5 if dtype == torch.float32 else 8e-3
            assert float(got) == pytest.approx(float(expected), rel=tol, abs=1e-6)


@pytest.mark.parametrize("n_splits", [0, 3])
@pytest.mark.parametrize("inplace", [False, True])
def test_kernel_writes_every_output_element(monkeypatch, inplace, n_splits):
    """Poisoned loss and gradient buffers (NaN): every element must be overwritten, ignored rows included."""
    force_plan(monkeypatch, n_splits)
    logits = random_tensor((1, 70, 1100), torch.float32)
    targets = make_targets((1, 70), 1100, ignore_frac=0.3)
    x64 = logits.double().requires_grad_()
    ref = cross_entropy_reference(x64, targets, reduction="mean")
    ref.backward()
    loss_rows = poison_(torch.empty(70, device=DEV))
    src = logits.clone()
    grad = src if inplace else poison_(torch.empty_like(logits))
    scale = mean_scale(targets, -100)
    launch_cross_entropy(src, targets.view(-1), loss_rows, grad, scale, -100, 0.0, 0.0, n_chunks=2)
    assert_close("grad", grad[0], x64.grad[0])
    assert_close("loss", loss_rows.sum() * scale[0], ref)
    if not inplace:
        assert torch.equal(src, logits)


def test_backward_scale_skips_factors_of_one():
    """The backward kernel multiplies each row by its factor and never touches rows whose factor is exactly 1:
    NaN-poisoned rows with factor 1 stay NaN, and a factor of 1 for all rows leaves every bit as it was."""
    grad = random_tensor((2, 35, 1100), torch.bfloat16, contiguous=False)
    factors = (torch.rand(2, 35) + 0.5).to(DEV)
    factors[0, ::3] = 1.0
    grad[0, ::3] = float("nan")
    before = grad.clone()
    scale_rows_(grad, factors)
    assert torch.equal(grad[0, ::3].isnan(), before[0, ::3].isnan())
    keep = factors != 1.0
    expected = before.double() * factors.unsqueeze(-1)
    assert_close("scaled rows", grad[keep], expected[keep], expected[keep].to(torch.bfloat16))
    after = grad.clone()
    scale_rows_(grad, torch.ones((), device=DEV))  # one factor of 1 for all rows: nothing changes
    assert torch.equal(grad.view(torch.int16), after.view(torch.int16))
    scale_rows_(grad, torch.tensor(-2.0, device=DEV))
    assert torch.equal(grad[keep], after[keep] * -2)


def test_inplace_backward_reuses_logits_buffer():
    hidden = random_tensor((2, 37, 48), torch.float32)
    weight = random_tensor((48, 1100), torch.float32, scale=0.5).requires_grad_()
    targets = make_targets((2, 37), 1100)
    grads = []
    for inplace in (False, True):
        logits = hidden @ weight
        keep = logits.detach().clone()
        loss = cross_entropy(logits, targets, label_smoothing=0.1, inplace_backward=inplace)
        assert torch.equal(logits.detach(), keep) != inplace  # destroyed exactly when asked
        loss.backward(torch.tensor(0.5, device=DEV))
        grads.append(weight.grad.clone())
        weight.grad = None
        if inplace:  # the logits buffer now holds d(loss)/d(logits), upstream gradient included
            x64 = keep.double().requires_grad_()
            (0.5 * cross_entropy_reference(x64, targets, label_smoothing=0.1)).backward()
            assert_close("logits buffer", logits.detach(), x64.grad)
    assert_close("grad weight", grads[1], grads[0].double())


def test_inplace_backward_refusals_leave_logits_intact():
    leaf = random_tensor((5, 300), torch.float32).requires_grad_()
    targets = make_targets((5,), 300)
    cases = {
        "leaf": lambda: leaf,
        "view of a leaf": lambda: leaf[1:],
        "expanded": lambda: (leaf[:1] * 2).expand(5, 300),
        # rows 100 apart but 300 long: each row's gradient would overwrite the next rows' logits (was accepted,
        # gradient off by 0.5)
        "rows overlap": lambda: (leaf * 2).as_strided((5, 300), (100, 1)),
        "columns interleave with rows": lambda: (leaf * 2).as_strided((5, 150), (1, 2)),
        "3-D, inner rows overlap": lambda: (leaf * 2).as_strided((2, 3, 200), (600, 150, 1)),
    }
    for name, make in cases.items():
        logits = make()
        before = logits.detach().clone()
        with pytest.raises(ValueError, match="inplace_backward.*(leaf|share memory)"):
            cross_entropy(logits, targets[: logits.shape[-2]].expand(logits.shape[:-1]), inplace_backward=True)
        assert torch.equal(logits.detach(), before), name


@given(shape=st.lists(st.integers(0, 4), min_size=1, max_size=4), data=st.data())
def test_elements_apart_is_never_wrong(shape, data):
    """The in-place check's layout rule against brute force: whenever it says no two elements share memory,
    every element's offset is distinct; and it accepts the layouts the kernel meets (dense, permuted, sliced)."""
    strides = data.draw(st.lists(st.integers(0, 30), min_size=len(shape), max_size=len(shape)))
    t = torch.empty(4 * 4 * 30 + 1).as_strided(shape, strides)  # room for the largest offset
    grid = torch.meshgrid(*(torch.arange(n) for n in shape), indexing="ij")
    offsets = sum(g * st_ for g, st_ in zip(grid, strides)).flatten()
    if ce_module._elements_apart(t):
        assert offsets.unique().numel() == offsets.numel(), (shape, strides)
    dense = torch.empty([n + 1 for n in shape])
    perm = data.draw(st.permutations(range(len(shape))))
    assert ce_module._elements_apart(dense[tuple(slice(0, n) for n in shape)].permute(*perm))


def test_inplace_backward_without_recorded_gradient_writes_nothing():
    """No gradient recorded (no_grad, or logits not requiring grad): the flag has nothing to write."""
    leaf = random_tensor((5, 300), torch.float32).requires_grad_()
    targets = make_targets((5,), 300)
    for logits, grad_mode in ((leaf * 2, False), (leaf, False), (leaf.detach() * 2, True)):
        before = logits.detach().clone()
        with torch.set_grad_enabled(grad_mode):
            loss = cross_entropy(logits, targets, inplace_backward=True)
        assert torch.equal(logits.detach(), before) and not loss.requires_grad
        assert torch.equal(loss, cross_entropy(before, targets))


def test_inplace_backward_detects_saved_logits():
    """An earlier op that saved the logits for its backward is caught by autograd's version counter."""
    pre = random_tensor((5, 300), torch.float32).requires_grad_()
    logits = pre.exp()  # exp saves its output
    loss = cross_entropy(logits, make_targets((5,), 300), inplace_backward=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


@pytest.mark.parametrize("inplace", [False, True])
def test_second_backward_raises(inplace):
    x = random_tensor((5, 300), torch.float32).requires_grad_()
    loss = cross_entropy(x * 1.0, make_targets((5,), 300), inplace_backward=inplace)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_no_grad_computes_loss_only():
    logits = random_tensor((2, 21, 700), torch.float16).requires_grad_()
    targets = make_targets((2, 21), 700)
    with torch.no_grad():
        loss = cross_entropy(logits, targets, reduction="none")
    assert not loss.requires_grad
    ref = cross_entropy_reference(logits.detach().double(), targets, reduction="none")
    assert_close("loss", loss, ref, torch_peer(logits.detach(), targets, -100, "none", 0.0))


@pytest.mark.skipif(not triformer.INTERPRET, reason="on CUDA a bad target is a device-side assert (async)")
def test_targets_out_of_range_raise():
    logits = random_tensor((4, 50), torch.float32)
    for bad in (50, -1, 10**6):
        targets = torch.tensor([1, bad, 2, -100])
        with pytest.raises(ValueError, match=r"targets must be in \[0, 50\)"):
            cross_entropy(logits, targets)
    with pytest.raises(ValueError, match="targets"):
        cross_entropy_reference(logits, torch.tensor([1, 50, 2, 3]))


def test_bad_arguments():
    logits = random_tensor((4, 50), torch.float32)
    targets = make_targets((4,), 50)
    with pytest.raises(TypeError, match="logits"):
        cross_entropy(logits.double(), targets)
    with pytest.raises(TypeError, match="targets"):
        cross_entropy(logits, targets.float())
    with pytest.raises(ValueError, match="targets must have shape"):
        cross_entropy(logits, targets[:3])
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, targets, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, targets, label_smoothing=1.5)
    with pytest.raises(TypeError, match="ignore_index"):
        cross_entropy(logits, targets, ignore_index=1.0)
    with pytest.raises(ValueError, match="n_chunks"):
        cross_entropy(logits, targets, n_chunks=0)
    with pytest.raises(ValueError, match="logits must have shape"):
        cross_entropy(logits[:, :0], targets)
    with pytest.raises(ValueError, match="reduction"):
        CrossEntropyLoss(reduction="avg")


def test_modules():
    logits = random_tensor((2, 37, 1100), torch.bfloat16).requires_grad_()
    targets = make_targets((2, 37), 1100, ignore_index=0)
    loss = TritonCrossEntropyLoss(pad_token_id=0)(logits, targets)  # the seed's call: leaf logits, .grad filled
    loss.backward()
    x64 = logits.detach().double().requires_grad_()
    ref = cross_entropy_reference(x64, targets, ignore_index=0)
    ref.backward()
    xp = logits.detach().clone().requires_grad_()
    peer = torch_peer(xp, targets, 0, "mean", 0.0)
    peer.backward()
    assert_close("loss", loss, ref, peer)
    assert_close("grad", logits.grad, x64.grad, xp.grad)
    with pytest.raises(ValueError, match="leaf"):
        TritonCrossEntropyLoss(pad_token_id=0, inplace_backward=True)(logits, targets)
    module = CrossEntropyLoss(ignore_index=0, reduction="sum", label_smoothing=0.2, n_chunks=2)
    assert "label_smoothing=0.2" in repr(module)
    assert torch.equal(module(logits.detach(), targets), cross_entropy(logits.detach(), targets, 0, "sum", 0.2))


def eager_and_compiled(f, hidden, weight, targets):
    """[(loss, weight's gradient)] of ``f(hidden, weight, targets)`` run eagerly, then compiled (aot_eager,
    fullgraph)."""
    results = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        loss = fn(hidden, weight, targets)
        loss.backward()
        results.append((loss.detach(), weight.grad))
        weight.grad = None
    return results


@pytest.mark.parametrize("inplace", [False, True])
def test_torch_compile_fullgraph(inplace):
    hidden = random_tensor((2, 37, 32), torch.float32)
    weight = random_tensor((32, 1100), torch.float32).requires_grad_()
    targets = make_targets((2, 37), 1100)

    def f(h, w, t):
        return cross_entropy(h @ w, t, label_smoothing=0.1, inplace_backward=inplace) * 3.0

    results = eager_and_compiled(f, hidden, weight, targets)
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


@given(
    rows=st.integers(1, 70), n_cols=st.integers(1, 2200), dtype=st.sampled_from(DTYPES),
    contiguous=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 30.0, 1e3]),
    offset=st.sampled_from([0.0, -5e3, 6e4]), reduction=st.sampled_from(["mean", "sum", "none"]),
    label_smoothing=st.sampled_from([0.0, 0.1, 1.0]), ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
# found by the long profile: a near-uniform row (see test_label_smoothing_on_near_uniform_rows)
@example(rows=1, n_cols=3, dtype=torch.float32, contiguous=False, scale=1e-3, offset=0.0, reduction="mean",
         label_smoothing=1.0, ignore_frac=0.0, seed=0)
def test_property(rows, n_cols, dtype, contiguous, scale, offset, reduction, label_smoothing, ignore_frac, seed):
    """Random shapes, strides, dtypes and extreme magnitudes/offsets against the float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.float16:
        offset = max(min(offset, 3e4), -3e4)  # stay representable
    contiguous = contiguous or n_cols == 1  # a [rows, 1] strided view is still contiguous
    logits = (random_tensor((rows, n_cols), torch.float32, contiguous=contiguous, scale=scale, generator=gen)
              + offset).to(dtype)
    targets = make_targets((rows,), n_cols, ignore_frac=ignore_frac, generator=gen)
    # PyTorch's own low-precision result sets the bar, except where 'mean' divides 0 by 0 (all ignored)
    check_against_reference(logits, targets, reduction=reduction, label_smoothing=label_smoothing,
                            check_peer=not (ignore_frac == 1.0 and reduction == "mean"), generator=gen)


@given(
    rows=st.integers(1, 40), n_cols=st.integers(1, 2200), dtype=st.sampled_from(DTYPES),
    n_splits=st.integers(0, 9), max_block_v=st.sampled_from([64, 256, 1024]), padded=st.booleans(),
    inplace=st.booleans(), label_smoothing=st.sampled_from([0.0, 0.2]), scale=st.sampled_from([1e-3, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_launch_plans(rows, n_cols, dtype, n_splits, max_block_v, padded, inplace, label_smoothing, scale,
                               seed):
    """Either launch shape (fused, or split into 1-9 column ranges), any tile width, rows padded to a multiple
    of 64 (the LM head's layout, which takes the unmasked tile loop when V is not a multiple of 16) or not, the
    gradient in place or in its own buffer: loss and gradient against float64. Small logits (near-uniform
    rows) make label smoothing's gradient depend on the merged expm1 sums."""
    gen = torch.Generator().manual_seed(seed)
    width = -(-n_cols // 64) * 64 if padded else n_cols
    base = random_tensor((rows, width), torch.float32, scale=scale, generator=gen).to(dtype).requires_grad_()
    logits = (base * 1.0)[:, :n_cols]  # an intermediate (in place needs one), a view of padded rows
    targets = make_targets((rows,), n_cols, generator=gen)
    with pytest.MonkeyPatch.context() as mp:
        force_plan(mp, n_splits, max_block_v)
        loss = cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing,
                             inplace_backward=inplace)
    x64 = base.detach()[:, :n_cols].double().requires_grad_()
    ref = cross_entropy_reference(x64, targets, reduction="none", label_smoothing=label_smoothing)
    g = upstream(loss, gen)
    loss.backward(g)
    ref.backward(g.double())
    peer = torch_peer(base.detach()[:, :n_cols], targets, -100, "none", label_smoothing)
    assert_close("loss", loss, ref, peer)
    xp = base.detach()[:, :n_cols].clone().requires_grad_()
    torch_peer(xp, targets, -100, "none", label_smoothing).backward(g)
    assert_close("grad logits", base.grad[:, :n_cols], x64.grad, xp.grad)


@pytest.mark.skipif(triformer.INTERPRET, reason="GPU memory accounting")
def test_gpu_inplace_peak_memory():
    """inplace_backward=True allocates no [N, V] gradient buffer: the whole backward, including the weight
    gradient's matmul (whose cuBLAS workspace measured on the H100 exceeded a few MiB), stays far below one."""
    hidden = torch.randn(4096, 64, device="cuda")
    weight = torch.randn(64, 32000, device="cuda", requires_grad=True)
    targets = torch.randint(0, 32000, (4096,), device="cuda")
    logits = hidden @ weight
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    cross_entropy(logits, targets, inplace_backward=True).backward()
    torch.cuda.synchronize()
    grad_buffer = logits.numel() * logits.element_size()
    assert torch.cuda.max_memory_allocated() - before < weight.numel() * 4 + grad_buffer // 4


# ------------------------------------------------------------------------------ padded logits, compiled path

def grad_in_backward_loss(logits, targets, reduction="mean", label_smoothing=0.0, num_classes=None, n_chunks=1):
    """The compiled path's loss (what cross_entropy runs inside torch.compile): the forward stores row statistics
    and the backward computes the gradient from them, here called eagerly."""
    num_classes = logits.shape[-1] if num_classes is None else num_classes
    return ce_module.CrossEntropyFunction.apply(logits, targets, -100, reduction, float(label_smoothing), n_chunks,
                                                False, True, num_classes, True)


@pytest.mark.parametrize("n_splits", [0, 3])  # the fused kernel and the split pair store the statistics
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_in_backward_matches_reference(monkeypatch, n_splits, reduction, label_smoothing, padded, dtype):
    """Loss and gradient (upstream factors per row or one, ignored rows) against float64, with the gradient
    buffer poisoned, on logits laid out as given or as the LM head's padded rows with num_classes."""
    force_plan(monkeypatch, n_splits)
    n_cols = SHAPE[-1]
    width = 1536 if padded else n_cols
    base = random_tensor(SHAPE[:-1] + (width,), dtype, contiguous=padded).requires_grad_()
    targets = make_targets(SHAPE[:-1], n_cols)
    with poisoned_empty():
        loss = grad_in_backward_loss(base, targets, reduction, label_smoothing, n_cols)
        g = upstream(loss)
        loss.backward(g)
    x64 = base.detach()[..., :n_cols].double().requires_grad_()
    ref = cross_entropy_reference(x64, targets, reduction=reduction, label_smoothing=label_smoothing)
    ref.backward(g.double())
    assert_close("loss", loss, ref)
    assert_close("grad logits", base.grad[..., :n_cols], x64.grad)
    assert torch.all(base.grad[..., n_cols:] == 0)


def test_gradient_in_backward_keeps_precision_at_large_offsets():
    """The statistics keep the row max and log-sum apart: at logits of 6e4 +- 1, lse alone would lose the digits
    of x - lse."""
    logits = (random_tensor((8, 300), torch.float32) + 6e4).requires_grad_()
    targets = make_targets((8,), 300, ignore_frac=0.0)
    grad_in_backward_loss(logits, targets).backward()
    x64 = logits.detach().double().requires_grad_()
    cross_entropy_reference(x64, targets).backward()
    assert_close("grad logits", logits.grad, x64.grad)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_num_classes_treats_columns_after_them_as_padding(inplace, label_smoothing):
    """The padded LM head's logits passed whole: the loss is the first num_classes columns' (PyTorch's on the
    slice), the padding's gradient is 0 and its values never matter."""
    n_cols, width = 1531, 1536
    padded = random_tensor((2, 37, width), torch.float32)
    padded[..., n_cols:] = 1e4  # would dominate every softmax if read
    base = padded.clone().requires_grad_()
    logits = base * 1.0  # an intermediate: in place needs one
    targets = make_targets((2, 37), n_cols)
    loss = cross_entropy(logits, targets, label_smoothing=label_smoothing, inplace_backward=inplace,
                         num_classes=n_cols)
    loss.backward()
    x64 = padded[..., :n_cols].double().requires_grad_()
    ref = cross_entropy_reference(x64, targets, label_smoothing=label_smoothing)
    ref.backward()
    assert_close("loss", loss, ref)
    assert_close("grad logits", base.grad[..., :n_cols], x64.grad)
    assert torch.all(base.grad[..., n_cols:] == 0)
    ref_padded = cross_entropy_reference(padded, targets, label_smoothing=label_smoothing, num_classes=n_cols)
    assert_close("reference", ref_padded, ref)


def test_num_classes_is_checked():
    logits = random_tensor((4, 10), torch.float32)
    targets = make_targets((4,), 10)
    for bad in (0, 11, 2.5, True):
        with pytest.raises(ValueError, match=r"num_classes must be an int in \[1, 10\]"):
            cross_entropy(logits, targets, num_classes=bad)
    with pytest.raises(ValueError, match="num_classes must be a positive int or None"):
        CrossEntropyLoss(num_classes=0)
    if triformer.INTERPRET:  # on CUDA a bad target is a device-side assert (async)
        with pytest.raises(ValueError, match=r"targets must be in \[0, 6\)"):
            cross_entropy(logits, torch.full((4,), 7, device=DEV), num_classes=6)


def test_gradient_in_backward_refuses_double_backward():
    logits = random_tensor((3, 20), torch.float32).requires_grad_()
    loss = grad_in_backward_loss(logits, make_targets((3,), 20))
    with pytest.raises(RuntimeError, match="records no graph"):
        torch.autograd.grad(loss, logits, create_graph=True)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_padded_logits_compile_like_eager(reduction):
    """The GPT layout under torch.compile: the padded LM-head output passed whole with num_classes, split into
    launches, through the compiled path (statistics forward, gradient backward) equals eager's."""
    hidden = random_tensor((2, 37, 32), torch.float32)
    weight = random_tensor((32, 1152), torch.float32).requires_grad_()
    targets = make_targets((2, 37), 1100)
    upstream_g = torch.rand(2, 37, device=DEV) + 0.5

    def f(h, w, t):
        loss = cross_entropy((h @ w).reshape(-1, w.shape[1]), t.reshape(-1), reduction=reduction,
                             label_smoothing=0.1, n_chunks=3, inplace_backward=True, num_classes=1100)
        return (loss * upstream_g.reshape(-1)).sum() if reduction == "none" else loss

    results = eager_and_compiled(f, hidden, weight, targets)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)
    w64 = weight.detach().double().requires_grad_()
    ref = cross_entropy_reference((hidden.double() @ w64)[..., :1100], targets, reduction=reduction,
                                  label_smoothing=0.1)
    if reduction == "none":
        ref = (ref * upstream_g.double().reshape(ref.shape)).sum()
    ref.backward()
    assert_close("grad weight", results[0][1], w64.grad)
