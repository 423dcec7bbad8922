"""Plain PyTorch GPT-2, llama-style and ViT models: the peers triformer is measured against.

They are written the way a user would write them without triformer (nanoGPT / timm style): ``nn.LayerNorm``
(or ``nn.RMSNorm``), ``F.scaled_dot_product_attention`` (flash / memory-efficient attention where the device
has it), ``nn.GELU`` (or SwiGLU from ``F.silu``), ``F.cross_entropy`` on the logits, ``nn.Dropout``. They
take ``(x, targets)`` and return ``(logits, loss)`` like ``models.GPT`` / ``models.ViT``, so the training
framework's memory report (``training.memory``) and ``benchmarks/train_step.py`` run them the same way.

``plain_model_like(model)`` builds the plain model of the same size as a triformer model (same layers, widths,
heads, vocabulary / classes, sequence length, dropout); its weights are its own (a fresh initialization):
these models share no state dict with triformer's.

Tensor layouts: token ids ``[B, T]`` (int64), images ``[B, C, H, W]``; attention runs on ``[B, H, T, D]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PlainBlock", "PlainGPT", "PlainViT", "has_plain_twin", "plain_model_like"]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """llama's half-split rotary embedding of ``x`` [B, H, T, D] (cos/sin [T, D/2])."""
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).to(x.dtype)


