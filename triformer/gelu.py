"""GELU, optionally fused with the bias add in front of it: ``y = gelu(x + bias)``.

Two forms, as in ``torch.nn.functional.gelu``: ``approximate="tanh"`` (GPT-2's, the default here) and
``approximate="none"`` (exact, with erf). The kernels read the input through its strides (up to two
collapsed leading dims, see ``triformer._shared.row_layout``) and write a contiguous output. The backward
recomputes the activation from ``x`` instead of saving anything extra. The formula (``gelu_and_grad``), the
row layout and the tile shape come from ``triformer._shared``, as they do for the gated units of
``triformer.swiglu``.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import nn

from triformer import _runtime
from triformer._double_backward import needs_graph, reference_grads
from triformer._shared import column_sums_kernel, elementwise_tiles, gelu_and_grad, row_layout, row_offsets

__all__ = ["GELUFunction", "GELU", "gelu", "gelu_reference", "BiasGELU"]
# triformer.gelu_linear runs these kernels through gelu_fwd and gelu_bwd_and_output (public names of this module,
# not exported by the package).

_APPROXIMATIONS = ("tanh", "none")


@triton.jit
def _gelu_fwd_kernel(x_ptr,  # [M, N] rows of the input, any row layout (read)
                     b_ptr,  # [N] bias, or a placeholder without one (read)
                     y_ptr,  # [M, N] contiguous output (written)
                     M, N, rows_inner, sx_o, sx_i, sx_n, sb_n,
                     HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One BLOCK_M x BLOCK_N tile per program; the output is contiguous [M, N].
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    x_offs = row_offsets(rows, rows_inner, sx_o, sx_i)[:, None] + cols[None, :] * sx_n
    x = tl.load(x_ptr + x_offs, mask=mask).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(b_ptr + cols * sb_n, mask=cols < N).to(tl.float32)[None, :]
    y, _ = gelu_and_grad(x, APPROX_TANH)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile_rows(first, group_end, M, col_mask, BLOCK_M: tl.constexpr):
    """(rows, mask) of the backward's tile at row ``first``, empty past the group or M. No pointer goes in:
    torch.compile's analysis of what a kernel writes (wrap_triton) counts every argument of a helper whose
    result addresses a store as written."""
    rows = first + tl.arange(0, BLOCK_M)
    return rows, ((rows < M) & (rows < group_end))[:, None] & col_mask[None, :]


@triton.jit
def _bwd_tile(dy_ptr, x_ptr, rows, mask, rows_inner, sdy_o, sdy_i, sdy_n, sx_o, sx_i, sx_n, cols):
    """(x, dy) of the backward's tile at ``rows``."""
    x = tl.load(x_ptr + row_offsets(rows, rows_inner, sx_o, sx_i)[:, None] + cols[None, :] * sx_n, mask=mask)
    dy = tl.load(dy_ptr + row_offsets(rows, rows_inner, sdy_o, sdy_i)[:, None] + cols[None, :] * sdy_n,
                 mask=mask)
    return x, dy


@triton.jit
def _gelu_bwd_kernel(dy_ptr,  # [M, N] incoming gradient, any row layout (read)
                     x_ptr,  # [M, N] the forward's input, any row layout (read)
                     b_ptr,  # [N] bias, or a placeholder without one (read)
                     dx_ptr,  # [M, N] contiguous gradient of x (written)
                     dbias_part_ptr,  # [row groups, N] fp32 partial bias gradients (written with a bias)
                     y_ptr,  # [M, N] contiguous gelu(x + bias), recomputed (written with STORE_Y)
                     M, N, rows_inner, sdy_o, sdy_i, sdy_n, sx_o, sx_i, sx_n, sb_n,
                     ROWS_PER_GROUP,
                     HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr, STORE_Y: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid (row groups, column blocks). A program walks its group's ROWS_PER_GROUP rows one BLOCK_M tile at
    # a time, so the bias gradient leaves it as a single fp32 partial row (one per group, summed by
    # column_sums_kernel) rather than one per tile. With a bias (several tiles a program, few programs an SM) the
    # next tile's x and dy are loaded before this one's GELU and stores (a warp issues in order): one tile in
    # flight per program does not cover the memory latency. Without one a program has a single tile, and the
    # registers of a second would only lower how many programs an SM holds.
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_mask = cols < N
    first_row = tl.program_id(0) * ROWS_PER_GROUP
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols * sb_n, mask=col_mask).to(tl.float32)[None, :]
        dbias = tl.zeros([BLOCK_N], dtype=tl.float32)
    group_end = first_row + ROWS_PER_GROUP
    rows, mask = _tile_rows(first_row, group_end, M, col_mask, BLOCK_M)
    x, dy = _bwd_tile(dy_ptr, x_ptr, rows, mask, rows_inner, sdy_o, sdy_i, sdy_n, sx_o, sx_i, sx_n, cols)
    for start in range(0, ROWS_PER_GROUP, BLOCK_M):
        next_rows, next_mask = _tile_rows(first_row + start + BLOCK_M, group_end, M, col_mask, BLOCK_M)
        if HAS_BIAS:
            nxt = _bwd_tile(dy_ptr, x_ptr, next_rows, next_mask, rows_inner, sdy_o, sdy_i, sdy_n, sx_o, sx_i, sx_n,
                            cols)
        x = x.to(tl.float32)
        if HAS_BIAS:
            x += bias
        y, grad = gelu_and_grad(x, APPROX_TANH)
        dx = tl.where(mask, dy.to(tl.float32) * grad, 0.0)
        out = rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(dx_ptr + out, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if STORE_Y:
            tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            dbias += tl.sum(dx, axis=0)
        else:
            nxt = _bwd_tile(dy_ptr, x_ptr, next_rows, next_mask, rows_inner, sdy_o, sdy_i, sdy_n, sx_o, sx_i, sx_n,
                            cols)
        rows, mask = next_rows, next_mask
        x, dy = nxt
    if HAS_BIAS:
        tl.store(dbias_part_ptr + tl.program_id(0).to(tl.int64) * N + cols, dbias, mask=col_mask)


# Launch parameters are computed once per shape: on the host, Triton 3.9's cdiv and next_power_of_2 cost ~2 us
# a call, and a backward with a bias made ten such calls.
@_runtime.plan_cache
def _fwd_launch(M: int, N: int):
    """(grid, meta-parameters) of the forward."""
    block_m, block_n = elementwise_tiles(M, N)
    return (triton.cdiv(M, block_m), triton.cdiv(N, block_n)), dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)


