"""End-to-end training-step benchmark on one GPU: triformer models against plain PyTorch.

    python -m benchmarks.train_step gpt    # gpt2-small, 16 x 1024 tokens, bf16 autocast, fused AdamW
    python -m benchmarks.train_step vit    # vit-base/16 at 224, batch 128, bf16 autocast

Variants, each eager, and on request under torch.compile (--compile) and as a CUDA-graphed whole step
(--graph: forward, backward and AdamW captured once and replayed): triformer's model with Triton kernels
(each loss option),
the same model built from the PyTorch references (kernels=torch), and a plain-PyTorch model written the
usual way (nanoGPT-style GPT-2 with SDPA flash attention and F.cross_entropy; a ViT with SDPA). Reports
tokens/s (images/s), MFU against the card's dense bf16 peak (``benchmarks.common.BF16_DENSE_PEAK_FLOPS``),
peak allocated memory, and (--max-batch) the largest batch that fits on the card.
Each row runs in a fresh process (``--same-process`` runs them all in this one): a row that corrupts the CUDA
context (an illegal memory access) then fails alone instead of every row after it, and no row inherits another's
allocator pools or compiled code. Inductor's on-disk cache still serves a graph compiled by an earlier row.
Results: benchmarks/results/<card>/train_step_<gpt|vit>.{csv,md,png}.
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import triformer  # noqa: F401  (first: torch._dynamo imports triton, whose mode triformer must choose)
import torch
import torch._dynamo.utils

import models
from models.layers import set_activation_checkpointing
from models.plain import PlainGPT, PlainViT  # one plain model for the trainer and here
from benchmarks.common import BF16_DENSE_PEAK_FLOPS, card, environment, out_dir


def variants(task: str):
    """name -> constructor of an nn.Module taking (x, targets) and returning (logits, loss)."""
    if task == "gpt":
        return {
            "triformer (ce)": lambda: models.create_model("gpt2-small", kernels="triton", dropout=0.0, loss="ce"),
            "triformer (ce, activation checkpointing)": lambda: checkpointed(
                models.create_model("gpt2-small", kernels="triton", dropout=0.0, loss="ce")),
            "triformer (fused linear-ce)": lambda: models.create_model("gpt2-small", kernels="triton", dropout=0.0,
                                                                       loss="fused"),
            "triformer model, torch kernels": lambda: models.create_model("gpt2-small", kernels="torch", dropout=0.0,
                                                                          loss="ce"),
            "plain PyTorch GPT-2": PlainGPT,
        }
    return {
        "triformer": lambda: models.create_model("vit-base", kernels="triton", dropout=0.0),
        "triformer (activation checkpointing)": lambda: checkpointed(
            models.create_model("vit-base", kernels="triton", dropout=0.0)),
        "triformer model, torch kernels": lambda: models.create_model("vit-base", kernels="torch", dropout=0.0),
        "plain PyTorch ViT": PlainViT,
    }


def chosen(spec: str, name: str) -> bool:
    """Whether the variant ``name`` is picked by ``spec``: 'all', or comma-separated parts, each a substring of
    the name, or ``=name`` for exactly that name (``=triformer`` without the other ViT variants)."""
    return spec == "all" or any(part == f"={name}" or (part and not part.startswith("=") and part in name)
                                for part in spec.split(","))


def checkpointed(model):
    """``model`` with per-block activation checkpointing (what trainer.activation_checkpointing=true sets)."""
    set_activation_checkpointing(model, True)
    return model


def make_batch(task: str, batch: int, seq: int):
    if task == "gpt":
        x = torch.randint(0, 50257, (batch, seq + 1), device="cuda")
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()
    return torch.randn(batch, 3, 224, 224, device="cuda"), torch.randint(0, 1000, (batch,), device="cuda")


def flops_per_example(task: str, seq: int | None) -> float:
    """fwd+bwd FLOPs of one sequence / image of the benchmarked shape (6N + attention), the same for every
    variant so their MFU compare; taken from triformer's model of that shape."""
    with torch.device("meta"):
        model = models.create_model("gpt2-small" if task == "gpt" else "vit-base", kernels="torch")
    return model.flops_per_example(seq)


def train_steps(model, opt, task, batch, seq, steps, mark_step=False):
    x, y = make_batch(task, batch, seq)
    for _ in range(steps):
        if mark_step:  # reduce-overhead: each step's outputs may be overwritten by the next replay
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss


def build(ctor, compile_mode: str | None, capturable: bool = False):
    """(model to run, optimizer, the uncompiled model); ``compile_mode`` None runs eager."""
    model = ctor().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=capturable)
    if compile_mode is None:
        return model, opt, model
    return torch.compile(model, mode=None if compile_mode == "default" else compile_mode), opt, model


def graphed_steps(model, opt, task, batch, seq, warmup):
    """Capture one whole training step (forward, backward, AdamW) in a CUDA graph after ``warmup`` eager
    steps (autotuning, allocator pools, optimizer state) and return ``run(steps)``, which replays it: the
    host then launches one graph per step instead of hundreds of kernels. The batch lives in static
    buffers that a real loop would refill with ``copy_`` before each replay."""
    x, y = make_batch(task, batch, seq)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph requires
        train_steps(model, opt, task, batch, seq, warmup)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # grads are None here, so backward allocates them in the graph's pool
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        opt.step()

    def run(steps):
        for _ in range(steps):
            graph.replay()
        return loss
    return run


