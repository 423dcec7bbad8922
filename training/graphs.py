"""The forward and backward passes of one optimizer step, captured once in a CUDA graph and replayed.

A GPT-2 small step launches several hundred kernels, and in eager mode the host spends longer issuing
them (Python, autograd, launches) than the GPU spends running them. A replay issues the whole captured
sequence at once, which is faster wherever the eager step is bound by the host (benchmarks/train_step.py
--graph measures it). Gradient clipping, the optimizer step and the trainer's
non-finite checks stay outside the graph, eager and unchanged.

What a graph fixes at capture: tensor addresses (the batch is copied into static buffers, the gradients
live in the graph's memory pool and are rewritten by each replay), shapes (every micro-batch has the same
shape) and every host-side value a kernel was launched with. The trainer therefore refuses settings that change those
from step to step (see ``check_supported``): dropout (its seed is drawn on the host per call), DDP/FSDP
(their communication hooks), torch.compile and fp16 loss scaling.
"""
from __future__ import annotations

import torch


def check_supported(cfg, device: torch.device, world_size: int, precision: str) -> None:
    """Raise ValueError naming the setting that a captured step cannot honour."""
    problems = []
    if device.type != "cuda":
        problems.append(f"it needs a CUDA device (trainer.device resolves to {device})")
    if world_size != 1:
        problems.append(f"it runs in one process (this run has {world_size}: DDP/FSDP hooks are not captured)")
    if cfg.trainer.compile:
        problems.append("it replaces trainer.compile (set one of them)")
    if precision == "fp16":
        problems.append("fp16's loss scaler skips steps on the host (use precision bf16 or fp32)")
    if cfg.model.get("dropout", 0.0):
        problems.append(f"model.dropout={cfg.model.dropout} draws a new seed on the host per call (set it to 0)")
    if problems:
        raise ValueError("trainer.cuda_graph=true: " + "; ".join(problems))


class GraphedStep:
    """``replay(batches)`` runs forward and backward over ``len(batches)`` micro-batches, leaving the summed
    gradients of ``loss / len(batches)`` in the parameters' ``.grad`` and returning the summed micro-batch
    losses (fp32, on the device). Built from the first step's batches: two eager passes (kernel compilation,
    autotuning, allocator warm-up) on a side stream, then the capture."""

    WARMUP_PASSES = 2

    def __init__(self, model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], autocast):
        device = next(model.parameters()).device
        self.inputs = [(x.to(device).clone(), y.to(device).clone()) for x, y in batches]
        self.params = [p for p in model.parameters() if p.requires_grad]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_PASSES):
                self._forward_backward(model, autocast)
        torch.cuda.current_stream(device).wait_stream(side)
        # As torch.cuda.graph's whole-network recipe does: with no gradients at capture, the captured backward
        # allocates them in the graph's memory pool, and every replay rewrites them there (the first micro-
        # batch's gradients replace, the later ones add). The trainer must not set them to None afterwards.
        for p in self.params:
            p.grad = None
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.total = self._forward_backward(model, autocast)

    def _forward_backward(self, model, autocast) -> torch.Tensor:
        total = torch.zeros((), device=self.params[0].device)
        for x, y in self.inputs:
            with autocast():
                _, loss = model(x, y)
            (loss / len(self.inputs)).backward()
            total += loss.detach().float()
        return total

    def replay(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        if len(batches) != len(self.inputs):
            raise ValueError(f"a captured step takes {len(self.inputs)} micro-batches, got {len(batches)}")
        for (x_static, y_static), (x, y) in zip(self.inputs, batches):
            if x.shape != x_static.shape or y.shape != y_static.shape:
                raise ValueError(f"a captured step takes micro-batches of shapes {tuple(x_static.shape)}, "
                                 f"{tuple(y_static.shape)}; got {tuple(x.shape)}, {tuple(y.shape)}")
            x_static.copy_(x)  # the trainer copies its batches to the device (Trainer._to_device)
            y_static.copy_(y)
        self.graph.replay()
        return self.total
