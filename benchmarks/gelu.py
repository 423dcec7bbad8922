"""GELU benchmark (GPU): ``python -m benchmarks.gelu``. Without a GPU it only builds small cases (smoke test).

Memory-bound: bytes_moved counts one read of each input and one write of each output per pass (fwd:
x -> y; bwd: dy, x -> dx). Peers: PyTorch eager, torch.compile of it (Liger has no plain GELU).
"""


import torch

import triformer  # noqa: F401  (chooses compiled kernels vs the interpreter first)
from benchmarks.common import Case, main, mode_cases
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


if __name__ == "__main__":
    main("gelu", lambda: build_cases("cuda"), lambda: build_cases("cpu", rows=8))
