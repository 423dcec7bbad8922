"""Which tensors torch.compile believes each op's kernels write, without a GPU.

Run as ``python -m tests.helpers.kernel_writes`` (tests/test_compile.py does, in a fresh process). On a GPU every
op is a ``torch.library.triton_op`` and Inductor sees its kernels through ``wrap_triton``, whose analysis of a
kernel's Triton IR decides which arguments the kernel writes. An argument it believes written that is one of the
op's inputs (and not declared in ``mutates_args``) is functionalized into a copy written back into that input:
when the input is a graph input (the batch's targets, a saved tensor), Inductor skips the graph's CUDA graph in
``mode="reduce-overhead"``. The analysis is conservative (a called ``@triton.jit`` helper's result depends on all
of its arguments), so a kernel can look as if it wrote what it only reads.

A written argument that is a view of a buffer the op made (a slice of a padded gradient, one of three parts
of a packed one) is functionalized into a write into a copy of the view and a copy of the whole buffer back (a
``slice_scatter``/``select_scatter`` each time): the compiled GPT-2 step paid several passes over its logits-sized
gradient and its packed q/k/v gradients that way. Kernels are handed whole buffers, with offsets and strides.

Here the op bodies run on CPU tensors in compile mode (TRIFORMER_INTERPRET=0) with launches recorded instead of
run, each kernel's IR is generated for sm_90 and analyzed by torch's own function; the output is one JSON line
per op: the kernel arguments believed written that alias an input of the op it does not declare mutated, or that
are views of part of a buffer.
"""
from __future__ import annotations

import importlib
import json
import os

os.environ["TRIFORMER_INTERPRET"] = "0"  # compile mode: real JITFunctions, nothing launched
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triformer  # noqa: E402,F401  (before triton)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from triformer import _runtime  # noqa: E402


class _Sm90Driver:
    """Enough of a driver for generating Triton IR for an H100/H200 on a machine without one."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def _kernel_args(kernel, args, kwargs):
    """(JITFunction, its arguments by name) of a recorded launch; an autotuner's first config fills its block sizes."""
    extra = {}
    while not isinstance(kernel, triton.JITFunction):  # Autotuner / Heuristics wrap the JITFunction as .fn
        if hasattr(kernel, "configs"):
            extra.update(kernel.configs[0].kwargs)
        kernel = kernel.fn
    named = dict(zip(kernel.arg_names, args))
    named.update({k: v for k, v in {**extra, **kwargs}.items() if k in kernel.arg_names})
    return kernel, named


def _written(kernel, named) -> list[str]:
    import torch._higher_order_ops.triton_kernel_wrap as tkw

    if not hasattr(tkw, "analyze_kernel_access"):  # torch < 2.13 names it differently; same analysis
        return sorted(tkw.identify_mutated_tensors(kernel, dict(named), {}))
    ttir, names = tkw.generate_ttir(kernel, dict(named), {})
    functions = tkw.ttir_to_functions(ttir)
    tkw.analyze_kernel_access.reset()
    tensors = frozenset(i for i, n in enumerate(names) if isinstance(named.get(n), torch.Tensor))
    accesses = tkw.analyze_kernel_access(functions, next(iter(functions)), len(names), tuple(names), tensors)
    return sorted(d.name for d in accesses.read_writes.writes)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def check(name: str, op, inputs: dict, mutates=()) -> dict:
    """Run ``op``'s body on ``inputs`` (keyword arguments) recording its launches; the written kernel arguments that
    alias an input the op does not declare mutated, or that are views of a buffer the op made."""
    launches = []
    _runtime.launch = lambda kernel, grid: (lambda *a, **kw: launches.append((kernel, a, kw)))
    op.__wrapped__(**inputs)
    wrong = []
    for kernel, args, kwargs in launches:
        fn, named = _kernel_args(kernel, args, kwargs)
        for arg in _written(fn, named):
            aliased = [input_name for input_name, value in inputs.items()
                       if isinstance(value, torch.Tensor) and value.numel() and _same_memory(named[arg], value)]
            wrong += [f"{fn.__name__}.{arg} aliases input {input_name}" for input_name in aliased
                      if input_name not in mutates]
            view_of = getattr(named[arg], "_base", None)  # a reshape of a whole buffer is the buffer's own write
            if not aliased and view_of is not None and named[arg].numel() < view_of.numel():
                wrong.append(f"{fn.__name__}.{arg} is a view of part of a buffer")
    return {"op": name, "launches": len(launches), "wrongly_written": wrong}


