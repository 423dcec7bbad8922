"""RoPE benchmark (GPU): ``python -m benchmarks.rope``. Without a GPU it only builds small cases.

Memory-bound: bytes_moved counts reading q and k and writing their rotations once per pass (the cos/sin
tables are small and L2-resident). In the fused-qkv case the backward also pays, for every provider,
autograd's scatter of the q/k gradients into a zeroed gradient of the whole qkv tensor (not counted).
Peers: the Hugging Face Llama formula in eager PyTorch (cos/sin [T, D] in the activation dtype, as HF
passes them), torch.compile of it, and Liger's liger_rotary_pos_emb.
"""


import torch

import triformer  # noqa: F401  (chooses compiled kernels vs the interpreter first)
from benchmarks.common import Case, liger_import, main, mode_cases
from triformer.rope import apply_rope, rope_cos_sin


def hf_rotate(q, k, cos, sin):
    """Hugging Face's apply_rotary_pos_emb, cos/sin [1, 1, T, D]."""
    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def liger_rope():
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    return liger_rotary_pos_emb


def build_cases(device: str, scale: int = 1) -> list[Case]:
    liger = liger_import(liger_rope) if device == "cuda" else None
    cases = []
    configs = [  # (B, H, Hk, T, D, layout): GPT-2-small-like MHA, and Llama-3-8B-like GQA
        (16, 12, 12, 1024, 64, "bhtd"),
        (8, 32, 8, 4096, 128, "bhtd"),
        (8, 32, 8, 4096, 128, "qkv"),
    ]
    dtype = torch.bfloat16
    for B, H, Hk, T, D, layout in configs:
        T //= scale
        if layout == "qkv":  # q, k as views of one fused projection output [B, T, (H + 2 Hk) D]
            qkv = torch.randn(B, T, (H + 2 * Hk) * D, device=device, dtype=dtype, requires_grad=True)
            heads = qkv.view(B, T, H + 2 * Hk, D).transpose(1, 2)
            q, k = heads[:, :H], heads[:, H:H + Hk]
            leaves = [qkv]
        else:
            q = torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True)
            k = torch.randn(B, Hk, T, D, device=device, dtype=dtype, requires_grad=True)
            leaves = [q, k]
        cos, sin = rope_cos_sin(T, D, device=device)
        cos_hf = torch.cat([cos, cos], dim=-1).to(dtype)[None]
        sin_hf = torch.cat([sin, sin], dim=-1).to(dtype)[None]

        # every provider maps the leaves (q, k, or the fused qkv) to the rotated q, k
        def split(*leaves, layout=layout, H=H, Hk=Hk, B=B, T=T, D=D):
            if layout != "qkv":
                return leaves
            heads = leaves[0].view(B, T, H + 2 * Hk, D).transpose(1, 2)
            return heads[:, :H], heads[:, H:H + Hk]

        def ours(*leaves, split=split, cos=cos, sin=sin):
            return apply_rope(*split(*leaves), cos, sin)

        def eager(*leaves, split=split, cos=cos_hf[:, None], sin=sin_hf[:, None]):
            return hf_rotate(*split(*leaves), cos, sin)

        providers = {"triformer": ours, "eager": eager, "compile": torch.compile(eager)}
        if liger is not None:
            providers["liger"] = lambda *leaves, split=split, cos=cos_hf, sin=sin_hf: liger(*split(*leaves), cos, sin)
        io_bytes = 2 * (q.numel() + k.numel()) * q.element_size()  # read q, k + write both rotations
        cases += mode_cases(f"rope_{layout}", f"B{B} H{H} Hk{Hk} T{T} D{D}", dtype, providers, leaves,
                            passes={"fwd": 1, "bwd": 1, "fwd+bwd": 2}, unit_bytes=io_bytes)
    return cases


if __name__ == "__main__":
    main("rope", lambda: build_cases("cuda"), lambda: build_cases("cpu", scale=256))
