"""Vision Transformer (ViT) built from triformer layers, laid out like timm's ``VisionTransformer``.

Patch embedding (a stride-p convolution, computed as a matmul over flattened patches), a class token, a
learned position embedding, pre-norm blocks with non-causal attention, a final norm and a linear head.
``pool="cls"`` classifies from the class token; ``pool="mean"`` from the mean of the patch tokens, normed
after pooling (timm's ``global_pool="avg"``).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import Block, Norm, TransformerConfig, at_least_fp32, dropout, init_weights, to_stream_dtype
from models.ops import get_ops

POOLS = ("cls", "mean")


@dataclasses.dataclass
class ViTConfig(TransformerConfig):
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000
    pool: str = "cls"
    activation: str = "gelu"
    norm_eps: float = 1e-6
    label_smoothing: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        for name in ("image_size", "patch_size", "in_channels", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.n_kv_head != self.n_head:
            raise ValueError("ViT uses plain multi-head attention: n_kv_head must equal n_head")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class ViT(nn.Module):
    task = "image"  # models.contract.TrainableModel: task, config, num_params, flops_per_example, forward

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.ops = ops = get_ops(config.kernels)
        C, p = config.n_embd, config.patch_size
        self.patch_embed = nn.Linear(config.in_channels * p * p, C)
        self.cls_token = nn.Parameter(torch.empty(1, 1, C))
        self.pos_embed = nn.Parameter(torch.empty(1, config.num_patches + 1, C))
        self.blocks = nn.ModuleList(Block(config, ops, causal=False) for _ in range(config.n_layer))
        self.norm = Norm(C, config.norm, config.norm_eps, config.bias, ops)
        self.head = nn.Linear(C, config.num_classes)
        init_weights(self, config.n_layer)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; ``non_embedding`` leaves out the position embedding and the class token."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.pos_embed.numel() + self.cls_token.numel()
        return n

    def flops_per_example(self, seq_len: int | None = None) -> float:
        """Forward + backward FLOPs of one image: 6 per parameter per token (the head once per image), plus
        attention's 12 * n_layer * n_embd * T per token. ``seq_len`` is ignored (fixed by the image size)."""
        cfg = self.config
        T = cfg.num_patches + 1
        head = self.head.weight.numel() + self.head.bias.numel()
        return float(6 * (self.num_params() - head) * T + 6 * head + 12 * cfg.n_layer * cfg.n_embd * T * T)

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None):
        """``(logits [B, num_classes], loss)``; the loss (mean cross entropy, -100 = ignored) needs ``targets``: class
        indices, or class probabilities ``[B, num_classes]`` (MixUp/CutMix soft targets)."""
        cfg = self.config
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(f"images must be a float tensor, got {getattr(images, 'dtype', type(images).__name__)}")
        param_dtype = self.patch_embed.weight.dtype
        if images.dtype != param_dtype and not torch.is_autocast_enabled(images.device.type):
            raise TypeError(f"images must be a float tensor of the model's dtype {param_dtype} (or run under "
                            f"torch.autocast), got {images.dtype}")
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be [B, {', '.join(map(str, expected))}], got {tuple(images.shape)}")
        if targets is not None and not isinstance(targets, torch.Tensor):
            raise TypeError(f"targets must be an int64/int32 tensor, got {type(targets).__name__}")
        soft = targets is not None and targets.is_floating_point()
        if targets is not None and not (
                (targets.dtype in (torch.int64, torch.int32) and targets.shape == images.shape[:1])
                or (soft and targets.shape == (images.shape[0], cfg.num_classes))):
            raise ValueError(f"targets must be int64/int32 class indices of shape [{images.shape[0]}] or float class "
                             f"probabilities of shape [{images.shape[0]}, {cfg.num_classes}] (MixUp/CutMix), got "
                             f"{targets.dtype} {tuple(targets.shape)}")
        B, p, n = images.shape[0], cfg.patch_size, cfg.image_size // cfg.patch_size
        # [B, C, n*p, n*p] -> [B, n*n, C*p*p], each patch flattened in the conv weight's (C, p, p) order
        patches = images.reshape(B, cfg.in_channels, n, p, n, p).permute(0, 2, 4, 1, 3, 5).reshape(B, n * n, -1)
        x = self.patch_embed(patches)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1) + self.pos_embed
        x = dropout(self.ops, to_stream_dtype(x), cfg.dropout, self.training)
        pending = None
        for block in self.blocks:
            x, pending = block(x, pending)
        # the last block's pending is its MLP output, not yet dropped (models.layers): the final norm drops it, fused
        # (only the class token's row: its mask is drawn over [B, C], not over the whole pending), or before pooling
        p = cfg.dropout if self.training else 0.0
        if cfg.pool == "cls":  # only the class token's row needs the final norm
            h = self.norm(x[:, 0], pending[:, 0], p)[1]
        else:
            h = self.norm((x + dropout(self.ops, pending, cfg.dropout, self.training))[:, 1:].mean(dim=1))[1]
        logits = self.head(h)
        if targets is None:
            return logits, None
        if soft:  # a [B, classes] loss is too small for a kernel of its own: PyTorch's takes probabilities
            return logits, F.cross_entropy(logits.float(), targets.float(), label_smoothing=cfg.label_smoothing)
        return logits, at_least_fp32(self.ops.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing))

    # ----------------------------------------------------------------------------------------------------
    # timm and Hugging Face interchange lives in models/interchange.py; these are its entry points on the class
    # (each imports it on call: interchange imports this module)

    @classmethod
    def from_timm(cls, model, kernels: str = "triton", **overrides) -> "ViT":
        """``models.interchange.vit_from_timm``: a ViT with the weights of a timm ``VisionTransformer``."""
        from models import interchange
        return interchange.vit_from_timm(model, kernels=kernels, **overrides)

    @classmethod
    def from_huggingface(cls, model, kernels: str = "triton", **overrides) -> "ViT":
        """``models.interchange.vit_from_huggingface``: a ViT with the weights of a ``transformers``
        ViTForImageClassification."""
        from models import interchange
        return interchange.vit_from_huggingface(model, kernels=kernels, **overrides)
