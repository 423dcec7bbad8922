"""Layer normalization over the last dimension, and the row-normalization kernels that RMSNorm
(``triformer.rmsnorm``) and the fused residual-add norms (``triformer.fused_add_norm``) share.

One forward kernel serves all of them: ``RMS`` centres rows at zero instead of their mean, and
``HAS_RESIDUAL`` normalizes ``x + residual``, writing that sum out for the next residual connection, and
``HAS_DROPOUT`` drops ``x`` first (``residual + dropout(x)``, the mask ``triformer.dropout`` applies with the same
seed, regenerated from the seed and each element's logical index). One backward kernel serves all of them too:
the fused ops add the gradient that reaches the sum directly (``HAS_DRES``), and with ``HAS_DROPOUT`` also write
the dropped input's gradient (the sum's, masked and scaled) in the same pass.

Forward: a program normalizes BLOCK_M rows. A row that fits one BLOCK_N tile is read once and kept in
registers. A wider row is read twice in column blocks: pass 1 merges each block's mean and sum of squared
deviations into the running ones (Chan et al.), which stays accurate when |mean| >> std, where
E[x^2] - mean^2 would cancel; pass 2 normalizes and writes.

Backward: each element of dx needs two row sums (of g * xhat and of g, with g = dy * weight) first, and
dweight/dbias need column sums over all rows. A fixed set of persistent programs each walks a strided
subset of row blocks, keeps its column sums in registers and writes them to its own row of a
[programs, N] fp32 buffer; ``column_sums_kernel`` (``triformer._shared``) then adds those rows. This
reduction is parallel and deterministic, with no locks or atomics.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import nn

from triformer import _runtime
from triformer._double_backward import needs_graph, reference_grads
from triformer._runtime import INTERPRET
from triformer._shared import column_sums_kernel, dropout_keep, row_layout, row_offsets

__all__ = ["LayerNormFunction", "LayerNorm", "layer_norm", "layer_norm_reference",
           "TritonLayerNorm"]  # the seed's name (see triformer/__init__.py)
# RMSNorm (triformer.rmsnorm) and the fused residual-add norms (triformer.fused_add_norm) run this module's
# kernels through its public launchers, ops and checks (not exported by the package): norm_forward,
# norm_backward, layer_norm_bwd, layer_norm_reference, check_args, check_last_dim, grad_or_none, NormBase.

# Widest column block kept as one tile. A wider row loops over column blocks. On the GPU a backward tile
# also holds dweight/dbias accumulators, and 8192 columns (32 warps) is about what registers allow without
# spilling. Tests lower these to run the column loops on small inputs.
FWD_MAX_BLOCK_N = 1 << 16 if INTERPRET else 16384
BWD_MAX_BLOCK_N = 1 << 16 if INTERPRET else 8192


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _load_tile(ptr, starts, cols, stride_n, mask):
    offsets = starts[:, None] + cols[None, :].to(tl.int64) * stride_n
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_vector(ptr, cols, col_ok, identity, PRESENT: tl.constexpr, BLOCK_N: tl.constexpr):
    # An absent weight/bias is its identity (1 or 0). The extra multiply-add costs nothing in a memory-bound kernel.
    if PRESENT:
        v = tl.load(ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        v = tl.full([BLOCK_N], identity, tl.float32)
    return v


@triton.jit
def _load_input(X, R, S, SEED, x_starts, r_starts, out_starts, cols, sx_n, sr_n, mask, dropout_p, drop_scale,
                HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    x = _load_tile(X, x_starts, cols, sx_n, mask)
    if HAS_DROPOUT:
        dropout_p, drop_scale = tl.cast(dropout_p, tl.float32), tl.cast(drop_scale, tl.float32)  # fp64 under Inductor
        # triformer.dropout's mask: element (row, col) of x is logical index row * N + col (out_starts = row * N).
        # A kept value is rounded to x's dtype as dropout's output is, so the sum is exactly residual + dropout(x).
        keep = dropout_keep(tl.load(SEED), out_starts[:, None] + cols[None, :], dropout_p)
        x = tl.where(keep, (x * drop_scale).to(X.dtype.element_ty).to(tl.float32), 0.0)
    if HAS_RESIDUAL:
        s = (x + _load_tile(R, r_starts, cols, sr_n, mask)).to(S.dtype.element_ty)
        tl.store(S + out_starts[:, None] + cols[None, :], s, mask=mask)
        # Normalize the sum as stored (rounded to its dtype), so normed == norm(returned sum) exactly.
        x = s.to(tl.float32)
    return x


@triton.jit
def _tile_moments(x, mask, count, RMS: tl.constexpr, BLOCK_M: tl.constexpr):
    # Per row: (mean, sum of squared deviations) of the valid elements. RMS norm centres at zero.
    if RMS:
        mean = tl.zeros([BLOCK_M], tl.float32)
        m2 = tl.sum(x * x, 1)
    else:
        mean = tl.sum(x, 1) / count
        centred = tl.where(mask, x - mean[:, None], 0.0)
        m2 = tl.sum(centred * centred, 1)
    return mean, m2


@triton.jit
def _rstd(m2, N, eps, row_ok):
    # Padding rows get variance 1, so eps = 0 does not divide by zero in rows nobody reads.
    return 1.0 / tl.sqrt(tl.where(row_ok, m2 / N, 1.0) + eps)


@triton.jit
def _store_normed(Y, W, B, x, mean, rstd, out_starts, cols, col_ok, mask,
                  HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    w = _load_vector(W, cols, col_ok, 1.0, HAS_WEIGHT, BLOCK_N)
    b = _load_vector(B, cols, col_ok, 0.0, HAS_BIAS, BLOCK_N)
    y = (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + out_starts[:, None] + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_fwd_kernel(
    X, R, W, B, Y, S, Mean, Rstd, SEED,
    M, N, rows_inner, eps, dropout_p, drop_scale,
    sx_o, sx_i, sx_n, sr_o, sr_i, sr_n,
    RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_TILE: tl.constexpr,
):
    # fp32 math: Inductor passes Python floats as fp64. With HAS_DROPOUT, SEED (0-d int64, read) is read from
    # device memory rather than passed by value, so a compiled graph or CUDA graph draws a fresh seed every step,
    # and drop_scale = 1 / (1 - dropout_p); without it the launcher passes None for all three, so the kernel
    # compiles to the code it had before dropout was added (no extra parameters).
    eps = tl.cast(eps, tl.float32)
    # One program per BLOCK_M rows. Outputs (Y, S) are contiguous [M, N], and statistics are fp32 [M].
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_starts = row_offsets(rows, rows_inner, sx_o, sx_i)
    r_starts = row_offsets(rows, rows_inner, sr_o, sr_i)
    out_starts = rows * N
    if ONE_TILE:
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        x = _load_input(X, R, S, SEED, x_starts, r_starts, out_starts, cols, sx_n, sr_n, mask, dropout_p,
                        drop_scale, HAS_RESIDUAL, HAS_DROPOUT)
        mean, m2 = _tile_moments(x, mask, N, RMS, BLOCK_M)
        rstd = _rstd(m2, N, eps, row_ok)
        _store_normed(Y, W, B, x, mean, rstd, out_starts, cols, col_ok, mask, HAS_WEIGHT, HAS_BIAS, BLOCK_N)
    else:
        mean = tl.zeros([BLOCK_M], tl.float32)
        m2 = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            mask = row_ok[:, None] & col_ok[None, :]
            x = _load_input(X, R, S, SEED, x_starts, r_starts, out_starts, cols, sx_n, sr_n, mask, dropout_p,
                            drop_scale, HAS_RESIDUAL, HAS_DROPOUT)
            count = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            block_mean, block_m2 = _tile_moments(x, mask, count, RMS, BLOCK_M)
            total = start + count
            delta = block_mean - mean
            mean += delta * (count / total)
            m2 += block_m2 + delta * delta * (start * count / total)
        rstd = _rstd(m2, N, eps, row_ok)
        if HAS_RESIDUAL:
            # Pass 2 re-reads the sum from S. A barrier makes pass 1's stores visible to every thread.
            tl.debug_barrier()
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            mask = row_ok[:, None] & col_ok[None, :]
            if HAS_RESIDUAL:
                x = _load_tile(S, out_starts, cols, 1, mask)
            else:
                x = _load_tile(X, x_starts, cols, sx_n, mask)
            _store_normed(Y, W, B, x, mean, rstd, out_starts, cols, col_ok, mask, HAS_WEIGHT, HAS_BIAS, BLOCK_N)
    if not RMS:
        tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _load_row_stats(Mean, Rstd, rows, row_ok, RMS: tl.constexpr):
    rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
    if RMS:
        mean = tl.zeros_like(rstd)
    else:
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
    return mean, rstd


@triton.jit
def _store_dx(DX, DRES, DXB, SEED, g, xhat, c1, c2, rstd, out_starts, d_starts, cols, sd_n, mask, dropout_p,
              drop_scale, RMS: tl.constexpr, HAS_DRES: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    # c1 = mean(g * xhat), c2 = mean(g) per row (the mean's gradient, absent for RMS norm)
    if RMS:
        dx = (g - xhat * c1[:, None]) * rstd[:, None]
    else:
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    if HAS_DRES:
        dx += _load_tile(DRES, d_starts, cols, sd_n, mask)
    dx = dx.to(DX.dtype.element_ty)
    tl.store(DX + out_starts[:, None] + cols[None, :], dx, mask=mask)
    if HAS_DROPOUT:
        dropout_p, drop_scale = tl.cast(dropout_p, tl.float32), tl.cast(drop_scale, tl.float32)  # fp64 under Inductor
        # The dropped input's gradient: dropout's backward (the forward's mask, regenerated) on dx as stored, so
        # it equals what triformer.dropout's backward gives for that gradient of the sum.
        keep = dropout_keep(tl.load(SEED), out_starts[:, None] + cols[None, :], dropout_p)
        dxb = tl.where(keep, dx.to(tl.float32) * drop_scale, 0.0)
        tl.store(DXB + out_starts[:, None] + cols[None, :], dxb.to(DXB.dtype.element_ty), mask=mask)


@triton.jit
def _load_dy_x(DY, X, rows, rows_inner, cols, mask, sdy_o, sdy_i, sdy_n, sx_o, sx_i, sx_n):
    """The [BLOCK_M, BLOCK_N] tiles of dy and x, in fp32."""
    dy = _load_tile(DY, row_offsets(rows, rows_inner, sdy_o, sdy_i), cols, sdy_n, mask)
    x = _load_tile(X, row_offsets(rows, rows_inner, sx_o, sx_i), cols, sx_n, mask)
    return dy, x


@triton.jit
def _rows_of_block(rb, M, BLOCK_M: tl.constexpr):
    """(rows, row_ok) of row block rb. No pointer goes in: torch.compile's analysis of what a kernel writes
    (wrap_triton) counts every argument of a helper whose result addresses a store as written."""
    rows = (rb * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    return rows, rows < M


@triton.jit
def _bwd_block(DY, X, Mean, Rstd, rows, row_ok, rows_inner, cols, col_ok, sdy_o, sdy_i, sdy_n, sx_o, sx_i, sx_n,
               RMS: tl.constexpr):
    """(mean, rstd, dy, x) of the backward's rows; rows past M load nothing."""
    mean, rstd = _load_row_stats(Mean, Rstd, rows, row_ok, RMS)
    dy, x = _load_dy_x(DY, X, rows, rows_inner, cols, row_ok[:, None] & col_ok[None, :], sdy_o, sdy_i, sdy_n,
                       sx_o, sx_i, sx_n)
    return mean, rstd, dy, x


