"""Compile the row-normalization backward kernel (``triformer.layernorm._norm_bwd_kernel``, behind LayerNorm,
RMSNorm and the fused residual-add norms) for sm_90 (H100/H200) on any machine, GPU or not:
``python -m benchmarks.layernorm_sm90 [--first] [--dump DIR]`` prints, per variant and row width, the tile the
launcher picks, the registers per thread, the stack bytes (register spills), and the instructions of PTX (lines
ending in ``;`` that are not directives: no debug information) and of SASS. ``--dump DIR`` also writes each variant's PTX and SASS there, to diff two versions of
the kernel; ``--first`` compiles only the first variant (a smoke check).

Arguments are specialised as Triton specialises a launch on contiguous bf16 [M, N] tensors with M and N
multiples of 16 (benchmarks/attention_sm90.py does the same for attention): the rows' column stride 1 and
rows_inner 1 become constants, pointers, M, N and row strides are 16-divisible, absent tensors are None.
"""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRIFORMER_INTERPRET"] = "0"  # compile, never interpret: nothing here launches a kernel
os.environ.pop("TRITON_INTERPRET", None)  # e.g. inherited from a test process running the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning

import triformer  # noqa: E402,F401  (before triton, which reads its mode when first imported)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ln = sys.modules["triformer.layernorm"]

M = 16384  # rows: only the launch's tile choice reads it (the kernel takes M at run time)
# (N, widest column block): one tile up to BWD_MAX_BLOCK_N (8192), two passes beyond; 4096 also in 1024-wide blocks
WIDTHS = ((768, None), (4096, None), (4096, 1024), (8192, None), (12288, None), (16384, None))
# (name, RMS, HAS_WEIGHT, HAS_BIAS, HAS_DRES, HAS_DROPOUT)
VARIANTS = (("layer_norm", False, True, True, False, False), ("rms_norm", True, True, False, False, False),
            ("add_layer_norm", False, True, True, True, False),
            ("add_layer_norm+dropout", False, True, True, True, True))


def specialise(fn, constants: dict, present: dict) -> ASTSource:
    signature, attrs, constants = {}, {}, dict(constants)
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name[0].isupper() and name not in ("M", "N"):  # tensor arguments, in capitals
            if not present.get(name, True):
                signature[name], constants[name] = "constexpr", None
            else:
                signature[name] = ("*bf16" if name in ("DY", "X", "W", "DRES", "DX", "DXB") else
                                   "*i64" if name == "SEED" else "*fp32")
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("dropout_p", "drop_scale"):  # None (a constexpr) without dropout, as the launcher passes them
            if present["SEED"]:
                signature[name] = "fp32"
            else:
                signature[name], constants[name] = "constexpr", None
        elif name.endswith("_n") or name == "rows_inner":  # column strides, and one row per group
            signature[name], constants[name] = "constexpr", 1
        else:  # M, N, n_row_blocks, row strides
            signature[name] = "i32"
            if name != "n_row_blocks":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs=constants, attrs=attrs)


def sass_of(cubin: bytes) -> str:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([str(cuobjdump), "--dump-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    return usage, sass


def main() -> None:
    args = sys.argv[1:]
    dump = Path(args[args.index("--dump") + 1]) if "--dump" in args else None
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
    print(f"triton {triton.__version__}, sm_90, bf16 x/dy/weight, fp32 partial sums, M={M}\n")
    print("| variant | N | BLOCK_M, BLOCK_N, warps | one tile | regs | stack | PTX instructions | SASS instructions |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rms, has_w, has_b, has_dres, has_dropout in VARIANTS:
        for n, max_block_n in WIDTHS:
            block_m, block_n, warps = ln._tile(M, n, max_block_n or ln.BWD_MAX_BLOCK_N, gpu_tile=ln.BWD_GPU_TILE,
                                               per_thread=ln.BWD_PER_THREAD, max_warps=32)
            one_tile = block_n >= n
            constants = dict(RMS=rms, HAS_WEIGHT=has_w, HAS_BIAS=has_b, HAS_DRES=has_dres, HAS_DROPOUT=has_dropout,
                             BLOCK_M=block_m, BLOCK_N=block_n, ONE_TILE=one_tile, PREFETCH=ln.BWD_PREFETCH)
            present = dict(W=has_w, Mean=not rms, DRES=has_dres, DWB=has_w or has_b, RowSums=not one_tile,
                           SEED=has_dropout, DXB=has_dropout)
            compiled = triton.compile(specialise(ln._norm_bwd_kernel, constants, present),
                                      target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
            usage, sass = sass_of(compiled.asm["cubin"])
            ptx = compiled.asm["ptx"]
            n_ptx = sum(1 for line in map(str.strip, ptx.splitlines()) if line.endswith(";") and line[0] != ".")
            n_sass = len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, re.M))
            regs, stack = (re.search(key + r":(\d+)", usage).group(1) for key in ("REG", "STACK"))
            print(f"| {name} | {n} | {block_m}, {block_n}, {warps} | {'yes' if one_tile else 'no'} | {regs} | "
                  f"{stack} | {n_ptx} | {n_sass} |", flush=True)
            if dump:
                (dump / f"{name}_{n}_{block_n}.ptx").write_text(ptx)
                (dump / f"{name}_{n}_{block_n}.sass").write_text(sass)
            if "--first" in args:
                return


if __name__ == "__main__":
    main()