def measure(task, name, ctor, mode, batch, seq, steps, warmup):
    """One row: ``mode`` is "eager", "graph" (CUDA graph replay of the eager step), "compile" (torch.compile of
    the model, default mode) or "compile:<torch.compile mode>", e.g. "compile:reduce-overhead"."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch._dynamo.utils.counters.clear()
    compile_mode = None if not mode.startswith("compile") else (mode.partition(":")[2] or "default")
    mark_step = compile_mode in ("reduce-overhead", "max-autotune")  # the modes that replay CUDA graphs
    model, opt, raw = build(ctor, compile_mode, capturable=mode == "graph")
    if mode == "graph":
        run = graphed_steps(model, opt, task, batch, seq, warmup)
    else:
        t_first = time.perf_counter()
        train_steps(model, opt, task, batch, seq, 1, mark_step)
        torch.cuda.synchronize()
        first_step_s = time.perf_counter() - t_first
        train_steps(model, opt, task, batch, seq, warmup, mark_step)

        def run(n):
            return train_steps(model, opt, task, batch, seq, n, mark_step)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = run(steps)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30
    per_step = batch * (seq if task == "gpt" else 1)
    flops = flops_per_example(task, seq)
    del model, opt, raw, run
    peak_flops = BF16_DENSE_PEAK_FLOPS.get(card())
    return {"variant": name, "mode": mode, "batch": batch, "ms_per_step": round(dt * 1e3, 2),
            ("tokens_per_s" if task == "gpt" else "images_per_s"): round(per_step / dt),
            "MFU": round(flops * batch / dt / peak_flops, 3) if peak_flops else "",
            "peak_GiB": round(peak, 2), "final_loss": round(float(loss.detach()), 3),
            "first_step_s": round(first_step_s, 1) if mode != "graph" else "",
            # a compiled CUDA-graph mode that skipped its graphs runs without them: the row must say so
            "cudagraph_skips": torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] if compile_mode else ""}


def measure_row(task, name, mode, batch, seq, steps, warmup, max_batch: bool) -> dict:
    """One row of the table (``measure``), plus the largest batch that fits when ``max_batch``."""
    torch.backends.cuda.matmul.allow_tf32 = True
    ctor = variants(task)[name]
    row = measure(task, name, ctor, mode, batch, seq, steps, warmup)
    if max_batch:
        row["max_batch"] = largest_batch(task, ctor, seq, batch)
    return row


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a new Python process (spawned: CUDA cannot be forked), its exception re-raised here."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def fits(task, ctor, batch, seq) -> bool:
    torch.cuda.empty_cache()
    try:
        model, opt, raw = build(ctor, None)
        train_steps(model, opt, task, batch, seq, 1)
        torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        model = opt = raw = None  # noqa: F841
        torch.cuda.empty_cache()


def largest_batch(task, ctor, seq, start) -> int:
    lo, hi = 0, start
    while fits(task, ctor, hi, seq):
        lo, hi = hi, hi * 2
    while hi - lo > max(1, lo // 16):  # ~6% resolution is enough to compare frameworks
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(task, ctor, mid, seq) else (lo, mid)
    return lo


def main():
    p = argparse.ArgumentParser()
    p.add_argument("task", choices=["gpt", "vit"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--eager", default="all",
                   help="comma-separated substrings of the variants to run eager ('all', 'none': compiled rows only)")
    p.add_argument("--compile", default="all",
                   help="comma-separated substrings of the variants to also run under torch.compile ('all', 'none')")
    p.add_argument("--compile-modes", default="default",
                   help="comma-separated torch.compile modes for --compile (default, reduce-overhead, "
                        "max-autotune-no-cudagraphs)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 16 sequences / 128 images)")
    p.add_argument("--variants", default="all",
                   help="comma-separated substrings of the variants to run, or =NAME for exactly one")
    p.add_argument("--graph", default="none",
                   help="comma-separated substrings of the variants to also run as a CUDA-graphed step ('all', 'none')")
    p.add_argument("--same-process", action="store_true",
                   help="run every row in this process instead of one fresh process per row")
    p.add_argument("--max-batch", default="none",
                   help="comma-separated substrings of the variants whose largest batch to search (eager; 'all')")
    args = p.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = True
    batch, seq = (16, 1024) if args.task == "gpt" else (128, None)
    batch = args.batch or batch
    compiled = args.compile_modes.split(",")
    rows = []
    for name in variants(args.task):
        if not chosen(args.variants, name):
            continue
        modes = (["eager"] * chosen(args.eager, name) + ["graph"] * chosen(args.graph, name)
                 + [("compile" if m == "default" else f"compile:{m}") for m in compiled] * chosen(args.compile, name))
        for mode in modes:
            row_args = (args.task, name, mode, batch, seq, args.steps, args.warmup,
                        mode == "eager" and chosen(args.max_batch, name))
            try:
                row = measure_row(*row_args) if args.same_process else in_fresh_process(measure_row, *row_args)
            except Exception as exc:
                print(f"{name} mode={mode}: failed: {exc!r}"[:400], flush=True)
                rows.append({"variant": name, "mode": mode, "batch": batch, "failed": repr(exc)[:120]})
                continue
            rows.append(row)
            print(row, flush=True)
    print(environment())
    for r in rows:
        print(" | ".join(f"{k}={v}" for k, v in r.items()))
    write_table(f"train_step_{args.task}", rows)


def write_table(name, rows):
    d = out_dir()
    env = environment()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(d / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    md = [f"# {name}", "", " | ".join(f"{k}: {v}" for k, v in env.items()), "",
          f"Command: `python -m benchmarks.train_step {' '.join(sys.argv[1:])}`", "",
          "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    (d / f"{name}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
