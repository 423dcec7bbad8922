"""Residual add fused with the norm after it: ``sum = x + residual``, ``normed = norm(sum)``, both returned.
The sum carries the residual stream on to the next block. With ``dropout_p > 0`` the branch ``x`` is dropped
first: ``sum = residual + dropout(x, dropout_p, seed)``.

A pre-norm transformer block runs ``h = h + dropout(f(norm(h)))``. Fused, each norm reads x and residual once
and writes the sum and the normed tensor. Run separately, the sum is written, then read back, and dropout
reads and writes the branch once more in the forward and again in the backward.

These ops use the shared row-normalization kernels of ``triformer.layernorm`` (``HAS_RESIDUAL`` in the
forward; the backward gets the gradient that reaches the sum directly as ``dres`` and adds it to dx). Without
dropout they reuse the layer_norm_bwd / rms_norm_bwd ops, and x and residual receive the same gradient.

Dropout (``HAS_DROPOUT`` in both kernels): the mask is ``triformer.dropout``'s (see its module docstring), at x's
logical row-major indices, regenerated from the seed in the backward and never stored; a kept element is scaled
by ``1 / (1 - dropout_p)`` and rounded to x's dtype before the add, so with the same seed the sum equals
``residual + triformer.dropout(x, dropout_p, seed=seed)`` exactly. The residual's gradient is the sum's, x's is
that masked and scaled, both written by one backward pass (add_layer_norm_bwd / add_rms_norm_bwd). The seed is
drawn as dropout draws it (``seed=None``: from the default generator of x's device) only when ``dropout_p > 0``.

The modules ``AddLayerNorm`` and ``AddRMSNorm`` are ``LayerNorm`` and ``RMSNorm`` (same constructors, parameters
and state dicts) whose ``forward(x, residual, dropout_p=0.0)`` returns both tensors, dropping x only in
training mode.
"""
from __future__ import annotations

import numbers

from typing import Optional

import torch

from triformer import _runtime
from triformer._double_backward import needs_graph, reference_grads
from triformer._runtime import check_float
from triformer._shared import seed_tensor
from triformer.dropout import dropout, dropout_reference
from triformer.layernorm import (LayerNorm, check_args, check_last_dim, grad_or_none, layer_norm_bwd,
                                 layer_norm_reference, norm_backward, norm_forward)
from triformer.rmsnorm import RMSNorm, resolve_eps, rms_norm_bwd, rms_norm_reference

__all__ = ["AddLayerNormFunction", "AddLayerNorm", "add_layer_norm", "add_layer_norm_reference",
           "AddRMSNormFunction", "AddRMSNorm", "add_rms_norm", "add_rms_norm_reference"]


# seed: None without dropout, else a 0-d int64 tensor on x's device (read by the kernels, never written).
@_runtime.kernel_op("triformer::add_layer_norm_fwd", mutates_args=())
def add_layer_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], eps: float, seed: Optional[torch.Tensor],
                       dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, s, mean, rstd = norm_forward(x, residual, weight, bias, eps, rms=False, seed=seed, dropout_p=dropout_p)
    return s, y, mean, rstd


