"""Datasets for the trainer: ``build_data(cfg.data, seed, rank, world_size)`` returns a ``TextData`` (task
"lm") or an ``ImageData`` (task "image"; a ``StreamImageData`` with the same interface for ``stream: true``,
which reads an image folder from disk in ``DataLoader`` workers); ``cfg.data`` is one of ``configs/data/*.yaml``, and its ``task`` picks
the builder (training/tasks.py).

All expose ``task``, ``next_batch(batch_size)`` (this rank's share of a global batch, see
``training.data.common``), ``eval_batches(split, batch_size, max_batches)`` (deterministic, identical on every
rank), ``state_dict()`` / ``load_state_dict()`` (plain JSON: batch counter and epoch position), plus
``vocab_size`` and ``tokenizer`` (lm) or ``num_classes``, ``image_shape`` and ``class_names`` (image).
"""
from __future__ import annotations

from typing import Any

from training.data.cache import CacheError
from training.data.common import to_plain
from training.data.text import TextData
from training.data.tokenizers import Tokenizer, load_tokenizer
from training.data.vision import ImageData
from training.tasks import get_task

__all__ = ["build_data", "TextData", "ImageData", "Tokenizer", "load_tokenizer", "CacheError"]


def build_data(cfg_data: Any, seed: int, rank: int = 0, world_size: int = 1) -> TextData | ImageData:
    """The data of ``cfg_data``, built by the builder its ``task`` names in training/tasks.py."""
    cfg = to_plain(cfg_data)
    return get_task(cfg.get("task")).make_data(cfg, seed, rank, world_size)
