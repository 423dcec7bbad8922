"""GELU followed by a linear layer, ``y = gelu(x + gelu_bias) @ weight.T + bias``, keeping only GELU's input.

The second half of a transformer MLP (``fc`` -> GELU -> ``proj``). Run as two separate ops, the linear layer
saves its input for its weight gradient, so the block keeps two activations of the hidden width for backward:
GELU's input (for GELU's own backward) and its output. This op saves only the input and recomputes the output in
the backward, inside the GELU backward kernel that evaluates GELU there anyway (``triformer.gelu``'s
``gelu_bwd_and_output``): one more write of the hidden width per layer in the backward, in exchange for one
activation of the hidden width less per layer at the step's peak (a sixth of GPT-2 small's activations).

Backward, for ``dy``: ``d_act = dy @ weight``; the GELU kernel turns ``(d_act, x)`` into ``dx``, the GELU bias's
gradient and the recomputed ``act``; then ``dweight = dy^T @ act`` and ``dbias = sum(dy)``. The matmuls run in
``x``'s dtype (the activations'; a weight of another dtype, e.g. fp32 master weights under autocast, is cast once
per call, as autocast would) with fp32 accumulation; the gradients are returned in each parameter's dtype.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from triformer import _runtime
from triformer._double_backward import needs_graph, reference_grads
# Built on gelu's kernels: its forward op and the backward op that also writes the activation (public names).
from triformer.gelu import gelu_bwd_and_output, gelu_fwd, gelu_reference

__all__ = ["GELULinearFunction", "GELULinear", "gelu_linear", "gelu_linear_reference"]

_APPROXIMATIONS = ("tanh", "none")


class GELULinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, gelu_bias, approximate):
        w = weight.to(x.dtype)
        b = bias.to(x.dtype) if bias is not None else None
        ctx.save_for_backward(x, weight, bias, gelu_bias)
        ctx.approximate = approximate
        return F.linear(gelu_fwd(x, gelu_bias, approximate), w, b)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, gelu_bias = ctx.saved_tensors
        if needs_graph(dy, x, weight, bias, gelu_bias):  # create_graph=True (triformer._double_backward)
            grads = reference_grads(
                lambda x_, w_, b_, gb_: gelu_linear_reference(x_, w_, b_, ctx.approximate, gb_),
                (x, weight, bias, gelu_bias), (dy,), ctx.needs_input_grad[:4])
            return (*grads, None)
        need_x, need_w, need_b, need_gb = ctx.needs_input_grad[:4]
        w = weight.to(x.dtype)
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x.dtype)
        dx = dweight = dbias = dgelu_bias = None
        if need_x or need_w or need_gb:
            d_act = (dy2 @ w).view(x.shape)
            dx, dgelu_bias, act = gelu_bwd_and_output(d_act, x, gelu_bias, ctx.approximate)
            if need_w:
                dweight = (dy2.t() @ act.view(-1, act.shape[-1])).to(weight.dtype)
        if need_b:
            dbias = dy2.float().sum(0).to(bias.dtype)
        return (dx if need_x else None, dweight, dbias, dgelu_bias if need_gb else None, None)


def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], approximate: str,
                gelu_bias: Optional[torch.Tensor]) -> None:
    _runtime.check_float("x", x)
    _runtime.check_float("weight", weight)
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    if x.dim() < 1:
        raise ValueError(f"x must have shape [..., K], got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape [N, {x.shape[-1]}] (x's last dim as its second), "
                         f"got {tuple(weight.shape)}")
    for name, vector, size in (("bias", bias, weight.shape[0]), ("gelu_bias", gelu_bias, x.shape[-1])):
        if vector is not None:
            _runtime.check_float(name, vector)
            if vector.dim() != 1 or vector.shape[0] != size:
                raise ValueError(f"{name} must have shape [{size}], got {tuple(vector.shape)}")
    _runtime.check_device(x=x, weight=weight, bias=bias, gelu_bias=gelu_bias)


def gelu_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                approximate: str = "tanh", gelu_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(gelu(x + gelu_bias, approximate), weight, bias)`` in ``x``'s dtype, keeping only ``x`` (not the
    activation) for backward. ``x`` [..., K], ``weight`` [N, K], ``bias`` [N], ``gelu_bias`` [K]."""
    _check_args(x, weight, bias, approximate, gelu_bias)
    return GELULinearFunction.apply(x, weight, bias, gelu_bias, approximate)


def gelu_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                          approximate: str = "tanh", gelu_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain PyTorch ``gelu_linear``: ``gelu_reference`` then ``F.linear`` in ``x``'s dtype."""
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    return F.linear(gelu_reference(x, approximate, gelu_bias), weight.to(x.dtype),
                    bias.to(x.dtype) if bias is not None else None)


class GELULinear(nn.Module):
    """``gelu(x + gelu_bias)`` then ``nn.Linear(in_features, out_features)``: the second half of an MLP, keeping
    one activation of ``in_features`` for backward instead of two. ``gelu_bias`` (a parameter of
    ``in_features``, as the bias of the layer before, fused into the GELU kernel) is optional."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, approximate: str = "tanh",
                 gelu_bias: bool = False, device=None, dtype=None):
        super().__init__()
        if approximate not in _APPROXIMATIONS:
            raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
        self.approximate = approximate
        self.linear = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.gelu_bias = nn.Parameter(torch.empty(in_features, device=device, dtype=dtype)) if gelu_bias else None
        if self.gelu_bias is not None:
            bound = 1.0 / math.sqrt(in_features)  # nn.Linear's bias init for fan_in = in_features
            nn.init.uniform_(self.gelu_bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_linear(x, self.linear.weight, self.linear.bias, self.approximate, self.gelu_bias)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}, gelu_bias={self.gelu_bias is not None}"
