"""Residual add fused with the norm after it: ``sum = x + residual``, ``normed = norm(sum)``, both returned.
The sum carries the residual stream on to the next block.

A pre-norm transformer block runs ``h = h + f(norm(h))``. Fused, each norm reads x and residual once
and writes the sum and the normed tensor. Run separately, the sum is written, then read back.

These ops use the shared row-normalization kernels of ``triformer.layernorm`` (``HAS_RESIDUAL`` in the
forward; the backward gets the gradient that reaches the sum directly as ``dres`` and adds it to dx). They
reuse the layer_norm_bwd / rms_norm_bwd ops. x and residual receive the same gradient. The modules ``AddLayerNorm``
and ``AddRMSNorm`` are ``LayerNorm`` and ``RMSNorm`` (same constructors, parameters and state dicts) whose
``forward(x, residual)`` returns both tensors.
"""
from __future__ import annotations

from typing import Optional

import torch

from triformer import _runtime
from triformer._double_backward import needs_graph, reference_grads
from triformer._runtime import check_float
from triformer.layernorm import (LayerNorm, check_args, check_last_dim, grad_or_none, layer_norm_bwd,
                                 layer_norm_reference, norm_forward)
from triformer.rmsnorm import RMSNorm, resolve_eps, rms_norm_bwd, rms_norm_reference

__all__ = ["AddLayerNormFunction", "AddLayerNorm", "add_layer_norm", "add_layer_norm_reference",
           "AddRMSNormFunction", "AddRMSNorm", "add_rms_norm", "add_rms_norm_reference"]


@_runtime.kernel_op("triformer::add_layer_norm_fwd", mutates_args=())
def add_layer_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor],
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, s, mean, rstd = norm_forward(x, residual, weight, bias, eps, rms=False)
    return s, y, mean, rstd


@_runtime.kernel_op("triformer::add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, s, _, rstd = norm_forward(x, residual, weight, None, eps, rms=True)
    return s, y, rstd


# Both Functions let an unused output's gradient arrive as None (set_materialize_grads(False)). When only
# the sum is used, its gradient passes straight through, with no zeros tensor and no kernel.
class AddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        s, y, mean, rstd = add_layer_norm_fwd(x, residual, weight, bias, eps)
        ctx.save_for_backward(s, weight, bias, mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.eps = eps
        return s, y

    @staticmethod
    def backward(ctx, ds, dy):
        s, weight, bias, mean, rstd = ctx.saved_tensors
        if dy is None:
            return ds, ds, None, None, None
        if needs_graph(ds, dy, s, weight, bias):
            # create_graph=True: differentiate layer_norm_reference at the saved sum (an output of this Function,
            # so its graph leads back to x and residual through this backward); see triformer._double_backward
            dsum, dw, db = reference_grads(lambda s_, w_, b_: layer_norm_reference(s_, w_, b_, ctx.eps),
                                           (s, weight, bias), (dy,), (True, *ctx.needs_input_grad[2:4]))
            dsum = ds if dsum is None else dsum if ds is None else dsum + ds
            return dsum, dsum, dw, db, None
        dsum, dw, db = layer_norm_bwd(dy, s, weight, bias, mean, rstd, ds)
        return dsum, dsum, grad_or_none(dw, weight), grad_or_none(db, bias), None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        s, y, rstd = add_rms_norm_fwd(x, residual, weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        ctx.set_materialize_grads(False)
        ctx.eps = eps
        return s, y

    @staticmethod
    def backward(ctx, ds, dy):
        s, weight, rstd = ctx.saved_tensors
        if dy is None:
            return ds, ds, None, None
        if needs_graph(ds, dy, s, weight):  # create_graph=True: as AddLayerNormFunction.backward
            dsum, dw = reference_grads(lambda s_, w_: rms_norm_reference(s_, w_, ctx.eps), (s, weight), (dy,),
                                       (True, ctx.needs_input_grad[2]))
            dsum = ds if dsum is None else dsum if ds is None else dsum + ds
            return dsum, dsum, dw, None
        dsum, dw = rms_norm_bwd(dy, s, weight, rstd, ds)
        return dsum, dsum, grad_or_none(dw, weight), None


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, layer_norm(x + residual, weight, bias, eps)). x and residual share shape and dtype,
    and the sum is rounded to that dtype before it is normalized."""
    check_float("residual", residual)  # check_args treats None as "no residual"
    eps = check_args(x, residual, weight, bias, eps)
    return AddLayerNormFunction.apply(x, residual, weight, bias, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                 eps: Optional[float] = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, rms_norm(x + residual, weight, eps)), as ``add_layer_norm``; ``eps=None`` as in ``rms_norm``."""
    check_float("residual", residual)
    eps = check_args(x, residual, weight, None, resolve_eps(x, eps))
    return AddRMSNormFunction.apply(x, residual, weight, eps)


def add_layer_norm_reference(x, residual, weight, bias, eps=1e-5):
    s = x + residual
    return s, layer_norm_reference(s, weight, bias, eps)


def add_rms_norm_reference(x, residual, weight, eps=1e-6):
    s = x + residual
    return s, rms_norm_reference(s, weight, eps)


class AddLayerNorm(LayerNorm):
    """``LayerNorm`` fused with the residual add in front of it: ``forward(x, residual)`` returns
    ``add_layer_norm(x, residual, weight, bias, eps)``, i.e. ``(x + residual, layer_norm(x + residual))``."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_last_dim(self, x)
        return add_layer_norm(x, residual, self.weight, self.bias, self.eps)


class AddRMSNorm(RMSNorm):
    """``RMSNorm`` fused with the residual add in front of it: ``forward(x, residual)`` returns
    ``add_rms_norm(x, residual, weight, eps)``, i.e. ``(x + residual, rms_norm(x + residual))``."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_last_dim(self, x)
        return add_rms_norm(x, residual, self.weight, self.eps)
