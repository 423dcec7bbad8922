"""Flash-attention benchmark (GPU): ``python -m benchmarks.attention [--quick]``. Without a GPU it only builds small
cases. ``--quick``: the anchor shape, T=4096 and D=128 causal, and the anchor shape with dropout, against SDPA
alone (no compile or eager peers), for a check that fits a short GPU call.

Compute-bound: flops = 4*B*H*Tq*Tk*D for the forward (half of it when causal), 2.5x that for the backward,
3.5x for fwd+bwd. Peers: SDPA pinned to its flash backend ("sdpa_flash"; with dropout, SDPA's own backend
choice, "sdpa"), torch.compile of SDPA, and the eager math version (triformer's plain-PyTorch reference,
which materialises the [T, T] scores: run up to T=2048 only, its retained graphs alone would take ~20 GB
at T=4096). Liger has no attention. The anchor is SDPA causal fwd+bwd at 16x12x1024x64 bf16 (0.375 ms).
"""


import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import triformer  # noqa: F401  (chooses compiled kernels vs the interpreter first)
from benchmarks.common import Case, flag, main, mode_cases
from triformer.attention import attention, attention_reference

# (B, H, T, D): 16k tokens per batch, hidden size 768; q, k and v are 25 MB each, 75 MB together.
SHAPES = [(16, 12, 1024, 64), (8, 12, 2048, 64), (4, 12, 4096, 64),
          (16, 6, 1024, 128), (8, 6, 2048, 128), (4, 6, 4096, 128)]
# (is_causal, dropout_p, shapes)
SETTINGS = [(True, 0.0, SHAPES), (False, 0.0, [SHAPES[0], SHAPES[3]]), (True, 0.1, [SHAPES[0], SHAPES[2]])]
QUICK_SETTINGS = [(True, 0.0, [SHAPES[0], SHAPES[2], SHAPES[3]]), (True, 0.1, [SHAPES[0]])]
QUICK_PROVIDERS = ("triformer", "sdpa", "sdpa_flash")
# Also timed as CUDA-graph replays: the kernels' time without the host's (launches, autograd), which at
# T=1024 is about as long as the GPU's (benchmarks/results/h200/host_overhead.md).
GRAPHED = ("triformer", "sdpa_flash", "sdpa")
EAGER_MAX_T = 2048
DTYPE = torch.bfloat16


def providers(is_causal: bool, dropout_p: float, T: int) -> dict:
    def ours(q, k, v):
        return attention(q, k, v, is_causal=is_causal, dropout_p=dropout_p)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=dropout_p)

    def sdpa_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q, k, v)

    def eager(q, k, v):
        return attention_reference(q, k, v, is_causal=is_causal, dropout_p=dropout_p)

    fns = {"triformer": ours, ("sdpa" if dropout_p else "sdpa_flash"): sdpa if dropout_p else sdpa_flash,
           "compile": torch.compile(sdpa)}
    if T <= EAGER_MAX_T:
        fns["eager"] = eager
    return fns


def build_cases(device: str, shrink: int = 1, quick: bool = False) -> list[Case]:
    """``shrink`` divides batch and sequence length (a CPU smoke test builds tiny cases)."""
    cases = []
    for is_causal, dropout_p, shapes in QUICK_SETTINGS if quick else SETTINGS:
        for B, H, T, D in shapes:
            B, T = max(1, B // shrink), max(16, T // shrink)
            q, k, v = (torch.randn(B, H, T, D, device=device, dtype=DTYPE, requires_grad=True) for _ in range(3))
            fwd_flops = 4 * B * H * T * T * D * (0.5 if is_causal else 1.0)
            op = "attention" + ("_causal" if is_causal else "") + (f"_dropout{dropout_p}" if dropout_p else "")
            fns = providers(is_causal, dropout_p, T)
            if quick:
                fns = {name: fn for name, fn in fns.items() if name in QUICK_PROVIDERS}
            cases += mode_cases(op, f"{B}x{H}x{T}x{D}", DTYPE, fns, [q, k, v],
                                flops={"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops},
                                graphed=GRAPHED if device == "cuda" else ())
    return cases


if __name__ == "__main__":
    main("attention", lambda: build_cases("cuda", quick=flag("--quick")), lambda: build_cases("cpu", shrink=64))
