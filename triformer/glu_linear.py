"""A gated unit followed by a linear layer, ``y = (act(gate) * up) @ weight.T + bias``, keeping only gate and up.

The second half of a gated (llama-style) MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``. Run as two
separate ops, the linear layer saves its input for its weight gradient, so the block keeps three activations of
the hidden width for backward: gate and up (for the gated unit's own backward) and their product. This op saves
only gate and up and recomputes the product in the backward, inside the gated unit's backward kernel that
evaluates the activation there anyway (``triformer.swiglu``'s ``glu_bwd_and_output``): one more write of the
hidden width per layer in the backward, in exchange for a third of the MLP's saved activations (with Llama-3's
4x-wide hidden layer, a fifth of what a decoder layer keeps under bf16 autocast).

``up=None`` takes ``gate`` packed [..., 2F] (gate half, up half), as ``triformer.swiglu`` does. ``activation`` is
"silu" (SwiGLU), "gelu_tanh" or "gelu" (GeGLU).

Backward, for ``dy``: ``d_h = dy @ weight``; the gated unit's kernel turns ``(d_h, gate, up)`` into the gradients
of gate and up and the recomputed ``h = act(gate) * up``; then ``dweight = dy^T @ h`` and ``dbias = sum(dy)``.
The matmuls run in gate's dtype (the activations'; a weight of another dtype, e.g. fp32 master weights under
autocast, is cast once per call, as autocast would) with fp32 accumulation; the gradients are returned in each
parameter's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from triformer import _runtime
from triformer._double_backward import needs_graph, reference_grads
# Built on swiglu's kernels: its forward op and the backward op that also writes the output (public names).
from triformer.swiglu import geglu_reference, glu_bwd_and_output, glu_fwd, swiglu_reference

__all__ = ["GLULinearFunction", "GLULinear", "glu_linear", "glu_linear_reference"]

_ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


def _glu_reference(gate: torch.Tensor, up: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    if activation == "silu":
        return swiglu_reference(gate, up)
    return geglu_reference(gate, up, "tanh" if activation == "gelu_tanh" else "none")


class GLULinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, bias, activation):
        ctx.packed = up is None
        packed = gate if ctx.packed else None  # the input itself (no copy): double backward differentiates it
        if ctx.packed:
            gate, up = gate.chunk(2, dim=-1)
        ctx.save_for_backward(gate, up, packed, weight, bias)
        ctx.activation = activation
        b = bias.to(gate.dtype) if bias is not None else None
        return F.linear(glu_fwd(gate, up, activation), weight.to(gate.dtype), b)

    @staticmethod
    def backward(ctx, dy):
        gate, up, packed, weight, bias = ctx.saved_tensors
        if needs_graph(dy, gate, up, packed, weight, bias):  # create_graph=True (triformer._double_backward)
            act = ctx.activation
            if ctx.packed:  # the chunks saved above are not connected to the input's graph: differentiate it whole
                d_packed, dweight, dbias = reference_grads(
                    lambda p_, w_, b_: glu_linear_reference(p_, None, w_, b_, act), (packed, weight, bias), (dy,),
                    (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:4]))
                return d_packed, None, dweight, dbias, None
            grads = reference_grads(lambda g_, u_, w_, b_: glu_linear_reference(g_, u_, w_, b_, act),
                                    (gate, up, weight, bias), (dy,), ctx.needs_input_grad[:4])
            return (*grads, None)
        need_gate, need_up, need_w, need_b = ctx.needs_input_grad[:4]
        dy2 = dy.reshape(-1, dy.shape[-1]).to(gate.dtype)
        dgu = dweight = dbias = None
        if need_gate or need_up:
            d_h = (dy2 @ weight.to(gate.dtype)).view(gate.shape)
            dgu, h = glu_bwd_and_output(d_h, gate, up, ctx.activation)
        elif need_w:  # frozen gate and up: the product alone
            h = glu_fwd(gate, up, ctx.activation)
        if need_w:
            dweight = (dy2.t() @ h.view(-1, h.shape[-1])).to(weight.dtype)
        if need_b:
            dbias = dy2.float().sum(0).to(bias.dtype)
        if ctx.packed:
            return (dgu if need_gate else None), None, dweight, dbias, None
        d_gate, d_up = dgu.chunk(2, dim=-1) if dgu is not None else (None, None)
        return (d_gate if need_gate else None), (d_up if need_up else None), dweight, dbias, None


def _check_args(gate: torch.Tensor, up: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
                activation: str) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    _runtime.check_float("gate", gate)
    if gate.dim() < 1:
        raise ValueError(f"gate must have shape [..., F], got {tuple(gate.shape)}")
    if up is None:
        if gate.shape[-1] % 2:
            raise ValueError(f"packed gate (up=None) must have an even last dim [..., 2F] (gate half, up half), "
                             f"got shape {tuple(gate.shape)}")
    else:
        _runtime.check_float("up", up)
        if up.shape != gate.shape:
            raise ValueError(f"gate and up must have the same shape [..., F], got {tuple(gate.shape)} and "
                             f"{tuple(up.shape)}")
        if up.dtype != gate.dtype:
            raise TypeError(f"gate and up must have the same dtype, got {gate.dtype} and {up.dtype}")
    hidden = gate.shape[-1] // 2 if up is None else gate.shape[-1]
    _runtime.check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden:
        raise ValueError(f"weight must have shape [N, {hidden}] (the gated unit's width as its second), "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        _runtime.check_float("bias", bias)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    _runtime.check_device(gate=gate, up=up, weight=weight, bias=bias)


def glu_linear(gate: torch.Tensor, up: Optional[torch.Tensor], weight: torch.Tensor,
               bias: Optional[torch.Tensor] = None, activation: str = "silu") -> torch.Tensor:
    """``F.linear(act(gate) * up, weight, bias)`` in gate's dtype, keeping only gate and up (not their product)
    for backward. ``gate``, ``up`` [..., F] (``up=None``: ``gate`` packed [..., 2F]), ``weight`` [N, F],
    ``bias`` [N]; ``activation`` "silu" (SwiGLU), "gelu_tanh" or "gelu" (GeGLU)."""
    _check_args(gate, up, weight, bias, activation)
    return GLULinearFunction.apply(gate, up, weight, bias, activation)


def glu_linear_reference(gate: torch.Tensor, up: Optional[torch.Tensor], weight: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, activation: str = "silu") -> torch.Tensor:
    """Plain PyTorch ``glu_linear``: the gated unit's reference then ``F.linear`` in gate's dtype."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    return F.linear(_glu_reference(gate, up, activation), weight.to(gate.dtype),
                    bias.to(gate.dtype) if bias is not None else None)


class GLULinear(nn.Module):
    """``act(gate) * up`` then ``nn.Linear(in_features, out_features)``: the second half of a gated MLP, keeping
    two activations of ``in_features`` for backward instead of three. ``forward(gate, up=None)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, activation: str = "silu",
                 device=None, dtype=None):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.linear = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, gate: torch.Tensor, up: Optional[torch.Tensor] = None) -> torch.Tensor:
        return glu_linear(gate, up, self.linear.weight, self.linear.bias, self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
