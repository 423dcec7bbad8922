"""The end of a sweep (``python train.py -m key=a,b ...``): one table and one plot comparing its runs.

``SweepReport`` is a Hydra callback (configured under ``hydra.callbacks`` in configs/train.yaml); after the last
job, ``on_multirun_end`` reads each job's records in the sweep directory (``summary.json``, ``metrics.jsonl``,
``.hydra/overrides.yaml``) and writes, atomically, next to them:

* ``sweep_summary.md`` (also printed) and ``sweep_summary.csv``: one row per run, its swept values, final and best
  validation loss (and test metrics when the runs had them), median training throughput, peak memory during
  training, activation memory of one step against plain PyTorch, and training time;
* ``sweep_summary.png``: the final loss, throughput and peak memory of each run as bars.

``sweep_rows(sweep_dir)`` and ``write_report(sweep_dir)`` are the same work without Hydra (tests, notebooks, a
sweep that was interrupted: ``python -m training.sweep runs/<name>/multirun-<time>``).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from training.checkpoint import write_atomically

log = logging.getLogger("triformer.sweep")

REPORT = "sweep_summary"


def _read_overrides(job_dir: Path) -> dict[str, str]:
    """The job's own command-line overrides (``.hydra/overrides.yaml``), ``key -> value`` as typed."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    out = {}
    for item in OmegaConf.load(path) or []:
        key, _, value = str(item).partition("=")
        out[key] = value
    return out


def _records(job_dir: Path) -> list[dict[str, Any]]:
    path = job_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-line
            continue
    return rows


def _finite(values) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def job_row(job_dir: Path) -> dict[str, Any]:
    """One run's line of the table (``status`` says whether it finished)."""
    summary_path = job_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    records = _records(job_dir)
    train = [r for r in records if r.get("kind") == "train"]
    throughput = _finite(r.get("throughput") for r in train[1:] or train)  # the first step includes warm-up
    memory = _finite(r.get("memory_gib") for r in train)
    times = _finite(r.get("time") for r in records)
    head = job_dir.name.split("_", 1)[0]
    row: dict[str, Any] = {"run": int(head) if head.isdigit() else job_dir.name, **_read_overrides(job_dir)}
    row["status"] = "finished" if "final_val/loss" in summary or "steps" in summary else "incomplete"
    row["steps"] = summary.get("steps")
    row["final val/loss"] = summary.get("final_val/loss")
    row["best val/loss"] = summary.get("best_val_loss")
    for key, value in summary.items():
        if key.startswith("final_") and key != "final_val/loss" and isinstance(value, (int, float)):
            row[key[len("final_"):]] = value
    row["throughput/s"] = statistics.median(throughput) if throughput else None
    row["peak memory GiB"] = max(memory) if memory else None
    act = summary.get("memory/activations_triformer_bytes")
    plain = summary.get("memory/activations_plain_bytes")
    row["activations MiB"] = act / 2**20 if isinstance(act, (int, float)) else None
    row["vs plain PyTorch"] = act / plain if isinstance(act, (int, float)) and plain else None
    row["time s"] = times[-1] - times[0] if len(times) > 1 else None
    row["dir"] = job_dir.name
    return row


def sweep_rows(sweep_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """A row per job directory of ``sweep_dir`` (those Hydra made: they hold ``.hydra/``), in job order."""
    sweep_dir = Path(sweep_dir)
    jobs = [d for d in sweep_dir.iterdir() if d.is_dir() and (d / ".hydra").is_dir()]

    def order(d: Path):
        head = d.name.split("_", 1)[0]
        return (int(head), d.name) if head.isdigit() else (math.inf, d.name)

    return [job_row(d) for d in sorted(jobs, key=order)]


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r))
    return list(columns)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value).replace("|", "\\|")


def swept_keys(rows: list[dict[str, Any]], overrides: list[str]) -> list[str]:
    """The overrides whose value differs between runs (the others are the sweep's common settings)."""
    return [k for k in overrides if len({str(r.get(k)) for r in rows}) > 1]


def markdown_table(rows: list[dict[str, Any]], overrides: list[str]) -> str:
    """The runs as a markdown table: the swept values, then the results; the common overrides above it."""
    swept = swept_keys(rows, overrides)
    common = [f"{k}={rows[0].get(k)}" for k in overrides if k not in swept]
    columns = [c for c in _columns(rows) if c not in overrides and c != "dir"
               and any(r.get(c) is not None for r in rows)]  # e.g. no activation memory without memory_report
    columns = columns[:1] + swept + columns[1:]
    lines = [f"common settings: {' '.join(common)}", ""] if common else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _unit(job_dir: Path) -> str:
    """What the runs' throughput counts, from the job's saved config (tokens for text, images for images)."""
    try:
        task = json.loads((job_dir / "config.json").read_text())["data"]["task"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return "examples"
    from training.tasks import TASKS

    return TASKS[task].unit if task in TASKS else "examples"


def _plot(rows: list[dict[str, Any]], swept: list[str], unit: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [", ".join(f"{k}={r.get(k)}" for k in swept) or str(r["run"]) for r in rows]
    panels = [("final val/loss", "final validation loss"), ("throughput/s", f"training throughput ({unit}/s)"),
              ("peak memory GiB", "peak memory during training (GiB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 1.5 + 0.45 * len(rows)), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        values = [r.get(key) if isinstance(r.get(key), (int, float)) else 0.0 for r in rows]
        ax.barh(range(len(rows)), values, color="tab:blue")
        ax.set_yticks(range(len(rows)), labels if ax is axes[0][0] else [""] * len(rows), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        for i, v in enumerate(values):
            if v:
                ax.text(v, i, f" {v:,.4g}", va="center", fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_report(sweep_dir: str | os.PathLike) -> dict[str, Path] | None:
    """Write the table (md, csv) and plot of the sweep in ``sweep_dir``; None when it holds no job."""
    sweep_dir = Path(sweep_dir)
    rows = sweep_rows(sweep_dir)
    if not rows:
        return None
    columns = _columns(rows)
    overrides = list(dict.fromkeys(k for r in rows for k in _read_overrides(sweep_dir / r["dir"])))
    paths = {ext: sweep_dir / f"{REPORT}.{ext}" for ext in ("md", "csv", "png")}
    write_atomically(paths["md"], markdown_table(rows, overrides).encode())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(paths["csv"], text.getvalue().encode())
    try:
        write_atomically(paths["png"], _plot(rows, swept_keys(rows, overrides), _unit(sweep_dir / rows[0]["dir"])))
    except Exception as e:  # noqa: BLE001 - a plotting problem must not hide the table
        log.warning(f"could not draw {paths['png']}: {e}")
        paths.pop("png")
    return paths


class SweepReport(Callback):
    """Hydra callback: after a multirun, the comparison table (printed, md, csv) and plot in its directory."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        paths = write_report(sweep_dir)
        if paths is None:
            return
        print(f"\nsweep of {len(sweep_rows(sweep_dir))} runs in {sweep_dir}:\n")
        print(paths["md"].read_text())
        print("written: " + ", ".join(str(p) for p in paths.values()), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m training.sweep runs/<name>/multirun-<time>")
    written = write_report(sys.argv[1])
    if written is None:
        sys.exit(f"{sys.argv[1]} holds no sweep job (no folder with .hydra/)")
    print(written["md"].read_text())