@_runtime.plan_cache
def _bwd_launch(M: int, N: int, has_bias: bool, device_index: int, store_y: bool = False):
    """(grid, rows per group, meta-parameters) of the backward, then (grid, meta-parameters) of the bias
    gradient's column_sums_kernel."""
    block_m, block_n = elementwise_tiles(M, N)
    row_blocks, col_blocks = triton.cdiv(M, block_m), triton.cdiv(N, block_n)
    per_sm = STORE_Y_PROGRAMS_PER_SM if store_y else BIAS_PROGRAMS_PER_SM
    groups = _row_groups(device_index, row_blocks, col_blocks, per_sm) if has_bias else row_blocks
    rows_per_group = triton.cdiv(row_blocks, groups) * block_m
    groups = triton.cdiv(M, rows_per_group)
    sum_n = min(triton.next_power_of_2(N), 1 << 14 if _runtime.INTERPRET else 128)
    # GPU: up to 64 partial rows per step; the interpreter takes two, so its few groups still loop
    sum_g = min(triton.next_power_of_2(groups), 2 if _runtime.INTERPRET else 64)
    # row groups on grid axis 0: axes 1 and 2 are limited to 65535 programs
    return ((groups, col_blocks), rows_per_group, dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4),
            (triton.cdiv(N, sum_n),), dict(TWO=False, BLOCK_P=sum_g, BLOCK_N=sum_n, num_warps=4))


# Resident programs per multiprocessor of the backward with a bias: enough loads in flight, few partial rows to
# sum. benchmarks/gelu.py --sweep times the alternatives. Writing the recomputed activation too (STORE_Y, for
# triformer.gelu_linear) needs about 250 registers at 4 warps on sm_90, so two programs fit an SM.
BIAS_PROGRAMS_PER_SM = 4
STORE_Y_PROGRAMS_PER_SM = 2


def _row_groups(device_index: int, row_blocks: int, col_blocks: int, per_sm: int) -> int:
    """How many row groups the bias-gradient backward splits the rows into (= fp32 partial rows)."""
    if _runtime.INTERPRET:
        return triton.cdiv(row_blocks, 2)  # two tiles per program, so the loop is exercised on the CPU too
    return max(1, min(row_blocks, triton.cdiv(per_sm * _runtime.multiprocessors(device_index), col_blocks)))


