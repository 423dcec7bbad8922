"""The bandwidth table (GPU): every memory-bound op, forward and backward separately, at the shapes of the models
people train, against PyTorch eager, torch.compile and Liger-Kernel, as a share of the copy bandwidth measured in
the same run. ``python -m benchmarks.bandwidth [--fp32]``: bf16 into ``bandwidth``, or float32 into
``bandwidth_fp32``. Without a GPU it builds and runs small cases (a smoke test).

Every provider is timed as a CUDA-graph replay (``benchmarks.common.cuda_graphed``): the GPU's time alone, which is
what a compiled or graph-captured training step pays, and what bandwidth is about; the per-op benchmarks
(``benchmarks/<op>.py``) time the eager calls, host included. bytes_moved is the fewest bytes a mode must move:
each input read once and each output written once (parameters and per-row statistics left out, under 1% here).
Rows are tokens: 16384 (16 x 1024, GPT-2 small's training batch; 16 x 1024 for Llama-1B/8B widths too) and
25216 (128 images x 197 tokens, ViT-B/16). Writes ``bandwidth.csv``/``.md`` and ``bandwidth.png`` (the README's
picture: triformer's share of copy bandwidth next to the best peer's, per op and mode).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import triformer  # noqa: F401  (chooses compiled kernels vs the interpreter first)
from benchmarks.common import Case, cuda_graphed, flag, liger_import, main, mode_cases, out_dir
from triformer.cross_entropy import cross_entropy
from triformer.dropout import dropout
from triformer.fused_add_norm import add_layer_norm, add_rms_norm
from triformer.gelu import gelu, gelu_reference
from triformer.layernorm import layer_norm
from triformer.rmsnorm import rms_norm
from triformer.rope import apply_rope, apply_rope_reference, rope_cos_sin
from triformer.softmax import softmax
from triformer.swiglu import swiglu, swiglu_reference

# (label, rows, hidden, head_dim): which model's activations each width stands for
WIDTHS = [("GPT-2", 16384, 768, 64), ("ViT-B/16", 25216, 768, 64), ("Llama-1B", 16384, 2048, 64),
          ("Llama-8B", 16384, 4096, 128)]
VOCABS = [("GPT-2", 16384, 50257), ("Llama-3", 8192, 128256)]  # cross-entropy: (label, rows, vocabulary)
MODES = ("fwd", "bwd")


def liger_peers() -> dict:
    """Liger-Kernel's counterparts, by op name, when it is installed."""
    def load():
        from liger_kernel.ops.softmax import LigerSoftmaxFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerLayerNorm, LigerRMSNorm
        return {"layer_norm": LigerLayerNorm, "rms_norm": LigerRMSNorm, "softmax": LigerSoftmaxFunction.apply,
                "swiglu": LigerSiLUMulFunction.apply, "cross_entropy": LigerCrossEntropyLoss()}
    return liger_import(load) or {}


def graphed_cases(op, shape, dtype, fns, inputs, passes, unit_bytes, modes=MODES) -> list[Case]:
    every_mode = {mode: passes.get(mode, 0) for mode in ("fwd", "bwd", "fwd+bwd")}
    cases = [c for c in mode_cases(op, shape, dtype, fns, inputs, passes=every_mode, unit_bytes=unit_bytes)
             if c.mode in modes]
    for case in cases:
        case.providers = {name: cuda_graphed(fn) for name, fn in case.providers.items()}
    return cases


def peers(ours, eager, liger=None) -> dict:
    fns = {"triformer": ours, "eager": eager, "compile": torch.compile(eager, dynamic=False)}
    if liger is not None:
        fns["liger"] = liger
    return fns


