"""SwiGLU / GeGLU benchmark (GPU): ``python benchmarks/swiglu.py``. Without a GPU it only builds small cases.

Activation cases are memory-bound: bytes_moved counts one read of each input and one write of each output
per pass (fwd: gate, up -> y; bwd: dy, gate, up -> d gate, d up). The llama MLP case (w2(silu(w1 x) * w3 x))
is matmul-bound and reported in TFLOP/s. Peers: eager, torch.compile of eager, and Liger
(LigerSiLUMulFunction, LigerGELUMulFunction, LigerSwiGLUMLP) when installed.
"""
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import triformer  # noqa: E402,F401  (chooses compiled kernels vs the interpreter first)
from benchmarks.common import Case, liger_available, run_cases  # noqa: E402
from benchmarks.gelu import MODES, mode_providers  # noqa: E402
from triformer.swiglu import SwiGLUMLP, geglu, geglu_reference, swiglu, swiglu_reference  # noqa: E402

PASSES = {"fwd": 3, "bwd": 5, "fwd+bwd": 8}  # F-sized reads + writes of each mode


def liger_ops():
    if not liger_available():
        return {}
    try:
        from liger_kernel.ops.geglu import LigerGELUMulFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    except Exception as exc:  # an incompatible liger version is reported, not fatal
        print(f"liger import failed: {exc!r}")
        return {}
    return {"swiglu": LigerSiLUMulFunction.apply, "geglu": LigerGELUMulFunction.apply, "mlp": LigerSwiGLUMLP}


def activation_cases(device: str, rows: int, cols: int, liger: dict) -> list[Case]:
    cases = []
    dtype = torch.bfloat16
    for kind, packed in (("swiglu", False), ("swiglu", True), ("geglu", False)):
        if packed:  # one fused w1|w3 output [rows, 2F]: first half gate, second half up
            inputs = [torch.randn(rows, 2 * cols, device=device, dtype=dtype, requires_grad=True)]
        else:
            inputs = [torch.randn(rows, cols, device=device, dtype=dtype, requires_grad=True) for _ in range(2)]
        ours, eager = (swiglu, swiglu_reference) if kind == "swiglu" else (geglu, geglu_reference)
        providers = {"triformer": ours, "eager": eager, "compile": torch.compile(eager)}
        if kind in liger:
            op = liger[kind]
            # Liger takes separate tensors; for the packed input it gets the two half views
            providers["liger"] = (lambda x, op=op: op(*x.chunk(2, dim=-1))) if packed else op
        for mode in MODES:
            cases.append(Case(
                op=kind + ("_packed" if packed else ""), shape=f"{rows}x{cols}", dtype="bfloat16", mode=mode,
                bytes_moved=PASSES[mode] * rows * cols * 2, flops=0,
                providers={name: mode_providers(fn, inputs, mode) for name, fn in providers.items()}))
    return cases


def mlp_cases(device: str, tokens: int, dim: int, hidden: int, liger: dict) -> list[Case]:
    dtype = torch.bfloat16
    ours = SwiGLUMLP(dim, hidden, fused=True, device=device, dtype=dtype)
    w13, w2 = ours.w13.weight, ours.w2.weight
    x = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)

    def eager(x, w13, w2):
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2)

    # provider -> (fn, the tensors it differentiates); Liger's MLP has its own weights of the same shapes
    providers = {"triformer": (lambda x, *_: ours(x), [x, w13, w2]), "eager": (eager, [x, w13, w2]),
                 "compile": (torch.compile(eager), [x, w13, w2])}
    if "mlp" in liger:
        config = SimpleNamespace(hidden_size=dim, intermediate_size=hidden, hidden_act="silu")
        liger_mlp = liger["mlp"](config).to(device=device, dtype=dtype)
        providers["liger"] = (lambda x, *_: liger_mlp(x), [x, *liger_mlp.parameters()])
    flops_fwd = 2 * tokens * dim * 3 * hidden
    cases = []
    for mode in MODES:
        flops = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode] * flops_fwd
        cases.append(Case(
            op="swiglu_mlp", shape=f"{tokens}x{dim}->{hidden}", dtype="bfloat16", mode=mode, bytes_moved=0,
            flops=flops,
            providers={name: mode_providers(fn, inputs, mode) for name, (fn, inputs) in providers.items()}))
    return cases


def build_cases(device: str, scale: int = 1) -> list[Case]:
    liger = liger_ops() if device == "cuda" else {}
    return (activation_cases(device, 16384 // scale, 8192 // scale, liger)
            + mlp_cases(device, 8192 // scale, 4096 // scale, 14336 // scale, liger))


if __name__ == "__main__":
    if torch.cuda.is_available():
        run_cases("swiglu", build_cases("cuda"))
    else:
        print(f"no GPU: built {len(build_cases('cpu', scale=512))} swiglu cases (timing needs CUDA)")
