"""Helpers for checking a kernel against its float64 reference; used by tests/ and the GPU check script.

The rule every op test follows:
* inputs are fresh random values (never zeros), in odd, non-power-of-two shapes larger than one block,
  and also as non-contiguous views;
* outputs are poisoned (NaN) before the kernel runs where the op writes into a given buffer;
* the kernel's output and gradients are compared with the reference computed in float64, by relative
  error ``||ours - ref|| / ||ref||``; for fp16/bf16 the bar is what PyTorch's own kernels reach on the same
  low-precision inputs (``peer``), with a little slack, never a fixed loose tolerance.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from triformer._runtime import INTERPRET

# fp32 kernels accumulate in a different order than torch's, which costs a few ulps.
FP32_RTOL = 1e-5
# fp16/bf16 outputs may be this many times worse than PyTorch's own kernel in the same dtype, plus a floor
# for the rounding of the output itself.
LOW_PRECISION_SLACK = 2.0
LOW_PRECISION_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def kernel_device() -> torch.device:
    """The device kernel tests run on: the GPU when kernels compile, else the CPU interpreter."""
    return torch.device("cpu" if INTERPRET else "cuda")


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64; inf if ``actual`` has a NaN/inf it shouldn't."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(device=a.device, dtype=torch.float64)
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    finite = torch.isfinite(e)
    if not torch.equal(torch.isfinite(a), finite):
        return float("inf")
    if not torch.equal(a[~finite], e[~finite]):  # matching infinities must also have matching signs
        return float("inf")
    a, e = a[finite], e[finite]
    denom = e.norm()
    if denom == 0:
        return float((a - e).norm())
    return float((a - e).norm() / denom)


def assert_close(name: str, actual: torch.Tensor, expected64: torch.Tensor, peer: torch.Tensor | None = None,
                 rtol: float | None = None) -> None:
    """Assert ``actual`` matches the float64 reference within the tolerance for its dtype.

    ``peer`` is PyTorch's own result on the same (low-precision) inputs; for fp16/bf16 it sets the bar.
    """
    err = rel_error(actual, expected64)
    if rtol is None:
        if actual.dtype in LOW_PRECISION_FLOOR:
            peer_err = rel_error(peer, expected64) if peer is not None else 0.0
            rtol = max(LOW_PRECISION_FLOOR[actual.dtype], LOW_PRECISION_SLACK * peer_err)
        else:
            rtol = FP32_RTOL
    assert err <= rtol, f"{name}: relative error {err:.3e} > tolerance {rtol:.3e} ({actual.dtype})"


def random_tensor(shape, dtype, device=None, *, contiguous: bool = True, scale: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Fresh normal values (never zeros). Non-contiguous: a view with the last dim strided by 2 and the
    leading dims permuted where there are several, so both row and column strides are unusual."""
    device = device or kernel_device()
    shape = tuple(shape)
    if contiguous:
        return (torch.randn(shape, generator=generator, dtype=torch.float32) * scale).to(dtype=dtype, device=device)
    wide = shape[:-1] + (2 * shape[-1],)
    base = (torch.randn(wide[::-1] if len(shape) > 2 else wide, generator=generator) * scale).to(dtype=dtype, device=device)
    if len(shape) > 2:  # stored with reversed dims, viewed back: a genuinely permuted layout
        base = base.permute(*reversed(range(len(shape))))
    view = base[..., ::2]
    assert view.shape == shape and (view.numel() <= 1 or not view.is_contiguous())
    return view


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a buffer with NaN (or the max value for integer tensors) so unwritten elements show."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max)


@contextlib.contextmanager
def poisoned_empty(owner: Any = torch, name: str = "empty") -> Iterator[None]:
    """Within the block, ``owner.name`` (by default ``torch.empty``) returns poisoned memory (see ``poison_``).

    For ops that allocate their own outputs: any output element a kernel fails to write then shows up as
    NaN. Point it at the allocator the op really calls, e.g. a module's private ``_empty`` helper, which
    patching ``torch.empty`` would not reach. The original is restored on exit."""
    real = getattr(owner, name)

    def empty(*args, **kwargs):
        return poison_(real(*args, **kwargs))

    setattr(owner, name, empty)
    try:
        yield
    finally:
        setattr(owner, name, real)
