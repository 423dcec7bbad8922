"""Gated linear units: ``swiglu(gate, up) = silu(gate) * up`` and ``geglu(gate, up) = gelu(gate) * up``.

One kernel pair serves both (the activation is a constexpr). ``gate`` and ``up`` are read through their
strides, so the packed form costs no copy: llama-style MLPs compute both projections in one matmul into
``x`` [..., 2F], and ``swiglu(x)`` (``up=None``) reads ``gate = x[..., :F]`` (first half) and
``up = x[..., F:]`` (second half) in place. The backward recomputes the activation and writes both
gradients into one [..., 2F] buffer in that same packed layout: it is the packed input's gradient as is,
and for separate inputs its two halves are returned as views.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import nn

from triformer import _runtime
from triformer._double_backward import needs_graph, reference_grads
from triformer._shared import elementwise_tiles, gelu_and_grad, row_layout, row_offsets

# One autograd Function and kernel pair (GLU) serve both gated units: swiglu, and geglu beside it.
# triformer.glu_linear runs these kernels through glu_fwd and glu_bwd_and_output (public names of this module, not
# exported by the package).
__all__ = ["GLUFunction", "SwiGLU", "swiglu", "swiglu_reference", "geglu", "geglu_reference", "SwiGLUMLP"]

# constexpr codes of the gating activation
_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32 for the activation code ACT."""
    if ACT == 0:
        sig = 1.0 / (1.0 + tl.exp(-g))
        value = g * sig
        grad = sig * (1.0 + g * (1.0 - sig))
    else:
        value, grad = gelu_and_grad(g, ACT == 1)
    return value, grad


