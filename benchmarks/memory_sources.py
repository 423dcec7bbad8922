"""Where triformer's activation memory savings come from, measured: one training step of the default CPU run's
model (configs/model/gpt2-nano-cpu.yaml on the stdlib data: 2 layers, 1 head of 128, byte vocabulary 257,
micro-batch 4 x 128, fp32) against the plain PyTorch model of its size (models/plain.py), with each source of
savings on in turn: dropout (masks regenerated from a seed instead of stored), the fused loss (no logits) and
activation checkpointing (blocks keep their inputs only). Counted as the trainer's memory line counts: the
unique storages autograd saves for backward (``training.memory``), so the numbers are exact and the same on any
CPU.

``python -m benchmarks.memory_sources`` writes ``benchmarks/results/cpu/memory_sources.md`` (or
``$TRIFORMER_BENCH_OUT``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

import models
from models.layers import set_activation_checkpointing
from models.plain import plain_model_like
from training import memory
from training.checkpoint import write_atomically

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(n_layer=2, n_head=1, n_embd=128, vocab_size=257, block_size=128)
BATCH, SEQ = 4, 128
VARIANTS = [  # (label, model fields, activation checkpointing)
    ("as the default run: dropout 0, loss=ce", dict(dropout=0.0, loss="ce"), False),
    ("model.dropout=0.1", dict(dropout=0.1, loss="ce"), False),
    ("loss=fused", dict(dropout=0.0, loss="fused"), False),
    ("trainer.activation_checkpointing=true", dict(dropout=0.0, loss="ce"), True),
    ("all three", dict(dropout=0.1, loss="fused"), True),
]


def measure() -> list[tuple[str, memory.MemoryReport]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ), generator=g)
    y = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ), generator=g)
    rows = []
    for label, fields, checkpointing in VARIANTS:
        torch.manual_seed(0)
        model = models.create_model("gpt2-nano", kernels="triton", **SHAPE, **fields)
        plain = plain_model_like(model)
        if checkpointing:
            set_activation_checkpointing(model, True)
        rows.append((label, memory.compare(model, plain, x, y, label)))
    return rows


def main() -> None:
    rows = measure()
    lines = ["# Where the activation memory goes (gpt2-nano-cpu, micro-batch 4 x 128, fp32, CPU)", "",
             "`python -m benchmarks.memory_sources`: activations autograd saves for backward in one training step,",
             "triformer's model against the plain PyTorch model of its size (`models/plain.py`), exact counts.", "",
             "| variant | plain PyTorch | triformer | triformer vs plain |", "|---|---|---|---|"]
    for label, r in rows:
        change = r.triformer.saved_bytes / r.plain.saved_bytes - 1
        lines.append(f"| {label} | {memory.format_bytes(r.plain.saved_bytes)} | "
                     f"{memory.format_bytes(r.triformer.saved_bytes)} | {change:+.0%} |")
    out = Path(os.environ.get("TRIFORMER_BENCH_OUT") or ROOT / "benchmarks" / "results" / "cpu") / "memory_sources.md"
    write_atomically(out, ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
