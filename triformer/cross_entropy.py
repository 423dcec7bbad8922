"""Cross-entropy over the last dimension, with the gradient computed in the forward pass (eager).

``logits[..., V]`` (fp32/fp16/bf16) and integer ``targets[...]`` give the loss; the same kernel launch writes
d(loss)/d(logits) for an upstream gradient of 1, so the backward pass only multiplies that stored gradient
by ``grad_output`` in place -- and skips even that when ``grad_output`` is exactly 1 (``loss.backward()``),
which its kernel checks on the device, without a host sync. Each row is streamed in blocks of columns with
an online log-sum-exp (any V, 256k and beyond; fp32 whatever the logits dtype), then streamed once more to
write the gradient.

Semantics match ``torch.nn.functional.cross_entropy`` with class-index targets and the class dimension
last, with one deliberate difference: ``reduction="mean"`` over a batch whose targets are all
``ignore_index`` returns 0 (and a zero gradient) instead of NaN.

Where the gradient goes (``inplace_backward``):

* ``False`` (default): into a fresh buffer shaped like ``logits`` (and none at all when no gradient is
  recorded), so ``logits`` is never written.
* ``True``: into the storage of ``logits`` itself, saving the ``[..., V]`` gradient allocation, exactly when
  a gradient for ``logits`` is being recorded (``torch.is_grad_enabled()`` and ``logits.requires_grad``).
  Then, after the call, ``logits`` no longer holds logits: it holds the gradient for an upstream gradient
  of 1, and after ``backward`` it is the very tensor returned as the gradient. When no gradient is recorded
  (``torch.no_grad()``, evaluation, frozen logits) there is no gradient to write: ``logits`` is left intact
  and only the loss is computed, so a model may pass the same flag in training and evaluation. When a
  gradient is recorded, reuse is refused with a ``ValueError`` before anything is written unless:
  1. ``logits`` is not a leaf, nor a view of one: leaves are the caller's data (inputs, parameters), only
     an intermediate result such as the output of the LM head's matmul may be consumed;
  2. no element of ``logits`` shares memory with another (no expanded, stride-0 dimension, no rows closer
     together than V elements or other overlapping view), and
     ``logits`` can be read as rows of V in place: its leading dims merge into at most two strided groups
     (``triformer._shared.rows_view``; any layout ``view(-1, T, V)`` accepts, among others).
  Autograd's version counter covers the remaining hazard: the write counts as an in-place modification,
  so an earlier op that saved ``logits`` for its own backward (e.g. ``logits = x.exp()``) raises autograd's
  usual "modified by an inplace operation" error at backward instead of producing wrong gradients.

Inside ``torch.compile`` nothing is written in place (the rules above are still checked, so a call that
traces also runs eagerly), and the gradient moves to the backward: the forward reads the logits once for the
loss and each row's statistics (max and log-sum-exp), and the backward reads them once more to write the
gradient with ``grad_output`` already applied. Storing the gradient in the forward instead would need a further
logits-sized pass to scale it out of place. Traced, an in-place write becomes a mutation that
functionalization must preserve: of the logits it makes Inductor copy their storage out and back, two
logits-sized passes for no memory saved; of a saved gradient, an input of the backward graph, it keeps
Inductor from capturing that graph in a CUDA graph (``mode="reduce-overhead"``). The compiled training step's
time and memory: ``docs/performance_history.md``.

``num_classes`` lets an LM head padded to a multiple of 64 columns pass its whole output: only the first
``num_classes`` columns are classes, and the gradient comes back in the padded layout (zeros in the padding),
where a ``[..., :V]`` slice would make autograd copy it into a fresh padded buffer.

Because the stored gradient is scaled in place, one forward supports one backward: a second backward
through the same graph (``retain_graph=True``) raises autograd's "modified by an inplace operation" error
instead of scaling twice.

Targets outside ``[0, V)`` that are not ``ignore_index`` are an error. On the CPU (interpreter) this is
checked on the host and raises ``ValueError``. On CUDA it is checked with ``torch._assert_async``, which
does not synchronize: the failure surfaces at the next synchronization as a device-side assert
(``RuntimeError``, like PyTorch's own cross-entropy), and the kernel also writes NaN as such a row's loss.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from triformer import _runtime
from triformer._double_backward import double_backward_unsupported
from triformer._shared import row_offsets, rows_view

__all__ = ["CrossEntropyFunction", "CrossEntropyLoss", "cross_entropy", "cross_entropy_reference",
           "TritonCrossEntropyLoss"]  # the seed's name and constructor (see triformer/__init__.py)
# triformer.linear_cross_entropy runs these kernels too, through launch_cross_entropy and the backward op
# cross_entropy_bwd, with the checks check_loss_args, check_targets, check_targets_tensor, and mean_scale and
# reference_loss: public names of this module, not exported by the package.

REDUCTIONS = ("mean", "sum", "none")


# exp(y) - 1 and log(1 + z) in fp32 where the plain forms cancel. At y = 1e-3, exp(y) - 1 keeps four of fp32's
# seven digits (and tl.exp on a GPU is an approximation); the series are exact to fp32 rounding on the ranges
# used: below |y| = 1/4 the Taylor series to y^7 (next term < 2e-9 relative), and for z in (-1/2, 0] the series
# 2 atanh(w), w = z / (2 + z), to w^13 (next term < 2e-8 relative).
@triton.jit
def _expm1(y):
    small = tl.abs(y) < 0.25
    z = tl.where(small, y, 0.0)
    series = z * (1.0 + z / 2.0 * (1.0 + z / 3.0 * (1.0 + z / 4.0 * (1.0 + z / 5.0 * (1.0 + z / 6.0 * (
        1.0 + z / 7.0))))))
    return tl.where(small, series, tl.exp(y) - 1.0)


@triton.jit
def _log1p(z):
    w = z / (2.0 + z)
    w2 = w * w
    return 2.0 * w * (1.0 + w2 * (1.0 / 3.0 + w2 * (1.0 / 5.0 + w2 * (1.0 / 7.0 + w2 * (1.0 / 9.0 + w2 * (
        1.0 / 11.0 + w2 / 13.0))))))


# A program walks rows in [BLOCK_R, BLOCK_V] tiles. Pass 1 (_row_stats) folds every tile of a column range into
# a running max / scaled exp-sum (online log-sum-exp, fp32) so registers never hold a whole row; pass 2
# (_store_grad) re-reads the range, last tile first, to write the gradient. Rows are addressed through two strides
# (sx_o, sx_i; triformer._shared.row_offsets) so [B, T, V] views with permuted batch dims need no copy. grad_ptr may
# equal logits_ptr: every element is read before the program that reads it overwrites it.
#
# Two launch shapes (see _plan):
# * fused: one program owns whole rows, both passes. On a GPU the grid is persistent (a few programs per SM,
#   each looping over row blocks) so that the rows being streamed at any moment fit in L2 and pass 2 re-reads
#   them from there, not from DRAM. Used when there are enough rows to fill the GPU.
# * split: each row's columns are cut into `n_splits` ranges, one program per (row block, range), in two
#   launches: _cross_entropy_partial_kernel writes each range's statistics, _cross_entropy_combine_kernel merges
#   a row's ranges and writes its loss and the gradient of its own range. Fewer rows than SMs (a few sequences'
#   last tokens over a large vocabulary) would otherwise leave SMs idle.
# (rows, row_ok) of the row block at first_row; padded rows re-read the last real row (never stored), so no tile
# row is all -inf and no NaN appears. No pointer goes in, on purpose: torch.compile's analysis of which tensors a
# kernel writes (wrap_triton) follows a called function's result back to every argument of the call, and the loss
# and gradient addresses are built from these rows. When _load_rows returned them, the targets and the logits
# counted as written: functionalization then copied the batch's targets back into the graph input, and Inductor
# skipped reduce-overhead's CUDA graph ("mutated inputs"). tests/test_compile.py checks the analysis.
@triton.jit
def _block_rows(first_row, row_end, BLOCK_R: tl.constexpr):
    rows = first_row + tl.arange(0, BLOCK_R)
    return tl.minimum(rows, row_end - 1).to(tl.int64), rows < row_end


@triton.jit
def _load_rows(targets_ptr, logits_ptr, rows, n_cols, rows_inner, sx_o, sx_i, st_m, ignore_index):
    x_base = logits_ptr + row_offsets(rows, rows_inner, sx_o, sx_i)
    target = tl.load(targets_ptr + rows * st_m).to(tl.int64)
    active = target != ignore_index
    in_range = (target >= 0) & (target < n_cols)
    return x_base, target, active, in_range


@triton.jit
def _with_reference(x_target):
    # Everything is kept relative to the row max m (and to x_ref, the target logit where finite) so that logits
    # with a large common offset lose no fp32 precision: lse - x_t never subtracts two large numbers.
    return x_target, tl.where(tl.abs(x_target) < float("inf"), x_target, 0.0)


@triton.jit
def _target_logit(x_base, sx_n, target, active, in_range):
    return _with_reference(tl.load(x_base + target * sx_n, mask=active & in_range, other=0.0).to(tl.float32))


@triton.jit
def _fold_tile(x_base, sx_n, x_ref, start, n_before, col_end, m, s, x_sum, t,
               MASKED: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr):
    """The online update for columns [start, start + BLOCK_V), those below col_end when MASKED."""
    cols = start + tl.arange(0, BLOCK_V)
    col_ok = cols < col_end
    ptrs = x_base[:, None] + cols[None, :].to(tl.int64) * sx_n
    if MASKED:
        x = tl.load(ptrs, mask=col_ok[None, :], other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
    else:
        x = tl.load(ptrs, eviction_policy="evict_last").to(tl.float32)
    m_new = tl.maximum(m, tl.max(x, 1))
    rescale = tl.exp(m - m_new)
    s = s * rescale + tl.sum(tl.exp(x - m_new[:, None]), 1)
    if HAS_SMOOTHING:
        shifted = x - x_ref[:, None]
        below = _expm1(x - m_new[:, None])
        if MASKED:
            shifted = tl.where(col_ok[None, :], shifted, 0.0)
            below = tl.where(col_ok[None, :], below, 0.0)
        x_sum += tl.sum(shifted, 1)
        # expm1(a + d) = exp(d) expm1(a) + expm1(d) for each earlier column, d = m - m_new
        t = t * rescale + n_before * _expm1(m - m_new) + tl.sum(below, 1)
    return m_new, s, x_sum, t


# UNMASKED (chosen at launch, see _unmasked_tiles): whole tiles load without a column mask and only the last,
# partial one takes it. With rows at 16-byte-aligned strides but a length that is not a multiple of 16 (GPT-2's
# 50257 padded to 50304, as the LM head and the fused linear-CE lay them out) that is what lets the compiler
# vectorize the loads and stores (ld.global.v4 instead of 2-byte loads). Elsewhere the plain masked loop is
# faster (benchmarks/cross_entropy.py --sweep; history in docs/performance_history.md).
@triton.jit
def _masked_start(col_start, col_end, UNMASKED: tl.constexpr, BLOCK_V: tl.constexpr):
    """Where the masked tiles of [col_start, col_end) begin: all of them, or with UNMASKED the partial last one."""
    start = col_start
    if UNMASKED:
        start = col_start + (col_end - col_start) // BLOCK_V * BLOCK_V
    return start


@triton.jit
def _row_stats(x_base, sx_n, x_ref, col_start, col_end,
               HAS_SMOOTHING: tl.constexpr, UNMASKED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    # a finite floor instead of -inf keeps exp(m - m_new) defined when a first tile holds only -inf logits
    m = tl.full([BLOCK_R], -3.0e38, tl.float32)
    s = tl.full([BLOCK_R], 0.0, tl.float32)
    # for label smoothing: x_sum = sum_j (x_j - x_ref), and t = s - (columns so far) = sum_j expm1(x_j - m), a
    # sum of terms <= 0 that holds s - V to fp32 precision where s is close to V (a near-uniform row)
    x_sum = tl.full([BLOCK_R], 0.0, tl.float32)
    t = tl.full([BLOCK_R], 0.0, tl.float32)
    masked_start = _masked_start(col_start, col_end, UNMASKED, BLOCK_V)
    if UNMASKED:
        for start in range(col_start, masked_start, BLOCK_V):
            m, s, x_sum, t = _fold_tile(x_base, sx_n, x_ref, start, start - col_start, col_end, m, s, x_sum,
                                        t, False, HAS_SMOOTHING, BLOCK_V)
    for start in range(masked_start, col_end, BLOCK_V):
        m, s, x_sum, t = _fold_tile(x_base, sx_n, x_ref, start, start - col_start, col_end, m, s, x_sum, t,
                                    True, HAS_SMOOTHING, BLOCK_V)
    return m, s, x_sum, t


@triton.jit
def _row_loss(m, s, x_sum, t, x_target, x_ref, active, in_range, n_cols, smoothing, z_loss,
              HAS_SMOOTHING: tl.constexpr, HAS_Z: tl.constexpr):
    """(loss, log s, log(s / V)) of rows whose statistics are complete."""
    log_s = tl.log(s)
    log_mean = log_s
    if HAS_SMOOTHING:
        # log(s / V) to fp32 precision: its error scales every p_j - 1/V term of the gradient by p_j, and a
        # near-uniform row has |p_j - 1/V| << p_j. From t while s > V / 2 (where log1p(t / V) loses less than
        # log(s / V): its error is eps (V - s) / s), from s otherwise.
        t_frac = t / n_cols
        log_mean = tl.where(t_frac > -0.5, _log1p(t_frac), tl.log(s / n_cols))
    # loss = (1 - eps) * (lse - x_t) + eps * (lse - mean_j x_j) + z * lse^2, with lse = m + log_s
    loss = (m - x_ref) + log_s - (1.0 - smoothing) * (x_target - x_ref)
    if HAS_SMOOTHING:
        loss -= smoothing * x_sum / n_cols
    if HAS_Z:
        loss += z_loss * (m + log_s) * (m + log_s)
    loss = tl.where(active, loss, 0.0)
    loss = tl.where(active & ~in_range, float("nan"), loss)
    return loss, log_s, log_mean


@triton.jit
def _grad_tile(x_base, sx_n, g_base, sg_n, start, col_end, row_ok, target, active, m, log_s, log_mean,
               hit, smooth, z_coef, n_cols, MASKED: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z: tl.constexpr,
               BLOCK_V: tl.constexpr):
    cols = start + tl.arange(0, BLOCK_V)
    col_ok = cols < col_end
    if MASKED:
        x = tl.load(x_base[:, None] + cols[None, :].to(tl.int64) * sx_n, mask=col_ok[None, :],
                    other=float("-inf"), eviction_policy="evict_first").to(tl.float32)
    else:
        x = tl.load(x_base[:, None] + cols[None, :].to(tl.int64) * sx_n,
                    eviction_policy="evict_first").to(tl.float32)
    p = tl.exp((x - m[:, None]) - log_s[:, None])
    g = (p - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)) * hit[:, None]
    if HAS_SMOOTHING:
        g += _expm1((x - m[:, None]) - log_mean[:, None]) * (smooth / n_cols)[:, None]
    if HAS_Z:
        g += p * z_coef[:, None]
    g = tl.where(active[:, None], g, 0.0)
    if MASKED:
        tl.store(g_base[:, None] + cols[None, :].to(tl.int64) * sg_n, g.to(g_base.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :], eviction_policy="evict_first")
    else:
        tl.store(g_base[:, None] + cols[None, :].to(tl.int64) * sg_n, g.to(g_base.dtype.element_ty),
                 mask=row_ok[:, None], eviction_policy="evict_first")


@triton.jit
def _store_grad(x_base, sx_n, grad_ptr, rows, rows_inner, sg_o, sg_i, sg_n, scale_ptr, ss_m,
                row_ok, target, active, m, log_s, log_mean, col_start, col_end, n_cols, pad_end, smoothing, z_loss,
                HAS_SCALE: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z: tl.constexpr, UNMASKED: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    if HAS_SCALE:
        scale = tl.load(scale_ptr + rows * ss_m).to(tl.float32)
    else:
        scale = tl.full([BLOCK_R], 1.0, tl.float32)
    # d loss / d x_j = (1 - eps) (p_j - [j == t]) + eps (p_j - 1 / V) + 2 z lse p_j, times the row's scale:
    # written as differences of p so that where they cancel (V = 1: p = 1) the small z term survives intact;
    # p_j - 1/V as expm1(x_j - lse + log V) / V: in a near-uniform row (small logits) p_j ~ 1/V, and the plain
    # difference had the relative error of p_j times 1 / |V p_j - 1| (1e-4 at logits of 1e-3)
    hit = (1.0 - smoothing) * scale
    smooth = smoothing * scale
    z_coef = scale * 2.0 * z_loss * (m + log_s)
    g_base = grad_ptr + row_offsets(rows, rows_inner, sg_o, sg_i)
    # Last tile first: pass 1 read the range front to back, so its last tiles are the likeliest still in L1/L2.
    masked_start = _masked_start(col_start, col_end, UNMASKED, BLOCK_V)
    n_masked = tl.cdiv(col_end - masked_start, BLOCK_V)
    for i in range(0, n_masked):
        _grad_tile(x_base, sx_n, g_base, sg_n, masked_start + (n_masked - 1 - i) * BLOCK_V, col_end,
                   row_ok, target, active, m, log_s, log_mean, hit, smooth, z_coef, n_cols, True, HAS_SMOOTHING,
                   HAS_Z, BLOCK_V)
    if UNMASKED:
        for i in range(0, (masked_start - col_start) // BLOCK_V):
            _grad_tile(x_base, sx_n, g_base, sg_n, masked_start - (i + 1) * BLOCK_V, col_end, row_ok,
                       target, active, m, log_s, log_mean, hit, smooth, z_coef, n_cols, False, HAS_SMOOTHING,
                       HAS_Z, BLOCK_V)
    # Padding columns [n_cols, pad_end) of a padded row (the LM head's output) are not classes: gradient 0,
    # written here by the range that ends the row, so that the launch writes its buffer whole (_grad_operand).
    # A narrow tile: a BLOCK_V-wide tile of 64-bit addresses for a few padding columns costs enough registers to
    # lower the programs an SM (benchmarks/cross_entropy_sm90.py shows the count).
    PAD_BLOCK: tl.constexpr = 64
    if col_end == n_cols:
        for start in range(n_cols, pad_end, PAD_BLOCK):
            cols = start + tl.arange(0, PAD_BLOCK)
            tl.store(g_base[:, None] + cols[None, :].to(tl.int64) * sg_n,
                     tl.zeros([BLOCK_R, PAD_BLOCK], g_base.dtype.element_ty),
                     mask=row_ok[:, None] & (cols < pad_end)[None, :])


@triton.jit
def _store_stats(stats_ptr, stats_plane, rows, row_ok, m, log_s, log_mean, HAS_SMOOTHING: tl.constexpr):
    # what _store_grad needs of a row, for a gradient computed later (_cross_entropy_grad_kernel): m and log s
    # apart, since lse = m + log s would round away the digits of x - lse when the logits share a large offset
    tl.store(stats_ptr + rows, m, mask=row_ok)
    tl.store(stats_ptr + stats_plane + rows, log_s, mask=row_ok)
    if HAS_SMOOTHING:
        tl.store(stats_ptr + 2 * stats_plane + rows, log_mean, mask=row_ok)


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr, grad_ptr, targets_ptr, loss_ptr, scale_ptr, stats_ptr,
    row_start, row_end, n_cols, pad_end, rows_inner, stats_plane,
    sx_o, sx_i, sx_n, sg_o, sg_i, sg_n, st_m, ss_m,
    ignore_index, smoothing, z_loss,
    HAS_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z: tl.constexpr,
    STORE_STATS: tl.constexpr, UNMASKED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # fp32 math: Inductor passes Python floats as fp64
    smoothing, z_loss = tl.cast(smoothing, tl.float32), tl.cast(z_loss, tl.float32)
    n_blocks = tl.cdiv(row_end - row_start, BLOCK_R)
    for block in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        rows, row_ok = _block_rows(row_start + block * BLOCK_R, row_end, BLOCK_R)
        x_base, target, active, in_range = _load_rows(targets_ptr, logits_ptr, rows, n_cols, rows_inner, sx_o,
                                                      sx_i, st_m, ignore_index)
        x_target, x_ref = _target_logit(x_base, sx_n, target, active, in_range)
        m, s, x_sum, t = _row_stats(x_base, sx_n, x_ref, 0, n_cols, HAS_SMOOTHING, UNMASKED, BLOCK_R, BLOCK_V)
        loss, log_s, log_mean = _row_loss(m, s, x_sum, t, x_target, x_ref, active, in_range, n_cols, smoothing,
                                          z_loss, HAS_SMOOTHING, HAS_Z)
        tl.store(loss_ptr + rows, loss, mask=row_ok)
        if STORE_STATS:
            _store_stats(stats_ptr, stats_plane, rows, row_ok, m, log_s, log_mean, HAS_SMOOTHING)
        if HAS_GRAD:
            _store_grad(x_base, sx_n, grad_ptr, rows, rows_inner, sg_o, sg_i, sg_n, scale_ptr,
                        ss_m, row_ok, target, active, m, log_s, log_mean, 0, n_cols, n_cols, pad_end, smoothing,
                        z_loss, HAS_SCALE, HAS_SMOOTHING, HAS_Z, UNMASKED, BLOCK_R, BLOCK_V)


# The gradient alone, from the row statistics a forward launch stored (STORE_STATS): one read of the logits and
# one write, with the whole upstream factor (grad_output times the mean's 1 / n) in the per-row scale. This is
# the compiled path's backward (see CrossEntropyFunction): there the forward only reads the logits once, and no
# separate pass scales a stored gradient.
@triton.jit
def _cross_entropy_grad_kernel(
    logits_ptr, grad_ptr, targets_ptr, stats_ptr, scale_ptr,
    row_start, row_end, n_cols, pad_end, rows_inner, stats_plane,
    sx_o, sx_i, sx_n, sg_o, sg_i, sg_n, st_m, ss_m,
    ignore_index, smoothing, z_loss,
    HAS_SMOOTHING: tl.constexpr, HAS_Z: tl.constexpr, UNMASKED: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    smoothing, z_loss = tl.cast(smoothing, tl.float32), tl.cast(z_loss, tl.float32)
    n_blocks = tl.cdiv(row_end - row_start, BLOCK_R)
    for block in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        rows, row_ok = _block_rows(row_start + block * BLOCK_R, row_end, BLOCK_R)
        x_base, target, active, in_range = _load_rows(targets_ptr, logits_ptr, rows, n_cols, rows_inner, sx_o,
                                                      sx_i, st_m, ignore_index)
        m = tl.load(stats_ptr + rows)
        log_s = tl.load(stats_ptr + stats_plane + rows)
        log_mean = log_s
        if HAS_SMOOTHING:
            log_mean = tl.load(stats_ptr + 2 * stats_plane + rows)
        _store_grad(x_base, sx_n, grad_ptr, rows, rows_inner, sg_o, sg_i, sg_n, scale_ptr, ss_m, row_ok, target,
                    active, m, log_s, log_mean, 0, n_cols, n_cols, pad_end, smoothing, z_loss, True, HAS_SMOOTHING,
                    HAS_Z, UNMASKED, BLOCK_R, BLOCK_V)


# Split launch, pass 1: statistics of one column range of a row block into part_ptr[plane, split, row] (fp32;
# planes m, s, and for smoothing x_sum, t), and the target logit into the plane after them: pass 2 cannot read
# it from the logits, which other ranges' programs may already have overwritten with their gradient.
@triton.jit
def _cross_entropy_partial_kernel(
    logits_ptr, targets_ptr, part_ptr, row_start, row_end, n_cols, rows_inner, n_splits, span, part_rows,
    sx_o, sx_i, sx_n, st_m, ignore_index,
    HAS_SMOOTHING: tl.constexpr, UNMASKED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    block = tl.program_id(0) // n_splits
    split = tl.program_id(0) % n_splits
    rows, row_ok = _block_rows(row_start + block * BLOCK_R, row_end, BLOCK_R)
    x_base, target, active, in_range = _load_rows(targets_ptr, logits_ptr, rows, n_cols, rows_inner, sx_o, sx_i,
                                                  st_m, ignore_index)
    x_target, x_ref = _target_logit(x_base, sx_n, target, active, in_range)
    col_start = split * span
    m, s, x_sum, t = _row_stats(x_base, sx_n, x_ref, col_start, tl.minimum(col_start + span, n_cols),
                                HAS_SMOOTHING, UNMASKED, BLOCK_R, BLOCK_V)
    plane = n_splits * part_rows
    out = part_ptr + split * part_rows + (rows - row_start)
    tl.store(out, m, mask=row_ok)
    tl.store(out + plane, s, mask=row_ok)
    if HAS_SMOOTHING:
        tl.store(out + 2 * plane, x_sum, mask=row_ok)
        tl.store(out + 3 * plane, t, mask=row_ok)
    if split == 0:
        tl.store(part_ptr + (4 if HAS_SMOOTHING else 2) * plane + (rows - row_start), x_target, mask=row_ok)


# Split launch, pass 2: merge a row's range statistics one range at a time with the update _row_stats applies
# tile by tile, then write the range's gradient; split 0 of each row block stores the loss. Without a gradient
# one program per row block (grid_splits = 1) only merges.
@triton.jit
def _cross_entropy_combine_kernel(
    logits_ptr, grad_ptr, targets_ptr, loss_ptr, scale_ptr, stats_ptr, part_ptr,
    row_start, row_end, n_cols, pad_end, rows_inner, stats_plane, n_splits, grid_splits, span, part_rows,
    sx_o, sx_i, sx_n, sg_o, sg_i, sg_n, st_m, ss_m,
    ignore_index, smoothing, z_loss,
    HAS_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z: tl.constexpr,
    STORE_STATS: tl.constexpr, UNMASKED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # fp32 math: Inductor passes Python floats as fp64
    smoothing, z_loss = tl.cast(smoothing, tl.float32), tl.cast(z_loss, tl.float32)
    block = tl.program_id(0) // grid_splits
    split = tl.program_id(0) % grid_splits
    rows, row_ok = _block_rows(row_start + block * BLOCK_R, row_end, BLOCK_R)
    x_base, target, active, in_range = _load_rows(targets_ptr, logits_ptr, rows, n_cols, rows_inner, sx_o, sx_i,
                                                  st_m, ignore_index)
    plane = n_splits * part_rows
    part = part_ptr + (rows - row_start)
    x_target, x_ref = _with_reference(tl.load(part + (4 if HAS_SMOOTHING else 2) * plane))
    m = tl.full([BLOCK_R], -3.0e38, tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    x_sum = tl.zeros([BLOCK_R], tl.float32)
    t = tl.zeros([BLOCK_R], tl.float32)
    for k in range(0, n_splits):
        m_k = tl.load(part + k * part_rows)
        m_new = tl.maximum(m, m_k)
        rescale = tl.exp(m - m_new)
        rescale_k = tl.exp(m_k - m_new)
        s = s * rescale + tl.load(part + plane + k * part_rows) * rescale_k
        if HAS_SMOOTHING:
            x_sum += tl.load(part + 2 * plane + k * part_rows)
            # t of the columns so far and of range k, both moved to the new max (columns before range k: k * span)
            t = (t * rescale + (k * span) * _expm1(m - m_new) + tl.load(part + 3 * plane + k * part_rows) * rescale_k
                 + tl.minimum(span, n_cols - k * span) * _expm1(m_k - m_new))
        m = m_new
    loss, log_s, log_mean = _row_loss(m, s, x_sum, t, x_target, x_ref, active, in_range, n_cols, smoothing, z_loss,
                                      HAS_SMOOTHING, HAS_Z)
    if split == 0:
        tl.store(loss_ptr + rows, loss, mask=row_ok)
        if STORE_STATS:
            _store_stats(stats_ptr, stats_plane, rows, row_ok, m, log_s, log_mean, HAS_SMOOTHING)
    if HAS_GRAD:
        col_start = split * span
        _store_grad(x_base, sx_n, grad_ptr, rows, rows_inner, sg_o, sg_i, sg_n, scale_ptr, ss_m,
                    row_ok, target, active, m, log_s, log_mean, col_start, tl.minimum(col_start + span, n_cols),
                    n_cols, pad_end, smoothing, z_loss, HAS_SCALE, HAS_SMOOTHING, HAS_Z, UNMASKED, BLOCK_R, BLOCK_V)


# The loss's two reductions -- the count behind "mean" and the sum of the row losses -- are kernels rather than
# torch ops in the op bodies: inside torch.compile Inductor would fuse those torch reductions with whatever the
# caller computes from the loss, and one such fused kernel (the count, the sum and sin/cos of the loss) fails in
# Triton 3.6's compiler (tests/test_compile.py's glue around each op). One program each, looping over 8K-row
# tiles: a few microseconds at the row counts of a training step, and the same summation order on every device.
REDUCE_BLOCK = 8192


@triton.jit
def _mean_scale_kernel(targets_ptr, scale_ptr, n_rows, st_m, ignore_index, BLOCK: tl.constexpr):
    count = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        target = tl.load(targets_ptr + rows.to(tl.int64) * st_m, mask=rows < n_rows, other=ignore_index)
        count += (target != ignore_index).to(tl.int32)
    tl.store(scale_ptr, 1.0 / tl.maximum(tl.sum(count, 0), 1).to(tl.float32))


@triton.jit
def _loss_total_kernel(loss_ptr, scale_ptr, out_ptr, n_rows, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        total += tl.load(loss_ptr + rows, mask=rows < n_rows, other=0.0)
    loss = tl.sum(total, 0)
    if HAS_SCALE:
        loss = loss * tl.load(scale_ptr)
    tl.store(out_ptr, loss.to(out_ptr.dtype.element_ty))


# Backward of the fused forward: multiply the stored gradient by grad_output in place, row by row (one factor
# per row, or one for all with ss_m = 0). A row whose factor is exactly 1 -- every row after
# loss.backward() on a scalar loss -- is skipped without reading or writing it, with no host sync.
@triton.jit
def _scale_rows_kernel(x_ptr, scale_ptr, n_rows, n_cols, rows_inner, sx_o, sx_i, sx_n, ss_m,
                       BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows = tl.minimum(rows, n_rows - 1).to(tl.int64)
    scale = tl.load(scale_ptr + rows * ss_m).to(tl.float32)
    todo = row_ok & (scale != 1.0)
    if tl.sum(todo.to(tl.int32), 0) > 0:
        base = x_ptr + row_offsets(rows, rows_inner, sx_o, sx_i)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ptrs = base[:, None] + cols[None, :].to(tl.int64) * sx_n
            mask = todo[:, None] & (cols < n_cols)[None, :]
            x = tl.load(ptrs, mask=mask).to(tl.float32)
            tl.store(ptrs, (x * scale[:, None]).to(x_ptr.dtype.element_ty), mask=mask)


# GPU launch, from `benchmarks/cross_entropy.py --sweep` (benchmarks/results/h100/cross_entropy_sweep.md): rows
# of 16 KiB tiles (8192 bf16 logits) on a persistent grid of four programs per SM, which beat 8 and 32 KiB tiles
# and one or two programs per SM at every vocabulary tried (32K, 50K, 128K), whether the gradient goes over the
# logits or into its own buffer. Registers allow one such program per SM at either warp count
# (benchmarks/results/sm90/cross_entropy_sm90.md: 209 at 8 warps, 104 at 16), so the grid's programs take turns;
# what the warp count changes is how many logits each thread loads at once. 16 warps where whole tiles load
# unmasked (_unmasked_tiles: the LM head's padded rows, 16-byte vectors), 8 where every tile is masked (a
# contiguous odd vocabulary, or one that is a multiple of 16): each was the faster of the two there. The split
# pair (column ranges of one row on several programs) only pays when there are fewer rows than SMs.
TILE_BYTES = 16384
PROGRAMS_PER_SM = 4
UNMASKED_WARPS, MASKED_WARPS = 16, 8


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one launch covers its rows: ``n_splits`` 0 is the fused kernel on ``programs`` persistent programs;
    ``n_splits`` >= 1 the split pair with that many column ranges per row (``programs`` unused)."""
    block_r: int
    block_v: int
    num_warps: int
    programs: int
    n_splits: int = 0