@_runtime.kernel_op("triformer::add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
                     seed: Optional[torch.Tensor], dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, s, _, rstd = norm_forward(x, residual, weight, None, eps, rms=True, seed=seed, dropout_p=dropout_p)
    return s, y, rstd


# The backward with dropout (without it, layer_norm_bwd / rms_norm_bwd): (gradient of the sum, which is the
# residual's; x's, the former masked and scaled; the parameters'). s is the saved sum, ds the gradient that reaches
# it directly (or None).
@_runtime.kernel_op("triformer::add_layer_norm_bwd", mutates_args=())
def add_layer_norm_bwd(dy: torch.Tensor, s: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                       ds: Optional[torch.Tensor], seed: torch.Tensor,
                       dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dsum, dw, db, dx = norm_backward(dy, s, weight, bias, mean, rstd, ds, seed, dropout_p)
    return dsum, dx, s.new_empty(0) if dw is None else dw, s.new_empty(0) if db is None else db


@_runtime.kernel_op("triformer::add_rms_norm_bwd", mutates_args=())
def add_rms_norm_bwd(dy: torch.Tensor, s: torch.Tensor, weight: Optional[torch.Tensor], rstd: torch.Tensor,
                     ds: Optional[torch.Tensor], seed: torch.Tensor,
                     dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dsum, dw, _, dx = norm_backward(dy, s, weight, None, None, rstd, ds, seed, dropout_p)
    return dsum, dx, s.new_empty(0) if dw is None else dw


def _branch_grad(dsum, dropout_p, seed):
    """x's gradient from the sum's when the kernel did not write it (only the sum was used, or double backward):
    triformer.dropout with the forward's seed, whose own backward keeps it differentiable."""
    return dsum if seed is None or dsum is None else dropout(dsum, dropout_p, seed=seed)


# Both Functions let an unused output's gradient arrive as None (set_materialize_grads(False)). When only
# the sum is used, its gradient passes straight through, with no zeros tensor and no kernel.
# seed: None without dropout (dropout_p 0), else the 0-d int64 seed tensor, saved for the backward's mask.
class AddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, dropout_p=0.0, seed=None):
        s, y, mean, rstd = add_layer_norm_fwd(x, residual, weight, bias, eps, seed, dropout_p)
        ctx.save_for_backward(s, weight, bias, mean, rstd, seed)
        ctx.set_materialize_grads(False)
        ctx.eps, ctx.dropout_p = eps, dropout_p
        return s, y

    @staticmethod
    def backward(ctx, ds, dy):
        s, weight, bias, mean, rstd, seed = ctx.saved_tensors
        if dy is None:
            return _branch_grad(ds, ctx.dropout_p, seed), ds, None, None, None, None, None
        if needs_graph(ds, dy, s, weight, bias):
            # create_graph=True: differentiate layer_norm_reference at the saved sum (an output of this Function,
            # so its graph leads back to x and residual through this backward); see triformer._double_backward.
            # x's gradient is dropout's (linear, differentiable) of the sum's, with the forward's seed.
            dsum, dw, db = reference_grads(lambda s_, w_, b_: layer_norm_reference(s_, w_, b_, ctx.eps),
                                           (s, weight, bias), (dy,), (True, *ctx.needs_input_grad[2:4]))
            dsum = ds if dsum is None else dsum if ds is None else dsum + ds
            return _branch_grad(dsum, ctx.dropout_p, seed), dsum, dw, db, None, None, None
        if seed is None:
            dsum, dw, db = layer_norm_bwd(dy, s, weight, bias, mean, rstd, ds)
            dx = dsum
        else:
            dsum, dx, dw, db = add_layer_norm_bwd(dy, s, weight, bias, mean, rstd, ds, seed, ctx.dropout_p)
        return dx, dsum, grad_or_none(dw, weight), grad_or_none(db, bias), None, None, None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, dropout_p=0.0, seed=None):
        s, y, rstd = add_rms_norm_fwd(x, residual, weight, eps, seed, dropout_p)
        ctx.save_for_backward(s, weight, rstd, seed)
        ctx.set_materialize_grads(False)
        ctx.eps, ctx.dropout_p = eps, dropout_p
        return s, y

    @staticmethod
    def backward(ctx, ds, dy):
        s, weight, rstd, seed = ctx.saved_tensors
        if dy is None:
            return _branch_grad(ds, ctx.dropout_p, seed), ds, None, None, None, None
        if needs_graph(ds, dy, s, weight):  # create_graph=True: as AddLayerNormFunction.backward
            dsum, dw = reference_grads(lambda s_, w_: rms_norm_reference(s_, w_, ctx.eps), (s, weight), (dy,),
                                       (True, ctx.needs_input_grad[2]))
            dsum = ds if dsum is None else dsum if ds is None else dsum + ds
            return _branch_grad(dsum, ctx.dropout_p, seed), dsum, dw, None, None, None
        if seed is None:
            dsum, dw = rms_norm_bwd(dy, s, weight, rstd, ds)
            dx = dsum
        else:
            dsum, dx, dw = add_rms_norm_bwd(dy, s, weight, rstd, ds, seed, ctx.dropout_p)
        return dx, dsum, grad_or_none(dw, weight), None, None, None


def _check_dropout_p(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:  # also refuses NaN
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def _seed(x: torch.Tensor, dropout_p: float, seed):
    """The seed tensor the kernels read, drawn (seed=None) or checked as triformer.dropout does; None without
    dropout, which draws nothing."""
    return seed_tensor(seed, x.device) if dropout_p > 0 else None


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, eps: float = 1e-5, dropout_p: float = 0.0,
                   seed=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, layer_norm(s, weight, bias, eps)) with s = residual + dropout(x, dropout_p, seed). x and residual share
    shape and dtype, and the sum is rounded to that dtype before it is normalized. ``dropout_p`` in [0, 1) (0: no
    dropout, no seed drawn); ``seed`` as ``triformer.dropout``'s (None draws one), giving the mask
    ``triformer.dropout(x, dropout_p, seed=seed)`` applies. There is no training flag: pass 0 in evaluation."""
    check_float("residual", residual)  # check_args treats None as "no residual"
    eps = check_args(x, residual, weight, bias, eps)
    dropout_p = _check_dropout_p(dropout_p)
    return AddLayerNormFunction.apply(x, residual, weight, bias, eps, dropout_p, _seed(x, dropout_p, seed))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor] = None,
                 eps: Optional[float] = 1e-6, dropout_p: float = 0.0, seed=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rms_norm(s, weight, eps)) with s = residual + dropout(x, dropout_p, seed), as ``add_layer_norm``;
    ``eps=None`` as in ``rms_norm``."""
    check_float("residual", residual)
    eps = check_args(x, residual, weight, None, resolve_eps(x, eps))
    dropout_p = _check_dropout_p(dropout_p)
    return AddRMSNormFunction.apply(x, residual, weight, eps, dropout_p, _seed(x, dropout_p, seed))


def add_layer_norm_reference(x, residual, weight=None, bias=None, eps=1e-5, dropout_p=0.0, seed=None):
    """Plain PyTorch ``add_layer_norm``: ``triformer.dropout_reference`` regenerates the same mask from the same
    seed (seed=None draws it the same way), so both agree after equal ``torch.manual_seed`` calls."""
    s = dropout_reference(x, _check_dropout_p(dropout_p), seed=seed) + residual
    return s, layer_norm_reference(s, weight, bias, eps)


def add_rms_norm_reference(x, residual, weight=None, eps=1e-6, dropout_p=0.0, seed=None):
    """Plain PyTorch ``add_rms_norm``, as ``add_layer_norm_reference``."""
    s = dropout_reference(x, _check_dropout_p(dropout_p), seed=seed) + residual
    return s, rms_norm_reference(s, weight, eps)


class AddLayerNorm(LayerNorm):
    """``LayerNorm`` fused with the residual add in front of it: ``forward(x, residual, dropout_p=0.0)`` returns
    ``add_layer_norm(x, residual, weight, bias, eps, dropout_p)``, i.e. ``(s, layer_norm(s))`` with
    ``s = residual + dropout(x)``; x is dropped in training mode only (a fresh seed per call), as ``nn.Dropout``."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor,
                dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        check_last_dim(self, x)
        dropout_p = _check_dropout_p(dropout_p)
        return add_layer_norm(x, residual, self.weight, self.bias, self.eps, dropout_p if self.training else 0.0)


class AddRMSNorm(RMSNorm):
    """``RMSNorm`` fused with the residual add in front of it: ``forward(x, residual, dropout_p=0.0)`` returns
    ``add_rms_norm(x, residual, weight, eps, dropout_p)``, as ``AddLayerNorm``."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor,
                dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        check_last_dim(self, x)
        dropout_p = _check_dropout_p(dropout_p)
        return add_rms_norm(x, residual, self.weight, self.eps, dropout_p if self.training else 0.0)
