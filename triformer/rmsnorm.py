"""RMS normalization over the last dimension: ``x / sqrt(mean(x^2) + eps) * weight``.

The kernels are the shared row-normalization kernels of ``triformer.layernorm``, launched with ``RMS``
set. Rows are centred at zero instead of their mean, so the forward saves only rstd and dx has no
mean-gradient term. See that module for the blocking and the parallel dweight reduction.
"""
from __future__ import annotations

from typing import Optional

import torch

from triformer import _runtime
from triformer._double_backward import needs_graph, reference_grads
from triformer.layernorm import NormBase, check_args, check_last_dim, grad_or_none, norm_backward, norm_forward

__all__ = ["RMSNormFunction", "RMSNorm", "rms_norm", "rms_norm_reference"]


def resolve_eps(x: torch.Tensor, eps: Optional[float]):
    """eps, or for None torch.nn.RMSNorm's default: the machine epsilon of x's dtype (also for add_rms_norm)."""
    return torch.finfo(x.dtype).eps if eps is None and isinstance(x, torch.Tensor) and x.is_floating_point() else eps


@_runtime.kernel_op("triformer::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, _, rstd = norm_forward(x, None, weight, None, eps, rms=True)
    return y, rstd


@_runtime.kernel_op("triformer::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], rstd: torch.Tensor,
                 dres: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """dres: a gradient reaching x directly (the fused op's residual sum), added to dx."""
    dx, dw, _, _ = norm_backward(dy, x, weight, None, None, rstd, dres)
    return dx, x.new_empty(0) if dw is None else dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        if needs_graph(dy, x, weight):  # create_graph=True: through the reference (triformer._double_backward)
            dx, dw = reference_grads(lambda x_, w_: rms_norm_reference(x_, w_, ctx.eps), (x, weight), (dy,),
                                     ctx.needs_input_grad[:2])
            return dx, dw, None
        dx, dw = rms_norm_bwd(dy, x, weight, rstd, None)
        return dx, grad_or_none(dw, weight), None


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: Optional[float] = 1e-6) -> torch.Tensor:
    """RMS norm over the last dim, output in x's dtype; ``eps=None`` uses ``torch.finfo(x.dtype).eps`` as
    ``torch.nn.functional.rms_norm`` does. Mixed dtypes (e.g. bf16 x, fp32 weight) as in ``layer_norm``."""
    eps = check_args(x, None, weight, None, resolve_eps(x, eps))
    return RMSNormFunction.apply(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                       eps: Optional[float] = 1e-6) -> torch.Tensor:
    """Plain PyTorch rms_norm with the same semantics: computed in fp32 (float64 for float64 inputs),
    returned in x's dtype."""
    eps = resolve_eps(x, eps)
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(compute)
    return y.to(x.dtype)


class RMSNorm(NormBase):
    """Drop-in for ``torch.nn.RMSNorm`` over the last dimension (parameter ``weight``, same state dict),
    with eps defaulting to 1e-6; ``eps=None`` keeps torch's dtype-dependent default."""

    def __init__(self, normalized_shape, eps: Optional[float] = 1e-6, elementwise_affine: bool = True,
                 device=None, dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, None, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_last_dim(self, x)
        return rms_norm(x, self.weight, self.eps)
