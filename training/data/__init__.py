"""Datasets for the trainer: ``build_data(cfg.data, seed, rank, world_size)`` returns a ``TextData`` (task
"lm") or an ``ImageData`` (task "image"); ``cfg.data`` is one of ``configs/data/*.yaml``.

Both expose ``task``, ``next_batch(batch_size)`` (this rank's share of a global batch, see
``training.data.common``), ``eval_batches(split, batch_size, max_batches)`` (deterministic, identical on every
rank), ``state_dict()`` / ``load_state_dict()`` (plain JSON: batch counter and epoch position), plus
``vocab_size`` and ``tokenizer`` (lm) or ``num_classes``, ``image_shape`` and ``class_names`` (image).
"""
from __future__ import annotations

from typing import Any

from training.data.cache import CacheError
from training.data.common import to_plain
from training.data.text import TextData, build_text_data
from training.data.tokenizers import Tokenizer, load_tokenizer
from training.data.vision import ImageData, build_image_data

__all__ = ["build_data", "TextData", "ImageData", "Tokenizer", "load_tokenizer", "CacheError"]


def build_data(cfg_data: Any, seed: int, rank: int = 0, world_size: int = 1) -> TextData | ImageData:
    cfg = to_plain(cfg_data)
    task = cfg.get("task")
    if task == "lm":
        return build_text_data(cfg, seed, rank, world_size)
    if task == "image":
        return build_image_data(cfg, seed, rank, world_size)
    raise ValueError(f"data.task must be 'lm' or 'image', got {task!r}")
