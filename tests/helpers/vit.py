"""Tiny ViT configs and image batches, shared by the ViT model tests and the torch.compile tests."""
import torch

from models import ViTConfig
from triformer.testing import kernel_device


def tiny(**kw) -> ViTConfig:
    """A two-layer ViT; kw overrides."""
    # 10x10 images in 2x2 patches: 25 patches + class token = 26 tokens
    return ViTConfig(**{**dict(n_layer=2, n_head=3, n_embd=48, image_size=10, patch_size=2, in_channels=3,
                               num_classes=7), **kw})


def images(config: ViTConfig, B: int, seed: int = 0, scale: float = 1.0):
    """(images [B, C, H, W], labels [B]) on the kernel device."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, config.in_channels, config.image_size, config.image_size, generator=g) * scale
    return x.to(kernel_device()), torch.randint(0, config.num_classes, (B,), generator=g).to(kernel_device())
