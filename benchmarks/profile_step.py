"""Where the time and the memory of a training step go (GPU), for the variants of benchmarks/train_step.py.

    python -m benchmarks.profile_step                      # gpt2-small, triformer (ce) and plain PyTorch, eager + compiled
    python -m benchmarks.profile_step --variants "(ce),plain" --modes compile --batch 32

For each (variant, mode), after the first step (compile, autotuning) and two warm-up steps:
* time: torch.profiler over 3 steps gives the wall time per step, the GPU busy time per step (the sum of kernel
  times: the gap between the two is host time the GPU waited for) and the kernels by GPU time, also summed into
  categories (matmuls, attention, loss, Inductor's fused glue, our other kernels, optimizer) so that two variants
  compare line by line;
* memory: the CUDA caching allocator's history over one more step (``torch.cuda.memory._record_memory_history``)
  replayed to the moment of the step's peak, listing what is alive then by the line of Python that allocated it
  (for a compiled graph that is a line of Inductor's generated code, printed). What is still alive from before
  the step (weights, their gradients, AdamW state) is one line.
Each (variant, mode) runs in a fresh process, as train_step's rows: one that fails is reported and the others run.
Results: benchmarks/results/<card>/profile_step.md.
"""
from __future__ import annotations

import argparse
import linecache
import re
from collections import defaultdict

import triformer  # noqa: F401  (before torch.profiler, which imports triton: picks compile vs interpreter)
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import environment, out_dir
from benchmarks.train_step import build, chosen, in_fresh_process, train_steps, variants

PROFILED_STEPS = 3
# Kernel name -> category, first match wins. cuBLAS/CUTLASS GEMMs carry these fragments on sm_90; Inductor's
# generated kernels start with triton_; ours are the @triton.jit names of triformer/*.py.
CATEGORIES = [
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|sm90_|cublas|splitk", re.I)),
    ("attention", re.compile(r"attn|flash|fmha|attention", re.I)),
    ("loss", re.compile(r"cross_entropy|_ce_|nll|log_softmax|logsumexp|scale_rows|element_mul", re.I)),
    ("activations, rope", re.compile(r"gelu|glu|silu|rope|rotary", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam|foreach", re.I)),
    ("inductor glue", re.compile(r"^triton_")),
    ("norms", re.compile(r"norm", re.I)),
]


def category(kernel: str) -> str:
    return next((name for name, pattern in CATEGORIES if pattern.search(kernel)), "other")


def time_table(step, label: str) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_STEPS):
            step()
        torch.cuda.synchronize()
    wall = max(e.time_range.end for e in prof.events()) - min(e.time_range.start for e in prof.events())
    # a user annotation (AdamW's "Optimizer.step#AdamW.step") also shows up as a GPU range spanning the kernels
    # it launched: counting it would count those kernels twice
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
               and e.self_device_time_total > 0 and not getattr(e, "is_user_annotation", False)]
    busy = sum(e.self_device_time_total for e in kernels)
    per_step = PROFILED_STEPS * 1e3  # profiler times are microseconds
    by_category = defaultdict(float)
    for e in kernels:
        by_category[category(e.key)] += e.self_device_time_total
    lines = [f"### {label}: time", "",
             f"wall {wall / per_step:.2f} ms/step (profiled), GPU busy {busy / per_step:.2f} ms/step", "",
             "| category | ms/step | share |", "|---|---|---|"]
    for name, t in sorted(by_category.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {t / per_step:.2f} | {100 * t / busy:.1f}% |")
    lines += ["", "| kernel | category | calls/step | ms/step | share |", "|---|---|---|---|---|"]
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]:
        lines.append(f"| `{e.key[:80]}` | {category(e.key)} | {e.count / PROFILED_STEPS:g} | "
                     f"{e.self_device_time_total / per_step:.3f} | {100 * e.self_device_time_total / busy:.1f}% |")
    return lines + [""]


def _site(frames: list[dict]) -> str:
    """The allocating line: the innermost frame outside torch's own Python (Inductor's generated code, which
    lives in a torchinductor cache folder, counts as ours), with its source."""
    for f in frames:
        name = f["filename"]
        if "/torch/" in name and "torchinductor" not in name:
            continue
        source = linecache.getline(name, f["line"]).strip()
        return f"{name.rsplit('/', 1)[-1]}:{f['line']} {f['name']}: {source[:110]}"
    return "(no Python frame: autograd engine or C++)"


def memory_table(step, label: str, top: int = 14) -> list[str]:
    """What is alive at the peak of one step, by allocation site (see the module docstring)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live, older_freed, current = {}, 0, before
    peak, peak_live, peak_older_freed = before, {}, 0
    for ev in snapshot["device_traces"][torch.cuda.current_device()]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], ev.get("frames", []))
            current += ev["size"]
        elif ev["action"] == "free_completed":
            current -= ev["size"]
            if live.pop(ev["addr"], None) is None:
                older_freed += ev["size"]
        if current > peak:
            peak, peak_live, peak_older_freed = current, dict(live), older_freed
    sites = defaultdict(lambda: [0, 0])
    for size, frames in peak_live.values():
        sites[_site(frames)][0] += size
        sites[_site(frames)][1] += 1
    gib = 2**30
    lines = [f"### {label}: memory", "",
             f"peak {torch.cuda.max_memory_allocated() / gib:.2f} GiB (allocator), replayed peak {peak / gib:.2f} GiB;"
             f" alive from before the step at the peak: {(before - peak_older_freed) / gib:.2f} GiB", "",
             "| allocated at | GiB at peak | blocks |", "|---|---|---|"]
    for site, (size, n) in sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"| `{site}` | {size / gib:.3f} | {n} |")
    return lines + [""]


def profile_section(task, name, mode, batch, seq) -> list[str]:
    """The time and memory tables of one (variant, mode)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    compile_mode = None if mode == "eager" else (mode.partition(":")[2] or "default")
    mark = compile_mode in ("reduce-overhead", "max-autotune")
    model, opt, _ = build(variants(task)[name], compile_mode)

    def step():
        train_steps(model, opt, task, batch, seq, 1, mark)
    for _ in range(3):  # compile / autotune, then the allocator's steady state
        step()
    label = f"{name}, {mode}, batch {batch}"
    return time_table(step, label) + memory_table(step, label)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--task", choices=["gpt", "vit"], default="gpt")
    p.add_argument("--variants", default="(ce),plain", help="comma-separated substrings of train_step's variants")
    p.add_argument("--modes", default="eager,compile", help="eager, compile, compile:<torch.compile mode>")
    p.add_argument("--batch", type=int, default=None, help="default 16 sequences of 1024 / 128 images")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    batch, seq = (args.batch or 16, 1024) if args.task == "gpt" else (args.batch or 128, None)
    lines = ["# Where the time and memory of a training step go", "",
             " | ".join(f"{k}: {v}" for k, v in environment().items()), "",
             f"Command: `python -m benchmarks.profile_step --task {args.task} --variants \"{args.variants}\" "
             f"--modes {args.modes} --batch {batch}`", ""]
    for name in variants(args.task):
        if not chosen(args.variants, name):
            continue
        for mode in args.modes.split(","):
            try:
                section = in_fresh_process(profile_section, args.task, name, mode, batch, seq)
            except Exception as exc:
                section = [f"### {name}, {mode}, batch {batch}: failed", "", f"`{exc!r}`"[:600], ""]
            print("\n".join(section), flush=True)
            lines += section
    (out_dir() / "profile_step.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
