"""Time the default CPU run (``python train.py``) as a user starts it: wall clock, and the CPU time the process
used, which a machine shared with other work inflates far less than the wall clock (the steps of one run went
from 0.8 s to 6 s while others were busy on the same two cores).

``python -m benchmarks.cpu_default_run [train.py overrides ...]`` runs ``python train.py <overrides>`` into a
scratch run directory (the data cache must already hold the stdlib corpus, as after a first run: tokenizing is
not what is timed), then appends a row to ``benchmarks/results/cpu/default_run.md`` (or ``$TRIFORMER_BENCH_OUT``)
with the command, date, load average, wall and CPU seconds (the file keeps one table per question: move a
new row where it belongs), and the training part's wall time (first to last
record of metrics.jsonl: evaluations included, start-up and the memory report not).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from training.checkpoint import write_atomically

ROOT = Path(__file__).resolve().parents[1]
HEADER = ("| date (UTC) | command or change | load avg before | wall s | CPU s (user+sys) | training part s "
          "| final val/loss |\n|---|---|---|---|---|---|---|\n")


def run(overrides: list[str]) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="triformer-bench-"))
    command = ["python", "train.py", *overrides]
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", *overrides, f"run_dir={run_dir}", "trainer.progress=false"],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "command": " ".join(command),
            "cores": os.cpu_count(), "load": load, "wall": wall,
            "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "training": records[-1]["time"] - records[0]["time"], "val": summary.get("final_val/loss")}


def main() -> None:
    result = run(sys.argv[1:])
    out = Path(os.environ.get("TRIFORMER_BENCH_OUT") or ROOT / "benchmarks" / "results" / "cpu") / "default_run.md"
    row = (f"| {result['date']} | `{result['command']}` ({result['cores']} cores) | {result['load']:.1f} | "
           f"{result['wall']:.0f} | {result['cpu']:.0f} | {result['training']:.0f} | {result['val']:.4f} |\n")
    text = out.read_text() if out.is_file() else ("# The default CPU run, timed\n\nRows appended by "
                                                  "`python -m benchmarks.cpu_default_run [overrides]`.\n\n" + HEADER)
    write_atomically(out, (text + row).encode())
    print(row, end="")


if __name__ == "__main__":
    main()
