"""Building blocks that several op files share: row layouts, column sums, the GELU formula, the tile shape of
element-wise kernels, and the counter-based random numbers of dropout. (Liger-Kernel keeps the like in
``ops/utils.py``.)

Op files take their plumbing from here, ``triformer._runtime`` (where kernels run, how ops register and launch,
argument checks) and ``triformer._double_backward`` (gradients of gradients); never from each other's private
names. Everything here is public to the package (no leading underscore) and is no part of the user-facing API
exported by ``triformer/__init__.py``.

Kernel vocabulary
    The names kernels use for the same things, so that one signature reads like the next:
    ``<t>_ptr`` is a pointer to tensor ``t`` (``x_ptr``, ``dy_ptr``), commented in a long signature with the
    tensor's shape, layout and whether the kernel writes it (as Liger-Kernel's kernels document theirs);
    ``M`` and ``N`` are the rows and columns of a row-wise or tiled kernel's ``[M, N]`` view (leading dims merged);
    ``rows_inner`` is the rows of one inner group of the ``[outer, inner, N]`` row grid below (1: every row at one
    stride); ``s<t>_<d>`` is tensor ``t``'s stride along dim ``d``: ``o``, ``i`` and ``n`` for the row grid's outer
    group, inner row and column (``sx_o, sx_i, sx_n``, the triple ``row_layout`` returns), or the dim's letter
    where a kernel indexes named dims (``sx_b, sx_h, sx_t, sx_d`` for rope's ``[B, H, T, D]``, ``sx_b, sx_q,
    sx_k`` for softmax's ``[batch, Tq, Tk]`` scores).
Row layouts
    A row-wise kernel reads each tensor ``[..., N]`` as an ``[outer, inner, N]`` grid of rows: row ``r`` starts at
    ``row_offsets(r, rows_inner, s_o, s_i)``, so permuted leading dims (a ``[B, T, N]`` view of
    ``[T, B, N]`` memory) are read in place. ``row_layout`` gives several same-shaped tensors one such grid
    (their strides and the shared ``rows_inner``); ``rows_view`` gives one tensor as an ``[outer, inner, N]`` view,
    for kernels that take a tensor and its ``stride()``. Both merge leading dims wherever the strides allow and
    pick ``rows_inner = 1`` when the rows sit at one stride (every contiguous tensor): Triton specialises an
    integer argument equal to 1 as a constant, so those kernels skip the per-row division.
Column sums
    ``column_sums_kernel`` adds fp32 partial rows (one per program of a backward that accumulated a parameter
    gradient, e.g. a bias) into the gradient, deterministically: no atomics.
Element-wise
    ``gelu_and_grad`` (GELU and its derivative, exact or tanh) and ``elementwise_tiles`` (the tile of a streaming
    element-wise kernel), shared by ``gelu`` and the gated units of ``swiglu``.
Random numbers
    ``philox`` and ``uniform`` are the counter-based stream of ``triformer.dropout``; ``dropout_keep`` its keep
    mask at any logical indices (attention drops its probabilities with it); ``seed_tensor`` turns a user's seed
    into the device tensor the kernels read; ``philox4x32_reference`` and ``dropout_keep_reference`` are the
    same in plain PyTorch.
"""
from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl

from triformer import _runtime  # (first: decides compile vs interpreter before the kernels below)

__all__ = [
    "row_offsets", "row_layout", "rows_view",
    "column_sums_kernel",
    "gelu_and_grad", "elementwise_tiles",
    "philox", "uniform", "dropout_keep", "SEED_LIMIT", "seed_tensor", "philox4x32_reference",
    "dropout_keep_reference",
]


