"""What torch.compile's AOT autograd makes of a model's training step on a GPU, on any machine, GPU or not:
``python -m benchmarks.traced_graph [MODEL] [--loss ce|fused] [--write DIR]`` prints, for the forward and the
backward graph, how many times each operator runs (views, kernels and allocations left out) and flags the ones
that move whole buffers behind the kernels' backs: ``slice_scatter`` / ``select_scatter`` / ``as_strided_scatter``
(a kernel that wrote a view of part of a buffer), ``copy_`` (a mutated graph input) and ``clone``.

On a GPU torch.compile traces into every triformer op (``torch.library.triton_op``) and functionalizes its
kernels' writes; those graphs are what Inductor then schedules. Here the model runs on the meta device with
triformer in compile mode (TRIFORMER_INTERPRET=0), as if compiling: each op's body is traced with its kernels as
``triton_kernel_wrapper_functional`` nodes, whose written arguments come from torch's analysis of the kernels'
Triton IR, generated for sm_90. Meta tensors stand in for CUDA ones because the autograd engine of a CPU-only
torch build cannot run on fake CUDA tensors. No Inductor: its reinplacing and fusion come after these graphs.
``--write DIR`` saves both graphs' code.

Found with it (docs/performance_history.md, 2026-12-07): the compiled GPT-2 step's 11 ``slice_scatter`` and 7
``select_scatter`` nodes (gpt2-nano), several passes over the logits-sized gradient and the packed q/k/v
gradients per step that eager never pays.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

os.environ["TRIFORMER_INTERPRET"] = "0"  # compile mode: the ops are triton_ops, traced into
os.environ.pop("TRITON_INTERPRET", None)

import triformer  # noqa: E402,F401  (before triton)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from triformer import _runtime  # noqa: E402

# whole-buffer movement that functionalization adds around the kernels
FLAGGED = ("slice_scatter", "select_scatter", "as_strided_scatter", "copy_", "clone")
# operators that move no data (or are the kernels themselves), left out of the counts
QUIET = ("view", "getitem", "triton_kernel_wrapper", "empty", "transpose", "permute", "expand", "aten.t.",
         "unsqueeze", "squeeze", "reshape", "split", "slice.Tensor", "select.int", "alias", "detach", "unbind")


class _Sm90Driver:
    """Enough of a Triton driver for torch's analysis of a kernel's IR, generated for an H100/H200."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def _as_if_compiling_on_a_gpu() -> None:
    """The few places the op bodies and models ask about the device or the tracer, answered as a GPU compile
    would answer them."""
    triton.runtime.driver.set_active(_Sm90Driver())
    _runtime.multiprocessors = lambda device_index: 132  # an H100's count: some launch plans depend on it
    torch.cuda.current_device = lambda: 0
    torch.compiler.is_compiling = lambda: True  # kernel_op: call the registered op (traced), not the kernels
    for module in list(sys.modules.values()):  # meta tensors pass the ops' device checks
        if getattr(module, "__name__", "").startswith("triformer.") and hasattr(module, "check_device"):
            module.check_device = lambda **tensors: next(t for t in tensors.values() if t is not None).device
    autocast_enabled = torch.is_autocast_enabled
    torch.is_autocast_enabled = lambda *args: (False if args and str(args[0]).startswith("meta")
                                               else autocast_enabled(*args))


def _report(name: str, write: Path | None):
    def compiler(gm, example_inputs):
        counts = collections.Counter()
        for node in gm.graph.nodes:
            if node.op == "call_function":
                counts[str(node.target)] += 1
        kernels = sum(n for op, n in counts.items() if "triton_kernel_wrapper" in op)
        print(f"## {name}: {sum(counts.values())} operators, {kernels} Triton kernels")
        for op, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            if not any(q in op for q in QUIET):
                flag = "   <-- moves a whole buffer" if any(f in op for f in FLAGGED) else ""
                print(f"{n:6d}  {op}{flag}")
        if write is not None:
            write.mkdir(parents=True, exist_ok=True)
            (write / f"{name}.py").write_text(gm.code)
        from functorch.compile import make_boxed_func
        return make_boxed_func(gm.forward)
    return compiler


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default="gpt2-nano", help="a models.create_model name")
    p.add_argument("--loss", default=None, help="GPT loss: ce or fused")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--write", type=Path, default=None, help="directory for the graphs' code")
    args = p.parse_args()
    _as_if_compiling_on_a_gpu()
    from torch._functorch.aot_autograd import aot_function
    from torch.func import functional_call

    import models
    extra = {} if args.loss is None else {"loss": args.loss}
    model = models.create_model(args.model, kernels="triton", dropout=0.0, **extra).to(torch.bfloat16).to("meta")
    if model.task == "lm":
        seq = min(128, model.config.block_size)
        x = torch.zeros(args.batch, seq, dtype=torch.long, device="meta")
        y = torch.zeros(args.batch, seq, dtype=torch.long, device="meta")
    else:
        cfg = model.config
        x = torch.zeros(args.batch, cfg.in_channels, cfg.image_size, cfg.image_size, dtype=torch.bfloat16,
                        device="meta")
        y = torch.zeros(args.batch, dtype=torch.long, device="meta")
    state = {**dict(model.named_buffers()), **dict(model.named_parameters())}

    def step(state, x, y):
        return functional_call(model, state, (x, y))[1]

    loss = aot_function(step, fw_compiler=_report("forward", args.write),
                        bw_compiler=_report("backward", args.write))(state, x, y)
    loss.backward()


if __name__ == "__main__":
    main()