def cases():
    """One call of every op that torch.compile traces into on a GPU, small CPU tensors (bf16 where the models run)."""
    g = torch.Generator().manual_seed(0)

    def t(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype)

    mod = {n: importlib.import_module(f"triformer.{n}") for n in (
        "attention", "cross_entropy", "dropout", "fused_add_norm", "gelu", "layernorm", "rmsnorm", "rope",
        "softmax", "swiglu")}
    B, H, T, D, C, V = 2, 4, 64, 64, 96, 1000
    q, k, v = t(B, H, T, D), t(B, H, T, D), t(B, H, T, D)
    seed = torch.tensor(7, dtype=torch.int64)
    # what the backward ops take from their forward: only shapes and dtypes matter here (nothing runs)
    out, lse = t(B, H, T, D), t(B, H, T, dtype=torch.float32)
    x, r, w, b = t(B * T, C), t(B * T, C), t(C, dtype=torch.float32), t(C, dtype=torch.float32)
    logits, targets = t(B * T, V), torch.randint(0, V, (B * T,), generator=g)
    mean, rstd, rms_rstd = (t(B * T, dtype=torch.float32) for _ in range(3))
    cos, sin = triformer.rope_cos_sin(T, D)
    y = t(B, H, T, T)
    return [
        ("attention_fwd", mod["attention"]._attention_fwd, dict(q=q, k=k, v=v, attn_mask=None, key_padding_mask=None,
                                                              seed=seed, is_causal=True, dropout_p=0.1, scale=D ** -0.5)),
        ("attention_bwd", mod["attention"]._attention_bwd, dict(grad_out=t(B, H, T, D), q=q, k=k, v=v, out=out, lse=lse,
                                                              attn_mask=None, key_padding_mask=None, seed=seed,
                                                              is_causal=True, dropout_p=0.1, scale=D ** -0.5)),
        # the models' layout: q, k, v read from one fused projection, their gradients written into one buffer
        ("attention_bwd_packed", mod["attention"]._attention_bwd_packed,
         dict(grad_out=t(B, H, T, D), qkv=t(B, T, 3 * H * D), out=out, lse=lse, seed=None, n_head=H, n_kv_head=H,
              is_causal=True, dropout_p=0.0, scale=D ** -0.5)),
        # the sliding-window variants (HAS_WINDOW), whose loops start at the window's first block
        ("attention_fwd_window", mod["attention"]._attention_fwd,
         dict(q=q, k=k, v=v, attn_mask=None, key_padding_mask=None, seed=None, is_causal=True, dropout_p=0.0,
              scale=D ** -0.5, window=16)),
        ("attention_bwd_window", mod["attention"]._attention_bwd,
         dict(grad_out=t(B, H, T, D), q=q, k=k, v=v, out=out, lse=lse, attn_mask=None, key_padding_mask=None,
              seed=None, is_causal=True, dropout_p=0.0, scale=D ** -0.5, window=16)),
        ("cross_entropy_fwd", mod["cross_entropy"]._cross_entropy_fwd,
         dict(logits=logits, targets=targets, ignore_index=-100, label_smoothing=0.1, reduction="mean", n_chunks=1,
              compute_grad=True, num_classes=V)),
        # few long rows: the split launch (statistics per column range, then a combining pass)
        ("cross_entropy_fwd_split", mod["cross_entropy"]._cross_entropy_fwd,
         dict(logits=t(8, 65536), targets=torch.randint(0, 65536, (8,), generator=g), ignore_index=-100,
              label_smoothing=0.1, reduction="mean", n_chunks=1, compute_grad=True, num_classes=65536)),
        # the LM head's padded rows: the gradient of the padding columns is written too
        ("cross_entropy_fwd_padded", mod["cross_entropy"]._cross_entropy_fwd,
         dict(logits=t(B * T, 1024), targets=targets, ignore_index=-100, label_smoothing=0.0, reduction="mean",
              n_chunks=1, compute_grad=True, num_classes=V)),
        ("cross_entropy_fwd_inplace", mod["cross_entropy"]._cross_entropy_fwd_inplace,
         dict(logits=logits.clone(), targets=targets, ignore_index=-100, label_smoothing=0.0, reduction="mean",
              n_chunks=1, num_classes=V), ("logits",)),
        # the compiled path, on the LM head's padded rows: statistics in the forward, the gradient in the backward
        ("cross_entropy_fwd_stats", mod["cross_entropy"]._cross_entropy_fwd_stats,
         dict(logits=t(B * T, 1024), targets=targets, ignore_index=-100, label_smoothing=0.1, reduction="mean",
              n_chunks=1, num_classes=V)),
        ("cross_entropy_fwd_stats_split", mod["cross_entropy"]._cross_entropy_fwd_stats,
         dict(logits=t(8, 65536), targets=torch.randint(0, 65536, (8,), generator=g), ignore_index=-100,
              label_smoothing=0.0, reduction="sum", n_chunks=1, num_classes=65536)),
        ("cross_entropy_grad", mod["cross_entropy"]._cross_entropy_grad,
         dict(logits=t(B * T, 1024), targets=targets, stats=t(3, B * T, dtype=torch.float32),
              grad_output=torch.rand(()), ignore_index=-100, label_smoothing=0.1, reduction="mean",
              num_classes=V)),
        ("cross_entropy_bwd", mod["cross_entropy"].cross_entropy_bwd,
         dict(grad=logits.clone(), grad_output=torch.rand(B * T)), ("grad",)),
        ("dropout", mod["dropout"]._dropout_op, dict(x=x, seed=seed, p=0.1)),
        ("add_layer_norm_fwd", mod["fused_add_norm"].add_layer_norm_fwd,
         dict(x=x, residual=r, weight=w, bias=b, eps=1e-5, seed=None, dropout_p=0.0)),
        ("add_rms_norm_fwd", mod["fused_add_norm"].add_rms_norm_fwd,
         dict(x=x, residual=r, weight=w, eps=1e-6, seed=None, dropout_p=0.0)),
        # with dropout on x: the kernels read the seed tensor, and the backward writes x's gradient as well
        ("add_layer_norm_fwd_dropout", mod["fused_add_norm"].add_layer_norm_fwd,
         dict(x=x, residual=r, weight=w, bias=b, eps=1e-5, seed=seed, dropout_p=0.1)),
        ("add_rms_norm_fwd_dropout", mod["fused_add_norm"].add_rms_norm_fwd,
         dict(x=x, residual=r, weight=w, eps=1e-6, seed=seed, dropout_p=0.1)),
        ("add_layer_norm_bwd", mod["fused_add_norm"].add_layer_norm_bwd,
         dict(dy=t(B * T, C), s=x, weight=w, bias=b, mean=mean, rstd=rstd, ds=t(B * T, C), seed=seed, dropout_p=0.1)),
        ("add_rms_norm_bwd", mod["fused_add_norm"].add_rms_norm_bwd,
         dict(dy=t(B * T, C), s=x, weight=w, rstd=rms_rstd, ds=t(B * T, C), seed=seed, dropout_p=0.1)),
        ("gelu_fwd", mod["gelu"].gelu_fwd, dict(x=x, bias=b, approximate="tanh")),
        ("gelu_bwd", mod["gelu"].gelu_bwd, dict(dy=t(B * T, C), x=x, bias=b, approximate="tanh")),
        ("gelu_bwd_and_output", mod["gelu"].gelu_bwd_and_output, dict(dy=t(B * T, C), x=x, bias=b,
                                                                     approximate="tanh")),
        ("layer_norm_fwd", mod["layernorm"].layer_norm_fwd, dict(x=x, weight=w, bias=b, eps=1e-5)),
        ("layer_norm_bwd", mod["layernorm"].layer_norm_bwd, dict(dy=t(B * T, C), x=x, weight=w, bias=b, mean=mean,
                                                                 rstd=rstd, dres=t(B * T, C))),
        ("rms_norm_fwd", mod["rmsnorm"].rms_norm_fwd, dict(x=x, weight=w, eps=1e-6)),
        ("rms_norm_bwd", mod["rmsnorm"].rms_norm_bwd, dict(dy=t(B * T, C), x=x, weight=w, rstd=rms_rstd,
                                                                                 dres=t(B * T, C))),
        ("rope_rotate", mod["rope"].rope_rotate, dict(x=q, cos=cos, sin=sin, position_offset=0,
                                                                 inverse=False)),
        ("softmax_fwd", mod["softmax"]._softmax_fwd, dict(x=t(B, H, T, T), is_causal=True, scale=0.125)),
        ("softmax_bwd", mod["softmax"]._softmax_bwd, dict(y=y, dy=t(B, H, T, T), is_causal=True, scale=0.125)),
        ("glu_fwd", mod["swiglu"].glu_fwd, dict(gate=x, up=r, activation="silu")),
        ("glu_bwd", mod["swiglu"].glu_bwd, dict(dy=t(B * T, C), gate=x, up=r, activation="silu")),
    ]


def main() -> None:
    triton.runtime.driver.set_active(_Sm90Driver())
    _runtime.multiprocessors = lambda device_index: 132  # an H100/H200's count: some launch plans depend on it
    torch.cuda.current_device = lambda: 0
    for name in ("softmax",):  # bodies that check the device themselves (here the tensors are on the CPU)
        importlib.import_module(f"triformer.{name}").check_device = lambda **tensors: None
    for case in cases():
        name, op, inputs = case[:3]
        try:
            print(json.dumps(check(name, op, inputs, case[3] if len(case) > 3 else ())), flush=True)
        except Exception as exc:  # reported per op: one broken case must not hide the others
            print(json.dumps({"op": name, "error": f"{type(exc).__name__}: {exc}"[:400]}), flush=True)


if __name__ == "__main__":
    main()