def width_cases(label, rows, hidden, head_dim, dtype, device, liger) -> list[Case]:
    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    shape = f"{label} {rows}x{hidden}"
    unit = rows * hidden * dtype.itemsize
    x, r, w, b = rand(rows, hidden), rand(rows, hidden), rand(hidden), rand(hidden)
    cases = []

    def liger_module(cls):  # a Liger norm module holds its own parameters: differentiate those
        if cls is None:
            return None
        module = cls(hidden).to(device=device, dtype=dtype)
        return (lambda x, *_: module(x), [x, *module.parameters()])

    cases += graphed_cases("layer_norm", shape, dtype, peers(
        layer_norm, lambda x, w, b: F.layer_norm(x, (hidden,), w, b), liger_module(liger.get("layer_norm"))),
        [x, w, b], {"fwd": 2, "bwd": 3}, unit)
    cases += graphed_cases("add_layer_norm", shape, dtype, peers(
        add_layer_norm, lambda x, r, w, b: ((x + r), F.layer_norm(x + r, (hidden,), w, b))),
        [x, r, w, b], {"fwd": 4, "bwd": 4}, unit)

    def dropped_add_norm(x, r, w, b):
        s = F.dropout(x, 0.1) + r
        return s, F.layer_norm(s, (hidden,), w, b)
    # dropout on the branch fused in: the same passes, plus the branch's own gradient written in the backward
    cases += graphed_cases("add_layer_norm_dropout0.1", shape, dtype, peers(
        lambda x, r, w, b: add_layer_norm(x, r, w, b, 1e-5, 0.1), dropped_add_norm),
        [x, r, w, b], {"fwd": 4, "bwd": 5}, unit)
    if label.startswith("Llama"):
        cases += graphed_cases("rms_norm", shape, dtype, peers(
            rms_norm, lambda x, w: F.rms_norm(x, (hidden,), w, 1e-6), liger_module(liger.get("rms_norm"))),
            [x, w], {"fwd": 2, "bwd": 3}, unit)
        cases += graphed_cases("add_rms_norm", shape, dtype, peers(
            add_rms_norm, lambda x, r, w: ((x + r), F.rms_norm(x + r, (hidden,), w, 1e-6))),
            [x, r, w], {"fwd": 4, "bwd": 4}, unit)
    cases += graphed_cases("dropout_p0.1", shape, dtype, peers(
        lambda x: dropout(x, 0.1), lambda x: F.dropout(x, 0.1)), [x], {"fwd": 2, "bwd": 2}, unit)
    # the MLP's activation, 4x the width: GELU (GPT-2, ViT) or SwiGLU (Llama)
    wide = rows * 4 * hidden * dtype.itemsize
    if label.startswith("Llama"):
        gate, up = rand(rows, 4 * hidden), rand(rows, 4 * hidden)
        cases += graphed_cases("swiglu", f"{label} {rows}x{4 * hidden}", dtype, peers(
            swiglu, swiglu_reference, liger.get("swiglu")), [gate, up], {"fwd": 3, "bwd": 5}, wide)
    else:
        h = rand(rows, 4 * hidden)
        cases += graphed_cases("gelu_tanh", f"{label} {rows}x{4 * hidden}", dtype, peers(
            lambda h: gelu(h, "tanh"), lambda h: gelu_reference(h, "tanh")), [h], {"fwd": 2, "bwd": 3}, wide)
    # attention-score rows: one row per query, T = 1024 keys (softmax outside a fused attention)
    scores = rand(rows * hidden // 1024, 1024)
    cases += graphed_cases("softmax", f"{label} {scores.shape[0]}x1024", dtype, peers(
        softmax, lambda s: torch.softmax(s, -1), liger.get("softmax")), [scores], {"fwd": 2, "bwd": 3}, unit)
    if label != "ViT-B/16":
        heads, t = hidden // head_dim, 1024
        q, k = rand(rows // t, heads, t, head_dim), rand(rows // t, heads, t, head_dim)
        cos, sin = rope_cos_sin(t, head_dim, device=device)
        cases += graphed_cases("rope", f"{label} {rows // t}x{heads}x{t}x{head_dim}", dtype, peers(
            lambda q, k: apply_rope(q, k, cos, sin), lambda q, k: apply_rope_reference(q, k, cos, sin)),
            [q, k], {"fwd": 4, "bwd": 4}, unit)  # q and k (each a unit) read, both rotations written
    return cases


def vocab_cases(label, rows, vocab, dtype, device, liger) -> list[Case]:
    """Cross-entropy: fwd is the loss alone (one read); fwd+bwd the loss and d(loss)/d(logits) (one read, one
    write): triformer writes the gradient in the forward pass, so it has no separate backward to time."""
    logits = (torch.randn(rows, vocab, device=device, dtype=dtype) * 2).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), device=device)
    targets[::10] = -100
    return graphed_cases("cross_entropy", f"{label} {rows}x{vocab}", dtype, peers(
        cross_entropy, F.cross_entropy, liger.get("cross_entropy")), [logits, targets],
        {"fwd": 1, "fwd+bwd": 2}, rows * vocab * dtype.itemsize, modes=("fwd", "fwd+bwd"))


def build_cases(device: str, dtypes, widths=WIDTHS, vocabs=VOCABS) -> list[Case]:
    torch._dynamo.config.recompile_limit = 256  # the compile peer specializes on every shape and dtype
    liger = liger_peers() if device == "cuda" else {}
    cases = []
    for dtype in dtypes:  # the costliest op of a GPT step first: a run cut short still has it
        for label, rows, vocab in vocabs:
            cases += vocab_cases(label, rows, vocab, dtype, device, liger)
        for label, rows, hidden, head_dim in widths:
            cases += width_cases(label, rows, hidden, head_dim, dtype, device, liger)
    return cases


def plot(rows: list[dict]) -> None:
    """bandwidth.png: per op and mode (bf16, the first shape of each op), triformer's share of copy bandwidth and
    the best peer's."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bf16 = [r for r in rows if r["dtype"] == "bfloat16" and r["pct_copy_bw"] != ""]
    keys = list(dict.fromkeys((r["op"], r["shape"], r["mode"]) for r in bf16))
    labels, ours, best_peer = [], [], []
    for key in keys:
        group = {r["provider"]: r["pct_copy_bw"] for r in bf16 if (r["op"], r["shape"], r["mode"]) == key}
        if "triformer" not in group:
            continue
        labels.append(f"{key[0]} {key[2]} ({key[1].split()[0]})")
        ours.append(group["triformer"])
        best_peer.append(max((v for p, v in group.items() if p != "triformer"), default=0))
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(labels) + 1.2))
    pos = range(len(labels))
    ax.barh([p + 0.2 for p in pos], ours, height=0.4, label="triformer")
    ax.barh([p - 0.2 for p in pos], best_peer, height=0.4, label="best of eager / torch.compile / Liger")
    ax.set_yticks(list(pos), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("% of the copy bandwidth measured in the same run (bf16, CUDA-graph replays)")
    ax.axvline(85, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir() / "bandwidth.png", dpi=120)


if __name__ == "__main__":
    # one dtype per process: not all of the memory of a run's hundreds of CUDA-graph captures comes back between
    # cases, and both dtypes in one process outgrow an 80 GB card. The README's picture is the bf16 table's.
    fp32 = flag("--fp32")
    main("bandwidth_fp32" if fp32 else "bandwidth",
         lambda: build_cases("cuda", (torch.float32,) if fp32 else (torch.bfloat16,)),
         lambda: build_cases("cpu", (torch.float32,), widths=[("tiny", 64, 48, 8)], vocabs=[("tiny", 16, 100)]),
         report=None if fp32 else plot)
