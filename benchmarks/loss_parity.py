"""Loss-curve parity: the same training run with triformer's kernels and with their PyTorch references.

    python -m benchmarks.loss_parity gpt [train.py overrides...]   # gpt2-small, 300 steps, bf16 (GPU)
    python -m benchmarks.loss_parity vit [train.py overrides...]   # vit-digits, a short run (CPU or GPU)

Runs ``train.py`` twice with one seed, so both see the same batches in the same order and start from the
same weights, once with ``model.kernels=triton`` and once with ``model.kernels=torch``, then compares
the validation losses at every evaluation: the largest relative gap must stay within 2%. Writes
benchmarks/results/<card>/loss_parity_<task>.{md,csv,png}.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from benchmarks.common import environment, out_dir

TOLERANCE = 0.02
RUNS = {
    "gpt": ["experiment=gpt2-small-stdlib-gpu", "trainer.batch_size=16", "trainer.grad_accum=1",
            "trainer.max_steps=300", "trainer.eval_interval=50", "trainer.eval_batches=10", "trainer.compile=false",
            "trainer.ckpt_interval=0", "trainer.progress=false", "memory_report=false", "logger=none"],
    "vit": ["experiment=vit-digits", "trainer.ckpt_interval=0", "trainer.progress=false", "memory_report=false",
            "logger=none"],
}


def run(task: str, kernels: str, extra: list[str], run_dir: Path) -> list[dict]:
    cmd = [sys.executable, "train.py", *RUNS[task], f"model.kernels={kernels}", f"run_dir={run_dir}", *extra]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval" and "val/loss" in r]


def main():
    task, extra = sys.argv[1], sys.argv[2:]
    results = out_dir()
    with tempfile.TemporaryDirectory() as tmp:  # the runs' checkpoints are large and not results
        curves = {k: run(task, k, extra, Path(tmp) / k) for k in ("triton", "torch")}
    rows = []
    for a, b in zip(curves["triton"], curves["torch"]):
        assert a["step"] == b["step"], (a["step"], b["step"])
        rows.append({"step": a["step"], "val_loss_triton": round(a["val/loss"], 4),
                     "val_loss_torch": round(b["val/loss"], 4),
                     "rel_gap": round(abs(a["val/loss"] - b["val/loss"]) / b["val/loss"], 5)})
    worst = max(r["rel_gap"] for r in rows)
    verdict = "PASS" if worst <= TOLERANCE else "FAIL"
    with open(results / f"loss_parity_{task}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Loss-curve parity ({task})", "", " | ".join(f"{k}: {v}" for k, v in environment().items()), "",
             f"Command: `python -m benchmarks.loss_parity {' '.join(sys.argv[1:])}` (train.py {' '.join(RUNS[task])})",
             "", f"Largest relative gap {worst:.4f} vs tolerance {TOLERANCE}: **{verdict}**", "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    (results / f"loss_parity_{task}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in ("triton", "torch"):
        ax.plot([r["step"] for r in rows], [r[f"val_loss_{k}"] for r in rows], marker="o", label=f"kernels={k}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{task}: triformer kernels vs PyTorch references (max gap {100 * worst:.2f}%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(results / f"loss_parity_{task}.png", dpi=110)


if __name__ == "__main__":
    main()
