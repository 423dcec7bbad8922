"""Compile attention's autotuning candidates for sm_90 (H100/H200) on any machine, GPU or not:
``python -m benchmarks.attention_sm90 [--first]`` prints, per kernel, head dim, config and dropout, the
registers per thread, the stack bytes (register spills), the shared memory, and how many asynchronous
global-to-shared copies (cp.async, issued by software pipelining) and warpgroup matmuls (wgmma) the PTX holds.
``--first`` compiles only the first variant (a smoke check for the test suite); ``--softcap`` compiles the
soft-capped variants (HAS_SOFTCAP), ``--window`` the sliding-window ones (HAS_WINDOW), ``--gqa`` the grouped-query
ones.

The arguments are specialised as Triton specialises a launch on contiguous bf16 [B, H, T, D] tensors at
T=1024: head-dim strides equal to 1 become constants, pointers, the other strides and T are 16-divisible.
Without those facts Triton cannot prove 16-byte alignment, loads element by element, and pipelines nothing.
"""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRIFORMER_INTERPRET"] = "0"  # compile, never interpret: nothing here launches a kernel
os.environ.pop("TRITON_INTERPRET", None)  # e.g. inherited from a test process running the interpreter

import triformer  # noqa: E402,F401  (before triton, which reads its mode when first imported)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

attention_module = sys.modules["triformer.attention"]

KERNELS = {"fwd": ("_attn_fwd_kernel", "_FWD_CONFIGS"), "dq": ("_attn_bwd_dq_kernel", "_DQ_CONFIGS"),
           "dkdv": ("_attn_bwd_dkdv_kernel", "_DKDV_CONFIGS")}
# every other tensor argument is bf16; SEED is dropout's seed, read on the device
POINTER_TYPES = {"LSE": "*fp32", "DELTA": "*fp32", "KPM": "*u8", "SEED": "*i64"}
FLOATS = {"qk_scale", "softcap", "scale", "dropout_p", "drop_scale"}
T = 1024


def specialise(fn, constants: dict) -> ASTSource:
    signature, attrs = {}, {}
    constants = dict(constants)
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.isupper() and name != "H":  # tensor arguments lead every signature, in capitals
            signature[name] = POINTER_TYPES.get(name, "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif len(name) == 3 and name.startswith("s"):  # strides: s<tensor><dim>
            if name.endswith("d"):
                signature[name], constants[name] = "constexpr", 1
            else:
                signature[name] = "i32"
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            signature[name] = "fp32"
        elif name == "seed":
            signature[name] = "i64"
        elif name == "kv_group" and "--gqa" not in sys.argv[1:]:
            # query heads per key/value head: 1 without grouped-query attention, which Triton's launcher
            # specialises as a constant (as it does every integer argument equal to 1); --gqa compiles the
            # grouped variant (a runtime group size, the dK/dV kernel looping over the group's query heads)
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if name in ("Tq", "Tk", "TQ_BUCKET", "TK_BUCKET", "dq_offset", "dk_offset", "dv_offset"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs=constants, attrs=attrs)


def resources(compiled) -> dict:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    ptx = compiled.asm["ptx"]
    return {"regs": int(re.search(r"REG:(\d+)", usage).group(1)),
            "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
            "smem": compiled.metadata.shared,
            "cp.async": len(re.findall(r"cp\.async\.c[ag]", ptx)),
            "wgmma": len(re.findall(r"wgmma\.mma_async", ptx))}


def variants():
    for kernel, (fn_name, table_name) in KERNELS.items():
        table = getattr(attention_module, table_name)
        for head_dim, configs in ((width, table[width]) for width in (64, 128, 256)):
            for config in configs:
                for dropout in (False, True):
                    yield kernel, getattr(attention_module, fn_name), head_dim, config, dropout


def main() -> None:
    softcap = "--softcap" in sys.argv[1:]
    window = "--window" in sys.argv[1:]
    print(f"triton {triton.__version__}, sm_90, bf16, causal, T={T}{', soft-capped' if softcap else ''}"
          f"{', sliding window' if window else ''}\n")
    print("| kernel | D | BLOCK_M, BLOCK_N, warps, stages | dropout | regs | stack | smem | cp.async | wgmma |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kernel, fn, head_dim, (block_m, block_n, warps, stages), dropout in variants():
        constants = dict(IS_CAUSAL=True, MASK_KIND=0, HAS_KPM=False, HAS_DROPOUT=dropout, HAS_SOFTCAP=softcap,
                         HAS_WINDOW=window, QUADS=True, DOT_PREC="tf32", HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=block_m,
                         BLOCK_N=block_n, SEQ_M=0, SEQ_N=0)
        compiled = triton.compile(specialise(fn, constants), target=GPUTarget("cuda", 90, 128),
                                  options=dict(num_warps=warps, num_stages=stages))
        r = resources(compiled)
        print(f"| {kernel} | {head_dim} | {block_m}, {block_n}, {warps}, {stages} | {'yes' if dropout else 'no'} | "
              f"{r['regs']} | {r['stack']} | {r['smem']} | {r['cp.async']} | {r['wgmma']} |", flush=True)
        if "--first" in sys.argv[1:]:
            return


if __name__ == "__main__":
    main()