@triton.jit
def _glu_fwd_kernel(
    g_ptr,  # gate [M, N] in the [outer, inner, N] row layout (_shared.row_layout), strides sg_*
    u_ptr,  # up, same shape and layout, strides su_*
    y_ptr,  # out: act(gate) * up, contiguous [M, N]
    M, N, rows_inner, sg_o, sg_i, sg_n, su_o, su_i, su_n,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One BLOCK_M x BLOCK_N tile of the [M, N] (N = F) view per program; the output is contiguous [M, N].
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.load(g_ptr + row_offsets(rows, rows_inner, sg_o, sg_i)[:, None] + cols[None, :] * sg_n, mask=mask)
    u = tl.load(u_ptr + row_offsets(rows, rows_inner, su_o, su_i)[:, None] + cols[None, :] * su_n, mask=mask)
    act, _ = _act_and_grad(g.to(tl.float32), ACT)
    y = act * u.to(tl.float32)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    dy_ptr,   # gradient of y [M, N], strides sdy_*
    g_ptr,    # gate, strides sg_*
    u_ptr,    # up, strides su_*
    dgu_ptr,  # out: contiguous [M, 2N], d gate in columns [0, N), d up in [N, 2N)
    y_ptr,    # out when STORE_Y: act(gate) * up, contiguous [M, N] (a placeholder otherwise)
    M, N, rows_inner, sdy_o, sdy_i, sdy_n, sg_o, sg_i, sg_n, su_o, su_i, su_n,
    ACT: tl.constexpr, STORE_Y: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Same tiling as the forward; d(gate) goes to columns [0, N) and d(up) to [N, 2N) of the contiguous
    # [M, 2N] gradient buffer. STORE_Y also writes the output the backward recomputes anyway, for an op that
    # kept only gate and up (triformer.glu_linear).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    dy = tl.load(dy_ptr + row_offsets(rows, rows_inner, sdy_o, sdy_i)[:, None] + cols[None, :] * sdy_n, mask=mask)
    g = tl.load(g_ptr + row_offsets(rows, rows_inner, sg_o, sg_i)[:, None] + cols[None, :] * sg_n, mask=mask)
    u = tl.load(u_ptr + row_offsets(rows, rows_inner, su_o, su_i)[:, None] + cols[None, :] * su_n, mask=mask)
    dy = dy.to(tl.float32)
    u = u.to(tl.float32)
    act, grad = _act_and_grad(g.to(tl.float32), ACT)
    out = dgu_ptr + rows.to(tl.int64)[:, None] * (2 * N) + cols[None, :]
    tl.store(out, (dy * u * grad).to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(out + N, (dy * act).to(dgu_ptr.dtype.element_ty), mask=mask)
    if STORE_Y:
        tl.store(y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], (act * u).to(y_ptr.dtype.element_ty),
                 mask=mask)


@_runtime.kernel_op("triformer::glu_fwd", mutates_args=())
def glu_fwd(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up``, contiguous, in gate's dtype; ``activation`` is "silu", "gelu_tanh" or "gelu"."""
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate.numel() == 0:
        return y
    (g, u), M, rows_inner, N, (sg, su) = row_layout(gate, up)
    block_m, block_n = elementwise_tiles(M, N)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _runtime.launch(_glu_fwd_kernel, grid)(g, u, y, M, N, rows_inner, *sg, *su,
                          ACT=_ACTIVATIONS[activation], BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return y


def _backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str,
              y: Optional[torch.Tensor]) -> torch.Tensor:
    """Launch the backward kernel; with ``y`` it also writes ``act(gate) * up`` there."""
    dgu = torch.empty((*gate.shape[:-1], 2 * gate.shape[-1]), dtype=gate.dtype, device=gate.device)
    if gate.numel() == 0:
        return dgu
    (d, g, u), M, rows_inner, N, (sdy, sg, su) = row_layout(dy, gate, up)
    block_m, block_n = elementwise_tiles(M, N)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _runtime.launch(_glu_bwd_kernel, grid)(d, g, u, dgu, dgu if y is None else y, M, N, rows_inner, *sdy, *sg, *su,
                          ACT=_ACTIVATIONS[activation], STORE_Y=y is not None, BLOCK_M=block_m,
                          BLOCK_N=block_n, num_warps=4)
    return dgu


@_runtime.kernel_op("triformer::glu_bwd", mutates_args=())
def glu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Gradients of gate and up side by side: a contiguous [..., 2F] tensor (d gate first, then d up)."""
    return _backward(dy, gate, up, activation, None)


@_runtime.kernel_op("triformer::glu_bwd_and_output", mutates_args=())
def glu_bwd_and_output(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                       activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(``glu_bwd``'s gradients, ``act(gate) * up``): the backward, also writing the output it recomputes anyway,
    for an op that kept only gate and up (``triformer.glu_linear``)."""
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    return _backward(dy, gate, up, activation, y), y


class GLUFunction(torch.autograd.Function):
    """``act(gate) * up``; with ``up=None``, ``gate`` is the packed [..., 2F] tensor (gate half, up half)."""

    @staticmethod
    def forward(ctx, gate, up, activation):
        ctx.packed = up is None
        packed = gate if ctx.packed else None  # the input itself (no copy): double backward differentiates it
        if ctx.packed:
            gate, up = gate.chunk(2, dim=-1)
        ctx.save_for_backward(gate, up, packed)
        ctx.activation = activation
        return glu_fwd(gate, up, activation)

    @staticmethod
    def backward(ctx, dy):
        gate, up, packed = ctx.saved_tensors
        if needs_graph(dy, gate, up, packed):  # create_graph=True: through the reference (triformer._double_backward)
            if ctx.activation == "silu":
                reference = swiglu_reference
            else:
                def reference(g, u=None):
                    return geglu_reference(g, u, "tanh" if ctx.activation == "gelu_tanh" else "none")
            if ctx.packed:  # the chunks saved above are not connected to the input's graph: differentiate it whole
                return reference_grads(reference, (packed,), (dy,), ctx.needs_input_grad[:1])[0], None, None
            d_gate, d_up = reference_grads(reference, (gate, up), (dy,), ctx.needs_input_grad[:2])
            return d_gate, d_up, None
        dgu = glu_bwd(dy, gate, up, ctx.activation)
        if ctx.packed:
            return dgu, None, None
        d_gate, d_up = dgu.chunk(2, dim=-1)
        return d_gate, d_up, None


def _check_args(gate: torch.Tensor, up: Optional[torch.Tensor]) -> None:
    _runtime.check_float("gate", gate)
    if up is None:
        if gate.dim() == 0 or gate.shape[-1] % 2:
            raise ValueError(f"packed gate (up=None) must have an even last dim [..., 2F] (gate half, up half), "
                             f"got shape {tuple(gate.shape)}")
    else:
        _runtime.check_float("up", up)
        if up.shape != gate.shape or gate.dim() == 0:
            raise ValueError(f"gate and up must have the same shape [..., F], got {tuple(gate.shape)} and "
                             f"{tuple(up.shape)}")
        if up.dtype != gate.dtype:
            raise TypeError(f"gate and up must have the same dtype, got {gate.dtype} and {up.dtype}")
    _runtime.check_device(gate=gate, up=up)


def _check_approximate(approximate: str) -> None:
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")


def swiglu(gate: torch.Tensor, up: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``silu(gate) * up`` in gate's dtype. With ``up=None``, ``gate`` is packed [..., 2F]: first half gate,
    second half up (e.g. the output of one fused w1|w3 matmul); the result is [..., F]."""
    _check_args(gate, up)
    return GLUFunction.apply(gate, up, "silu")


def geglu(gate: torch.Tensor, up: Optional[torch.Tensor] = None, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate, approximate) * up``; packing as in ``swiglu``."""
    _check_approximate(approximate)
    _check_args(gate, up)
    return GLUFunction.apply(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")


def swiglu_reference(gate: torch.Tensor, up: Optional[torch.Tensor] = None) -> torch.Tensor:
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: Optional[torch.Tensor] = None, approximate: str = "tanh") -> torch.Tensor:
    _check_approximate(approximate)
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return torch.nn.functional.gelu(gate, approximate=approximate) * up


class SwiGLU(nn.Module):
    """The activation alone: ``forward(gate, up=None)`` as ``swiglu``."""

    def forward(self, gate: torch.Tensor, up: Optional[torch.Tensor] = None) -> torch.Tensor:
        return swiglu(gate, up)


class SwiGLUMLP(nn.Module):
    """Llama's MLP: ``w2(silu(w1 x) * w3 x)``.

    ``fused=True`` computes w1 and w3 as one [2 * hidden, dim] projection ``w13`` whose output is consumed
    packed (rows [0, hidden) are w1, rows [hidden, 2 * hidden) are w3), saving a launch and the split;
    ``fused=False`` keeps separate ``w1``/``w3`` layers (e.g. to load checkpoints by name).
    """

    def __init__(self, dim: int, hidden: int, bias: bool = False, fused: bool = True, device=None, dtype=None):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.fused = fused
        if fused:
            self.w13 = nn.Linear(dim, 2 * hidden, bias=bias, device=device, dtype=dtype)
        else:
            self.w1 = nn.Linear(dim, hidden, bias=bias, device=device, dtype=dtype)
            self.w3 = nn.Linear(dim, hidden, bias=bias, device=device, dtype=dtype)
        self.w2 = nn.Linear(hidden, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.w2(swiglu(self.w13(x)))
        return self.w2(swiglu(self.w1(x), self.w3(x)))
