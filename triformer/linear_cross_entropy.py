"""Fused linear + cross-entropy: ``loss = CE(hidden @ weight.T + bias, targets)`` without the [N, V] logits.

Tokens are processed in chunks. Per chunk: ``logits = h_chunk @ W^T (+ b)`` by torch's matmul into one reused
buffer, the cross-entropy kernel (``triformer.cross_entropy``) turns that buffer into d(loss)/d(logits) in
place, then ``grad_h_chunk = g @ W`` and ``grad_W += g^T @ h_chunk`` (and ``grad_b += sum(g)``). So for
``reduction`` "mean"/"sum" every gradient exists when the forward returns, and backward only multiplies them
by ``grad_output`` in place (skipped when it is exactly 1, see ``triformer.cross_entropy``). Nothing in the
loop waits on the device: no host-device sync.

Memory: one logits buffer of at most ``CHUNK_BYTES`` (256 MiB) plus O(N) floats, above the inputs and their
gradients. Chunks are a multiple of 128 rows where the budget allows (whole matmul tiles). Why that budget:
every chunk reads and writes the whole ``grad_W`` accumulator once (V x H, 4 bytes a value for fp32 master
weights), while its matmuls do 6 x rows x V x H flops, so the accumulator's share of the time falls like
1 / rows whatever V and H are: at a card's ratio of matmul rate to bandwidth (~160 FLOP/byte on an H200) about
200 / rows for an fp32 accumulator. 256 MiB gives 1024-row chunks for a Llama-3 vocabulary (128256), where a
quarter of that let the accumulator dominate the step, and ~2600 rows for GPT-2's 50257.

Alignment: GEMM kernels with 16-byte vector or TMA accesses need every operand's leading dimension *and*
contiguous extent to be a multiple of 16 bytes (CUTLASS checks both; cuBLAS falls back to slower kernels).
With an odd vocabulary (GPT-2's 50257) each of the three matmuls has an operand whose contiguous extent is V
-- logits (N = V), g (K = V), g^T (M = V) -- and with one matmul over the whole vocabulary this op ran at a
fraction of the card's matmul rate, like eager PyTorch. So the buffer's rows are padded to a multiple of 64 elements, and
the vocabulary is split: its first ``V - V % 8`` rows go through aligned matmuls per chunk, the last few (< 8)
through three matmuls over all N tokens at once (their [N, < 8] logits and gradients are copied into and out of
each chunk's buffer), with no copy of the weight: three tiny matmuls per chunk would cost more host time than
their GPU work (``benchmarks/linear_cross_entropy.py --profile`` shows both).

Precision: the matmuls run in the hidden state's dtype (the activation dtype; a weight of another dtype,
e.g. fp32 master weights under autocast, is cast once per call -- a V x H copy outside the budget) with fp32
accumulation inside each matmul, like eager; logits and their gradient are rounded to that dtype, like
eager; the cross-entropy itself is computed in fp32. ``grad_W`` is accumulated across chunks with
``addmm_`` in the weight's dtype (an fp32 accumulator would cost 4*V*H bytes, 154 MB for GPT-2, over
the budget), so a bf16 ``grad_W`` is rounded once per chunk instead of once: its error grows like
sqrt(number of chunks), so the chunk budget keeps the count low (a handful for GPT-2 at 16k tokens). Fewer,
larger chunks (``chunk_rows``) trade memory for accuracy. A weight of a wider dtype
than the activations (fp32 master weights) gets its ``grad_W`` summed in that dtype: on CUDA by cuBLAS itself
(``addmm`` with ``out_dtype``: the bf16 product is added to the fp32 accumulator in the matmul's epilogue, no
V x H temporary), elsewhere through a temporary product. ``grad_b`` is summed in fp32.

``reduction="none"`` cannot precompute gradients (they depend on the per-token ``grad_output``): its forward
computes only the losses, and its backward sweeps the chunks again with the per-token scale (4 matmuls instead
of 3). ``z_loss`` adds ``z_loss * logsumexp(logits)^2`` per counted token (averaged like the rest under
"mean"). Ignored tokens (``ignore_index``) contribute no loss and no gradient; "mean" divides by the count
of the others, and returns 0 when there are none.

A weight tied to the token embedding works as usual: the gradient returned here is added by autograd to the
embedding's.
"""
from __future__ import annotations


