"""Transformer building blocks shared by the GPT/llama and ViT models.

Each module keeps its parameters as plain ``nn.Parameter``s / ``nn.Linear`` weights and does its math through
``ops`` (``models.ops.get_ops``), so the Triton and the PyTorch variants of a model share one state dict.

The residual stream is carried as ``(x, pending)``: ``pending`` is the output of the last sublayer, neither
dropped out nor added to ``x`` yet. The next norm drops it and adds it (``add_layer_norm`` / ``add_rms_norm``
with ``dropout_p``), which fuses the residual dropout and add into the norm kernel instead of spending separate
passes over the activations on them. So every consumer of a block's ``pending`` applies the residual dropout
exactly once: the next block's ``ln_1``, the model's final norm (GPT's ``ln_f``, ViT's ``norm`` on the class
token), or an explicit ``dropout`` where it is added without a norm (ViT's mean pooling).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")


@dataclasses.dataclass
class TransformerConfig:
    """What a stack of pre-norm blocks needs; the GPT and ViT configs extend it."""
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None       # fewer key/value heads than query heads: grouped-query attention
    mlp_hidden: int | None = None      # default 4 * n_embd (gelu), or ~8/3 * n_embd rounded up to 64 (swiglu)
    norm: str = "layernorm"
    activation: str = "gelu_tanh"
    bias: bool = True                  # biases in the Linear layers and the LayerNorms
    norm_eps: float = 1e-5
    dropout: float = 0.0               # at the embedding, on attention probabilities, on each residual branch
    kernels: str = "triton"

    def __post_init__(self):
        from models.ops import check_kernels  # late: models.ops imports triformer
        check_kernels(self.kernels)
        for name in ("n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if not isinstance(self.n_kv_head, int) or self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head must be a positive divisor of n_head ({self.n_head}), got {self.n_kv_head!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.mlp_hidden is None:
            self.mlp_hidden = (4 * self.n_embd if self.activation != "swiglu"
                               else 64 * math.ceil(8 * self.n_embd / 3 / 64))
        if not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be a positive int, got {self.mlp_hidden!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def to_stream_dtype(x: torch.Tensor) -> torch.Tensor:
    """The residual stream's dtype: under autocast the autocast dtype (Megatron's default), so the sublayer
    outputs (autocast matmuls) and the stream meet in the fused add+norm kernels in one dtype and the normed
    activations feed the next matmul without a cast; otherwise the parameters' dtype."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def at_least_fp32(loss: torch.Tensor) -> torch.Tensor:
    """The losses come in the logits' dtype; under autocast that is bf16/fp16, too coarse to log or compare."""
    return loss.to(torch.promote_types(loss.dtype, torch.float32))


