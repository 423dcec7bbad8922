"""Sampling is discoverable and its printed command works: the finished run's sample command survives a POSIX
shell and Hydra's override parser with any prompt, runs as printed, and ``eval.py --help`` explains
``checkpoint=`` and ``prompt=``."""
import dataclasses
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from training import run
from training.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["def main(", "a, b = (1, 2)", 'say "hi" \\ it\'s', "ends \\", '\\"', "key=value", ""]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_sample_command_gives_hydra_the_prompt_unchanged(prompt):
    words = shlex.split(run.sample_command("runs/x/checkpoints/best.safetensors", prompt))
    assert words[:3] == ["python", "eval.py", "checkpoint=runs/x/checkpoints/best.safetensors"]
    (override,) = [w for w in words if w.startswith("prompt=")]
    assert OverridesParser.create().parse_override(override).value() == prompt


def test_printed_sample_command_runs_in_bash(tmp_path):
    import models
    from training.checkpoint import save_checkpoint

    model = models.create_model("gpt2-nano", kernels="torch", vocab_size=257, block_size=32, n_layer=1)
    data_cfg = dict(task="lm", source="stdlib", max_files=2, seq_len=32, cache_dir=str(tmp_path / "cache"))
    ckpt = save_checkpoint(tmp_path / "best.safetensors", {
        "model": model.state_dict(), "model_name": "gpt2-nano", "model_config": dataclasses.asdict(model.config),
        "config": {"data": data_cfg, "seed": 1}, "step": 3})
    prompt = TASKS["lm"].sample_prompt
    out = tmp_path / "out"
    command = f"{run.sample_command(ckpt, prompt)} max_new_tokens=4 device=cpu hydra.run.dir={shlex.quote(str(out))}"
    proc = subprocess.run(["bash", "-c", command.replace("python ", shlex.quote(sys.executable) + " ", 1)],
                          cwd=REPO, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "samples.txt").read_text().startswith(prompt)


def test_eval_help_explains_checkpoint_and_prompt():
    proc = subprocess.run([sys.executable, "eval.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checkpoint=PATH" in proc.stdout and "'prompt=\"def main(\"'" in proc.stdout
    assert "num_samples: 1" in proc.stdout  # the settings follow
