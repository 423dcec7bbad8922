"""GELU benchmark (GPU): ``python -m benchmarks.gelu [--sweep]``. Without a GPU it only builds small cases (smoke
test).

Memory-bound: bytes_moved counts one read of each input and one write of each output per pass (fwd:
x -> y; bwd: dy, x -> dx). Peers: PyTorch eager, torch.compile of it (Liger has no plain GELU).

``--sweep`` times the backward with a bias alone, as CUDA-graph replays, for each candidate of
``triformer.gelu.BIAS_PROGRAMS_PER_SM`` (and of ``STORE_Y_PROGRAMS_PER_SM`` for the backward that also writes the
activation, ``gelu_linear``'s) and writes ``gelu_sweep``.
"""
import sys


import torch

import triformer  # noqa: F401  (chooses compiled kernels vs the interpreter first)
from benchmarks.common import Case, cuda_graphed, main, mode_cases, run_cases, with_settings
from triformer.gelu import gelu, gelu_reference

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

        cases += mode_cases(f"gelu_{approximate}" + ("+bias" if with_bias else ""), f"{rows}x{cols}", dtype,
                            {"triformer": ours, "eager": eager, "compile": torch.compile(eager)}, inputs,
                            passes={"fwd": 2, "bwd": 3, "fwd+bwd": 5},  # tensor-sized reads + writes of each mode
                            unit_bytes=x.numel() * x.element_size())
    return cases


def sweep() -> None:
    gelu_module = sys.modules["triformer.gelu"]
    cases = []
    for cols in (3072, 8192):
        x = torch.randn(16384, cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for per_sm in (2, 4, 8, 16, 32):
            (case,) = [c for c in mode_cases("gelu_tanh+bias", f"16384x{cols}", torch.bfloat16,
                                             {f"programs_per_sm_{per_sm}": lambda x, b: gelu(x, "tanh", b)}, [x, b],
                                             passes={"fwd": 2, "bwd": 3, "fwd+bwd": 5},
                                             unit_bytes=x.numel() * x.element_size()) if c.mode == "bwd"]
            case.providers = {name: cuda_graphed(with_settings(fn, gelu_module, {"BIAS_PROGRAMS_PER_SM": per_sm},
                                                               (gelu_module._bwd_launch,)))
                              for name, fn in case.providers.items()}
            cases.append(case)
        # the backward that also writes the recomputed activation (triformer.gelu_linear): reads dy and x, writes
        # dx and y
        dy = torch.randn_like(x)
        for per_sm in (1, 2, 4):
            run = with_settings(lambda: gelu_module.gelu_bwd_and_output(dy, x.detach(), b.detach(), "tanh"),
                                gelu_module, {"STORE_Y_PROGRAMS_PER_SM": per_sm}, (gelu_module._bwd_launch,))
            cases.append(Case(op="gelu_tanh+bias, writing y", shape=f"16384x{cols}", dtype="bfloat16", mode="bwd",
                              bytes_moved=4 * x.numel() * x.element_size(), flops=0,
                              providers={f"programs_per_sm_{per_sm}": cuda_graphed(run)}))
    run_cases("gelu_sweep", cases)


if __name__ == "__main__":
    main("gelu", lambda: build_cases("cuda"), lambda: build_cases("cpu", rows=8), gpu_flags={"--sweep": sweep})