def dropout(ops, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # p == 0 (the default, and every eval step) is the identity: no kernel launch for it.
    return ops.dropout(x, p, training=True) if training and p > 0 else x


class Norm(nn.Module):
    """LayerNorm or RMSNorm; ``forward(x, pending, dropout_p)`` returns ``(s, norm(s))`` with
    ``s = x + dropout(pending, dropout_p)``. The caller passes ``dropout_p`` 0 outside training."""

    def __init__(self, dim: int, kind: str, eps: float, bias: bool, ops):
        super().__init__()
        self.kind, self.eps, self.ops = kind, eps, ops
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias and kind == "layernorm" else None

    def forward(self, x: torch.Tensor, pending: torch.Tensor | None = None, dropout_p: float = 0.0):
        ops = self.ops
        if self.kind == "layernorm":
            if pending is None:
                return x, ops.layer_norm(x, self.weight, self.bias, self.eps)
            return ops.add_layer_norm(pending, x, self.weight, self.bias, self.eps, dropout_p)
        if pending is None:
            return x, ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(pending, x, self.weight, self.eps, dropout_p)


class KVCache:
    """Keys and values of the positions seen so far, for one attention layer during generation."""

    def __init__(self, max_len: int):
        self.max_len, self.length = max_len, 0
        self.k = self.v = None

    def append(self, k: torch.Tensor, v: torch.Tensor):
        if self.k is None:  # allocated at the first call: in the dtype the layer computes in (autocast or not)
            B, H, _, D = k.shape
            self.k = k.new_empty(B, H, self.max_len, D)
            self.v = v.new_empty(B, H, self.max_len, D)
        end = self.length + k.shape[2]
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Multi-head (or grouped-query) attention with one fused qkv projection.

    The qkv output ``[B, T, (H + 2 * Hkv) * D]`` is viewed as ``[B, H + 2 * Hkv, T, D]`` and split into
    q, k, v without copies (``triformer.split_qkv``): the rotary and attention kernels read the strided views
    directly. Without rotary embeddings or a KV cache, ``attention_packed`` takes the projection's output itself,
    so the backward writes its gradient in one tensor instead of autograd concatenating dq, dk and dv.
    """

    def __init__(self, cfg: TransformerConfig, ops, causal: bool):
        super().__init__()
        self.ops, self.causal, self.dropout = ops, causal, cfg.dropout
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor, rope=None, cache: KVCache | None = None) -> torch.Tensor:
        """``rope``: None or (cos, sin, position of x's first token) for ``ops.apply_rope``."""
        B, T, C = x.shape
        dropout_p = self.dropout if self.training else 0.0
        if rope is None and cache is None:  # attention on the projection itself: its gradient comes back as one tensor
            y = self.ops.attention_packed(self.qkv(x), self.n_head, self.n_kv_head, is_causal=self.causal,
                                          dropout_p=dropout_p)
            return self.proj(y.transpose(1, 2).reshape(B, T, C))
        q, k, v = self.ops.split_qkv(self.qkv(x), self.n_head, self.n_kv_head)
        if rope is not None:
            q, k = self.ops.apply_rope(q, k, *rope)
        if cache is not None:
            k, v = cache.append(k, v)
        # grouped-query attention: ops.attention reads key/value head h // (n_head / n_kv_head) for query head h
        y = self.ops.attention(q, k, v, is_causal=self.causal, dropout_p=dropout_p)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """``fc`` -> GELU or SwiGLU -> ``proj``. For SwiGLU, ``fc`` holds the gate and up projections stacked."""

    def __init__(self, cfg: TransformerConfig, ops):
        super().__init__()
        self.ops, self.activation = ops, cfg.activation
        width = 2 * cfg.mlp_hidden if cfg.activation == "swiglu" else cfg.mlp_hidden
        self.fc = nn.Linear(cfg.n_embd, width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            # fc's output is packed (gate half, up half); SwiGLU and proj run as one op that keeps only that for
            # backward (triformer.glu_linear: their product, a third of the MLP's activations, is recomputed)
            return self.ops.glu_linear(self.fc(x), None, self.proj.weight, self.proj.bias)
        # fc's bias add rides along in the GELU kernel rather than in the matmul's epilogue, and GELU and proj run
        # as one op that keeps only GELU's input for backward (triformer.gelu_linear: one activation of the
        # hidden width per block less at the step's peak, recomputed in the GELU backward kernel)
        approximate = "tanh" if self.activation == "gelu_tanh" else "none"
        return self.ops.gelu_linear(F.linear(x, self.fc.weight), self.proj.weight, self.proj.bias,
                                    approximate=approximate, gelu_bias=self.fc.bias)


class Block(nn.Module):
    """Pre-norm transformer block on the ``(x, pending)`` residual stream (see the module docstring)."""

    def __init__(self, cfg: TransformerConfig, ops, causal: bool):
        super().__init__()
        self.ops, self.dropout = ops, cfg.dropout
        self.ln_1 = Norm(cfg.n_embd, cfg.norm, cfg.norm_eps, cfg.bias, ops)
        self.attn = Attention(cfg, ops, causal)
        self.ln_2 = Norm(cfg.n_embd, cfg.norm, cfg.norm_eps, cfg.bias, ops)
        self.mlp = MLP(cfg, ops)
        # activation checkpointing (set_activation_checkpointing): keep only the block's inputs for backward and
        # run its forward again there; the RNG state is restored for the rerun, so dropout draws the same masks
        self.checkpointed = False

    def forward(self, x, pending=None, rope=None, cache: KVCache | None = None):
        if self.checkpointed and cache is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, pending, rope, use_reentrant=False)
        return self._forward(x, pending, rope, cache)

    def _forward(self, x, pending=None, rope=None, cache: KVCache | None = None):
        # Each branch's dropout runs inside the add-norm that consumes it: the attention branch's in ln_2, the MLP
        # branch's (returned undropped) in whatever takes this block's pending next (see the module docstring).
        # Seeds are drawn in the same order as with separate dropouts: attention's, its branch's, the MLP branch's
        # (at the next consumer, before anything else there draws one).
        p = self.dropout if self.training else 0.0
        x, h = self.ln_1(x, pending, p)
        x, h = self.ln_2(x, self.attn(h, rope, cache), p)
        return x, self.mlp(h)


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> int:
    """Turn per-block activation checkpointing on or off in ``model``; returns how many blocks it set. Each
    block then saves only its inputs and recomputes its forward in backward (about one more forward of the
    blocks, for activation memory that no longer grows with the blocks' internals)."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"activation checkpointing needs a model built from models.layers.Block; "
                         f"{type(model).__name__} has none")
    for block in blocks:
        block.checkpointed = bool(enabled)
    return len(blocks)


def init_weights(module: nn.Module, n_layer: int) -> None:
    """GPT-2's init: N(0, 0.02) weights, zero biases, and the projections that feed the residual stream
    scaled by 1/sqrt(2 * n_layer) so its variance does not grow with depth."""
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std)

