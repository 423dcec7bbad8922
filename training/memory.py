"""How much activation memory triformer's model saves against the plain PyTorch model a user would otherwise run.

The baseline is ``models.plain`` (nn.LayerNorm, ``F.scaled_dot_product_attention``, nn.GELU, ``F.cross_entropy``)
of the same size and layout, not triformer's own model built from the ``*_reference`` ops (which nobody would
train). One training step of each on the same batch: what autograd saves for backward is counted exactly, on
any device, with ``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd saves passes through the
pack hook, and the sum of the *unique* storages' sizes (views and re-saves of one buffer count once; parameters
are not activations and are left out) is the activation memory of the step. On CUDA the peak allocated during
the step (above what was allocated before it) is reported too; it includes gradients and temporaries.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable

import torch
from torch import nn


@dataclasses.dataclass
class StepMemory:
    saved_bytes: int          # unique storages autograd kept for backward (activations only)
    cuda_peak_bytes: int | None


@dataclasses.dataclass
class MemoryReport:
    triformer: StepMemory
    plain: StepMemory         # the plain PyTorch model of the same size (models.plain)
    description: str          # e.g. "gpt2-nano, batch 16x256, fp32"
    sources: str = ""         # where this run's savings come from, or would (``savings_sources``)

    @property
    def saved_bytes(self) -> int:
        return self.plain.saved_bytes - self.triformer.saved_bytes

    @property
    def saved_fraction(self) -> float:
        return self.saved_bytes / self.plain.saved_bytes if self.plain.saved_bytes else 0.0

    def message(self) -> str:
        verb = "saves" if self.saved_bytes >= 0 else "uses"
        amount = f"{format_bytes(abs(self.saved_bytes))} ({abs(self.saved_fraction):.0%})"
        line = (f"triformer {verb} {amount} {'of' if verb == 'saves' else 'more'} activation memory vs plain PyTorch "
                f"({self.description}: {format_bytes(self.plain.saved_bytes)} -> {format_bytes(self.triformer.saved_bytes)})")
        if self.triformer.cuda_peak_bytes is not None:
            line += (f"; step peak {format_bytes(self.plain.cuda_peak_bytes)} -> "
                     f"{format_bytes(self.triformer.cuda_peak_bytes)}")
        return line + (f". {self.sources}" if self.sources else "")

    def metrics(self) -> dict[str, float]:
        out = {"memory/activations_plain_bytes": self.plain.saved_bytes,
               "memory/activations_triformer_bytes": self.triformer.saved_bytes,
               "memory/activations_saved_bytes": self.saved_bytes,
               "memory/activations_saved_fraction": self.saved_fraction}
        if self.triformer.cuda_peak_bytes is not None:
            out["memory/step_peak_plain_bytes"] = self.plain.cuda_peak_bytes
            out["memory/step_peak_triformer_bytes"] = self.triformer.cuda_peak_bytes
        return out


def savings_sources(dropout: float, loss: str | None, checkpointing: bool,
                    logits_shape: tuple[int, int] | None, gelu_mlp: bool = False) -> str:
    """Where triformer's activation memory savings come from, said for this run: which sources it has on, and
    what the others would save. The layers themselves save what plain PyTorch's save (attention keeps its
    output and log-sum-exp as SDPA does), except a GELU MLP's, so a run with none of them on shows about the
    same memory:
    * a GELU MLP (``gelu_mlp``, always on for such models): GELU's output is recomputed in the backward
      (``triformer.gelu_linear``), one activation of the hidden width per block less;
    * dropout: plain PyTorch keeps each dropout's mask (a byte per element, and a [B, H, T, T] one inside
      attention); triformer regenerates its masks from a seed in backward;
    * the fused loss (``loss=fused``): the [tokens, vocabulary] logits, which the cross-entropy keeps in fp32,
      are never made;
    * activation checkpointing: each block keeps only its input and recomputes the rest in backward.
    README "Where the memory goes" has each one measured."""
    on, off = [], []
    if gelu_mlp:
        on.append("GELU outputs recomputed in backward (one hidden-width activation per block)")
    (on if dropout > 0 else off).append(f"dropout masks never stored (model.dropout={dropout:g}"
                                        + ("" if dropout > 0 else "; on with model.dropout > 0") + ")")
    if loss is not None and logits_shape is not None:
        rows, vocab = logits_shape
        logits = f"[{rows}, {vocab}] fp32 logits, {format_bytes(4 * rows * vocab)}"
        (on if loss == "fused" else off).append(
            f"the fused loss (loss=fused: no {logits})" if loss == "fused" else
            f"the fused loss (loss=fused would not keep the {logits})")
    (on if checkpointing else off).append("activation checkpointing (trainer.activation_checkpointing=true: "
                                          "blocks keep only their inputs)")
    parts = []
    if on:
        parts.append("Savings from: " + "; ".join(on))
    if off:
        parts.append(("Not on in this run: " if on else "This run has none of what saves memory: ") + "; ".join(off))
    return ". ".join(parts) + " (README: Where the memory goes)"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def measure_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> StepMemory:
    """One forward + backward of ``model`` on ``(x, y)``; leaves the parameters' ``.grad`` as it found them."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    grads = [p.grad for p in model.parameters()]
    for p in model.parameters():  # backward would otherwise accumulate into the caller's gradients
        p.grad = None
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast():
            _, loss = model(x, y)
    loss.backward()
    peak = None
    if cuda:
        torch.cuda.synchronize(x.device)
        peak = torch.cuda.max_memory_allocated(x.device) - before
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    return StepMemory(sum(storages.values()), peak)


def compare(triformer_model: nn.Module, plain_model: nn.Module, x: torch.Tensor, y: torch.Tensor, description: str,
            autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> MemoryReport:
    """Measure both models (each taking ``(x, y)`` and returning ``(logits, loss)``) on the same batch, in train
    mode (dropout masks are saved tensors too). Dropout and a fresh plain model's initialization draw random
    numbers: callers that must keep their streams untouched wrap this in ``fork_rng``."""
    results = []
    for model in (triformer_model, plain_model):
        was_training = model.training
        model.train()
        try:
            results.append(measure_step(model, x, y, autocast))
        finally:
            model.train(was_training)
    return MemoryReport(triformer=results[0], plain=results[1], description=description)


def current_bytes(device: torch.device, since_last: bool = True) -> int:
    """Peak CUDA memory allocated since the last call (``since_last``, which resets it) or since the process
    began, or the process's resident set on the CPU (Linux; 0 where /proc is missing).

    Steps replayed from CUDA graphs allocate nothing: their memory is the graphs' private pool, taken while the
    first steps were recorded, so a peak since the last call would show only what lives outside the graphs
    (0.96 GiB for a gpt2-small step that holds 11.3 GiB on an H200). Such runs pass ``since_last=False``."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        if since_last:
            torch.cuda.reset_peak_memory_stats(device)
        return peak
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