# ------------------------------------------------------------------------------------------------- row layouts
@triton.jit
def row_offsets(rows, rows_inner, s_o, s_i):
    """Element offsets (int64) of the first element of ``rows`` of an ``[outer, inner, N]`` grid (see
    ``row_layout``). ``rows`` may be int32, which a GPU divides far faster than int64 (a row count never reaches
    2**31), or int64; the offsets, which can pass 2**31 elements, are int64 either way."""
    return (rows // rows_inner).to(tl.int64) * s_o + (rows % rows_inner).to(tl.int64) * s_i


def _row_groups(shape, tensors):
    """Leading dims of ``shape`` merged into as few groups as the strides of every tensor allow, each
    ``[size, [stride in each tensor]]`` (dims of size 1 skipped); None when that takes more than two groups."""
    groups = []
    for d in range(len(shape) - 1):
        if shape[d] == 1:
            continue
        strides = [t.stride(d) for t in tensors]
        if groups and all(outer == s * shape[d] for outer, s in zip(groups[-1][1], strides)):
            groups[-1] = [groups[-1][0] * shape[d], strides]
        else:
            groups.append([shape[d], strides])
    return groups if len(groups) <= 2 else None


def row_layout(*tensors: torch.Tensor | None):
    """Same-shaped tensors ``[..., N]`` (None entries allowed) as ``[outer, inner, N]`` grids of one shape, for
    a kernel that finds row ``r`` of each at ``row_offsets(r, rows_inner, s_o, s_i)`` and column ``c``
    ``c * s_n`` further.

    Returns ``(tensors, n_rows, rows_inner, n_cols, strides)``: the tensors themselves, or each copied to
    contiguous when their leading dims cannot be merged into two groups (rare: a 4-D tensor permuted twice);
    ``strides[i]`` is tensor i's ``(s_o, s_i, s_n)``, the first tensor's for a None entry so that an
    absent tensor adds no specialization. ``rows_inner`` is 1 when every tensor's rows sit at one stride
    (contiguous tensors take that path without per-dim Python, which costs microseconds of host time per call).
    A 0-d tensor is one row of one element.
    """
    if tensors[0].dim() == 0:
        tensors = tuple(None if t is None else t.reshape(1) for t in tensors)
    shape = tensors[0].shape
    n_cols = shape[-1]
    n_rows = tensors[0].numel() // n_cols if n_cols else math.prod(shape[:-1])
    present = [t for t in tensors if t is not None]
    if all(t.is_contiguous() for t in present):  # (a column stride of a one-column tensor is never used)
        return tensors, n_rows, 1, n_cols, ((n_cols, n_cols, 1),) * len(tensors)
    groups = _row_groups(shape, present)
    if groups is None:
        return row_layout(*(None if t is None else t.contiguous() for t in tensors))
    if len(groups) == 2:
        (_, s_o), (rows_inner, s_i) = groups
    else:  # one stride for all rows (or a single row)
        rows_inner = 1
        s_o = s_i = groups[0][1] if groups else [0] * len(present)
    present_strides = iter(zip(s_o, s_i, (t.stride(-1) for t in present)))
    strides = [None if t is None else next(present_strides) for t in tensors]
    strides = [strides[0] if s is None else s for s in strides]
    return tensors, n_rows, rows_inner, n_cols, strides


def rows_view(x: torch.Tensor, what: str, copy_ok: bool) -> torch.Tensor:
    """``x[..., N]`` as an ``[outer, inner, N]`` tensor, with ``row_layout``'s grouping (``inner`` 1 when all rows
    sit at one stride): a view of x where its strides allow. Otherwise a contiguous copy when ``copy_ok``, else a
    ValueError naming ``what`` (a kernel that writes through the view must not write into a copy)."""
    if x.dim() == 0:
        return x.view(1, 1, 1)
    groups = _row_groups(x.shape, (x,))
    if groups is None:
        if not copy_ok:
            raise ValueError(f"{what}: its layout cannot be viewed as rows of the last dimension "
                             f"(shape {tuple(x.shape)}, strides {x.stride()}); pass a contiguous tensor")
        x = x.contiguous()
        groups = _row_groups(x.shape, (x,))
    outer = groups[0][0] if groups else 1
    rows_inner = groups[1][0] if len(groups) == 2 else 1
    return x.view(outer, rows_inner, x.shape[-1])


# ------------------------------------------------------------------------------------------------- column sums
@triton.jit
def column_sums_kernel(
    part_ptr,  # fp32 partial rows, contiguous [1 or 2, P, N]
    out0_ptr,  # out: part[0].sum(0), contiguous [N], any float dtype
    out1_ptr,  # out (with TWO): part[1].sum(0), as out0
    P, N, TWO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``out0[:] = part[0].sum(0)`` and, with TWO, ``out1[:] = part[1].sum(0)``.

    Grid ``(cdiv(N, BLOCK_N), 1 or 2)``: axis 1 picks the output, so two gradients (a norm's dweight and dbias)
    take one launch. Callers pick narrow column blocks, so that even a short row (N = 768) spreads over many
    programs, each adding BLOCK_P partial rows per step."""
    which = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    base = part_ptr + which.to(tl.int64) * P * N
    acc = tl.zeros([BLOCK_P, BLOCK_N], tl.float32)
    for start in range(0, P, BLOCK_P):
        part_rows = start + tl.arange(0, BLOCK_P)
        mask = (part_rows < P)[:, None] & (cols < N)[None, :]
        acc += tl.load(base + part_rows.to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, 0)
    if TWO:
        if which == 1:
            tl.store(out1_ptr + cols, total.to(out1_ptr.dtype.element_ty), mask=cols < N)
        else:
            tl.store(out0_ptr + cols, total.to(out0_ptr.dtype.element_ty), mask=cols < N)
    else:
        tl.store(out0_ptr + cols, total.to(out0_ptr.dtype.element_ty), mask=cols < N)


# ------------------------------------------------------------------------------------------------ element-wise
@triton.jit
def gelu_and_grad(x, APPROX_TANH: tl.constexpr):
    """(gelu(x), d gelu / dx) in fp32, exact (erf) or with the tanh approximation; callers that need only one
    rely on dead-code elimination."""
    if APPROX_TANH:
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): no tanh primitive needed, and no cancellation for x << 0.
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        cdf = 1.0 / (1.0 + tl.exp(-2.0 * inner))
        pdf_term = x * cdf * (1.0 - cdf) * 2.0 * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    else:
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        pdf_term = x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    return x * cdf, cdf + pdf_term


@_runtime.plan_cache
def elementwise_tiles(M: int, N: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for a streaming kernel over an [M, N] grid of rows (cached: it runs on every launch).

    GPU: 4096-element tiles at most 1024 wide, i.e. 32 values per thread of 4 warps, loaded as a few
    16-byte vectors along a row. Interpreter: rows up to 16k wide, as many as fit 64k elements.
    """
    block_n = min(triton.next_power_of_2(N), 1 << 14 if _runtime.INTERPRET else 1024)
    block_m = _runtime.rows_per_program(M, block_n, gpu_rows=min(max(1, 4096 // block_n), triton.next_power_of_2(M)))
    return block_m, block_n


# ---------------------------------------------------------------------------------------------- random numbers
# The stream (triformer.dropout's module docstring states it in full): element i of a tensor takes the top 24
# bits of word i % 4 of Philox4x32-10 on the counter (lo32(i // 4), hi32(i // 4), 0, 0) with the key
# (lo32(seed), hi32(seed)), divided by 2**24, and is kept iff that is >= p (in fp32).
@triton.jit
def philox(seed, counter):
    """Philox4x32-10 on counter (lo32, hi32, 0, 0) of a non-negative int64 counter; four uint32 words.
    The 32-bit counter form is spelled out because tl.randint4x's handling of 64-bit offsets differs
    between triton versions."""
    lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    hi = (counter >> 32).to(tl.uint32)
    zero = lo * 0
    return tl.philox(seed, lo, hi, zero, zero)


@triton.jit
def uniform(r0, r1, r2, r3, lane):
    """Word ``lane`` (0..3) of a ``philox`` output as a float in [0, 1) with 24 bits, exact in fp32."""
    bits = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def dropout_keep(seed, offsets, p):
    """Keep-mask (True = kept) of the elements at logical indices ``offsets`` (any integer tensor of any
    shape) of a tensor dropped with ``seed`` and probability ``p``; identical to what ``triformer.dropout``
    applies. For use inside other kernels (e.g. attention dropout on the [B, H, Tq, Tk] probability tensor, with
    ``offsets = ((b * H + h) * Tq + q) * Tk + k``). Costs one Philox call per element; ``dropout`` itself
    shares each call between four elements."""
    offsets = offsets.to(tl.int64)
    r0, r1, r2, r3 = philox(seed, offsets >> 2)
    return uniform(r0, r1, r2, r3, offsets & 3) >= p


SEED_LIMIT = 2**63


def seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """The seed as a 0-dim int64 tensor on ``device``, where the kernels read it. A tensor, not an int, so that
    torch.compile keeps drawing it in the graph instead of baking one value in, and so that a CUDA graph
    replays a fresh draw. ``None`` draws from ``device``'s default generator; otherwise an int in
    [0, 2**63) or a 0-dim integer tensor (TypeError / ValueError naming ``seed`` if not)."""
    if seed is None:
        return torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
            raise TypeError(f"seed tensor must be a 0-dim integer tensor, got shape {tuple(seed.shape)} "
                            f"dtype {seed.dtype}")
        if not torch.compiler.is_compiling() and not _runtime.is_fake(seed) and not 0 <= int(seed) < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**63), got {int(seed)}")
        return seed.to(device=device, dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be None, an int or a 0-dim integer tensor, got {type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return torch.tensor(int(seed), dtype=torch.int64, device=device)


# Philox4x32 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", 2011).
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of ``a * b`` for a 32-bit constant and uint32 values held in int64, without
    overflowing int64 (split ``a`` into 16-bit halves)."""
    low_part = b * (a & 0xFFFF)
    mid = b * (a >> 16) + (low_part >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low_part & 0xFFFF)


def philox4x32_reference(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 10):
    """Plain-PyTorch Philox4x32 on int64 tensors holding uint32 values; returns the four output words."""
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _U32, (k1 + _KEY_B) & _U32
    return c0, c1, c2, c3


def dropout_keep_reference(offsets: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """The keep-mask ``dropout_keep`` computes, in plain PyTorch (``offsets``: int64 logical indices)."""
    offsets = offsets.to(torch.int64)
    counter = offsets >> 2
    zero = torch.zeros_like(counter)
    words = torch.stack(philox4x32_reference(counter & _U32, counter >> 32, zero, zero, seed & _U32, seed >> 32), -1)
    bits = words.gather(-1, (offsets & 3).unsqueeze(-1)).squeeze(-1)
    p32 = torch.tensor(p, dtype=torch.float32).item()  # the kernel compares against p in float32
    return (bits >> 8).to(torch.float64) / 2**24 >= p32