import torch
import triton

from triformer import _runtime
from triformer._double_backward import double_backward_unsupported, needs_graph, reference_grads
# Built on cross_entropy's kernels: its launcher, its in-place backward op and its argument checks (public names).
from triformer.cross_entropy import (check_loss_args, check_num_classes, check_targets, check_targets_tensor,
                                     cross_entropy_bwd, launch_cross_entropy, loss_total, mean_scale,
                                     reference_loss)

__all__ = ["LinearCrossEntropyFunction", "LinearCrossEntropyLoss", "linear_cross_entropy",
           "linear_cross_entropy_reference"]

# Budget for the per-chunk logits buffer, the op's only large temporary.
CHUNK_BYTES = 256 << 20
# Logits rows are padded to this many elements (128 bytes in bf16) for aligned matmul leading dimensions.
ROW_ALIGN = 64
# The aligned part of the vocabulary is a multiple of this many rows (16 bytes of bf16; see the docstring).
VOCAB_ALIGN = 8
# Chunks are a multiple of this many rows when the budget holds that many: the matmuls' M (or K) fills whole tiles.
CHUNK_ROW_ALIGN = 128


def _chunk_rows(n_rows: int, n_cols: int, itemsize: int) -> int:
    """Rows per chunk: the fewest chunks the budget allows, aligned rows, and as even as alignment leaves them."""
    fit = max(1, CHUNK_BYTES // (triton.cdiv(n_cols, ROW_ALIGN) * ROW_ALIGN * itemsize))
    if fit >= n_rows:
        return max(n_rows, 1)
    step = CHUNK_ROW_ALIGN if fit >= CHUNK_ROW_ALIGN else 1
    fit -= fit % step
    return triton.cdiv(triton.cdiv(n_rows, triton.cdiv(n_rows, fit)), step) * step


def _vocab_split(n_cols: int) -> int:
    """Rows of the weight in the aligned bulk of the vocabulary; the rest (fewer than VOCAB_ALIGN) is the tail."""
    return n_cols - n_cols % VOCAB_ALIGN


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``out = a @ b`` when ``first``, else ``out += a @ b``; an ``out`` of a wider dtype (fp32 master weights,
    zero-initialized) takes the product computed in ``a``'s dtype and always sums it."""
    if out.dtype != a.dtype:
        if (out.is_cuda and out.dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16)
                and not _runtime.is_fake(out)):
            # cuBLAS adds the half-precision product into the fp32 ``out`` (beta = 1): one read and one write
            # of ``out``, where ``out += a @ b`` also wrote and read back a V x H product, which dominated a
            # Llama-sized step (``benchmarks/patch_llama.py``). Not on fake
            # tensors (this body is the op's shape rule under torch.compile): torch 2.11 has no fake rule for
            # ``addmm(out_dtype=)`` and its generic decomposition takes the dtype for ``beta``.
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            out += a @ b
    elif first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


