"""AdamW with nanoGPT's weight-decay rule, and the warmup + cosine learning-rate schedule.

The schedule is a pure function of the step (no scheduler object with state), so a resumed run sets the
same learning rate as an uninterrupted one without having to restore anything.
"""
from __future__ import annotations

import math

import torch
from torch import nn

def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights, dim >= 2); never biases or norm gains (dim < 2).

    Shrinking a gain or bias toward zero changes the function without regularizing capacity, which is
    why only 2-D weights decay (nanoGPT's rule)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg, device: torch.device, sharded: bool = False) -> torch.optim.Optimizer:
    """AdamW from ``cfg`` (the optim config group). ``fused`` on CUDA with plain tensors; ``foreach``
    for FSDP's sharded DTensor parameters, where the multi-tensor path is the one every version supports.
    ``cfg``'s values were checked before the run started (``training.settings.OptimSettings``)."""
    kwargs = {}
    if device.type == "cuda":
        kwargs = {"foreach": True} if sharded else {"fused": True}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, **kwargs)


def lr_at(step: int, cfg, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup to ``lr`` over ``warmup_steps``,
    then ``schedule`` decays to ``min_lr_ratio * lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    min_lr = cfg.lr * cfg.min_lr_ratio
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - min_lr) * progress
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))
