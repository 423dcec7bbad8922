"""Compose the training config without the command line (tests, notebooks): ``compose(["experiment=smoke"])``
gives the same ``DictConfig`` as ``python train.py experiment=smoke`` (struct mode: unknown keys raise)."""
from __future__ import annotations

from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="train"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
