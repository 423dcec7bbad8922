"""What the attention autotuner picked at the benchmark's anchor shapes, and what the compiler made of each
compiled variant (GPU): ``python benchmarks/attention_kernels.py``.

Per compiled kernel: its tile and pipeline config, registers per thread, bytes spilled, shared memory, and in
its PTX the warpgroup matmuls (wgmma), the asynchronous global->shared copies that software pipelining
issues (cp.async / cp.async.bulk) and the synchronous global loads. Without async copies the key/value
loads of a stage are not overlapped with the previous stage's matmuls, whatever num_stages says.
"""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import triformer  # noqa: E402,F401  (chooses compiled kernels vs the interpreter first)
from benchmarks.common import environment  # noqa: E402
from triformer.attention import attention  # noqa: E402

attention_module = sys.modules["triformer.attention"]
SHAPES = [((16, 12, 1024, 64), 0.0), ((16, 6, 1024, 128), 0.0), ((16, 12, 1024, 64), 0.1)]
PTX_COUNTS = {"wgmma": r"wgmma\.mma_async", "cp.async": r"cp\.async\.c[ag]", "cp.async.bulk": r"cp\.async\.bulk",
              "ld.global": r"ld\.global", "ld.global.v4": r"ld\.global[.a-z0-9]*\.v4"}


def compiled_variants(kernel):
    """(constexpr values by name, CompiledKernel) for every variant of an autotuned kernel compiled so far."""
    fn = kernel.fn
    for caches in fn.device_caches.values():
        for compiled in caches[0].values():
            constants = getattr(compiled.src, "constants", {})
            names = {fn.arg_names[k[0]] if isinstance(k, tuple) else k: v for k, v in constants.items()}
            yield names, compiled


def main() -> None:
    print(" | ".join(f"{k}: {v}" for k, v in environment().items()))
    for (B, H, T, D), p in SHAPES:
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        attention(q, k, v, is_causal=True, dropout_p=p).backward(torch.randn_like(q))
    torch.cuda.synchronize()
    for name in ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv"):
        kernel = getattr(attention_module, name)
        print(f"\n## {name}: autotuner's picks")
        for key, config in kernel.cache.items():
            print(f"  {tuple(key)[:7]} -> {config}")
        print(f"## {name}: compiled variants")
        for names, compiled in compiled_variants(kernel):
            if names.get("MASK_KIND", 0) or names.get("HAS_KPM", False):
                continue
            ptx = compiled.asm.get("ptx", "")
            counts = " ".join(f"{c}={len(re.findall(pat, ptx))}" for c, pat in PTX_COUNTS.items())
            meta = compiled.metadata
            print(f"  D={names.get('HEAD_DIM')} drop={names.get('HAS_DROPOUT')} BLOCK_M={names.get('BLOCK_M')} "
                  f"BLOCK_N={names.get('BLOCK_N')} warps={meta.num_warps} stages={meta.num_stages} "
                  f"regs={getattr(compiled, 'n_regs', '?')} spills={getattr(compiled, 'n_spills', '?')} "
                  f"smem={meta.shared} {counts}")


if __name__ == "__main__":
    main()
