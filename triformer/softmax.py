"""Softmax over the last dimension, optionally scaled and causally masked.

``softmax(x, is_causal=False, scale=1.0)`` is ``softmax(scale * x)`` along the last dim. With ``is_causal``
``x`` holds attention scores ``[..., Tq, Tk]`` and query row ``i`` sees keys ``j <= i + (Tk - Tq)``
(bottom-right aligned: ``Tq == Tk`` is ordinary causal attention, a shorter query block sees the most recent
keys). Masked entries output exactly 0 and get zero gradient.

Fully masked rows: a row whose visible scores are all ``-inf`` (or that sees no key at all, when ``Tk < Tq``)
outputs all zeros and gets zero gradient, where ``torch.softmax`` would return NaN. NaN or ``+inf`` scores
still give a NaN row, as in PyTorch.

Backward: ``dx = scale * y * (dy - sum(dy * y))`` from the saved output ``y``.
"""
from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from triformer import _runtime
from triformer._double_backward import needs_graph
from triformer._runtime import INTERPRET, check_device, check_float

__all__ = ["SoftmaxFunction", "Softmax", "softmax", "softmax_reference",
           "TritonSoftmax"]  # the seed's name (see triformer/__init__.py)

# ---------------------------------------------------------------------------------------------------------
# Kernels
#
# Blocking: each program owns ROWS rows and sweeps their columns in BLOCK_N-wide tiles ([ROWS, BLOCK_N]).
# Rows up to MAX_SINGLE_BLOCK columns are held whole in registers (SINGLE): one read, one exp per element.
# Longer rows take two sweeps, an online max/sum and then the normalisation; on a GPU the second sweep
# re-reads rows the first has just pulled into L2, so DRAM traffic stays close to one read and one write.
# A row index r of the [batch, Tq, Tk] view splits into (batch b, query q) so arbitrary batch/query/key
# strides work without a copy.
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _row_coords(n_rows, tq, shift, ROWS: tl.constexpr):
    """This program's rows: batch index, query index, in-range flag, last visible key (causal)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    b = rows // tq
    q = rows - b * tq
    return b, q, rows < n_rows, q + shift


@triton.jit
def _load_tile(ptr, row_off, col_stride, cols, n_cols, row_ok, last, other, IS_CAUSAL: tl.constexpr):
    """[ROWS, BLOCK_N] tile in fp32; invisible entries (out of range or causally masked) read as ``other``,
    and all but at most 15 a row of them are not fetched from memory."""
    in_row = row_ok[:, None] & (cols[None, :] < n_cols)
    if IS_CAUSAL:
        # Read up to the next multiple of 16 past the diagonal (a bound the compiler knows is 16-aligned keeps
        # the loads vectorized), then mask exactly.
        bound = (last + 16) // 16 * 16
        t = tl.load(ptr + row_off[:, None] + cols[None, :].to(tl.int64) * col_stride,
                    mask=in_row & (cols[None, :] < bound[:, None]), other=other)
        t = tl.where(cols[None, :] <= last[:, None], t, other)
    else:
        t = tl.load(ptr + row_off[:, None] + cols[None, :].to(tl.int64) * col_stride, mask=in_row, other=other)
    return t.to(tl.float32)


@triton.jit
def _store_tile(ptr, row_off, col_stride, cols, n_cols, row_ok, value):
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    tl.store(ptr + row_off[:, None] + cols[None, :].to(tl.int64) * col_stride,
             value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _causal_end(n_cols, row_ok, last, IS_CAUSAL: tl.constexpr):
    """Columns past every row's diagonal hold only masked scores: the reducing sweep stops before them."""
    if IS_CAUSAL:
        return tl.minimum(tl.max(tl.where(row_ok, last, -1)) + 1, n_cols)
    else:
        return n_cols


