"""Run records: metrics as JSONL (streamed) and CSV, a summary JSON, PNG plots at the end, and (opt-in,
``logger=wandb``) wandb. The default logger (``logger=none``) keeps only the local records.

Plots: ``loss.png`` (train and validation loss), ``accuracy.png`` (image models: validation accuracy), ``lr.png``,
``throughput.png``, ``memory.png`` (the process's memory per logged step: CUDA peak allocated on a GPU, resident set
on the CPU) and ``activation_memory.png`` (the start-of-run comparison with the plain PyTorch model).

Only the main rank writes. wandb runs ``online`` only when the user is logged in (WANDB_API_KEY or a netrc
entry for the wandb host), otherwise ``offline`` (synced later with ``wandb sync``), so a run never waits
on the network; if wandb cannot start at all the run continues with the local records.
"""
from __future__ import annotations

import csv
import io
import json
import math
import netrc
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from training.checkpoint import atomic_write

LEADING_COLUMNS = ("kind", "step", "time")

def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_scalars(kind: str, metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of one record under wandb names: each in its section, ``train/loss``, ``train/lr``, ``val/loss``
    (evaluation metrics already carry their split), so wandb groups them into panels per section."""
    return {(k if "/" in k else f"{kind}/{k}"): v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RunLogger:
    """``log(kind, step, metrics)`` during the run, ``summary(...)`` for one-off results, ``close()`` at the end."""

    def __init__(self, run_dir: str | os.PathLike, cfg_logger, config: dict[str, Any], enabled: bool = True,
                 throughput_unit: str = "tokens", history: str | os.PathLike | None = None,
                 until_step: int | None = None):
        """``history``: the directory of the run this one resumes (``run_dir`` itself when it continues there):
        its records up to ``until_step`` (the checkpoint's step) start this run's, so the records read as one
        run; those past the checkpoint, which the resumed run trains again, are dropped."""
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.throughput_unit = throughput_unit
        self.records: list[dict[str, Any]] = []
        self.summary_data: dict[str, Any] = {}
        self.wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if history is not None:
            self.records = _read_records(Path(history) / "metrics.jsonl", until_step)
            summary = Path(history) / "summary.json"
            self.summary_data = json.loads(summary.read_text()) if summary.is_file() else {}
        atomic_write(self.run_dir / "config.json", json.dumps(config, indent=2, default=str).encode())
        atomic_write(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.records).encode())
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg_logger.name == "wandb":  # logger.name and its fields are checked in training/settings.py
            self.wandb = _start_wandb(cfg_logger, config, self.run_dir)

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **metrics}
        self.records.append(record)
        self._jsonl.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(wandb_scalars(kind, metrics), step=step)

    def summary(self, **values: Any) -> None:
        if not self.enabled:
            return
        self.summary_data.update(values)
        atomic_write(self.run_dir / "summary.json", json.dumps(self.summary_data, indent=2, default=str).encode())
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in values.items() if isinstance(v, (int, float, str))})

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        self._write_csv()
        try:
            self._plot()
        except Exception as e:  # a plotting problem must not turn a finished run into a failed one
            warnings.warn(f"could not write plots: {e}")
        if self.wandb is not None:
            import wandb

            for png in sorted(self.run_dir.glob("*.png")):
                self.wandb.log({f"plots/{png.stem}": wandb.Image(str(png))})
            self.wandb.finish()
            self.wandb = None

    def _write_csv(self) -> None:
        # kind, step, time, then the metrics by name: the same order whichever record came first (a resumed run's
        # first record may be an evaluation, an uninterrupted run's a training step)
        metrics = sorted({k for r in self.records for k in r} - set(LEADING_COLUMNS))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=[*LEADING_COLUMNS, *metrics])
        writer.writeheader()
        writer.writerows(self.records)
        atomic_write(self.run_dir / "metrics.csv", text.getvalue().encode())

    def _series(self, kind: str, key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in self.records
               if r["kind"] == kind and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        memory_label = ("peak CUDA memory allocated per step (GiB)" if self._on_cuda()
                        else "process resident memory, CPU (GiB)")
        # name -> (series, y label, title)
        panels = {
            "loss": ([("train", "loss", "train"), ("eval", "val/loss", "val")], "loss (cross entropy)", "loss"),
            "accuracy": ([("eval", "val/accuracy", "val"), ("eval", "test/accuracy", "test")], "top-1 accuracy",
                         "accuracy"),
            "lr": ([("train", "lr", "learning rate")], "learning rate", "learning rate"),
            "throughput": ([("train", "throughput", f"{self.throughput_unit}/s")],
                           f"training throughput ({self.throughput_unit}/s)", "throughput"),
            "memory": ([("train", "memory_gib", "memory")], memory_label, "memory during training"),
        }
        for name, (series, ylabel, title) in panels.items():
            drawn = [(label, *self._series(kind, key)) for kind, key, label in series]
            drawn = [d for d in drawn if d[1]]
            if not drawn:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for label, xs, ys in drawn:
                ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            if name == "memory":  # a few MiB of drift must not look like a trend: start the axis at 0
                ax.set_ylim(bottom=0, top=max(max(d[2]) for d in drawn) * 1.15 or 1)
            if len(drawn) > 1:
                ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(self.run_dir / f"{name}.png", dpi=100)
            plt.close(fig)
        self._plot_memory_savings(plt)

    def _on_cuda(self) -> bool:
        device = str(self.summary_data.get("device") or "")
        if device:
            return device.startswith("cuda")
        return any(r.get("kind") == "train" and "mfu" in r for r in self.records)

    def _plot_memory_savings(self, plt) -> None:
        torch_b = self.summary_data.get("memory/activations_plain_bytes")
        triton_b = self.summary_data.get("memory/activations_triformer_bytes")
        if not torch_b or triton_b is None:
            return
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.bar(["plain PyTorch", "triformer"], [torch_b / 2**20, triton_b / 2**20], color=["tab:gray", "tab:blue"])
        ax.set_ylabel("activations saved for backward, one step (MiB)")
        change = 1 - triton_b / torch_b
        ax.set_title(f"vs plain PyTorch: {abs(change):.0%} {'less' if change >= 0 else 'more'}")
        fig.tight_layout()
        fig.savefig(self.run_dir / "activation_memory.png", dpi=100)
        plt.close(fig)


def _read_records(path: Path, until_step: int | None) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` up to step ``until_step``; a line torn by a kill is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if until_step is None or record.get("step", 0) <= until_step:
            records.append(record)
    return records


def _start_wandb(cfg_logger, config: dict[str, Any], run_dir: Path):
    mode = cfg_logger.mode
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
    try:
        import wandb

        run = wandb.init(project=cfg_logger.project, entity=cfg_logger.entity, group=cfg_logger.group,
                         tags=list(cfg_logger.tags), name=config.get("name"), config=config, dir=str(run_dir),
                         mode=mode, settings=wandb.Settings(init_timeout=cfg_logger.init_timeout, quiet=True))
    except Exception as e:
        print(f"wandb could not start ({type(e).__name__}: {e}); continuing with local metrics only", file=sys.stderr)
        return None
    return run