def _sweep(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None,
           ignore_index: int, label_smoothing: float, z_loss: float, scale: torch.Tensor | None,
           loss_rows: torch.Tensor, need_h: bool, need_w: bool, need_b: bool, chunk_rows: int, num_classes: int):
    """One pass over token chunks of ``hidden[N, H]``: fp32 losses into ``loss_rows``, and the requested
    gradients of sum(loss * scale) (``scale`` one value, one per token, or None for 1). The first
    ``num_classes`` rows of ``weight`` are classes, the rest padding: their logits are computed with the others
    (whole aligned matmuls) but stay out of the loss, and their gradient is 0."""
    n_rows, n_hidden = hidden.shape
    n_cols = weight.shape[0]
    dtype = hidden.dtype
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    any_grad = need_h or need_w or need_b
    grad_h = torch.empty(n_rows, n_hidden, dtype=dtype, device=hidden.device) if need_h else None
    # the first chunk's product initializes grad_W (no memset, no read of zeros) unless nothing will write it
    zero_w = n_rows == 0 or weight.dtype != dtype
    grad_w = ((torch.zeros if zero_w else torch.empty)(weight.shape, dtype=weight.dtype, device=weight.device)
              if need_w else None)
    grad_b = torch.zeros(n_cols, dtype=torch.float32, device=hidden.device) if need_b else None
    if _runtime.shapes_only():  # the op's shape rule: the outputs exist, the chunk loop only fills them
        return grad_h, grad_w, grad_b.to(bias.dtype) if grad_b is not None else None
    rows = chunk_rows or _chunk_rows(n_rows, n_cols, dtype.itemsize)
    padded = triton.cdiv(n_cols, ROW_ALIGN) * ROW_ALIGN
    buf = torch.empty(min(rows, n_rows), padded, dtype=dtype, device=hidden.device)[:, :n_cols]
    split = _vocab_split(n_cols)
    # the loop enqueues several kernels per chunk, so the views it needs are made once where they can be
    w_bulk, b_bulk = w[:split], (b[:split] if b is not None else None)
    w_bulk_t = w_bulk.t()
    grad_w_bulk = grad_w[:split] if need_w else None
    tail = split < n_cols
    if tail:  # [N, V - split] logits of all tokens at once, and their gradients gathered chunk by chunk
        w_tail = w[split:]
        tail_logits = (torch.mm(hidden, w_tail.t()) if b is None else torch.addmm(b[split:], hidden, w_tail.t()))
        tail_grad = torch.empty_like(tail_logits) if need_h or need_w else None
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        h = hidden[start:stop]
        logits = buf[: stop - start]
        bulk = logits[:, :split]
        if split:
            if b_bulk is None:
                torch.mm(h, w_bulk_t, out=bulk)
            else:
                torch.addmm(b_bulk, h, w_bulk_t, out=bulk)
        if tail:
            logits[:, split:].copy_(tail_logits[start:stop])
        row_scale = scale if scale is None or scale.numel() == 1 else scale[start:stop]
        classes3 = logits[:, :num_classes].unsqueeze(0)
        # the padding's gradient (columns num_classes and up) is 0, written by the same launch
        launch_cross_entropy(classes3, targets[start:stop], loss_rows[start:stop], classes3 if any_grad else None,
                             row_scale, ignore_index, label_smoothing, z_loss, grad_buffer=logits)
        if split:
            if need_h:
                _mm_into(grad_h[start:stop], bulk, w_bulk, first=True)
            if need_w:
                _mm_into(grad_w_bulk, bulk.t(), h, first=start == 0)
        if tail and tail_grad is not None:
            tail_grad[start:stop].copy_(logits[:, split:])
        if need_b:
            grad_b += logits.sum(0, dtype=torch.float32)
    if tail and tail_grad is not None:
        if need_h:
            _mm_into(grad_h, tail_grad, w_tail, first=split == 0)
        if need_w:
            _mm_into(grad_w[split:], tail_grad.t(), hidden, first=True)
    return grad_h, grad_w, grad_b.to(bias.dtype) if grad_b is not None else None


