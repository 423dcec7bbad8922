"""Every config in configs/ composes; model configs match the registry; bad names and keys fail at start;
train.py runs and sweeps from the command line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import models
from training.config import CONFIG_DIR, compose
from training.trainer import Trainer

GROUPS = ("model", "data", "optim", "trainer", "logger", "loss", "experiment")
ROOT = Path(__file__).resolve().parent.parent


def _options(group):
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_config_composes(group, option):
    cfg = compose([f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True)  # no broken interpolations (??? = must be given, e.g. a data root)
    assert cfg.model.name in models.list_models()
    assert cfg.model.kernels in ("triton", "torch")
    if group == "model":  # a file is a registry model, or a resized variant of one (<name>-<variant>)
        assert option == cfg.model.name or option.startswith(cfg.model.name + "-")
        with torch.device("meta"):  # every exposed field is a real config field of that model (no memory used)
            fields = set(type(models.create_model(cfg.model.name, kernels="torch").config).__dataclass_fields__)
        assert set(cfg.model) - {"name"} <= fields
    if group == "experiment":
        assert cfg.name == option  # runs land in runs/<experiment>/


def test_model_configs_match_the_registry():
    assert set(models.list_models()) <= set(_options("model"))


def test_defaults_are_the_cpu_gpt_run():
    cfg = compose()
    assert (cfg.model.name, cfg.data.name, cfg.model.kernels) == ("gpt2-nano", "stdlib", "triton")
    assert cfg.name == "gpt2-nano-stdlib" and cfg.logger.name == "none"  # runs/<model>-<data>/; wandb is opt-in
    assert cfg.trainer.device == "auto" and cfg.memory_report
    same = compose(["experiment=gpt-stdlib-cpu"])
    assert OmegaConf.to_container(same.model) == OmegaConf.to_container(cfg.model)
    assert OmegaConf.to_container(same.data) == OmegaConf.to_container(cfg.data)


def test_runs_are_named_after_experiment_or_model_and_data():
    assert compose(["model=gpt2-small", "data=tinyshakespeare"]).name == "gpt2-small-tinyshakespeare"
    assert compose(["experiment=vit-digits"]).name == "vit-digits"
    assert compose(["experiment=vit-digits", "name=mine"]).name == "mine"


def test_unknown_model_option_lists_choices():
    with pytest.raises(ConfigCompositionException, match=r"(?s)Could not find 'model/gpt9'.*gpt2-nano.*vit-digits"):
        compose(["model=gpt9"])


def test_unknown_model_name_lists_choices(tmp_path):
    cfg = compose(["experiment=smoke", "model.name=gpt9", f"run_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"model.name='gpt9' is not one of: gpt2-nano, .*vit-digits"):
        Trainer(cfg)


@pytest.mark.parametrize("override", ["trainer.max_step=3", "model.n_layers=2", "optim.learning_rate=1e-3", "sed=1"])
def test_misspelled_key_fails(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigCompositionException, match=f"Could not override '{key}'"):
        compose([override])


def test_train_py_sweep(tmp_path):
    """``python train.py -m``: a 2x2 sweep over dropout and CE chunks, each job a tiny run in its own dir."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py", "-m", "experiment=smoke", "model.kernels=torch", "model.dropout=0.0,0.1",
           "loss.ce_chunks=1,4", "trainer.max_steps=2", "trainer.eval_interval=0", f"data.cache_dir={tmp_path}/cache",
           "data.num_proc=1", f"runs_root={tmp_path}", "hydra.sweep.subdir=${hydra.job.num}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = next((tmp_path / "smoke").glob("multirun-*"))
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        config = json.loads((job / "config.json").read_text())
        seen.add((config["model"]["dropout"], config["loss"]["ce_chunks"]))
        assert json.loads((job / "summary.json").read_text())["steps"] == 2
        assert (job / "checkpoints" / "step_00000002.safetensors").exists()
    assert seen == {(0.0, 1), (0.0, 4), (0.1, 1), (0.1, 4)}
