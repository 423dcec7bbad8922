"""Rotary position embedding (RoPE) in the half-split layout of Llama / Hugging Face.

For a head vector ``x`` of size D at position ``p``, with ``x1 = x[:D/2]``, ``x2 = x[D/2:]`` and angles
``p * inv_freq`` (``inv_freq[i] = base ** (-2i / D)``)::

    out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]

which is Hugging Face's ``q * cos + rotate_half(q) * sin`` with its cos/sin [T, D] being two copies of
ours [T, D/2]. q/k are [B, H, T, D] and are read through their strides, so views of a fused qkv projection
(e.g. ``qkv.view(B, T, 3, H, D)[:, :, 0].transpose(1, 2)``) are rotated without a copy; the outputs are
contiguous [B, H, T, D]. The backward is the inverse rotation (``sin`` negated), by the same kernel.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import nn

from triformer import _runtime
from triformer._double_backward import needs_graph

__all__ = ["RopeFunction", "RotaryEmbedding", "rope", "rope_reference", "apply_rope", "apply_rope_reference",
           "rope_cos_sin", "rope_inv_freq"]


@triton.jit
def _rope_kernel(
    x_ptr,    # q or k [B, H, T, D], strides sx_b, sx_h, sx_t, sx_d
    cos_ptr,  # cos table [B or 1, T', D/2], strides scos_b (0 for a table shared by the batch), scos_t, scos_d
    sin_ptr,  # sin table, laid out as cos, strides ssin_*
    y_ptr,    # out: the rotated vectors, contiguous [B, H, T, D]
    R, H, T, HALF, offset,  # R = B * H * T head vectors; HALF = D / 2; position of t is t + offset
    sx_b, sx_h, sx_t, sx_d, scos_b, scos_t, scos_d, ssin_b, ssin_t, ssin_d,
    INVERSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # A program rotates BLOCK_R of the B*H*T head vectors. Their two halves are loaded as two [BLOCK_R,
    # BLOCK_D] tiles, so the rotation pairs lane i of one with lane i of the other: no shuffles.
    # (b, h, t) from int32 row indices (int64 division is far slower on a GPU); offsets in int64
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    t = (rows % T).to(tl.int64)
    b = (rows // T // H).to(tl.int64)
    h = (rows // T % H).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = (rows < R)[:, None] & (d < HALF)[None, :]
    x1_ptrs = x_ptr + (b * sx_b + h * sx_h + t * sx_t)[:, None] + d[None, :] * sx_d
    x1 = tl.load(x1_ptrs, mask=mask).to(tl.float32)
    x2 = tl.load(x1_ptrs + HALF * sx_d, mask=mask).to(tl.float32)
    pos = t + offset
    c = tl.load(cos_ptr + (b * scos_b + pos * scos_t)[:, None] + d[None, :] * scos_d, mask=mask).to(tl.float32)
    s = tl.load(sin_ptr + (b * ssin_b + pos * ssin_t)[:, None] + d[None, :] * ssin_d, mask=mask).to(tl.float32)
    if INVERSE:
        s = -s
    y1_ptrs = y_ptr + rows.to(tl.int64)[:, None] * (2 * HALF) + d[None, :]
    tl.store(y1_ptrs, (x1 * c - x2 * s).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y1_ptrs + HALF, (x2 * c + x1 * s).to(y_ptr.dtype.element_ty), mask=mask)


def _table_strides(table: torch.Tensor) -> tuple[int, int, int]:
    """(batch, position, column) strides of a [T', D/2] or [B or 1, T', D/2] cos/sin table."""
    if table.dim() == 2 or table.shape[0] == 1:
        return 0, table.stride(-2), table.stride(-1)
    return table.stride(0), table.stride(1), table.stride(2)


@_runtime.kernel_op("triformer::rope_rotate", mutates_args=())
def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_offset: int,
                inverse: bool) -> torch.Tensor:
    """Rotate x [B, H, T, D] by the angles of positions ``position_offset + t`` (backward: ``inverse``)."""
    B, H, T, D = x.shape
    y = torch.empty((B, H, T, D), dtype=x.dtype, device=x.device)
    R, half = B * H * T, D // 2
    if R == 0:
        return y
    block_d = triton.next_power_of_2(*_runtime.plan_sizes(half))
    # GPU: 2048-value half tiles (4096 values with both halves), 32 per thread of 4 warps.
    block_r = _runtime.rows_per_program(R, 2 * block_d, gpu_rows=max(1, 2048 // block_d))
    _runtime.launch(_rope_kernel, (triton.cdiv(R, block_r),))(
        x, cos, sin, y, R, H, T, half, position_offset, *x.stride(), *_table_strides(cos), *_table_strides(sin),
        INVERSE=inverse, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return y


class RopeFunction(torch.autograd.Function):
    """One tensor's rotation; cos/sin are constants (no gradient)."""

    @staticmethod
    def forward(ctx, x, cos, sin, position_offset):
        ctx.save_for_backward(cos, sin)
        ctx.position_offset = position_offset
        return rope_rotate(x, cos, sin, position_offset, False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        if needs_graph(dy):
            # create_graph=True: the rotation is linear, its backward the inverse rotation, i.e. the rotation by
            # (cos, -sin): this Function again, differentiable through its own backward. See triformer._double_backward.
            return RopeFunction.apply(dy, cos, -sin, ctx.position_offset), None, None, None
        return rope_rotate(dy, cos, sin, ctx.position_offset, True), None, None, None


def _check_table(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_offset: int) -> None:
    B, _, T, D = x.shape
    for name, table in (("cos", cos), ("sin", sin)):
        _runtime.check_float(name, table)
        if table.requires_grad:
            raise ValueError(f"{name} requires grad, but apply_rope treats the cos/sin tables as constants")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.dim() not in (2, 3) or cos.shape[-1] != D // 2 or (cos.dim() == 3 and cos.shape[0] not in (1, B)):
        raise ValueError(f"cos/sin must be [positions, D/2] or [B or 1, positions, D/2] with D/2 = {D // 2}, "
                         f"B = {B}; got {tuple(cos.shape)}")
    # under torch.compile an offset that varies between calls arrives as a SymInt
    if not isinstance(position_offset, (int, torch.SymInt)) or isinstance(position_offset, bool) or position_offset < 0:
        raise ValueError(f"position_offset must be a non-negative int, got {position_offset!r}")
    if position_offset + T > cos.shape[-2]:
        raise ValueError(f"positions up to {position_offset + T - 1} (position_offset {position_offset} + T {T} - 1) "
                         f"need cos/sin with more than {cos.shape[-2]} positions")


def _check_head(name: str, x: torch.Tensor) -> None:
    _runtime.check_float(name, x)
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"{name} must be [B, H, T, D] with an even head dim D, got shape {tuple(x.shape)}")


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
    """Rotate one tensor x [B, H, T, D]; token t gets position ``position_offset + t``, i.e. row
    ``position_offset + t`` of cos/sin [positions, D/2] (or of [B, positions, D/2], per sequence)."""
    _check_head("x", x)
    _check_table(x, cos, sin, position_offset)
    _runtime.check_device(x=x, cos=cos, sin=sin)
    return RopeFunction.apply(x, cos, sin, position_offset)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               position_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rope(q), rope(k)) for q [B, H, T, D] and k [B, Hk, T, D] (Hk may differ: GQA/MQA).

    For a [B, T, H, D] layout pass ``q.transpose(1, 2)`` (a view; the result is contiguous [B, H, T, D]).
    """
    _check_head("q", q)
    _check_head("k", k)
    if k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k must be [B, Hk, T, D] with q's B, T, D; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    _check_table(q, cos, sin, position_offset)
    _runtime.check_device(q=q, k=k, cos=cos, sin=sin)
    return RopeFunction.apply(q, cos, sin, position_offset), RopeFunction.apply(k, cos, sin, position_offset)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
    """Plain PyTorch ``rope``: the math in the promoted dtype of x and the tables, returned in x's dtype."""
    T = x.shape[-2]
    c = cos[..., position_offset:position_offset + T, :]
    s = sin[..., position_offset:position_offset + T, :]
    if c.dim() == 3:  # per-sequence tables [B, T, D/2] broadcast over heads
        c, s = c[:, None], s[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         position_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_reference(q, cos, sin, position_offset), rope_reference(k, cos, sin, position_offset)


ROPE_SCALINGS = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, base: float = 10000.0, scaling: Optional[dict] = None) -> torch.Tensor:
    """fp32 inverse frequencies [head_dim / 2], Hugging Face's bit for bit: ``1 / base ** (arange(0, D, 2) / D)``,
    then ``scaling`` (Hugging Face's ``rope_parameters`` without ``rope_theta``): None / ``{"rope_type":
    "default"}``; ``{"rope_type": "linear", "factor": f}`` (positions interpolated: frequencies / f); or
    ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}`` (Llama 3.1+: long wavelengths / factor, short ones kept, a smooth
    blend between). Dynamic NTK and YaRN tables depend on more than the position and are refused."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"rope scaling must be one of {ROPE_SCALINGS}, got {kind!r}")
    if kind == "default":
        return inv_freq
    factor = scaling.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not _runtime.is_finite(factor) or factor <= 0:
        raise ValueError(f"rope scaling factor must be a positive number, got {factor!r}")
    if kind == "linear":
        return inv_freq / factor
    try:
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
    except KeyError as e:
        raise ValueError(f"llama3 rope scaling needs {e.args[0]!r}") from None
    if not 0 < low < high or old_len <= 0:
        raise ValueError(f"llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor and a positive "
                         f"original_max_position_embeddings, got {scaling}")
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(seq_len: int, head_dim: int, base: float = 10000.0, device=None, dtype=torch.float32,
                 offset: int = 0, scaling: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, head_dim / 2] for positions ``offset .. offset + seq_len - 1``.

    The frequencies are Hugging Face Llama's exactly (``rope_inv_freq``: ``1 / base ** (arange(0, D, 2) / D)``
    rounded to fp32, with ``scaling`` = HF's linear or llama3 RoPE scaling applied as HF does); the angles
    ``position * inv_freq`` and their cos/sin are computed in float64 and rounded once to ``dtype``, so long
    positions do not lose the fp32 angle precision that HF's tables do.
    """
    for name, value in (("seq_len", seq_len), ("head_dim", head_dim), ("offset", offset)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if head_dim == 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim}")
    if not isinstance(base, (int, float)) or isinstance(base, bool) or not _runtime.is_finite(base) or base <= 0:
        raise ValueError(f"base must be a positive finite number, got {base!r}")
    # on the CPU, as HF does, so the fp32 frequencies are bit-identical whatever the target device
    inv_freq = rope_inv_freq(head_dim, base, scaling)
    angles = torch.arange(offset, offset + seq_len, dtype=torch.float64)[:, None] * inv_freq.double()[None, :]
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


class RotaryEmbedding(nn.Module):
    """Caches fp32 cos/sin for ``max_seq_len`` positions; ``forward(q, k, position_offset=0)`` rotates q and
    k [B, H, T, D] (e.g. ``position_offset`` = tokens already in a KV cache)."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0, device=None):
        super().__init__()
        if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
        self.head_dim, self.max_seq_len, self.base = head_dim, max_seq_len, base
        cos, sin = rope_cos_sin(max_seq_len, head_dim, base, device=device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if q.dim() == 4 and q.shape[-1] != self.head_dim:
            raise ValueError(f"q's head dim {q.shape[-1]} != this RotaryEmbedding's head_dim {self.head_dim}")
        return apply_rope(q, k, self.cos, self.sin, position_offset)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, base={self.base}"
