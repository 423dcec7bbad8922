"""Grouped-query attention (GPU): ``python -m benchmarks.attention_gqa``. Without a GPU it builds small cases.

triformer's kernels read key/value head ``h // (H / H_kv)`` for query head h ("triformer", k/v of H_kv heads, dK/dV
summed over each group inside the dK/dV kernel) against the copy models used to pay ("triformer_copy":
``repeat_interleave`` to H heads, then the same kernels, and autograd sums the copies' gradients), and SDPA
(flash backend) with ``enable_gqa=True`` and with the copy. Causal, bf16, fwd / bwd / fwd+bwd, median time and
the peak memory above the inputs (benchmarks/common.py ``measure``). Shapes: Llama 3.2 1B's attention (32 query
heads, 8 key/value heads, head dim 64) at 8 x 1024 and 2 x 4096 tokens, and Llama 3 8B's (head dim 128) at
4 x 2048. Results: benchmarks/results/<card>/attention_gqa.{md,csv,png}.
"""


import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import triformer  # noqa: F401  (chooses compiled kernels vs the interpreter first)
from benchmarks.common import Case, main, mode_cases
from triformer.attention import attention

# (B, H, H_kv, T, D)
SHAPES = [(8, 32, 8, 1024, 64), (2, 32, 8, 4096, 64), (4, 32, 8, 2048, 128)]
DTYPE = torch.bfloat16


def providers(group: int) -> dict:
    def copy(t):
        return t.repeat_interleave(group, dim=1)

    def sdpa(q, k, v, **kw):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)

    return {"triformer": lambda q, k, v: attention(q, k, v, is_causal=True),
            "triformer_copy": lambda q, k, v: attention(q, copy(k), copy(v), is_causal=True),
            "sdpa_gqa": lambda q, k, v: sdpa(q, k, v, enable_gqa=True),
            "sdpa_copy": lambda q, k, v: sdpa(q, copy(k), copy(v))}


def build_cases(device: str, shrink: int = 1) -> list[Case]:
    cases = []
    for B, H, H_kv, T, D in SHAPES:
        B, T = max(1, B // shrink), max(16, T // shrink)
        q = torch.randn(B, H, T, D, device=device, dtype=DTYPE, requires_grad=True)
        k, v = (torch.randn(B, H_kv, T, D, device=device, dtype=DTYPE, requires_grad=True) for _ in range(2))
        fns = providers(H // H_kv)
        if device != "cuda":  # SDPA's flash backend is CUDA-only
            fns = {name: fn for name, fn in fns.items() if name.startswith("triformer")}
        fwd_flops = 4 * B * H * T * T * D * 0.5
        cases += mode_cases("attention_gqa_causal", f"{B}x{H}/{H_kv}x{T}x{D}", DTYPE, fns, [q, k, v],
                            flops={"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops})
    return cases


if __name__ == "__main__":
    main("attention_gqa", lambda: build_cases("cuda"), lambda: build_cases("cpu", shrink=64))