@_runtime.plan_cache
def _plan(n_rows: int, n_cols: int, dtype: torch.dtype, device: torch.device, unmasked: bool) -> Plan:
    """Interpreter: fused, few programs with 64k-element tiles of many rows. GPU: see the constants above;
    ``unmasked``: whole tiles load without a column mask (``_unmasked_tiles``)."""
    if _runtime.INTERPRET:
        block_v = min(triton.next_power_of_2(n_cols), max(1024, 65536 // min(triton.next_power_of_2(n_rows), 64)))
        block_r = _runtime.rows_per_program(n_rows, block_v)
        return Plan(block_r, block_v, 4, triton.cdiv(n_rows, block_r))
    block_v = min(triton.next_power_of_2(n_cols), TILE_BYTES // dtype.itemsize)
    num_warps = min(UNMASKED_WARPS if unmasked else MASKED_WARPS, max(4, block_v * dtype.itemsize // 512))
    sms = _runtime.multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    if n_cols > block_v and n_rows < sms:
        n_splits = min(triton.cdiv(PROGRAMS_PER_SM * sms, n_rows), triton.cdiv(n_cols, block_v))
        return Plan(1, block_v, num_warps, 0, n_splits)
    return Plan(1, block_v, num_warps, min(n_rows, PROGRAMS_PER_SM * sms))


def check_targets(targets: torch.Tensor, n_cols: int, ignore_index: int) -> None:
    """Targets must be in [0, n_cols) or ignore_index; see the module docstring for how each device reports it."""
    bad = ((targets < 0) | (targets >= n_cols)) & (targets != ignore_index)
    # traced (the kernels=torch reference inside torch.compile) or fake, there are no values to read
    if targets.device.type == "cpu" and not torch.compiler.is_compiling() and not _runtime.is_fake(targets):
        if bool(bad.any()):
            value = int(targets[bad][0])
            raise ValueError(f"targets must be in [0, {n_cols}) or ignore_index={ignore_index}, got {value}")
    else:
        torch._assert_async(~bad.any(), f"targets must be in [0, {n_cols}) or ignore_index={ignore_index}")


def _unmasked_tiles(t3: torch.Tensor) -> bool:
    """Whether whole tiles of ``t3[outer, inner, V]`` go unmasked (see _row_stats): its row strides are multiples
    of 16 elements from a 16-byte-aligned address, its columns are contiguous, and V is not a multiple of 16
    (where it is, the masked loads vectorize already, and measured faster). The address is judged by the
    storage offset (PyTorch's and Inductor's allocations are aligned), which a traced tensor has too."""
    n_cols = t3.shape[-1]
    return (n_cols % 16 != 0 and t3.stride(2) == 1 and t3.stride(0) % 16 == 0
            and (t3.shape[1] == 1 or t3.stride(1) % 16 == 0) and t3.storage_offset() * t3.element_size() % 16 == 0)


def _grad_operand(grad3: torch.Tensor, grad_buffer: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(the tensor the kernels write through, the row width they write): ``grad_buffer`` and its last dim when
    given -- ``grad3`` must be its first V columns (the same first element and column stride) -- else ``grad3``
    and V. Handed the whole buffer, a kernel traced by torch.compile writes that buffer, where writing a view of it
    becomes a write into a copy of the view and a copy of the whole buffer back (a ``slice_scatter``); the
    padding columns the view leaves out get their zeros from the same kernel."""
    if grad_buffer is None:
        return grad3, grad3.shape[-1]
    if grad3.storage_offset() != grad_buffer.storage_offset() or grad3.stride(-1) != grad_buffer.stride(-1):
        raise ValueError("grad3 must be the leading columns of grad_buffer")
    return grad_buffer, grad_buffer.shape[-1]


def launch_cross_entropy(logits3: torch.Tensor, targets: torch.Tensor, loss_rows: torch.Tensor,
                         grad3: torch.Tensor | None, scale: torch.Tensor | None, ignore_index: int,
                         label_smoothing: float, z_loss: float, n_chunks: int = 1,
                         stats: torch.Tensor | None = None, grad_buffer: torch.Tensor | None = None) -> None:
    """Run the kernels on ``logits3[outer, inner, V]``: per-row fp32 loss into ``loss_rows[N]`` and, when
    ``grad3`` is given (``logits3`` itself, or a tensor of its [outer, inner, V] shape with any strides), the
    gradient times ``scale`` (one value, or one per row) into ``grad3``; when ``stats`` is given (contiguous fp32
    [stat_planes(label_smoothing), N]), the row statistics ``launch_cross_entropy_grad`` needs. Rows go in
    ``n_chunks`` successive launches. ``grad_buffer``: the padded tensor whose first V columns ``grad3`` is; its
    other columns get gradient 0 (see _grad_operand)."""
    outer, rows_inner, n_cols = logits3.shape
    n_rows = outer * rows_inner
    if n_rows == 0 or _runtime.shapes_only():  # (a shape rule: it writes no output's shape)
        return
    g = grad3 if grad3 is not None else logits3  # never written when HAS_GRAD is off
    g_arg, pad_end = _grad_operand(g, grad_buffer if grad3 is not None else None)
    per_row_scale = scale is not None and scale.numel() > 1
    # the logits' layout decides: they are read twice, the gradient written once
    common = dict(HAS_SMOOTHING=label_smoothing > 0, UNMASKED=_unmasked_tiles(logits3))
    flags = dict(HAS_GRAD=grad3 is not None, HAS_SCALE=scale is not None, HAS_Z=z_loss > 0,
                 STORE_STATS=stats is not None, **common)
    strides = (*logits3.stride(), *g.stride(), targets.stride(0), scale.stride(0) if per_row_scale else 0)
    scale_arg = scale if scale is not None else loss_rows
    stats_arg = stats if stats is not None else loss_rows  # never written when STORE_STATS is off
    chunk = triton.cdiv(n_rows, n_chunks)
    for first in range(0, n_rows, chunk):
        last = min(first + chunk, n_rows)
        plan = _plan(last - first, n_cols, logits3.dtype, logits3.device, common["UNMASKED"])
        tiles = dict(BLOCK_R=plan.block_r, BLOCK_V=plan.block_v, num_warps=plan.num_warps)
        row_blocks = triton.cdiv(last - first, plan.block_r)
        if not plan.n_splits:
            _runtime.launch(_cross_entropy_fwd_kernel, (min(plan.programs, row_blocks),))(
                logits3, g_arg, targets, loss_rows, scale_arg, stats_arg, first, last, n_cols, pad_end, rows_inner,
                n_rows,
                *strides, ignore_index, float(label_smoothing), float(z_loss), **flags, **tiles)
            continue
        # ranges of whole tiles; row r of this launch has its statistics at part[plane, split, r - first]
        span = triton.cdiv(triton.cdiv(n_cols, plan.n_splits), plan.block_v) * plan.block_v
        n_splits = triton.cdiv(n_cols, span)
        planes = 4 if label_smoothing > 0 else 2
        part = torch.empty(planes * n_splits * (last - first) + (last - first), dtype=torch.float32,
                           device=logits3.device)
        _runtime.launch(_cross_entropy_partial_kernel, (row_blocks * n_splits,))(
            logits3, targets, part, first, last, n_cols, rows_inner, n_splits, span, last - first,
            *logits3.stride(), targets.stride(0), ignore_index, **common, **tiles)
        grid_splits = n_splits if grad3 is not None else 1
        _runtime.launch(_cross_entropy_combine_kernel, (row_blocks * grid_splits,))(
            logits3, g_arg, targets, loss_rows, scale_arg, stats_arg, part, first, last, n_cols, pad_end,
            rows_inner, n_rows,
            n_splits, grid_splits, span, last - first, *strides, ignore_index, float(label_smoothing),
            float(z_loss), **flags, **tiles)


def stat_planes(label_smoothing: float) -> int:
    """Rows of the statistics buffer: m and log s, and log(s / V) with label smoothing."""
    return 3 if label_smoothing > 0 else 2


def launch_cross_entropy_grad(logits3: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor,
                              grad3: torch.Tensor, scale: torch.Tensor, ignore_index: int, label_smoothing: float,
                              z_loss: float, grad_buffer: torch.Tensor | None = None) -> None:
    """The gradient of ``logits3[outer, inner, V]`` times ``scale`` (one value, or one per row) into ``grad3`` (its
    shape, any strides), from the row statistics a ``launch_cross_entropy(..., stats=stats)`` stored;
    ``grad_buffer`` as in ``launch_cross_entropy``."""
    outer, rows_inner, n_cols = logits3.shape
    n_rows = outer * rows_inner
    if n_rows == 0 or _runtime.shapes_only():
        return
    g_arg, pad_end = _grad_operand(grad3, grad_buffer)
    unmasked = _unmasked_tiles(logits3)
    plan = _plan(n_rows, n_cols, logits3.dtype, logits3.device, unmasked)
    row_blocks = triton.cdiv(n_rows, plan.block_r)
    programs = min(plan.programs, row_blocks) if not plan.n_splits else row_blocks
    _runtime.launch(_cross_entropy_grad_kernel, (programs,))(
        logits3, g_arg, targets, stats, scale, 0, n_rows, n_cols, pad_end, rows_inner, n_rows, *logits3.stride(),
        *grad3.stride(), targets.stride(0), scale.stride(0) if scale.numel() > 1 else 0, ignore_index,
        float(label_smoothing), float(z_loss), HAS_SMOOTHING=label_smoothing > 0, HAS_Z=z_loss > 0,
        UNMASKED=unmasked, BLOCK_R=plan.block_r, BLOCK_V=plan.block_v, num_warps=plan.num_warps)


def scale_rows_(x: torch.Tensor, scale: torch.Tensor) -> None:
    """``x[..., C] *= scale`` in place, with ``scale`` one value (0-dim / [1]) or one per row of ``x``."""
    x3 = rows_view(x, "gradient", copy_ok=False)
    outer, rows_inner, n_cols = x3.shape
    n_rows = outer * rows_inner
    flat = scale.reshape(-1)
    if n_rows == 0 or _runtime.shapes_only():  # (a shape rule: it writes no output's shape)
        return
    if _runtime.INTERPRET:
        block_v = min(triton.next_power_of_2(n_cols), 1024)
        block_r = _runtime.rows_per_program(n_rows, block_v)
    else:  # one row per program: a skipped row costs one scalar load
        block_v, block_r = min(triton.next_power_of_2(n_cols), 4096), 1
    _runtime.launch(_scale_rows_kernel, (triton.cdiv(n_rows, block_r),))(
        x3, flat, n_rows, n_cols, rows_inner, *x3.stride(), flat.stride(0) if flat.numel() > 1 else 0,
        BLOCK_R=block_r, BLOCK_V=block_v, num_warps=4 if block_v <= 1024 else 8,
    )


@_runtime.kernel_op("triformer::cross_entropy_bwd", mutates_args=("grad",))
def cross_entropy_bwd(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """Scale a gradient stored by a forward pass by ``grad_output`` in place (no new buffer)."""
    scale_rows_(grad, grad_output)


def mean_scale(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """[1] fp32 on the device: 1 / (number of ``targets`` not ignored), 1 when all are (loss 0, not NaN).
    No sync."""
    scale = torch.empty(1, dtype=torch.float32, device=targets.device)
    if not _runtime.shapes_only():
        flat = targets.reshape(-1)
        _runtime.launch(_mean_scale_kernel, (1,))(flat, scale, flat.numel(), flat.stride(0) if flat.numel() else 1,
                                                  ignore_index, BLOCK=REDUCE_BLOCK, num_warps=8)
    return scale


def loss_total(loss_rows: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """0-dim ``dtype``: the sum of the fp32 ``loss_rows[N]`` (contiguous), times ``scale[0]`` when given."""
    loss = torch.empty((), dtype=dtype, device=loss_rows.device)
    if not _runtime.shapes_only():
        _runtime.launch(_loss_total_kernel, (1,))(loss_rows, scale if scale is not None else loss_rows, loss,
                                                  loss_rows.numel(), HAS_SCALE=scale is not None,
                                                  BLOCK=REDUCE_BLOCK, num_warps=8)
    return loss


def _rows3(t: torch.Tensor, num_classes: int, what: str, copy_ok: bool) -> torch.Tensor:
    """``t[..., :num_classes]`` as ``[outer, inner, num_classes]`` rows (``rows_view``): the columns the kernels
    read; those after them are padding."""
    return rows_view(t.narrow(-1, 0, num_classes), what, copy_ok=copy_ok)


def _forward(logits: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor | None, ignore_index: int,
             label_smoothing: float, reduction: str, n_chunks: int, num_classes: int,
             stats: torch.Tensor | None = None) -> torch.Tensor:
    """Shared body of the forward ops: launch, then reduce the fp32 row losses to the requested loss. ``grad``:
    None, the logits themselves, or a contiguous buffer of their shape; ``stats``: see launch_cross_entropy."""
    logits3 = _rows3(logits, num_classes, "logits", copy_ok=grad is not logits)
    outer, rows_inner, _ = logits3.shape
    # the kernels index both through one [outer, inner, classes] grid: the logits' (a contiguous buffer takes any)
    if grad is None or grad is logits:
        grad3 = None if grad is None else logits3
    else:
        grad3 = grad.view(outer, rows_inner, grad.shape[-1]).narrow(-1, 0, num_classes)
    flat_targets = targets.reshape(-1)
    check_targets(flat_targets, num_classes, ignore_index)
    loss_rows = torch.empty(flat_targets.numel(), dtype=torch.float32, device=logits.device)
    scale = mean_scale(flat_targets, ignore_index) if reduction == "mean" else None
    launch_cross_entropy(logits3, flat_targets, loss_rows, grad3, scale if grad3 is not None else None,
                         ignore_index, label_smoothing, 0.0, n_chunks, stats, grad_buffer=grad)
    if reduction == "none":
        return loss_rows.to(logits.dtype).view(targets.shape)
    return loss_total(loss_rows, scale, logits.dtype)


@_runtime.kernel_op("triformer::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, label_smoothing: float,
                       reduction: str, n_chunks: int, compute_grad: bool,
                       num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, gradient for an upstream gradient of 1 shaped like logits, or an empty tensor)."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if compute_grad else None
    loss = _forward(logits, targets, grad, ignore_index, label_smoothing, reduction, n_chunks, num_classes)
    return loss, grad if grad is not None else logits.new_empty(0)


@_runtime.kernel_op("triformer::cross_entropy_fwd_inplace", mutates_args=("logits",))
def _cross_entropy_fwd_inplace(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                               label_smoothing: float, reduction: str, n_chunks: int,
                               num_classes: int) -> torch.Tensor:
    """The loss; ``logits`` is overwritten with the gradient for an upstream gradient of 1."""
    return _forward(logits, targets, logits, ignore_index, label_smoothing, reduction, n_chunks, num_classes)


@_runtime.kernel_op("triformer::cross_entropy_fwd_stats", mutates_args=())
def _cross_entropy_fwd_stats(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                             label_smoothing: float, reduction: str, n_chunks: int,
                             num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, the row statistics _cross_entropy_grad computes the gradient from): the logits are read once."""
    stats = torch.empty(stat_planes(label_smoothing), targets.numel(), dtype=torch.float32, device=logits.device)
    loss = _forward(logits, targets, None, ignore_index, label_smoothing, reduction, n_chunks, num_classes, stats)
    return loss, stats


@_runtime.kernel_op("triformer::cross_entropy_grad", mutates_args=())
def _cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor,
                        grad_output: torch.Tensor, ignore_index: int, label_smoothing: float, reduction: str,
                        num_classes: int) -> torch.Tensor:
    """d(loss)/d(logits) times ``grad_output``, shaped like ``logits`` (padding columns 0), from ``stats``."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    logits3 = _rows3(logits, num_classes, "logits", copy_ok=True)
    outer, rows_inner, _ = logits3.shape
    flat_targets = targets.reshape(-1)
    if reduction == "none":
        scale = grad_output.float().reshape(-1)
    else:
        scale = grad_output.float().reshape(1)
        if reduction == "mean":
            scale = scale * mean_scale(flat_targets, ignore_index)
    grad3 = grad.view(outer, rows_inner, grad.shape[-1]).narrow(-1, 0, num_classes)
    launch_cross_entropy_grad(logits3, flat_targets, stats, grad3, scale, ignore_index, label_smoothing, 0.0,
                              grad_buffer=grad)
    return grad


class CrossEntropyFunction(torch.autograd.Function):
    """Eager: forward stores the gradient (fresh buffer or the logits themselves), backward scales it in place.
    ``grad_in_backward`` (what ``cross_entropy`` asks for inside torch.compile): forward reads the logits once for
    the loss and the row statistics, backward computes the gradient times grad_output in one pass."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, label_smoothing, n_chunks, inplace_backward,
                compute_grad, num_classes, grad_in_backward):
        ctx.inplace, ctx.grad_in_backward = inplace_backward, grad_in_backward
        if grad_in_backward:
            loss, stats = _cross_entropy_fwd_stats(logits, targets, ignore_index, label_smoothing, reduction,
                                                   n_chunks, num_classes)
            ctx.save_for_backward(logits, targets, stats)
            ctx.args = (ignore_index, label_smoothing, reduction, num_classes)
            return loss
        if inplace_backward:
            loss = _cross_entropy_fwd_inplace(logits, targets, ignore_index, label_smoothing, reduction, n_chunks,
                                              num_classes)
            grad = logits
        else:
            loss, grad = _cross_entropy_fwd(logits, targets, ignore_index, label_smoothing, reduction, n_chunks,
                                            compute_grad, num_classes)
        if compute_grad:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # create_graph=True: the logits are gone (triformer._double_backward)
            raise double_backward_unsupported(
                "cross_entropy",
                "with inplace_backward=True its forward wrote d(loss)/d(logits) over the logits" if ctx.inplace else
                "its backward computes d(loss)/d(logits) in a kernel that records no graph" if ctx.grad_in_backward
                else "it keeps only d(loss)/d(logits) from its forward, not the logits, whose curvature the second "
                "order needs",
                "compute this loss with triformer.cross_entropy_reference (same arguments, plain PyTorch) or "
                "torch.nn.functional.cross_entropy")
        nones = (None,) * 9
        if ctx.grad_in_backward:
            logits, targets, stats = ctx.saved_tensors
            return (_cross_entropy_grad(logits, targets, stats, grad_loss, *ctx.args), *nones)
        # a second backward through this graph fails in this unpack: the in-place scale below bumped the
        # saved tensor's version, so autograd refuses to scale it twice
        (grad,) = ctx.saved_tensors
        if torch.compiler.is_compiling():
            # Traced, the in-place scale would mutate an input of the backward graph, and Inductor then refuses
            # to capture that graph in a CUDA graph (mode="reduce-overhead"). Out of place it is one pointwise
            # kernel that Inductor fuses, writing into the saved gradient's buffer once nothing else reads it.
            scale = grad_loss.float().unsqueeze(-1) if grad_loss.dim() else grad_loss.float()  # one per row, or one
            return ((grad.float() * scale).to(grad.dtype), *nones)
        cross_entropy_bwd(grad, grad_loss)
        return (grad, *nones)


def check_loss_args(ignore_index, reduction, label_smoothing) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def check_targets_tensor(targets, expected_shape, what: str) -> None:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 or int32 class indices, got {targets.dtype}")
    if tuple(targets.shape) != tuple(expected_shape):
        raise ValueError(f"targets must have shape {tuple(expected_shape)} ({what}), got {tuple(targets.shape)}")


def _elements_apart(t: torch.Tensor) -> bool:
    """Whether no two elements of ``t`` share memory, proven from its layout: with its dims of size > 1 sorted by
    stride, each stride must step past the whole span of the dims below it. That holds for every slice,
    permutation and padded-row layout; one it cannot prove (a stride 0, rows closer together than a row is long,
    interleaved dims) counts as sharing. PyTorch's ``torch._debug_has_internal_overlap`` is no help here: it
    answers "too hard" for any layout with gaps, the LM head's output sliced to the vocabulary among them."""
    if t.numel() == 0:
        return True
    dims = [(st, n) for n, st in zip(t.shape, t.stride()) if n > 1]
    # the dims before dim i in (stride, index) order, summed without sorting: Dynamo cannot sort symbolic strides
    for i, (stride, _) in enumerate(dims):
        below = sum(st * (n - 1) for j, (st, n) in enumerate(dims) if st < stride or (st == stride and j < i))
        if stride <= below:
            return False
    return True


def _check_inplace(logits: torch.Tensor) -> None:
    """The rule of the module docstring, point by point, for logits whose gradient is being recorded."""
    base = logits if logits._base is None else logits._base
    if logits.is_leaf or base.is_leaf:
        raise ValueError("inplace_backward=True would overwrite logits, which is a leaf tensor (or a view of one): "
                         "only an intermediate result, e.g. the LM head's output, may be consumed")
    if not _elements_apart(logits):
        raise ValueError(f"inplace_backward=True needs logits whose elements do not share memory, got strides "
                         f"{logits.stride()} for shape {tuple(logits.shape)} (an expanded or overlapping view); "
                         "pass inplace_backward=False, or logits.contiguous()")
    rows_view(logits, "logits with inplace_backward=True", copy_ok=False)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, n_chunks: int = 1, inplace_backward: bool = False,
                  num_classes: int | None = None) -> torch.Tensor:
    """Cross-entropy of ``logits[..., V]`` against class indices ``targets[...]`` (int64/int32).

    ``reduction``: "mean" (over rows whose target is not ``ignore_index``; 0 when there are none), "sum" or
    "none" (loss shaped like ``targets``). ``label_smoothing`` as in ``torch.nn.functional.cross_entropy``.
    The loss has the logits' dtype; it is accumulated in fp32. ``n_chunks`` splits the rows into that many
    successive launches; the kernel keeps no per-row scratch proportional to V, so peak memory is the
    gradient buffer (none with ``inplace_backward=True``) whatever ``n_chunks`` is (measured on an H200:
    benchmarks/results/h200/cross_entropy_chunks.md). ``inplace_backward``:
    see the module docstring for exactly when the logits buffer is reused and what is refused.
    ``num_classes`` (default V): only ``logits[..., :num_classes]`` are classes; the columns after them are
    padding (an LM head padded to a multiple of 64), outside the softmax, with gradient 0. Passing the padded
    logits this way, rather than a slice of them, spares the backward a copy of the gradient into the padded
    layout.
    """
    _runtime.check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    check_targets_tensor(targets, logits.shape[:-1], "logits.shape[:-1]")
    _runtime.check_device(logits=logits, targets=targets)
    check_loss_args(ignore_index, reduction, label_smoothing)
    if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1:
        raise ValueError(f"n_chunks must be a positive int, got {n_chunks!r}")
    num_classes = check_num_classes(num_classes, logits.shape[-1])
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    inplace = bool(inplace_backward) and compute_grad
    if inplace:
        _check_inplace(logits)
        inplace = not torch.compiler.is_compiling()  # traced: out of place (module docstring)
    grad_in_backward = compute_grad and torch.compiler.is_compiling()
    return CrossEntropyFunction.apply(logits, targets, ignore_index, reduction, float(label_smoothing), n_chunks,
                                      inplace, compute_grad, num_classes, grad_in_backward)


def check_num_classes(num_classes, n_cols: int | None):
    """``num_classes`` checked against the logits' last dimension ``n_cols`` (None means all of it, which is
    returned); with ``n_cols`` None (a module's constructor, before any logits) only that it is None or an int >= 1."""
    if num_classes is None:
        return n_cols
    is_int = isinstance(num_classes, int) and not isinstance(num_classes, bool)
    if n_cols is None and not (is_int and num_classes >= 1):
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    if n_cols is not None and not (is_int and 1 <= num_classes <= n_cols):
        raise ValueError(f"num_classes must be an int in [1, {n_cols}] (the logits' last dimension), "
                         f"got {num_classes!r}")
    return num_classes


def reference_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str,
                   label_smoothing: float, z_loss: float) -> torch.Tensor:
    """Plain-PyTorch loss of the kernel's semantics, z-loss included (computed in fp32 for fp16/bf16)."""
    check_targets(targets, logits.shape[-1], ignore_index)
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    active = targets != ignore_index
    lse = torch.logsumexp(x, dim=-1)
    x_target = x.gather(-1, torch.where(active, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    loss = lse - x_target
    if label_smoothing > 0:  # (skipped at 0 like PyTorch: 0 * mean would turn a -inf logit into NaN)
        loss = loss + label_smoothing * (x_target - x.mean(dim=-1))
    if z_loss > 0:
        loss = loss + z_loss * lse * lse
    loss = torch.where(active, loss, torch.zeros_like(loss))
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / active.sum().clamp(min=1)
    return loss.to(logits.dtype)


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                            reduction: str = "mean", label_smoothing: float = 0.0, n_chunks: int = 1,
                            inplace_backward: bool = False, num_classes: int | None = None) -> torch.Tensor:
    """Plain PyTorch, same semantics (``n_chunks``/``inplace_backward`` are memory knobs: no effect here)."""
    check_loss_args(ignore_index, reduction, label_smoothing)
    num_classes = check_num_classes(num_classes, logits.shape[-1])
    return reference_loss(logits[..., :num_classes], targets, ignore_index, reduction, float(label_smoothing), 0.0)


class CrossEntropyLoss(torch.nn.Module):
    """``cross_entropy`` as a module: ``loss = CrossEntropyLoss()(logits[..., V], targets[...])``."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 n_chunks: int = 1, inplace_backward: bool = False, num_classes: int | None = None):
        super().__init__()
        check_loss_args(ignore_index, reduction, label_smoothing)
        check_num_classes(num_classes, None)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = float(label_smoothing)
        self.n_chunks = n_chunks
        self.inplace_backward = inplace_backward
        self.num_classes = num_classes

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, targets, self.ignore_index, self.reduction, self.label_smoothing,
                             self.n_chunks, self.inplace_backward, self.num_classes)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing="
                f"{self.label_smoothing}, n_chunks={self.n_chunks}, inplace_backward={self.inplace_backward}, "
                f"num_classes={self.num_classes}")


class TritonCrossEntropyLoss(CrossEntropyLoss):
    """The seed's name and constructor (``pad_token_id`` is the ignored target). It used to always reuse the
    logits buffer for the gradient; that is now opt-in with ``inplace_backward=True`` (rules in the module
    docstring) and off by default."""

    def __init__(self, pad_token_id: int = -100, reduction: str = "mean", n_chunks: int = 1,
                 inplace_backward: bool = False):
        super().__init__(ignore_index=pad_token_id, reduction=reduction, n_chunks=n_chunks,
                         inplace_backward=inplace_backward)