@triton.jit
def _finite_or_zero(m):
    # A fully masked row has max -inf; subtracting 0 instead keeps exp2(-inf - max) at 0, not NaN.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _softmax_fwd_kernel(
    x_ptr,  # scores [batch, Tq, Tk], strides sx_b, sx_q, sx_k
    y_ptr,  # out: softmax over Tk, same shape, strides sy_b, sy_q, sy_k
    n_rows, n_cols, tq, shift,  # batch * Tq rows of Tk columns; row q's last visible key is q + shift (causal)
    sx_b, sx_q, sx_k, sy_b, sy_q, sy_k,
    coef,  # scale * log2(e)
    IS_CAUSAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
):
    coef = tl.cast(coef, tl.float32)  # fp32 math: Inductor passes Python floats as fp64
    # coef = scale * log2(e): the max is taken on raw scores (scale > 0 commutes with it) and the scale is
    # applied to x - max, so large scores lose no precision to a pre-scaled copy.
    b, q, row_ok, last = _row_coords(n_rows, tq, shift, ROWS)
    x_row = b * sx_b + q * sx_q
    y_row = b * sy_b + q * sy_q
    cols = tl.arange(0, BLOCK_N)
    if SINGLE:
        x = _load_tile(x_ptr, x_row, sx_k, cols, n_cols, row_ok, last, float("-inf"), IS_CAUSAL)
        m = _finite_or_zero(tl.max(x, 1))
        e = tl.exp2((x - m[:, None]) * coef)
        d = tl.sum(e, 1)
        # A fully masked row has e == 0 and d == 0; dividing by 1 instead leaves it 0 (a NaN d stays NaN).
        inv = 1.0 / tl.where(d == 0, 1.0, d)
        _store_tile(y_ptr, y_row, sy_k, cols, n_cols, row_ok, e * inv[:, None])
    else:
        m = tl.full([ROWS], float("-inf"), tl.float32)
        d = tl.zeros([ROWS], tl.float32)
        for start in range(0, _causal_end(n_cols, row_ok, last, IS_CAUSAL), BLOCK_N):
            x = _load_tile(x_ptr, x_row, sx_k, start + cols, n_cols, row_ok, last, float("-inf"), IS_CAUSAL)
            m_new = tl.maximum(m, tl.max(x, 1))
            base = _finite_or_zero(m_new)
            d = d * tl.exp2((m - base) * coef) + tl.sum(tl.exp2((x - base[:, None]) * coef), 1)
            m = m_new
        m = _finite_or_zero(m)
        inv = 1.0 / tl.where(d == 0, 1.0, d)
        for start in range(0, n_cols, BLOCK_N):
            x = _load_tile(x_ptr, x_row, sx_k, start + cols, n_cols, row_ok, last, float("-inf"), IS_CAUSAL)
            _store_tile(y_ptr, y_row, sy_k, start + cols, n_cols, row_ok,
                        tl.exp2((x - m[:, None]) * coef) * inv[:, None])