def _empty(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(0)


# Opaque to Inductor: the sweep's point is its memory plan (one chunk buffer reused in place by the matmuls and the
# cross-entropy kernel, gradients written into preallocated outputs), which functionalization would turn into
# copies; and the matmuls inside are already cuBLAS calls that Inductor would not fuse.
@_runtime.kernel_op("triformer::linear_cross_entropy_fwd", mutates_args=(), opaque=True)
def _linear_cross_entropy_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              bias: torch.Tensor | None, ignore_index: int, label_smoothing: float, z_loss: float,
                              reduction: str, need_h: bool, need_w: bool, need_b: bool, chunk_rows: int,
                              num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias) for an upstream gradient of 1; empty where not requested.
    ``hidden`` is [N, H], ``targets`` [N]; "none" gives the [N] losses."""
    check_targets(targets, num_classes, ignore_index)
    loss_rows = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    scale = mean_scale(targets, ignore_index) if reduction == "mean" else None
    grads = _sweep(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, scale, loss_rows,
                   need_h, need_w, need_b, chunk_rows, num_classes)
    loss = loss_rows.to(hidden.dtype) if reduction == "none" else loss_total(loss_rows, scale, hidden.dtype)
    return (loss, *(g if g is not None else _empty(hidden) for g in grads))


@_runtime.kernel_op("triformer::linear_cross_entropy_bwd", mutates_args=(), opaque=True)
def _linear_cross_entropy_bwd(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                              targets: torch.Tensor, bias: torch.Tensor | None, ignore_index: int,
                              label_smoothing: float, z_loss: float, need_h: bool, need_w: bool, need_b: bool,
                              chunk_rows: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for reduction "none": sweep the chunks again, each token's gradient scaled by grad_loss[N]."""
    loss_rows = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    grads = _sweep(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, grad_loss, loss_rows,
                   need_h, need_w, need_b, chunk_rows, num_classes)
    return tuple(g if g is not None else _empty(hidden) for g in grads)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """mean/sum: forward computes and saves the gradients, backward scales them in place by grad_output.
    none: forward computes the losses, backward recomputes the chunks with per-token scales."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, z_loss, chunk_rows,
                num_classes, need_h, need_w, need_b):
        hidden2 = hidden.reshape(-1, hidden.shape[-1])
        targets1 = targets.reshape(-1)
        deferred = reduction == "none"
        loss, grad_h, grad_w, grad_b = _linear_cross_entropy_fwd(
            hidden2, weight, targets1, bias, ignore_index, label_smoothing, z_loss, reduction,
            need_h and not deferred, need_w and not deferred, need_b and not deferred, chunk_rows, num_classes)
        ctx.deferred = deferred
        ctx.hidden_shape = hidden.shape
        ctx.needs = (need_h, need_w, need_b)
        ctx.args = (ignore_index, label_smoothing, z_loss, chunk_rows, num_classes)
        if deferred:
            # hidden too (the input; hidden2 is its reshape, a view when contiguous): double backward differentiates it
            ctx.save_for_backward(hidden2, weight, targets1, bias, hidden)
            return loss.view(targets.shape)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        need_h, need_w, need_b = ctx.needs
        if torch.is_grad_enabled():  # create_graph=True (triformer._double_backward)
            if not ctx.deferred:
                raise double_backward_unsupported(
                    "linear_cross_entropy",
                    "with reduction 'mean' or 'sum' its forward computes the first-order gradients and keeps neither "
                    "the hidden states nor the logits",
                    "use reduction='none' and reduce the per-token losses yourself (its backward recomputes, and can "
                    "be differentiated again), or triformer.linear_cross_entropy_reference")
            hidden2, weight, targets1, bias, hidden = ctx.saved_tensors
            if needs_graph(grad_loss, hidden, weight, bias):
                ignore_index, label_smoothing, z_loss, _, num_classes = ctx.args
                grad_h, grad_w, grad_b = reference_grads(
                    lambda h, w, b: linear_cross_entropy_reference(h.reshape(-1, h.shape[-1]), w, targets1, b,
                                                                   ignore_index, "none", label_smoothing, z_loss,
                                                                   num_classes=num_classes),
                    (hidden, weight, bias), (grad_loss.reshape(-1),), ctx.needs)
                return grad_h, grad_w, None, grad_b, *(None,) * 9
        if ctx.deferred:
            hidden2, weight, targets1, bias, _ = ctx.saved_tensors
            ignore_index, label_smoothing, z_loss, chunk_rows, num_classes = ctx.args
            grads = _linear_cross_entropy_bwd(
                grad_loss.reshape(-1), hidden2, weight, targets1, bias, ignore_index, label_smoothing, z_loss,
                need_h, need_w, need_b, chunk_rows, num_classes)
        elif torch.compiler.is_compiling():
            # Traced, the scale is a new tensor: Inductor folds it into the kernel that consumes the gradient
            # (the tied embedding's gradient sum), where an in-place scale of the forward's outputs would make
            # the backward graph mutate its inputs and return one of them as a parameter's gradient
            grads = tuple((g.float() * grad_loss.float()).to(g.dtype) if needed else g
                          for g, needed in zip(ctx.saved_tensors, ctx.needs))
        else:
            # a second backward through this graph fails in this unpack (the in-place scale below bumped the
            # saved tensors' versions) instead of scaling twice
            grads = ctx.saved_tensors
            for g, needed in zip(grads, ctx.needs):
                if needed:
                    cross_entropy_bwd(g, grad_loss)
        grad_h, grad_w, grad_b = (g if needed else None for g, needed in zip(grads, ctx.needs))
        if grad_h is not None:
            grad_h = grad_h.view(ctx.hidden_shape)
        return grad_h, grad_w, None, grad_b, *(None,) * 9


def _check_args(hidden, weight, targets, bias, z_loss, chunk_rows) -> None:
    _runtime.check_float("hidden", hidden)
    _runtime.check_float("weight", weight)
    if bias is not None:
        _runtime.check_float("bias", bias)
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a scalar")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape [V, H] with V >= 1 and H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) (weight.shape[0]), got {tuple(bias.shape)}")
    check_targets_tensor(targets, hidden.shape[:-1], "hidden.shape[:-1]")
    _runtime.check_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)):
        raise TypeError(f"z_loss must be a float, got {type(z_loss).__name__}")
    if not (_runtime.is_finite(z_loss) and z_loss >= 0):
        raise ValueError(f"z_loss must be finite and >= 0, got {z_loss}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be None or a positive int, got {chunk_rows!r}")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0, *,
                         chunk_rows: int | None = None, num_classes: int | None = None) -> torch.Tensor:
    """Cross-entropy of ``hidden[..., H] @ weight[V, H]^T (+ bias[V])`` against ``targets[...]`` (int64/int32).

    Same loss semantics as ``triformer.cross_entropy`` (plus ``z_loss``), in the hidden state's dtype. The
    [N, V] logits are never materialized: see the module docstring for the chunking, the memory bound and
    the precision of each gradient. ``chunk_rows`` overrides the tokens per chunk (default: as many as
    ``CHUNK_BYTES`` of logits hold): a size, where ``cross_entropy``'s ``n_chunks`` (the trainer's ``ce_chunks``)
    is a count of launches. ``num_classes`` (default V): only the first ``num_classes`` rows of ``weight`` (and
    ``bias``) are classes; the rest are padding (an LM head padded to a multiple of 64), outside the softmax,
    with gradient 0. Passing the padded weight this way keeps every matmul aligned, where a ``weight[:V]`` slice
    of an odd V needs the tail matmuls of the module docstring and a copy of its gradient into the padded one.
    """
    _check_args(hidden, weight, targets, bias, z_loss, chunk_rows)
    check_loss_args(ignore_index, reduction, label_smoothing)
    num_classes = check_num_classes(num_classes, weight.shape[0])
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, bias, ignore_index, reduction,
                                            float(label_smoothing), float(z_loss), chunk_rows or 0, num_classes,
                                            *needs)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   bias: torch.Tensor | None = None, ignore_index: int = -100,
                                   reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0, *,
                                   chunk_rows: int | None = None, num_classes: int | None = None) -> torch.Tensor:
    """Plain PyTorch with the full logits (``chunk_rows`` has no effect here)."""
    check_loss_args(ignore_index, reduction, label_smoothing)
    num_classes = check_num_classes(num_classes, weight.shape[0])
    logits = torch.nn.functional.linear(hidden, weight[:num_classes].to(hidden.dtype),
                                        bias[:num_classes].to(hidden.dtype) if bias is not None else None)
    return reference_loss(logits, targets, ignore_index, reduction, float(label_smoothing), float(z_loss))


class LinearCrossEntropyLoss(torch.nn.Module):
    """``loss = LinearCrossEntropyLoss()(hidden[..., H], weight[V, H], targets[...], bias=None)``, e.g. with the
    LM head's (or the tied embedding's) weight."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, chunk_rows: int | None = None, num_classes: int | None = None):
        super().__init__()
        check_loss_args(ignore_index, reduction, label_smoothing)
        check_num_classes(num_classes, None)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = float(label_smoothing)
        self.z_loss = float(z_loss)
        self.chunk_rows = chunk_rows
        self.num_classes = num_classes

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear_cross_entropy(hidden, weight, targets, bias, self.ignore_index, self.reduction,
                                    self.label_smoothing, self.z_loss, chunk_rows=self.chunk_rows,
                                    num_classes=self.num_classes)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing="
                f"{self.label_smoothing}, z_loss={self.z_loss}, chunk_rows={self.chunk_rows}, "
                f"num_classes={self.num_classes}")
