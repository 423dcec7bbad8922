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
"""
from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from triformer import _runtime  # noqa: F401  (decides compile vs interpret before the kernels below)
from triformer._double_backward import needs_graph
from triformer._runtime import INTERPRET, check_device, check_float

# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _philox(seed, counter):
    """Philox4x32-10 on counter (lo32, hi32, 0, 0) of a non-negative int64 counter; four uint32 words.
    The 32-bit counter form is spelled out because tl.randint4x's handling of 64-bit offsets differs
    between triton versions."""
    lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    hi = (counter >> 32).to(tl.uint32)
    zero = lo * 0
    return tl.philox(seed, lo, hi, zero, zero)


@triton.jit
def _uniform(r0, r1, r2, r3, lane):
    """Word ``lane`` (0..3) of a Philox output as a float in [0, 1) with 24 bits, exact in fp32."""
    bits = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def dropout_keep(seed, offsets, p):
    """Keep-mask (True = kept) of the elements at logical indices ``offsets`` (any integer tensor of any
    shape) of a tensor dropped with ``seed`` and probability ``p``; identical to what ``dropout`` applies.
    For use inside other kernels (e.g. attention dropout on the [B, H, Tq, Tk] probability tensor, with
    ``offsets = ((b * H + h) * Tq + q) * Tk + k``). Costs one Philox call per element; ``dropout`` itself
    shares each call between four elements."""
    offsets = offsets.to(tl.int64)
    r0, r1, r2, r3 = _philox(seed, offsets >> 2)
    return _uniform(r0, r1, r2, r3, offsets & 3) >= p


@triton.jit
def _dropout_kernel(x_ptr, y_ptr, seed_ptr, n_elements, n_cols, stride_r, stride_c, p, scale,
                    FLAT: tl.constexpr, BLOCK: tl.constexpr):
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
        src = (idx // n_cols) * stride_r + (idx % n_cols) * stride_c
    x = tl.load(x_ptr + src, mask=in_range, other=0.0).to(tl.float32)
    r0, r1, r2, r3 = _philox(seed, quad)
    keep = _uniform(r0[:, None], r1[:, None], r2[:, None], r3[:, None], lane[None, :]) >= p
    y = tl.where(keep, x * scale, 0.0)
    tl.store(y_ptr + idx, y.to(y_ptr.dtype.element_ty), mask=in_range)


# ---------------------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------------------

# Elements per program: few, large programs on the interpreter; on a GPU 4096 over 8 warps is 16 elements
# (4 Philox calls) a thread, enough bytes in flight per SM to stay memory-bound.
BLOCK = 1 << 16 if INTERPRET else 4096
NUM_WARPS = 8

SEED_LIMIT = 2**63


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


def _seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """The seed as a 0-dim int64 tensor on ``device``, where the kernels read it. A tensor, not an int, so that
    torch.compile keeps drawing it in the graph instead of baking one value in, and so that a CUDA graph
    replays a fresh draw. ``None`` draws from ``device``'s default generator."""
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


class TritonDropout(torch.autograd.Function):
    """``TritonDropout.apply(x, p, seed=None)``: always drops (no training flag; p == 0 still launches)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed=None) -> torch.Tensor:
        check_float("x", x)
        check_device(x=x)
        p = _check_p(p)
        seed = _seed_tensor(seed, x.device)
        ctx.save_for_backward(seed)
        ctx.p = p
        return _dropout_op(x, seed, p)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (seed,) = ctx.saved_tensors
        if needs_graph(dy):
            # create_graph=True: dropout is linear, so its backward (the same mask and scale applied to dy) is this
            # Function again, whose own backward makes it differentiable. See triformer._double_backward.
            return TritonDropout.apply(dy, ctx.p, seed), None, None
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
    return TritonDropout.apply(x, p, seed)


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
        seed_value = int(_seed_tensor(seed, x.device))
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
