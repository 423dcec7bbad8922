"""Dropout benchmark (GPU): ``python -m benchmarks.dropout``. Without a GPU it only builds small cases.

Memory-bound: bytes_moved counts one read of the input and one write of the output per pass (fwd: x -> y;
bwd: dy -> dx). Triformer stores no mask (the backward regenerates it); PyTorch's eager dropout also writes
and re-reads a mask, which is its cost, not counted. Peers: torch.nn.functional.dropout eager and
torch.compile of it (Liger has no dropout).
"""


import torch
import torch.nn.functional as F

import triformer  # noqa: F401  (chooses compiled kernels vs the interpreter first)
from benchmarks.common import Case, main, mode_cases
from triformer.dropout import dropout

P = 0.1
CONFIGS = [  # (shape, dtype): 128 MB - 1 GB a tensor, far above the 50 MB L2
    ((16384, 4096), torch.bfloat16),
    ((16384, 16384), torch.bfloat16),
    ((16384, 4096), torch.float32),
    ((16384, 16384), torch.float32),
]


def ours(x):
    return dropout(x, P)


def eager(x):
    return F.dropout(x, P, training=True)


def build_cases(device: str, shrink: int = 1) -> list[Case]:
    """``shrink`` divides every dimension (a CPU smoke test builds tiny cases)."""
    cases = []
    compiled = torch.compile(eager)
    for shape, dtype in CONFIGS:
        shape = tuple(max(1, n // shrink) for n in shape)
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        cases += mode_cases(f"dropout_p{P}", "x".join(map(str, shape)), dtype,
                            {"triformer": ours, "eager": eager, "compile": compiled}, [x],
                            passes={"fwd": 2, "bwd": 2, "fwd+bwd": 4}, unit_bytes=x.numel() * x.element_size())
    return cases


if __name__ == "__main__":
    main("dropout", lambda: build_cases("cuda"), lambda: build_cases("cpu", shrink=256))
