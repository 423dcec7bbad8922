"""Gradients of gradients (double backward) for triformer's autograd Functions.

The Triton backward kernels return plain tensors with no autograd graph. Under ``create_graph=True``
(``g, = torch.autograd.grad(loss, x, create_graph=True)``, a gradient penalty, a Hessian-vector product,
MAML) such a ``g`` would silently carry no second-order terms. Every op's ``backward`` therefore starts with
one cheap test, ``needs_graph(...)``: ``torch.is_grad_enabled()`` is False during an ordinary
``.backward()`` / ``autograd.grad`` (autograd runs a backward with grad mode set to ``create_graph``), so
the first-order path costs one call and then runs the Triton kernels exactly as before.

When it is True (``create_graph=True`` and a saved input or an incoming gradient requires grad), the op
computes its gradients with a graph instead, by one of:

* ``reference_grads``: differentiate the op's plain-PyTorch ``*_reference`` (same signature and semantics)
  at the original saved tensors with ``torch.autograd.grad(..., create_graph=True)``. Slower than the
  kernels and with the reference's memory (e.g. attention's [B, H, Tq, Tk] scores), but it is only taken
  when gradients of gradients are asked for.
* an op that is linear in its input (dropout, RoPE) applies its own autograd.Function to the incoming
  gradient: the same kernels, and differentiable again.
* an op that saved its output rather than its input (softmax) writes its backward formula in plain PyTorch
  on that output, which autograd differentiates through the op's own backward.

An op that keeps neither its inputs nor anything they can be recomputed from (cross_entropy, which keeps
only d(loss)/d(logits) or writes it over the logits; linear_cross_entropy with reduction "mean"/"sum",
which computes its gradients in the forward) raises ``double_backward_unsupported(...)``: a RuntimeError
naming the op and what to use instead. None returns a silently wrong second-order gradient.

Public names: ``needs_graph``, ``reference_grads``, ``double_backward_unsupported``.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

__all__ = ["needs_graph", "reference_grads", "double_backward_unsupported"]


def needs_graph(*tensors: Optional[torch.Tensor]) -> bool:
    """True when a backward must return gradients that carry a graph: grad mode is on (the backward runs
    under ``create_graph=True``) and one of ``tensors`` (the saved tensors and incoming gradients; None
    entries allowed) requires grad. ``torch.is_grad_enabled()`` is tested first, so an ordinary backward pays
    one call."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def reference_grads(reference: Callable, inputs: Sequence, grad_outputs: Sequence[Optional[torch.Tensor]],
                    needs_input_grad: Optional[Sequence[bool]] = None) -> tuple:
    """The gradients of ``reference(*inputs)`` against ``grad_outputs``, with a graph (``create_graph=True``).

    ``inputs``: the op's original saved tensors (and any other arguments); an entry is differentiated when it
    is a tensor that requires grad and ``needs_input_grad`` (e.g. ``ctx.needs_input_grad``, same length as
    ``inputs``) allows it. ``reference`` returns a tensor or a tuple of tensors; ``grad_outputs`` has one
    entry per output, None for an output that received no gradient. Returns one entry per input: its
    gradient, or None (not differentiated, or the reference does not depend on it: autograd reads None as
    zeros). Each differentiated input is passed to ``reference`` as its own alias, so an op given the same
    tensor twice (``attention(x, x, x)``) gets each argument's own partial gradient, not the total three times.
    """
    wrt = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.requires_grad
           and (needs_input_grad is None or needs_input_grad[i])]
    result: list = [None] * len(inputs)
    if not wrt:
        return tuple(result)
    with torch.enable_grad():
        args = list(inputs)
        for i in wrt:
            args[i] = inputs[i].view_as(inputs[i])
        outputs = reference(*args)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        if len(outputs) != len(grad_outputs):
            raise AssertionError(f"reference gave {len(outputs)} outputs for {len(grad_outputs)} gradients")
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
        if not pairs:
            return tuple(result)
        grads = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in wrt], [g for _, g in pairs],
                                    create_graph=True, allow_unused=True)
    for i, g in zip(wrt, grads):
        result[i] = g
    return tuple(result)


def double_backward_unsupported(op: str, why: str, instead: str) -> RuntimeError:
    """The error an op raises (``raise double_backward_unsupported(...)``) when its backward runs under
    ``create_graph=True`` but it cannot give correct gradients of gradients."""
    return RuntimeError(
        f"triformer.{op}: gradients of gradients (double backward, create_graph=True) are not supported: {why}. "
        f"To avoid this error, {instead}.")
