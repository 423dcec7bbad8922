"""Tiny GPT configs and token batches, shared by the GPT model tests and the torch.compile tests."""
import torch

from models import GPTConfig
from models.gpt import LLAMA_STYLE
from triformer.testing import kernel_device

V = 97  # odd vocab, padded to 128: the padded rows must stay out of everything


def tiny(style="gpt2", **kw) -> GPTConfig:
    """A two-layer GPT-2 ("gpt2") or llama-style ("llama": RoPE, SwiGLU, RMSNorm, GQA) config; kw overrides."""
    fields = dict(n_layer=2, n_head=3, n_embd=48, block_size=32, vocab_size=V)
    if style == "llama":
        fields.update(LLAMA_STYLE, n_head=4, n_kv_head=2)
    return GPTConfig(**{**fields, **kw})


def batch(B, T, seed=0, ignore=True):
    """(idx, targets) of shape [B, T] on the kernel device; ``ignore``: the first 3 targets of row 0 are -100."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    if ignore:
        targets[0, :3] = -100
    return idx.to(kernel_device()), targets.to(kernel_device())