@_runtime.kernel_op("triformer::gelu_fwd", mutates_args=())
def gelu_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str) -> torch.Tensor:
    # size=: a positional torch.Size takes ~1 us longer to parse
    y = torch.empty(size=x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    (x2,), M, rows_inner, N, ((sx_o, sx_i, sx_n),) = row_layout(x)
    grid, meta = _fwd_launch(M, N)
    _runtime.launch(_gelu_fwd_kernel, grid)(x2, bias if bias is not None else x2, y, M, N, rows_inner, sx_o, sx_i,
                                            sx_n, bias.stride(0) if bias is not None else 0,
                                            HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh", **meta)
    return y


def _backward(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str,
              y: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward: (dx, dbias; an empty tensor when there is no bias), and gelu(x + bias) into ``y``
    (contiguous, x's shape) when given."""
    dx = torch.empty(size=x.shape, dtype=x.dtype, device=x.device)
    if bias is None:
        dbias = torch.empty(0, dtype=x.dtype, device=x.device)
    else:
        dbias = torch.empty(size=bias.shape, dtype=bias.dtype, device=bias.device)
    if x.numel() == 0:
        return dx, dbias.zero_()
    (dy2, x2), M, rows_inner, N, ((sdy_o, sdy_i, sdy_n), (sx_o, sx_i, sx_n)) = row_layout(dy, x)
    grid, rows_per_group, meta, sum_grid, sum_meta = _bwd_launch(M, N, bias is not None, x.get_device(),
                                                                 y is not None)
    partials = torch.empty(grid[0], N, dtype=torch.float32, device=x.device) if bias is not None else dx
    _runtime.launch(_gelu_bwd_kernel, grid)(
        dy2, x2, bias if bias is not None else x2, dx, partials, y if y is not None else dx, M, N, rows_inner,
        sdy_o, sdy_i, sdy_n, sx_o, sx_i, sx_n, bias.stride(0) if bias is not None else 0, rows_per_group,
        HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh", STORE_Y=y is not None, **meta)
    if bias is not None:
        _runtime.launch(column_sums_kernel, sum_grid)(partials, dbias, dbias, grid[0], N, **sum_meta)
    return dx, dbias


@_runtime.kernel_op("triformer::gelu_bwd", mutates_args=())
def gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor],
             approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dbias); dbias is an empty tensor when there is no bias."""
    return _backward(dy, x, bias, approximate, None)


@_runtime.kernel_op("triformer::gelu_bwd_and_output", mutates_args=())
def gelu_bwd_and_output(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor],
                        approximate: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dbias, gelu(x + bias)): the backward, also writing the activation it recomputes anyway, for an op
    that kept only GELU's input (``triformer.gelu_linear``)."""
    y = torch.empty(size=x.shape, dtype=x.dtype, device=x.device)
    dx, dbias = _backward(dy, x, bias, approximate, y)
    return dx, dbias, y


class GELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, approximate):
        ctx.save_for_backward(x, bias)
        ctx.approximate = approximate
        return gelu_fwd(x, bias, approximate)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        if needs_graph(dy, x, bias):  # create_graph=True: through the reference (triformer._double_backward)
            dx, dbias = reference_grads(lambda x_, b_: gelu_reference(x_, ctx.approximate, b_), (x, bias), (dy,),
                                        ctx.needs_input_grad[:2])
            return dx, dbias, None
        dx, dbias = gelu_bwd(dy, x, bias, ctx.approximate)
        return dx, (dbias if bias is not None else None), None


def _check_args(x: torch.Tensor, approximate: str, bias: Optional[torch.Tensor]) -> None:
    _runtime.check_float("x", x)
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    if bias is not None:
        _runtime.check_float("bias", bias)
        if bias.dim() != 1 or x.dim() == 0 or bias.shape[0] != x.shape[-1]:
            raise ValueError(f"bias must have shape [{x.shape[-1] if x.dim() else 'N'}] (x's last dim), "
                             f"got {tuple(bias.shape)} for x of shape {tuple(x.shape)}")
    _runtime.check_device(x=x, bias=bias)


def gelu(x: torch.Tensor, approximate: str = "tanh", bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``gelu(x + bias)`` element-wise, in ``x``'s dtype (fp32 math; ``bias`` [N] may be fp32 under autocast).

    ``approximate``: ``"tanh"`` (GPT-2's approximation, the default) or ``"none"`` (exact, with erf).
    """
    _check_args(x, approximate, bias)
    return GELUFunction.apply(x, bias, approximate)


def gelu_reference(x: torch.Tensor, approximate: str = "tanh", bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain PyTorch ``gelu``: ``torch.nn.functional.gelu`` on ``x + bias``, returned in ``x``'s dtype."""
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    return torch.nn.functional.gelu(x if bias is None else x + bias, approximate=approximate).to(x.dtype)


class GELU(nn.Module):
    def __init__(self, approximate: str = "tanh"):
        super().__init__()
        if approximate not in _APPROXIMATIONS:
            raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class BiasGELU(nn.Module):
    """``gelu(x + bias)`` with a learnable bias [features], the add fused into the kernel (e.g. after a
    bias-free linear layer)."""

    def __init__(self, features: int, approximate: str = "tanh", device=None, dtype=None):
        super().__init__()
        if approximate not in _APPROXIMATIONS:
            raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
        self.approximate = approximate
        self.bias = nn.Parameter(torch.empty(features, device=device, dtype=dtype))
        bound = 1.0 / math.sqrt(features)  # nn.Linear's bias init for fan_in = features
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x, self.approximate, self.bias)
