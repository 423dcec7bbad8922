"""Peak GPU memory of one gpt2-small training step: triformer against plain PyTorch, from a committed result.

    python -m benchmarks.plot_memory [benchmarks/results/h200/train_step_gpt.csv] [-o memory_vs_plain.png]

Reads the CSV ``benchmarks/train_step.py gpt`` wrote (peak allocated memory per variant and mode) and draws one
bar per (variant, mode), triformer in blue and plain PyTorch (``models/plain.py``) in grey; the same model built
from triformer's PyTorch references (``kernels=torch``) is left out: it is a test twin, not what anyone trains.
Nothing is measured here; the numbers are the CSV's.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "benchmarks" / "results" / "h200" / "train_step_gpt.csv"


def load_rows(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if "torch kernels" not in r["variant"]]
    if not rows:
        raise ValueError(f"{path} has no rows with a variant and peak_GiB")
    for r in rows:
        r["peak_GiB"] = float(r["peak_GiB"])
    return rows


def _short(variant: str) -> str:
    return variant.replace("triformer ", "triformer\n").replace("plain PyTorch GPT-2", "plain PyTorch")


def plot(rows: list[dict], out: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_short(r["variant"]) + "\n" + r["mode"] for r in rows]
    colors = ["tab:gray" if r["variant"].startswith("plain") else "tab:blue" for r in rows]
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 4.5))
    bars = ax.bar(range(len(rows)), [r["peak_GiB"] for r in rows], color=colors)
    for bar, r in zip(bars, rows):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{r['peak_GiB']:.1f}", ha="center",
                va="bottom", fontsize=9)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("peak GPU memory allocated, one training step (GiB)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="?", default=str(DEFAULT))
    p.add_argument("-o", "--out", default=None, help="PNG path (default: memory_vs_plain.png next to the CSV)")
    p.add_argument("--title", default="gpt2-small, 16 x 1024 tokens, bf16, AdamW (H200): triformer vs plain PyTorch")
    args = p.parse_args()
    out = args.out or Path(args.csv).with_name("memory_vs_plain.png")
    print(plot(load_rows(args.csv), out, args.title))


if __name__ == "__main__":
    main()
