"""What the text and image data share: config parsing, counter-based randomness and the DDP batch split.

Randomness is counter-based: the ``k``-th training batch is drawn from a generator seeded by
``(seed, stream, k)``. The whole sampler state is therefore a few integers (``state_dict`` is plain JSON),
resuming is exact, and every rank, given the same seed, computes the same global draw.

DDP: ``next_batch(batch_size)`` takes the per-rank batch. Every rank draws the *global* batch of
``batch_size * world_size`` samples (identical on all ranks) and keeps rows
``[rank * batch_size, (rank + 1) * batch_size)``. Concatenating the ranks' batches in rank order gives
exactly what one process calling ``next_batch(batch_size * world_size)`` gets, so a 2-process run sees
the same data as a 1-process run with twice the per-call batch.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch


def to_plain(cfg: Any) -> dict:
    """A Hydra/OmegaConf node or mapping as a plain dict with interpolations resolved."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # "???" fields: name them
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"cfg_data must be a mapping or DictConfig, got {type(cfg).__name__}")


def parse_config(cls, cfg: dict):
    """Build dataclass ``cls`` from ``cfg``: unknown keys (typos would otherwise be ignored) and values of the
    wrong type are refused, naming the ``data.`` key (``training.settings.build``)."""
    from training.settings import build

    return build("data", cls, cfg)


def check_rank(rank: int, world_size: int) -> None:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_fraction(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def stream_generator(seed: int, stream: str, index: int) -> torch.Generator:
    """A generator for draw ``index`` of ``stream``, independent of every other (seed, stream, index)."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


class Sampler:
    """Per-rank slicing of global batches plus the batch counter that drives the randomness."""

    def __init__(self, seed: int, rank: int, world_size: int):
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        check_rank(rank, world_size)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batches = 0

    def global_size(self, batch_size: int) -> int:
        check_positive_int("batch_size", batch_size)
        return batch_size * self.world_size

    def mine(self, batch_size: int) -> slice:
        return slice(self.rank * batch_size, (self.rank + 1) * batch_size)

    def generator(self, stream: str) -> torch.Generator:
        return stream_generator(self.seed, stream, self.batches)
