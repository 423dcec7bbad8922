"""SwiGLU / GeGLU benchmark (GPU): ``python -m benchmarks.swiglu``. Without a GPU it only builds small cases.

Activation cases are memory-bound: bytes_moved counts one read of each input and one write of each output
per pass (fwd: gate, up -> y; bwd: dy, gate, up -> d gate, d up). The llama MLP case (w2(silu(w1 x) * w3 x))
is matmul-bound and reported in TFLOP/s. Peers: eager, torch.compile of eager, and Liger
(LigerSiLUMulFunction, LigerGELUMulFunction, LigerSwiGLUMLP) when installed.
"""
from types import SimpleNamespace


import torch
import torch.nn.functional as F

import triformer  # noqa: F401  (chooses compiled kernels vs the interpreter first)
from benchmarks.common import Case, liger_import, main, mode_cases
from triformer.swiglu import SwiGLUMLP, geglu, geglu_reference, swiglu, swiglu_reference

PASSES = {"fwd": 3, "bwd": 5, "fwd+bwd": 8}  # F-sized reads + writes of each mode


def liger_ops():
    from liger_kernel.ops.geglu import LigerGELUMulFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
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
        cases += mode_cases(kind + ("_packed" if packed else ""), f"{rows}x{cols}", dtype, providers, inputs,
                            passes=PASSES, unit_bytes=rows * cols * 2)
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
    return mode_cases("swiglu_mlp", f"{tokens}x{dim}->{hidden}", dtype, providers,
                      flops={"fwd": flops_fwd, "bwd": 2 * flops_fwd, "fwd+bwd": 3 * flops_fwd})


def build_cases(device: str, scale: int = 1) -> list[Case]:
    liger = (liger_import(liger_ops) or {}) if device == "cuda" else {}
    return (activation_cases(device, 16384 // scale, 8192 // scale, liger)
            + mlp_cases(device, 8192 // scale, 4096 // scale, 14336 // scale, liger))


if __name__ == "__main__":
    main("swiglu", lambda: build_cases("cuda"), lambda: build_cases("cpu", scale=512))
