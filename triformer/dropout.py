"""Dropout with a counter-based RNG: the keep-mask is a pure function of (seed, element index), never stored.

Mask definition (shared by the kernel, ``dropout_keep`` and ``dropout_reference``): element ``i`` of the
tensor, ``i`` being its *logical* row-major index (so a non-contiguous input gets the same mask as its
contiguous copy), is kept iff ``u(seed, i) >= p`` where ``u`` takes the top 24 bits of word ``i % 4`` of
Philox4x32-10 run on the counter ``(lo32(i // 4), hi32(i // 4), 0, 0)`` with the key ``(lo32(seed),
hi32(seed))``, divided by 2**24. ``p`` is compared in float32. One Philox call serves four consecutive
elements, a quarter of the per-element RNG work.

Kept elements are scaled by ``1 / (1 - p)``; dropped elements are exactly 0 (even where the input is inf or
NaN). The backward regenerates the mask from the seed: ``dx = mask * dy / (1 - p)``.

Seeds: ``None`` draws one from the default generator of x's device (so ``torch.manual_seed`` reproduces a run), or
pass an int in ``[0, 2**63)`` or a 0-dim integer tensor. ``p == 0`` or ``training=False`` returns ``x``
itself without drawing a seed or launching anything.

The stream's building blocks (``philox``, ``uniform``, ``dropout_keep``, ``seed_tensor``) and their plain-PyTorch
twins live in ``triformer._shared``, since attention drops its probabilities with the same stream;
``dropout_keep`` and the references are re-exported here.
"""
from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from triformer import _runtime  # noqa: F401  (decides compile vs interpret before the kernels below)
from triformer._double_backward import needs_graph
from triformer._runtime import INTERPRET, check_device, check_float
from triformer._shared import dropout_keep, dropout_keep_reference, philox, philox4x32_reference, seed_tensor, uniform

__all__ = ["DropoutFunction", "Dropout", "dropout", "dropout_reference",
           "dropout_keep", "dropout_keep_reference", "philox4x32_reference",  # the mask, for other kernels and tests
           "TritonDropout"]  # the seed's name (see triformer/__init__.py)

# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _dropout_kernel(
    x_ptr,     # input as a [M, N] view (its leading dims merged), strides sx_m, sx_n (unread when FLAT)
    y_ptr,     # out: contiguous, x's shape
    seed_ptr,  # 0-d int64 seed on the device
    n_elements, n_cols, sx_m, sx_n, p, scale,  # x's element count and row length; scale = 1 / (1 - p)
    FLAT: tl.constexpr, BLOCK: tl.constexpr,
):
    # fp32 math: Inductor passes Python floats as fp64
    p, scale = tl.cast(p, tl.float32), tl.cast(scale, tl.float32)
    # Each program owns BLOCK consecutive logical indices as a [BLOCK // 4, 4] tile: row k of the tile is
    # the four elements one Philox call covers, so the RNG runs on BLOCK // 4 counters. The seed is read from
    # device memory, not passed by value, so a compiled graph or CUDA graph draws a new one every step.
    seed = tl.load(seed_ptr)
    quad = tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    lane = tl.arange(0, 4)
    idx = quad[:, None] * 4 + lane[None, :]
    in_range = idx < n_elements
    if FLAT:
        src = idx
    else:  # a strided [rows, n_cols] view: logical index -> memory offset
        src = (idx // n_cols) * sx_m + (idx % n_cols) * sx_n
    x = tl.load(x_ptr + src, mask=in_range, other=0.0).to(tl.float32)
    r0, r1, r2, r3 = philox(seed, quad)
    keep = uniform(r0[:, None], r1[:, None], r2[:, None], r3[:, None], lane[None, :]) >= p
    y = tl.where(keep, x * scale, 0.0)
    tl.store(y_ptr + idx, y.to(y_ptr.dtype.element_ty), mask=in_range)


# ---------------------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------------------

# Elements per program: few, large programs on the interpreter; on a GPU 4096 over 8 warps is 16 elements
# (4 Philox calls) a thread, enough bytes in flight per SM to stay memory-bound.
BLOCK = 1 << 16 if INTERPRET else 4096
NUM_WARPS = 8

def _launch(x: torch.Tensor, y: torch.Tensor, seed: torch.Tensor, p: float) -> None:
    """Write the dropped ``x`` into the preallocated contiguous ``y``."""
    n = x.numel()
    if n == 0:
        return
    rows = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    flat = rows.is_contiguous()
    scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0
    _runtime.launch(_dropout_kernel, (triton.cdiv(n, BLOCK),))(
        rows, y, seed, n, rows.shape[1], rows.stride(0), rows.stride(1), p, scale, FLAT=flat, BLOCK=BLOCK,
        num_warps=NUM_WARPS)


@_runtime.kernel_op("triformer::dropout", mutates_args=())
def _dropout_op(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """Forward and backward alike: the backward drops ``dy`` with the same seed and p. ``seed``: a 0-dim int64
    tensor on x's device, in [0, 2**63)."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, y, seed, p)
    return y


def _check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"p must be a real number in [0, 1], got {type(p).__name__}")
    if not 0.0 <= float(p) <= 1.0:  # also rejects NaN
        raise ValueError(f"p must be in [0, 1], got {p}")
    return float(p)


class DropoutFunction(torch.autograd.Function):
    """``DropoutFunction.apply(x, p, seed=None)``: always drops (no training flag; p == 0 still launches), and
    checks its arguments itself (the seed's ``TritonDropout.apply`` is this)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed=None) -> torch.Tensor:
        check_float("x", x)
        check_device(x=x)
        p = _check_p(p)
        seed = seed_tensor(seed, x.device)
        ctx.save_for_backward(seed)
        ctx.p = p
        return _dropout_op(x, seed, p)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (seed,) = ctx.saved_tensors
        if needs_graph(dy):
            # create_graph=True: dropout is linear, so its backward (the same mask and scale applied to dy) is this
            # Function again, whose own backward makes it differentiable. See triformer._double_backward.
            return DropoutFunction.apply(dy, ctx.p, seed), None, None
        return _dropout_op(dy, seed, ctx.p), None, None


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def _check_training(training) -> None:
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, seed=None) -> torch.Tensor:
    """Zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)``; see the module
    docstring for the mask and seed rules."""
    check_float("x", x)
    p = _check_p(p)
    _check_training(training)
    if not training or p == 0.0:
        return x
    return DropoutFunction.apply(x, p, seed)


def dropout_reference(x: torch.Tensor, p: float = 0.5, training: bool = True, seed=None,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch dropout with ``dropout``'s semantics, float64-friendly and differentiable.

    With ``mask`` (bool, x's shape; True = kept) that mask is applied; otherwise the mask is regenerated from
    ``seed`` exactly as the kernel does (``None`` draws the seed from torch's generator the same way, so
    after equal ``torch.manual_seed`` calls ``dropout_reference(x)`` equals ``dropout(x)``).
    """
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    p = _check_p(p)
    _check_training(training)
    if not training or p == 0.0:
        return x
    if mask is None:
        seed_value = int(seed_tensor(seed, x.device))
        index = torch.arange(x.numel(), device=x.device).reshape(x.shape)
        mask = dropout_keep_reference(index, seed_value, p)
    elif mask.shape != x.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(x.shape)}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0
    return torch.where(mask, x * scale, torch.zeros((), dtype=x.dtype, device=x.device))


class Dropout(torch.nn.Module):
    """``dropout(x, p, self.training)``: a fresh seed per call in training mode, identity in eval mode."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = _check_p(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


TritonDropout = DropoutFunction
"""The seed's name for the autograd Function (``TritonDropout.apply(x, p, seed)``): see triformer/__init__.py."""
