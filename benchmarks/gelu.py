"""GELU benchmark (GPU): ``python benchmarks/gelu.py``. Without a GPU it only builds small cases (smoke test).

Memory-bound: bytes_moved counts one read of each input and one write of each output per pass (fwd:
x -> y; bwd: dy, x -> dx). Peers: PyTorch eager, torch.compile of it (Liger has no plain GELU).
This file also holds ``mode_providers``, which the other element-wise benchmarks share.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import triformer  # noqa: E402,F401  (chooses compiled kernels vs the interpreter first)
from benchmarks.common import Case, run_cases  # noqa: E402
from triformer.gelu import gelu, gelu_reference  # noqa: E402

MODES = ("fwd", "bwd", "fwd+bwd")


def mode_providers(fn, inputs, mode):
    """A no-argument callable timing ``mode`` of ``fn(*inputs)``. Gradients go to every input requiring
    grad via autograd.grad (accumulating into .grad would add a read-modify-write). Nothing runs until the
    first call, which the harness makes outside the timing (so building cases stays cheap)."""
    wrt = [t for t in inputs if t.requires_grad]
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return fn(*inputs)
        return fwd

    state = {}

    def as_tuple(out):
        return out if isinstance(out, tuple) else (out,)

    def run():
        if not state:  # the graph bwd replays, and the incoming gradients
            state["outs"] = as_tuple(fn(*inputs))
            state["grads"] = [torch.randn_like(o) for o in state["outs"]]
        if mode == "bwd":
            return torch.autograd.grad(state["outs"], wrt, state["grads"], retain_graph=True)
        return torch.autograd.grad(as_tuple(fn(*inputs)), wrt, state["grads"])
    return run


def build_cases(device: str, rows: int = 16384) -> list[Case]:
    cases = []
    configs = [  # (cols, dtype, approximate, with bias)
        (3072, torch.bfloat16, "tanh", False),
        (3072, torch.bfloat16, "tanh", True),
        (3072, torch.bfloat16, "none", False),
        (3072, torch.float32, "tanh", False),
        (8192, torch.bfloat16, "tanh", False),
    ]
    for cols, dtype, approximate, with_bias in configs:
        x = torch.randn(rows, cols, device=device, dtype=dtype, requires_grad=True)
        inputs = [x] + ([torch.randn(cols, device=device, dtype=dtype, requires_grad=True)] if with_bias else [])

        def ours(x, b=None, approximate=approximate):
            return gelu(x, approximate, b)

        def eager(x, b=None, approximate=approximate):
            return gelu_reference(x, approximate, b)

        compiled = torch.compile(eager)
        passes = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}  # tensor-sized reads + writes of each mode
        for mode in MODES:
            cases.append(Case(
                op=f"gelu_{approximate}" + ("+bias" if with_bias else ""), shape=f"{rows}x{cols}",
                dtype=str(dtype).removeprefix("torch."), mode=mode,
                bytes_moved=passes[mode] * x.numel() * x.element_size(), flops=0,
                providers={name: mode_providers(fn, inputs, mode)
                           for name, fn in (("triformer", ours), ("eager", eager), ("compile", compiled))}))
    return cases


if __name__ == "__main__":
    if torch.cuda.is_available():
        run_cases("gelu", build_cases("cuda"))
    else:
        print(f"no GPU: built {len(build_cases('cpu', rows=8))} gelu cases (timing needs CUDA)")