@triton.jit
def _normalized(x, mean, rstd):
    return (x - mean[:, None]) * rstd[:, None]


@triton.jit
def _norm_bwd_kernel(
    DY, X, W, Mean, Rstd, DRES, DX, DWB, RowSums, SEED, DXB,
    M, N, rows_inner, n_row_blocks, dropout_p, drop_scale,
    sdy_o, sdy_i, sdy_n, sx_o, sx_i, sx_n, sd_o, sd_i, sd_n,
    RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DRES: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_TILE: tl.constexpr, PREFETCH: tl.constexpr,
):
    # HAS_DROPOUT (the fused add-norms with dropout on x): DX is the gradient of the sum (the residual's), DXB
    # (contiguous, x's shape, written) the dropped input's, with the forward's mask regenerated from SEED (0-d
    # int64, read) at each element's logical index; _store_dx casts dropout_p and drop_scale to fp32 (Inductor
    # passes Python floats as fp64). Without it all four are None: the kernel has no extra parameters.
    # Persistent: program p takes row blocks p, p + P, p + 2P, ... and writes its dweight/dbias column
    # sums to row p of DWB's dweight / dbias plane ([planes, P, N] fp32, one buffer: see norm_backward). The
    # accumulators are 2-D so that the cross-thread reduction over rows happens once per column block, not once
    # per row block.
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    if not ONE_TILE:
        # Pass 1, for rows wider than one tile: the row sums c1, c2 of this program's rows (see _store_dx),
        # column block by column block, into RowSums ([2, M] fp32).
        for rb in range(pid, n_row_blocks, n_programs):
            rows = (rb * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            row_ok = rows < M
            mean, rstd = _load_row_stats(Mean, Rstd, rows, row_ok, RMS)
            c1 = tl.zeros([BLOCK_M], tl.float32)
            c2 = tl.zeros([BLOCK_M], tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                col_ok = cols < N
                mask = row_ok[:, None] & col_ok[None, :]
                w = _load_vector(W, cols, col_ok, 1.0, HAS_WEIGHT, BLOCK_N)
                dy, x = _load_dy_x(DY, X, rows, rows_inner, cols, mask, sdy_o, sdy_i, sdy_n, sx_o, sx_i, sx_n)
                g = dy * w[None, :]
                c1 += tl.sum(g * _normalized(x, mean, rstd), 1)
                c2 += tl.sum(g, 1)
            tl.store(RowSums + rows, c1 / N, mask=row_ok)
            tl.store(RowSums + M + rows, c2 / N, mask=row_ok)
        # Other threads of this program stored the row sums that pass 2 loads.
        tl.debug_barrier()
    # Pass 2 (the only one when a row fits one tile): dx, and the dweight/dbias sums. Column blocks outermost,
    # so one block's sums stay in registers while the program walks its rows. With ONE_TILE the loop has
    # constant bounds and one iteration (the compiler drops it), and each row's sums come from its tile.
    cols_end = N
    if ONE_TILE:
        cols_end = BLOCK_N
    for start in range(0, cols_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        w = _load_vector(W, cols, col_ok, 1.0, HAS_WEIGHT, BLOCK_N)
        dw = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        db = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        # Each warp issues its loads in order, so a block's tiles are loaded one block ahead (PREFETCH): while
        # this block's row sums and stores run, the next block's dy and x are already in flight. Without it a
        # program has one block's bytes in flight at a time, too few to cover the memory latency at narrow rows.
        rows, row_ok = _rows_of_block(pid, M, BLOCK_M)
        mean, rstd, dy, x = _bwd_block(DY, X, Mean, Rstd, rows, row_ok, rows_inner, cols, col_ok,
                                       sdy_o, sdy_i, sdy_n, sx_o, sx_i, sx_n, RMS)
        for rb in range(pid, n_row_blocks, n_programs):
            next_rows, next_ok = _rows_of_block(rb + n_programs, M, BLOCK_M)
            if PREFETCH:
                nxt = _bwd_block(DY, X, Mean, Rstd, next_rows, next_ok, rows_inner, cols, col_ok,
                                 sdy_o, sdy_i, sdy_n, sx_o, sx_i, sx_n, RMS)
            mask = row_ok[:, None] & col_ok[None, :]
            if not ONE_TILE:
                c1 = tl.load(RowSums + rows, mask=row_ok, other=0.0)
                c2 = tl.load(RowSums + M + rows, mask=row_ok, other=0.0)
            xhat = _normalized(x, mean, rstd)
            g = dy * w[None, :]
            if ONE_TILE:  # the row sums of pass 1, from the tile itself
                c1 = tl.sum(g * xhat, 1) / N
                c2 = tl.sum(g, 1) / N
            _store_dx(DX, DRES, DXB, SEED, g, xhat, c1, c2, rstd, rows * N,
                      row_offsets(rows, rows_inner, sd_o, sd_i), cols, sd_n, mask, dropout_p, drop_scale, RMS,
                      HAS_DRES, HAS_DROPOUT)
            dw += dy * xhat
            db += dy
            if not PREFETCH:
                nxt = _bwd_block(DY, X, Mean, Rstd, next_rows, next_ok, rows_inner, cols, col_ok,
                                 sdy_o, sdy_i, sdy_n, sx_o, sx_i, sx_n, RMS)
            rows, row_ok = next_rows, next_ok
            mean, rstd, dy, x = nxt
        if HAS_WEIGHT:
            tl.store(DWB + pid.to(tl.int64) * N + cols, tl.sum(dw, 0), mask=col_ok)
        if HAS_BIAS:
            bias_row = pid + n_programs if HAS_WEIGHT else pid  # dbias's plane follows dweight's
            tl.store(DWB + bias_row.to(tl.int64) * N + cols, tl.sum(db, 0), mask=col_ok)


# ------------------------------------------------------------------------------------------- launchers
# At GPT-2 sizes a norm's kernels take tens of microseconds on the GPU and the Python around them can take
# longer (benchmarks/host_overhead.py), so the launchers keep their per-call work small: launch
# parameters are computed once per shape (Triton 3.9's cdiv and next_power_of_2 are constexpr-function
# wrappers, ~2 us a call on the host), contiguous inputs go to the kernels without views, and torch.empty
# gets its sizes as ``size=`` (a positional torch.Size takes ~1 us longer to parse).
def _tile(n_rows: int, n_cols: int, max_block_n: int, gpu_tile: int, per_thread: int,
          max_warps: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of a row-wise launch. A GPU tile holds about gpu_tile elements, which is
    several rows of a narrow layer or one row of a wide one, and each thread holds about per_thread of them."""
    block_n = min(triton.next_power_of_2(n_cols), max_block_n)
    block_m = _runtime.rows_per_program(n_rows, block_n, gpu_rows=max(1, gpu_tile // block_n))
    num_warps = min(max_warps, max(4, block_m * block_n // (32 * per_thread)))
    return block_m, block_n, num_warps


# GPU tiles: elements per tile and per thread of each kernel, and how many backward warps an SM keeps resident
# (the persistent backward grid is sized to that, so there is no second wave). Chosen by
# `python -m benchmarks.layernorm --sweep` (benchmarks/results/h100/layernorm_sweep.md): 16 elements per thread
# with 16 resident warps and the next row block loaded ahead (BWD_PREFETCH) was fastest at 768, 2048 and 4096
# columns; 2048-element forward tiles (several rows of a narrow layer per program) likewise.
FWD_GPU_TILE, FWD_PER_THREAD = 2048, 16
BWD_GPU_TILE, BWD_PER_THREAD, BWD_RESIDENT_WARPS, BWD_PREFETCH = 2048, 16, 16, True


@_runtime.plan_cache
def _fwd_launch(m: int, n: int, max_block_n: int):
    """(grid, meta-parameters) of the forward."""
    block_m, block_n, num_warps = _tile(m, n, max_block_n, gpu_tile=FWD_GPU_TILE, per_thread=FWD_PER_THREAD,
                                        max_warps=16)
    return (triton.cdiv(m, block_m),), dict(BLOCK_M=block_m, BLOCK_N=block_n, ONE_TILE=block_n >= n,
                                            num_warps=num_warps)


@_runtime.plan_cache
def _bwd_launch(m: int, n: int, max_block_n: int, device_index: int):
    """(programs, row blocks, meta-parameters) of the backward, then (column blocks, meta-parameters) of
    column_sums_kernel, which adds the programs' partial dweight/dbias rows."""
    block_m, block_n, num_warps = _tile(m, n, max_block_n, gpu_tile=BWD_GPU_TILE, per_thread=BWD_PER_THREAD,
                                        max_warps=32)
    n_row_blocks = triton.cdiv(m, block_m)
    # Two interpreter programs exercise both the persistent row loop and the cross-program reduction.
    programs = min(n_row_blocks, 2 if INTERPRET else
                   _runtime.multiprocessors(device_index) * max(1, BWD_RESIDENT_WARPS // num_warps))
    if INTERPRET:
        sum_p = triton.next_power_of_2(programs)
        sum_n = min(triton.next_power_of_2(n), (1 << 16) // sum_p)
    else:
        sum_p, sum_n = 128, 32
    return (programs, n_row_blocks,
            dict(BLOCK_M=block_m, BLOCK_N=block_n, ONE_TILE=block_n >= n, PREFETCH=BWD_PREFETCH, num_warps=num_warps),
            triton.cdiv(n, sum_n), dict(BLOCK_P=sum_p, BLOCK_N=sum_n, num_warps=4))


def _dropout_args(seed: Optional[torch.Tensor], p: float) -> tuple:
    """The kernels' (dropout_p, drop_scale): None without dropout (Triton then drops the parameters), else p and
    1 / (1 - p) computed on the host in float64 as triformer.dropout does, so the kept elements are scaled by the
    same fp32 number."""
    return (None, None) if seed is None else (p, 1.0 / (1.0 - p))


def norm_forward(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], eps: float, rms: bool, seed: Optional[torch.Tensor] = None,
                 dropout_p: float = 0.0):
    """Launch the forward. Returns (y, sum or None, mean or None (RMS), rstd), with mean and rstd fp32 per row.
    With ``seed`` (a 0-d int64 tensor on x's device; needs a residual) x is dropped with ``dropout_p`` before the
    add, as ``triformer.dropout(x, dropout_p, seed=seed)`` drops it."""
    assert seed is None or residual is not None, "dropout is fused into the residual add only"
    n, m = x.shape[-1], n_rows(x)
    y = torch.empty(size=x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty(size=x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    mean = None if rms else torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return y, s, mean, rstd
    (x3, r3), _, rows_inner, _, (sx, sr) = row_layout(x, residual)
    grid, meta = _fwd_launch(m, n, FWD_MAX_BLOCK_N)
    _runtime.launch(_norm_fwd_kernel, grid)(
        x3, r3, weight, bias, y, s, mean, rstd, seed, m, n, rows_inner, eps, *_dropout_args(seed, dropout_p),
        *sx, *sr, RMS=rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, HAS_DROPOUT=seed is not None, **meta,
    )
    return y, s, mean, rstd


def norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                  mean: Optional[torch.Tensor], rstd: torch.Tensor, dres: Optional[torch.Tensor],
                  seed: Optional[torch.Tensor] = None, dropout_p: float = 0.0):
    """Launch the backward of y = norm(x) (RMS norm when ``mean`` is None), adding ``dres``, a gradient that
    reaches x directly, to dx. Returns (dx, dweight or None, dbias or None, dxb or None), each in its input's
    dtype. ``bias`` only says whether there is one, and its dtype. With ``seed`` (the fused forward's dropout
    seed; x is then the saved sum) dxb is the dropped input's gradient, dx masked as the forward dropped it
    and scaled by 1 / (1 - dropout_p)."""
    n, m = x.shape[-1], n_rows(x)
    dx = torch.empty(size=x.shape, dtype=x.dtype, device=x.device)
    dxb = None if seed is None else torch.empty(size=x.shape, dtype=x.dtype, device=x.device)
    if m == 0:  # no rows: parameter gradients are empty sums
        return (dx, None if weight is None else torch.zeros_like(weight),
                None if bias is None else torch.zeros_like(bias), dxb)
    programs, n_row_blocks, meta, sum_blocks, sum_meta = _bwd_launch(m, n, BWD_MAX_BLOCK_N, x.get_device())
    params = [p for p in (weight, bias) if p is not None]
    # Each program's partial dweight row, then its partial dbias row, in one fp32 buffer ([params, programs, N]),
    # handed to the kernel whole: traced by torch.compile, a kernel writing two views of one buffer becomes two
    # copies of it and a copy back.
    part = torch.empty(len(params), programs, n, dtype=torch.float32, device=x.device) if params else None
    row_sums = None if meta["ONE_TILE"] else torch.empty(2, m, dtype=torch.float32, device=x.device)
    (x3, dy3, d3), _, rows_inner, _, (sx, sdy, sd) = row_layout(x, dy, dres)
    _runtime.launch(_norm_bwd_kernel, (programs,))(
        dy3, x3, weight, mean, rstd, d3, dx, part, row_sums, seed, dxb, m, n, rows_inner, n_row_blocks,
        *_dropout_args(seed, dropout_p), *sdy, *sx, *sd, RMS=mean is None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, HAS_DRES=dres is not None, HAS_DROPOUT=seed is not None, **meta,
    )
    grads = [torch.empty(n, dtype=p.dtype, device=x.device) for p in params]
    if grads:  # grads[i] = part[i].sum(0), each in its parameter's dtype; grid axis 1 picks the output
        _runtime.launch(column_sums_kernel, (sum_blocks, len(grads)))(part, grads[0], grads[-1], programs, n,
                                                                      TWO=len(grads) == 2, **sum_meta)
    dw = grads[0] if weight is not None else None
    db = grads[-1] if bias is not None else None
    return dx, dw, db, dxb


def n_rows(x: torch.Tensor):
    """Rows normalized: every index of x's leading dims."""
    return x.numel() // x.shape[-1]


def grad_or_none(grad: torch.Tensor, param: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if param is None else grad


def check_args(x, residual, weight, bias, eps) -> float:
    """Validate the arguments of every norm op before any launch. Returns eps as a float."""
    _runtime.check_float("x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension (the one normalized), got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if residual is not None:
        _runtime.check_float("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _runtime.check_float(name, p)
            if p.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},) to match x's last dimension, got {tuple(p.shape)}")
    _runtime.check_device(x=x, residual=residual, weight=weight, bias=bias)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (_runtime.is_finite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return float(eps)


def check_normalized_shape(normalized_shape) -> tuple[int]:
    """The modules normalize the last dimension only: an int, or a sequence holding one int."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) != 1 or not isinstance(shape[0], int) or isinstance(shape[0], bool) or shape[0] <= 0:
        raise ValueError(
            f"normalized_shape must be a positive int or a 1-element sequence (triformer normalizes the last "
            f"dimension only), got {normalized_shape!r}"
        )
    return shape


def check_last_dim(module: nn.Module, x) -> None:
    """A norm module's input must end in its normalized_shape."""
    if isinstance(x, torch.Tensor) and (x.dim() == 0 or x.shape[-1] != module.normalized_shape[0]):
        raise ValueError(f"{type(module).__name__}{module.normalized_shape} expects x's last dimension to be "
                         f"{module.normalized_shape[0]}, got shape {tuple(x.shape)}")


# ------------------------------------------------------------------------------------------ custom ops
@_runtime.kernel_op("triformer::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, _, mean, rstd = norm_forward(x, None, weight, bias, eps, rms=False)
    return y, mean, rstd


@_runtime.kernel_op("triformer::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   mean: torch.Tensor, rstd: torch.Tensor,
                   dres: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dres: a gradient reaching x directly (the fused ops' residual sum), added to dx."""
    dx, dw, db, _ = norm_backward(dy, x, weight, bias, mean, rstd, dres)
    return dx, x.new_empty(0) if dw is None else dw, x.new_empty(0) if db is None else db


# ------------------------------------------------------------------------------------- autograd, API
class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = layer_norm_fwd(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if needs_graph(dy, x, weight, bias):  # create_graph=True: through the reference (triformer._double_backward)
            dx, dw, db = reference_grads(lambda x_, w_, b_: layer_norm_reference(x_, w_, b_, ctx.eps),
                                         (x, weight, bias), (dy,), ctx.needs_input_grad[:3])
            return dx, dw, db, None
        dx, dw, db = layer_norm_bwd(dy, x, weight, bias, mean, rstd, None)
        return dx, grad_or_none(dw, weight), grad_or_none(db, bias), None


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5) -> torch.Tensor:
    """Layer norm over the last dim: (x - mean) / sqrt(var + eps) * weight + bias, output in x's dtype.
    x may be fp32/fp16/bf16 with weight/bias in another float dtype (e.g. fp32 under autocast). Each
    gradient comes back in its input's dtype."""
    eps = check_args(x, None, weight, bias, eps)
    return LayerNormFunction.apply(x, weight, bias, eps)


def layer_norm_reference(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                         eps: float = 1e-5) -> torch.Tensor:
    """Plain PyTorch layer_norm with the same semantics: computed in fp32 (float64 for float64 inputs),
    returned in x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).square().mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


class NormBase(nn.Module):
    """What ``LayerNorm`` and ``triformer.rmsnorm.RMSNorm`` share: torch.nn's constructor arguments and attributes
    (``normalized_shape``, the last dim only; ``eps``; ``elementwise_affine``), its parameters ``weight`` (ones)
    and, for a norm with one (``bias`` True or False, None for a norm without), ``bias`` (zeros), so that state
    dicts load either way, and its repr."""

    def __init__(self, normalized_shape, eps, elementwise_affine: bool, bias: Optional[bool], device, dtype):
        super().__init__()
        self.normalized_shape = check_normalized_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        affine = {"weight": elementwise_affine}
        if bias is not None:
            affine["bias"] = elementwise_affine and bias
        for name, present in affine.items():
            if present:
                setattr(self, name, nn.Parameter(torch.empty(self.normalized_shape, **factory)))
            else:
                self.register_parameter(name, None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if getattr(self, "bias", None) is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class LayerNorm(NormBase):
    """Drop-in for ``torch.nn.LayerNorm`` over the last dimension. It takes the same constructor arguments
    and has the same parameter names, so state dicts load either way."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_last_dim(self, x)
        return layer_norm(x, self.weight, self.bias, self.eps)


TritonLayerNorm = LayerNorm
"""The seed's name for the module (``TritonLayerNorm(hidden)``): see triformer/__init__.py."""