class PlainBlock(nn.Module):
    """A pre-norm transformer block written the usual PyTorch way.

    ``norm``: ``"layernorm"`` (nn.LayerNorm) or ``"rmsnorm"`` (nn.RMSNorm); ``activation``: ``"gelu_tanh"`` /
    ``"gelu"`` (nn.GELU) or ``"swiglu"``; ``kv_heads < heads`` is grouped-query attention."""

    def __init__(self, dim: int, heads: int, causal: bool, mlp_ratio: int = 4, *, mlp_hidden: int | None = None,
                 kv_heads: int | None = None, norm: str = "layernorm", activation: str = "gelu_tanh",
                 bias: bool = True, eps: float = 1e-5, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads, self.kv_heads, self.causal, self.dropout = heads, kv_heads or heads, causal, dropout
        self.head_dim = dim // heads
        if norm == "layernorm":
            self.ln1, self.ln2 = nn.LayerNorm(dim, eps=eps, bias=bias), nn.LayerNorm(dim, eps=eps, bias=bias)
        elif norm == "rmsnorm":
            self.ln1, self.ln2 = nn.RMSNorm(dim, eps=eps), nn.RMSNorm(dim, eps=eps)
        else:
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {norm!r}")
        hidden = mlp_hidden or mlp_ratio * dim
        self.qkv = nn.Linear(dim, (heads + 2 * self.kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.swiglu = activation == "swiglu"
        if activation not in ("gelu_tanh", "gelu", "swiglu"):
            raise ValueError(f"activation must be 'gelu_tanh', 'gelu' or 'swiglu', got {activation!r}")
        self.fc = nn.Linear(dim, 2 * hidden if self.swiglu else hidden, bias=bias)
        self.act = None if self.swiglu else nn.GELU(approximate="tanh" if activation == "gelu_tanh" else "none")
        self.out = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.shape
        H, K, D = self.heads, self.kv_heads, self.head_dim
        q, k, v = self.qkv(self.ln1(x)).split([H * D, K * D, K * D], dim=-1)
        q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        if rope is not None:
            q, k = _rope(q, *rope), _rope(k, *rope)
        if K != H:
            k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))
        h = self.fc(self.ln2(x))
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = self.act(h)
        return x + self.drop(self.out(h))


class PlainGPT(nn.Module):
    """GPT-2 (nanoGPT's layout: learned positions, tied LM head, ``F.cross_entropy`` on fp32 logits); with
    ``norm="rmsnorm", activation="swiglu", rope=True, bias=False`` the llama-style decoder."""

    def __init__(self, vocab: int = 50304, block: int = 1024, layers: int = 12, heads: int = 12, dim: int = 768, *,
                 kv_heads: int | None = None, mlp_hidden: int | None = None, norm: str = "layernorm",
                 activation: str = "gelu_tanh", bias: bool = True, eps: float = 1e-5, rope: bool = False,
                 rope_base: float = 10000.0, dropout: float = 0.0, label_smoothing: float = 0.0):
        super().__init__()
        self.block, self.label_smoothing = block, label_smoothing
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = None if rope else nn.Embedding(block, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            PlainBlock(dim, heads, causal=True, mlp_hidden=mlp_hidden, kv_heads=kv_heads, norm=norm,
                       activation=activation, bias=bias, eps=eps, dropout=dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim, eps=eps, bias=bias) if norm == "layernorm" else nn.RMSNorm(dim, eps=eps)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight
        if rope:
            d = dim // heads
            inv = 1.0 / rope_base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
            angles = torch.outer(torch.arange(block, dtype=torch.float32), inv)
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        for p in self.wte.parameters():  # GPT-2's init: N(0, 1) embeddings would make the tied logits huge
            nn.init.normal_(p, std=0.02)
        if self.wpe is not None:
            nn.init.normal_(self.wpe.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        T = idx.shape[1]
        if T > self.block:
            raise ValueError(f"sequence length {T} exceeds block={self.block}")
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        else:
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        x = self.drop(x)
        for b in self.blocks:
            x = b(x, rope)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                       ignore_index=-100, label_smoothing=self.label_smoothing)


class PlainViT(nn.Module):
    """ViT (timm's layout: a Conv2d patch embedding, class token, learned positions, pre-norm blocks)."""

    def __init__(self, image: int = 224, patch: int = 16, layers: int = 12, heads: int = 12, dim: int = 768,
                 classes: int = 1000, *, in_channels: int = 3, mlp_hidden: int | None = None, eps: float = 1e-6,
                 bias: bool = True, pool: str = "cls", activation: str = "gelu", dropout: float = 0.0,
                 label_smoothing: float = 0.0):
        super().__init__()
        if image % patch:
            raise ValueError(f"image ({image}) must be divisible by patch ({patch})")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.pool, self.label_smoothing = pool, label_smoothing
        self.patch = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(PlainBlock(dim, heads, causal=False, mlp_hidden=mlp_hidden, activation=activation,
                                               bias=bias, eps=eps, dropout=dropout) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim, eps=eps, bias=bias), nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = self.drop(torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos)
        for b in self.blocks:
            x = b(x)
        h = self.norm(x)
        logits = self.head(h[:, 0] if self.pool == "cls" else h[:, 1:].mean(dim=1))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float(), targets, ignore_index=-100,
                                       label_smoothing=self.label_smoothing)


def has_plain_twin(model: nn.Module) -> bool:
    """Whether ``plain_model_like`` builds ``model``'s plain PyTorch twin (a ``models.GPT`` or ``models.ViT``): the
    trainer's memory report skips, and says so for, a model without one."""
    from models.gpt import GPT
    from models.vit import ViT

    return isinstance(model, (GPT, ViT))


def plain_model_like(model: nn.Module) -> nn.Module:
    """The plain PyTorch model of ``model``'s size and layout (a ``models.GPT`` or ``models.ViT``), freshly
    initialized, on ``model``'s device and dtype."""
    from models.gpt import GPT

    if not has_plain_twin(model):
        raise TypeError(f"plain_model_like takes a models.GPT or models.ViT, got {type(model).__name__}")
    c = model.config
    common = dict(mlp_hidden=c.mlp_hidden, eps=c.norm_eps, bias=c.bias, dropout=c.dropout,
                  label_smoothing=c.label_smoothing)
    if isinstance(model, GPT):
        plain = PlainGPT(c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd, kv_heads=c.n_kv_head,
                         norm=c.norm, activation=c.activation, rope=c.position == "rope", rope_base=c.rope_base,
                         **common)
    else:
        if c.norm != "layernorm" or c.activation not in ("gelu", "gelu_tanh"):
            raise ValueError(f"PlainViT has LayerNorm and GELU; this ViT has norm={c.norm!r}, "
                             f"activation={c.activation!r}")
        plain = PlainViT(c.image_size, c.patch_size, c.n_layer, c.n_head, c.n_embd, c.num_classes,
                         in_channels=c.in_channels, pool=c.pool, activation=c.activation, **common)
    param = next(model.parameters())
    return plain.to(device=param.device, dtype=param.dtype)
