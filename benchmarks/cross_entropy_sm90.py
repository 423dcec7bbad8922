"""Compile the cross-entropy kernel (``triformer.cross_entropy._cross_entropy_fwd_kernel``, forward and gradient in
one launch) for sm_90 (H100/H200) on any machine, GPU or not: ``python -m benchmarks.cross_entropy_sm90 [--first]``
prints, per tile and warp count of ``benchmarks/cross_entropy.py --sweep``, the registers per thread, the stack
bytes (register spills), how many programs of that size an SM can hold by registers, and the global loads and
stores by width and eviction hint (``EL`` evict-last, ``EF`` evict-first; ``128`` are 16-byte vectors).

Specialised as Triton specialises a launch on bf16 logits whose rows sit at a 16-byte-aligned stride (GPT-2's
padded 50304-wide rows: whole tiles load unmasked), with the gradient written and a per-row scale.
"""
import os
import re
import sys
from collections import Counter

os.environ["TRIFORMER_INTERPRET"] = "0"  # compile, never interpret: nothing here launches a kernel
os.environ.pop("TRITON_INTERPRET", None)

import triformer  # noqa: E402,F401  (before triton, which reads its mode when first imported)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from benchmarks.layernorm_sm90 import sass_of  # noqa: E402

ce = sys.modules["triformer.cross_entropy"]
REGISTERS_PER_SM = 65536
TILES = [(tile // 2, warps) for tile in (8192, 16384, 32768) for warps in (8, 16, 32)]  # (BLOCK_V, num_warps)


def source(block_v: int) -> ASTSource:
    fn = ce._cross_entropy_fwd_kernel
    signature, attrs = {}, {}
    constants = dict(HAS_GRAD=True, HAS_SCALE=True, HAS_SMOOTHING=False, HAS_Z=False, UNMASKED=True, BLOCK_R=1,
                     BLOCK_V=block_v)
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = {"logits_ptr": "*bf16", "grad_ptr": "*bf16", "targets_ptr": "*i64"}.get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("smoothing", "z_loss"):
            signature[name] = "fp32"
        elif name in ("sx_n", "sg_n", "rows_inner"):  # contiguous columns, one row group
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if name in ("sx_o", "sg_o"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs=constants, attrs=attrs)


def main() -> None:
    print(f"triton {triton.__version__}, sm_90, bf16 logits in rows of 50304\n")
    print("| BLOCK_V | warps | regs | stack | programs/SM | loads | stores |")
    print("|---|---|---|---|---|---|---|")
    for block_v, warps in TILES:
        compiled = triton.compile(source(block_v), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
        usage, sass = sass_of(compiled.asm["cubin"])
        regs, stack = (int(re.search(key + r":(\d+)", usage).group(1)) for key in ("REG", "STACK"))
        loads = Counter(re.findall(r"LDG\.E[\w.]*", sass))
        stores = Counter(re.findall(r"STG\.E[\w.]*", sass))
        fit = REGISTERS_PER_SM // (regs * 32 * warps)
        print(f"| {block_v} | {warps} | {regs} | {stack} | {fit} | "
              f"{', '.join(f'{k} x{v}' for k, v in loads.items())} | {', '.join(f'{k} x{v}' for k, v in stores.items())} |",
              flush=True)
        if "--first" in sys.argv[1:]:
            return


if __name__ == "__main__":
    main()