@triton.jit
def _softmax_bwd_kernel(
    y_ptr,   # the forward's softmax [batch, Tq, Tk], strides sy_b, sy_q, sy_k
    dy_ptr,  # its gradient, strides sdy_b, sdy_q, sdy_k
    dx_ptr,  # out: the scores' gradient, strides sdx_b, sdx_q, sdx_k
    n_rows, n_cols, tq, shift,  # as the forward's
    sy_b, sy_q, sy_k, sdy_b, sdy_q, sdy_k, sdx_b, sdx_q, sdx_k,
    scale,
    IS_CAUSAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # fp32 math: Inductor passes Python floats as fp64
    # Masked entries have y == 0, so they are not read (dx is 0 there even if dy holds inf/NaN).
    b, q, row_ok, last = _row_coords(n_rows, tq, shift, ROWS)
    y_row = b * sy_b + q * sy_q
    dy_row = b * sdy_b + q * sdy_q
    dx_row = b * sdx_b + q * sdx_q
    cols = tl.arange(0, BLOCK_N)
    if SINGLE:
        y = _load_tile(y_ptr, y_row, sy_k, cols, n_cols, row_ok, last, 0.0, IS_CAUSAL)
        g = _load_tile(dy_ptr, dy_row, sdy_k, cols, n_cols, row_ok, last, 0.0, IS_CAUSAL)
        dot = tl.sum(y * g, 1)
        _store_tile(dx_ptr, dx_row, sdx_k, cols, n_cols, row_ok, scale * y * (g - dot[:, None]))
    else:
        # Elementwise partial sums, reduced once after the sweep.
        acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
        for start in range(0, _causal_end(n_cols, row_ok, last, IS_CAUSAL), BLOCK_N):
            y = _load_tile(y_ptr, y_row, sy_k, start + cols, n_cols, row_ok, last, 0.0, IS_CAUSAL)
            g = _load_tile(dy_ptr, dy_row, sdy_k, start + cols, n_cols, row_ok, last, 0.0, IS_CAUSAL)
            acc += y * g
        dot = tl.sum(acc, 1)
        for start in range(0, n_cols, BLOCK_N):
            y = _load_tile(y_ptr, y_row, sy_k, start + cols, n_cols, row_ok, last, 0.0, IS_CAUSAL)
            g = _load_tile(dy_ptr, dy_row, sdy_k, start + cols, n_cols, row_ok, last, 0.0, IS_CAUSAL)
            _store_tile(dx_ptr, dx_row, sdx_k, start + cols, n_cols, row_ok, scale * y * (g - dot[:, None]))


# ---------------------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------------------

# Longest row kept whole in registers. On a GPU 32768 fp32 values over 32 warps is 32 registers a thread. The
# backward holds two such rows (y, dy): at 32768 ptxas spills some bytes a thread and it is still faster than
# two sweeps; at 65536 both directions spill more and lose to the sweeps (`benchmarks/softmax.py --sweep`).
# On the interpreter a small bound keeps the two-sweep path cheap to test.
MAX_SINGLE_BLOCK = 1024 if INTERPRET else 32768
MAX_SINGLE_BLOCK_BWD = 1024 if INTERPRET else 32768
# Column tile of the two-sweep path: the fastest of the sweep's candidates at the longest rows.
LOOP_BLOCK = 512 if INTERPRET else 16384

LOG2_E = 1.4426950408889634


def _launch_params(n_rows: int, n_cols: int, max_single: int) -> tuple[int, int, bool, int]:
    """(ROWS, BLOCK_N, SINGLE, num_warps)."""
    n_rows, n_cols = _runtime.plan_sizes(n_rows, n_cols)
    single = n_cols <= max_single
    block = triton.next_power_of_2(n_cols) if single else LOOP_BLOCK
    # GPU: about 16 elements a thread; short rows are packed several to a program so a tile has >= 2048.
    rows = _runtime.rows_per_program(n_rows, block, gpu_rows=max(1, 2048 // block))
    num_warps = min(32, max(4, block // 512))
    return rows, block, single, num_warps


def _scores_view(t: torch.Tensor, output: bool = False) -> torch.Tensor:
    """[batch, Tq, Tk] view of a [..., Tq, Tk] tensor. An input whose leading dims cannot merge is copied; an
    output must be a true view (view() raises rather than let the kernel write into a copy)."""
    shape = (1, 1, -1) if t.dim() == 1 else (-1, t.shape[-2], t.shape[-1])
    return t.view(shape) if output else t.reshape(shape)


def _launch_config(x3: torch.Tensor, max_single: int):
    n_batch, tq, tk = x3.shape
    n_rows = n_batch * tq
    rows, block, single, num_warps = _launch_params(n_rows, tk, max_single)
    return (triton.cdiv(n_rows, rows),), n_rows, tq, tk, dict(ROWS=rows, BLOCK_N=block, SINGLE=single,
                                                              num_warps=num_warps)


def _launch_fwd(x: torch.Tensor, y: torch.Tensor, is_causal: bool, scale: float) -> None:
    """Write softmax(x) into the preallocated ``y`` (same shape, any strides)."""
    if x.numel() == 0:
        return
    x3, y3 = _scores_view(x), _scores_view(y, output=True)
    grid, n_rows, tq, tk, meta = _launch_config(x3, MAX_SINGLE_BLOCK)
    _runtime.launch(_softmax_fwd_kernel, grid)(
        x3, y3, n_rows, tk, tq, tk - tq, *x3.stride(), *y3.stride(), scale * LOG2_E, IS_CAUSAL=is_causal, **meta)


def _launch_bwd(y: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, is_causal: bool, scale: float) -> None:
    if y.numel() == 0:
        return
    y3, dy3, dx3 = _scores_view(y), _scores_view(dy), _scores_view(dx, output=True)
    grid, n_rows, tq, tk, meta = _launch_config(y3, MAX_SINGLE_BLOCK_BWD)
    _runtime.launch(_softmax_bwd_kernel, grid)(
        y3, dy3, dx3, n_rows, tk, tq, tk - tq, *y3.stride(), *dy3.stride(), *dx3.stride(), scale,
        IS_CAUSAL=is_causal, **meta)


@_runtime.kernel_op("triformer::softmax_fwd", mutates_args=())
def _softmax_fwd(x: torch.Tensor, is_causal: bool, scale: float) -> torch.Tensor:
    check_device(x=x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_fwd(x, y, is_causal, scale)
    return y


@_runtime.kernel_op("triformer::softmax_bwd", mutates_args=())
def _softmax_bwd(y: torch.Tensor, dy: torch.Tensor, is_causal: bool, scale: float) -> torch.Tensor:
    check_device(y=y, dy=dy)
    dx = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    _launch_bwd(y, dy, dx, is_causal, scale)
    return dx


class SoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, is_causal: bool, scale: float) -> torch.Tensor:
        y = _softmax_fwd(x, is_causal, scale)
        ctx.save_for_backward(y)
        ctx.is_causal = is_causal
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (y,) = ctx.saved_tensors
        if needs_graph(dy, y):
            # create_graph=True: the input is not kept, so softmax's backward formula in plain PyTorch on the saved
            # output (whose graph leads back to x through this backward); masked entries have y = 0, so dx = 0
            # there, as in softmax_reference. See triformer._double_backward.
            compute = torch.promote_types(y.dtype, torch.float32)
            yf, dyf = y.to(compute), dy.to(compute)
            dx = ctx.scale * yf * (dyf - (yf * dyf).sum(-1, keepdim=True))
            return dx.to(y.dtype), None, None
        return _softmax_bwd(y, dy, ctx.is_causal, ctx.scale), None, None


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def _check_options(is_causal, scale) -> float:
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    scale = float(scale)
    # scale > 0 keeps masked (-inf) scores at -inf and lets the kernel take the max before scaling.
    if not (_runtime.is_finite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    return scale


def _check_input(x, is_causal: bool) -> None:
    check_float("x", x)
    if x.dim() < (2 if is_causal else 1):
        raise ValueError(
            f"x must have at least {2 if is_causal else 1} dimension(s)"
            f"{' ([..., Tq, Tk] scores) when is_causal=True' if is_causal else ''}, got shape {tuple(x.shape)}"
        )
    check_device(x=x)


def softmax(x: torch.Tensor, is_causal: bool = False, scale: float = 1.0) -> torch.Tensor:
    """Softmax of ``scale * x`` over the last dim; see the module docstring for masking and -inf rows."""
    scale = _check_options(is_causal, scale)
    _check_input(x, is_causal)
    return SoftmaxFunction.apply(x, is_causal, scale)


def softmax_reference(x: torch.Tensor, is_causal: bool = False, scale: float = 1.0) -> torch.Tensor:
    """Plain PyTorch with the same semantics (fully masked rows give 0); differentiable, float64-friendly."""
    scale = _check_options(is_causal, scale)
    if is_causal and x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions when is_causal=True, got shape {tuple(x.shape)}")
    s = x * scale
    if is_causal:
        tq, tk = s.shape[-2], s.shape[-1]
        visible = torch.ones(tq, tk, dtype=torch.bool, device=s.device).tril(diagonal=tk - tq)
        s = s.masked_fill(~visible, float("-inf"))
    empty_row = (s == float("-inf")).all(dim=-1, keepdim=True)
    # Softmax a harmless row in place of a fully masked one so neither the value nor its gradient is NaN.
    y = torch.softmax(s.masked_fill(empty_row, 0.0), dim=-1)
    return y.masked_fill(empty_row, 0.0)


class Softmax(torch.nn.Module):
    """``softmax(x, is_causal, scale)`` over the last dim as a module."""

    def __init__(self, is_causal: bool = False, scale: float = 1.0):
        super().__init__()
        self.scale = _check_options(is_causal, scale)
        self.is_causal = is_causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softmax(x, self.is_causal, self.scale)

    def extra_repr(self) -> str:
        return f"is_causal={self.is_causal}, scale={self.scale}"


TritonSoftmax = Softmax
"""The seed's name for the module (``TritonSoftmax(is_causal=False)``): see triformer/__init__.py."""
