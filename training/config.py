"""Compose the training config without the command line (tests, notebooks): ``compose(["experiment=smoke"])``
gives the same ``DictConfig`` as ``python train.py experiment=smoke`` (struct mode: unknown keys raise).

Importing this module registers the OmegaConf resolvers configs/train.yaml uses (train.py imports it before Hydra
composes): ``${default_if_null:a,b}`` (a unless it is null: ``run_dir`` or Hydra's timestamped directory, so
Hydra's ``train.log`` lands where the run writes everything else) and ``${path_safe:s}`` (``s`` with every
character but letters, digits and ``. _ + -`` replaced, ``=`` by ``-`` and ``,`` by ``_``: sweep folder names)."""
from __future__ import annotations

from pathlib import Path

import re

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def path_safe(text: str) -> str:
    text = str(text).replace("=", "-").replace(",", "_")
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def default_if_null(value, default):
    return default if value is None or value == "" else value


for _name, _resolver in (("path_safe", path_safe), ("default_if_null", default_if_null)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="train"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
