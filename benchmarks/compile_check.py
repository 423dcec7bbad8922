"""torch.compile of triformer's models on one GPU: cold compile time, graph breaks, and the compiled loss curve
against the eager one.

    python -m benchmarks.compile_check                       # gpt2-small, llama-small, vit-base; three modes
    python -m benchmarks.compile_check --models gpt2-small --modes default --steps 100
    python -m benchmarks.compile_check --models gpt2-small,plain:gpt2-small --modes max-autotune-no-cudagraphs

Each (model, mode) runs in a fresh process with empty Inductor and Triton caches, so the time is a cold
compile: ``torch.compile(model, fullgraph=True, mode=...)``, then the first forward + backward + AdamW step
(bf16 autocast, fused AdamW) is timed. Then ``--steps`` compiled steps and the same steps eager, from the same
initial weights on the same batches (a fixed set of sequences the model can memorize, so the loss falls), give
the largest gap between the two loss curves, next to the gap between the eager curve and the curve of the
same model built from the PyTorch reference kernels (what bf16 rounding alone does). ``plain:<model>`` is the
plain-PyTorch model of that size (models/plain.py), the peer's compile time in the same mode; it has no
reference twin, so its row gives the compiled-against-eager gap only. Results: benchmarks/results/<card>/compile_check.{md,csv}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root: `python -m benchmarks.compile_check` runs from it
MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
MODELS = ("gpt2-small", "llama-small", "vit-base")
# batch per model: large enough to be a real step, small enough that three modes and two curves fit a lease
BATCH = {"gpt": (8, 1024), "vit": (64, None)}


def _batches(task: str, n: int, batch: int, seq: int | None, device: str):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    if task == "gpt":
        data = torch.randint(0, 50257, (n, batch, seq + 1), generator=g)
        return [(d[:, :-1].to(device), d[:, 1:].to(device)) for d in data]
    return [(torch.randn(batch, 3, 224, 224, generator=g).to(device),
             torch.randint(0, 1000, (batch,), generator=g).to(device)) for _ in range(n)]


def _curve(model, batches, steps: int, mark_step: bool):
    """Losses of ``steps`` AdamW steps cycling over ``batches``; the first step's time (compile) in seconds."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    losses, first = [], None
    for i in range(steps):
        t0 = time.perf_counter()
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        x, y = batches[i % len(batches)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if first is None:
            first = time.perf_counter() - t0
    return losses, first


def run_one(name: str, mode: str, steps: int) -> dict:
    import torch
    import torch._dynamo.utils

    import triformer  # noqa: F401  (before models: picks compile vs interpreter)
    import models

    from models.plain import plain_model_like

    torch.manual_seed(0)
    plain, _, size = name.rpartition(":")
    model = models.create_model(size, kernels="triton", dropout=0.0)
    model = (plain_model_like(model) if plain else model).cuda()
    task = "vit" if size.startswith("vit") else "gpt"
    batch, seq = BATCH[task]
    batches = _batches(task, 4, batch, seq, "cuda")
    eager_model = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, mode=None if mode == "default" else mode)
    row = {"model": name, "mode": mode, "batch": batch}
    try:
        losses, compile_s = _curve(compiled, batches, steps, mark_step=mode == "reduce-overhead")
    except Exception as exc:  # reported, never hidden: the row says why
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[-1500:])
        return row
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    _curve(compiled, batches, 10, mark_step=mode == "reduce-overhead")
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) / 10 * 1e3
    # bf16 noise: the same model built from the PyTorch reference kernels (kernels=torch) drifts from triformer's
    # eager curve by rounding alone; the compiled curve should drift no further
    eager, _ = _curve(eager_model, batches, steps, mark_step=False)

    def gap(a, b):  # largest distance of two loss curves, as a fraction of the first loss (losses fall towards 0)
        return max(abs(x - y) for x, y in zip(a, b)) / eager[0]

    compiled_gap = gap(losses, eager)
    row.update(ok=True, compile_s=round(compile_s, 1), graph_breaks=sum(torch._dynamo.utils.counters["graph_break"].values()),
               step_ms=round(step_ms, 2), loss_first=round(eager[0], 3), loss_last_eager=round(eager[-1], 3),
               loss_last_compiled=round(losses[-1], 3), compiled_gap=round(compiled_gap, 4), steps=steps,
               cudagraph_skips=torch._dynamo.utils.counters["inductor"]["cudagraph_skips"])
    if not plain:
        twin = models.create_model(name, kernels="torch", dropout=0.0).cuda()
        twin.load_state_dict(eager_model.state_dict())
        reference, _ = _curve(twin, batches, steps, mark_step=False)
        noise_gap = gap(reference, eager)
        row.update(loss_last_reference=round(reference[-1], 3), noise_gap=round(noise_gap, 4),
                   within_noise=compiled_gap <= max(1.5 * noise_gap, 0.01))
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--limit", type=float, default=300.0, help="seconds one (model, mode) process may take")
    p.add_argument("--keep-logs", action="store_true", help="save each process's output beside the results")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(*args.one, args.steps)), flush=True)
        return

    from benchmarks.common import environment, out_dir

    rows = []
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            with tempfile.TemporaryDirectory() as cache:  # cold: nothing compiled before
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{cache}/inductor", TRITON_CACHE_DIR=f"{cache}/triton")
                t0 = time.perf_counter()
                try:
                    out = subprocess.run([sys.executable, "-m", "benchmarks.compile_check", "--one", name, mode,
                                          "--steps", str(args.steps)], cwd=ROOT, env=env, capture_output=True,
                                         text=True, timeout=args.limit)
                    if args.keep_logs:  # e.g. with TORCH_LOGS=perf_hints: why a CUDA graph was skipped
                        (out_dir() / f"compile_check-{name}-{mode}.log").write_text(out.stdout + out.stderr)
                    out = out.stdout
                    found = [line[7:] for line in out.splitlines() if line.startswith("RESULT ")]
                    row = json.loads(found[-1]) if found else {"model": name, "mode": mode, "ok": False,
                                                              "error": "no result: " + out[-400:]}
                except subprocess.TimeoutExpired:
                    row = {"model": name, "mode": mode, "ok": False, "error": f"over {args.limit:.0f} s"}
                row["process_s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    env = environment()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    d = out_dir()
    lines = ["# compile_check", "", " | ".join(f"{k}: {v}" for k, v in env.items()), "",
             f"Command: `python -m benchmarks.compile_check {' '.join(sys.argv[1:])}`", "",
             "compile_s: cold torch.compile(fullgraph=True) + first forward/backward/AdamW step; process_s: the "
             "whole fresh process (imports, model, eager curve too); compiled_gap: largest distance between "
             "the compiled and eager loss curves (bf16 autocast, same weights and batches) over the first loss; "
             "noise_gap: the same between triformer's eager curve and the model built from the PyTorch reference "
             "kernels (kernels=torch), i.e. what bf16 rounding alone does; within_noise: compiled_gap <= "
             "max(1.5 x noise_gap, 0.01).", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    (d / "compile_check.md").write_text("\n".join(lines) + "\n")
    with open(d / "compile_check.csv", "w") as f:
        f.write(",".join(keys) + "\n")
        for r in rows:
            f.write(",".join(json.dumps(r.get(k, "")) for k in keys) + "\n")


if __name__ == "__main__":
    main()
