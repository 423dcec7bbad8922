"""Where the time goes (GPU): torch.profiler over (1) one triformer op's forward+backward, host side included,
and (2) a gpt2-small training step (16 x 1024 tokens, bf16 autocast, fused AdamW) with triformer's kernels.

    python -m benchmarks.profile_step

Prints and writes benchmarks/results/<card>/profile_step.md: the top operators by host (CPU) time for the op, and
the top GPU kernels by time for the training step with their share of the step.
"""
from __future__ import annotations


import torch
from torch.profiler import ProfilerActivity, profile

import triformer
import models
from benchmarks.common import environment, out_dir
from benchmarks.train_step import build, train_steps


def profile_calls(fn, steps: int):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return prof


def op_fwd_bwd():
    x = torch.randn(16384, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(768, device="cuda", requires_grad=True)
    b = torch.randn(768, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)

    def step():
        triformer.layer_norm(x, w, b).backward(dy)
    return step


def gpt_step(loss: str):
    model, opt, _ = build(lambda: models.create_model("gpt2-small", kernels="triton", dropout=0.0, loss=loss), False)
    return lambda: train_steps(model, opt, "gpt", 16, 1024, 1)


def main():
    lines = ["# Where the time goes", "", " | ".join(f"{k}: {v}" for k, v in environment().items()), "",
             "Command: `python -m benchmarks.profile_step`", ""]
    prof = profile_calls(op_fwd_bwd(), 20)
    lines += ["## layer_norm 16384x768 bf16, forward+backward, 20 calls: operators by host time", "", "```",
              prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60), "```", ""]
    for loss in ("fused", "ce"):
        prof = profile_calls(gpt_step(loss), 3)
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.self_device_time_total for e in events)
        events.sort(key=lambda e: e.self_device_time_total, reverse=True)
        lines += [f"## gpt2-small training step (loss={loss}), 3 steps: GPU kernels by time", "",
                  f"GPU busy time per step: {total / 3 / 1e3:.1f} ms", "",
                  "| kernel | calls/step | ms/step | share |", "|---|---|---|---|"]
        for e in events[:20]:
            lines.append(f"| {e.key[:90]} | {e.count // 3} | {e.self_device_time_total / 3 / 1e3:.2f} | "
                         f"{100 * e.self_device_time_total / total:.1f}% |")
        lines.append("")
        del prof
        torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text)
    (out_dir() / "profile_step.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
