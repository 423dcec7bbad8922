"""LayerNorm benchmark (GPU): ``python -m benchmarks.layernorm [--quick | --sweep]``. Without a GPU it only builds small
cases (a smoke test). ``benchmarks/rmsnorm.py`` runs the same grid for RMSNorm through ``build_cases``.

The op is memory-bound. bytes_moved counts one read of each [rows, hidden] input and one write of each
output per pass: fwd x -> y (2); bwd x, dy -> dx (3); the fused residual add reads x and residual, writes
the sum and y (4), and its backward reads sum, dy, dsum and writes one gradient (4). Parameters and per-row
statistics are ignored; they are under 1% here. Peers: PyTorch eager (its native kernels), torch.compile of
eager, and Liger-Kernel's LigerLayerNorm / LigerRMSNorm when installed. Anchors from earlier H100 runs
(fwd+bwd, bf16): 16384x768 eager 0.160 ms, 16384x4096 compile 0.420 ms. ``--quick`` runs only those shapes.

``--sweep`` times triformer's forward and backward alone, as CUDA-graph replays (the GPU's time, no host time),
under each candidate of ``triformer.layernorm``'s GPU tile constants, and writes ``layernorm_sweep``: the data
behind those constants.
"""
import sys


import torch
import torch.nn.functional as F

import triformer  # noqa: F401  (chooses compiled kernels vs the interpreter first)
from benchmarks.common import Case, cuda_graphed, flag, liger_import, main, mode_cases, run_cases, with_settings
from triformer.fused_add_norm import add_layer_norm, add_rms_norm
from triformer.layernorm import layer_norm
from triformer.rmsnorm import rms_norm

# (rows, hidden): tokens x model width, from GPT-2 small to 32k-wide rows. All but the first are >= 50 MB
# (H100 L2) per bf16 tensor; the first is the 0.160 ms anchor.
SHAPES = [(16384, 768), (32768, 768), (8192, 2048), (16384, 4096), (8192, 8192), (4096, 16384), (4096, 32768)]
QUICK_SHAPES = [(16384, 768), (16384, 4096)]
FUSED_SHAPES = [(16384, 768), (16384, 4096)]  # the fused residual add, bf16 only
DTYPES = (torch.bfloat16, torch.float32)
EPS = {"layer": 1e-5, "rms": 1e-6}
PASSES = {"plain": {"fwd": 2, "bwd": 3, "fwd+bwd": 5}, "fused": {"fwd": 4, "bwd": 4, "fwd+bwd": 8}}


def torch_norm(kind):
    eps = EPS[kind]
    if kind == "layer":
        return lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, eps)
    return lambda x, w: F.rms_norm(x, x.shape[-1:], w, eps)


def liger_module(kind):
    """Liger-Kernel's norm module class for kind."""
    from liger_kernel.transformers import LigerLayerNorm, LigerRMSNorm
    return LigerLayerNorm if kind == "layer" else LigerRMSNorm


def build_cases(kind: str, device: str, shapes, dtypes=DTYPES, fused_shapes=FUSED_SHAPES) -> list[Case]:
    """Cases for kind "layer" or "rms": the plain norm on every shape and dtype, and the fused residual add
    on fused_shapes in bf16."""
    ours = layer_norm if kind == "layer" else rms_norm
    ours_fused = add_layer_norm if kind == "layer" else add_rms_norm
    eager = torch_norm(kind)
    liger = liger_import(lambda: liger_module(kind))
    n_params = 2 if kind == "layer" else 1

    def eager_fused(x, r, *params):
        s = x + r
        return s, eager(s, *params)

    def fused(x, r, *params):
        return ours_fused(x, r, *params, eps=EPS[kind])

    def plain(x, *params):
        return ours(x, *params, eps=EPS[kind])

    cases = []
    for rows, hidden in shapes:
        for dtype in dtypes:
            def make(*shape):
                return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

            x, params = make(rows, hidden), [make(hidden) for _ in range(n_params)]
            providers = {name: (fn, [x, *params]) for name, fn in
                         (("triformer", plain), ("eager", eager), ("compile", torch.compile(eager, dynamic=False)))}
            if liger is not None:
                module = liger(hidden, eps=EPS[kind]).to(device=device, dtype=dtype)
                providers["liger"] = (lambda x, *p, module=module: module(x), [x, *module.parameters()])
            cases += norm_cases(f"{kind}_norm", rows, hidden, dtype, providers, PASSES["plain"])
    for rows, hidden in fused_shapes:
        x, r = (torch.randn(rows, hidden, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        params = [torch.randn(hidden, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(n_params)]
        compiled = torch.compile(eager_fused, dynamic=False)
        providers = {name: (fn, [x, r, *params]) for name, fn in
                     (("triformer", fused), ("eager", eager_fused), ("compile", compiled))}
        cases += norm_cases(f"add_{kind}_norm", rows, hidden, torch.bfloat16, providers, PASSES["fused"])
    return cases


def norm_cases(op, rows, hidden, dtype, providers, passes) -> list[Case]:
    return mode_cases(op, f"{rows}x{hidden}", dtype, providers, passes=passes,
                      unit_bytes=rows * hidden * torch.finfo(dtype).bits // 8)


ln_module = sys.modules["triformer.layernorm"]
SWEEP_SHAPES = [("layer", 16384, 768), ("layer", 16384, 2048), ("layer", 16384, 4096)]  # RMS shares the kernels
FWD_CANDIDATES = {f"fwd_t{t >> 10}k_e{e}": dict(FWD_GPU_TILE=t, FWD_PER_THREAD=e)
                  for t in (1024, 2048, 4096, 8192, 16384) for e in (4, 8, 16, 32)}
BWD_CANDIDATES = {f"bwd_t{t >> 10}k_e{e}_w{w}" + ("_pf" if pf else ""):
                  dict(BWD_GPU_TILE=t, BWD_PER_THREAD=e, BWD_RESIDENT_WARPS=w, BWD_PREFETCH=pf)
                  for t in (1024, 2048, 4096, 8192) for e in (4, 8, 16) for w in (16, 32, 48) for pf in (False, True)}


def sweep() -> None:
    """Every candidate of FWD_CANDIDATES (forward) and BWD_CANDIDATES (backward) at SWEEP_SHAPES, bf16."""
    caches = (ln_module._fwd_launch, ln_module._bwd_launch)
    cases = []
    for kind, rows, hidden in SWEEP_SHAPES:
        x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        params = [torch.randn(hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                  for _ in range(2 if kind == "layer" else 1)]
        ours = layer_norm if kind == "layer" else rms_norm
        for mode, candidates in (("fwd", {"default": {}, **FWD_CANDIDATES}), ("bwd", {"default": {}, **BWD_CANDIDATES})):
            for name, values in candidates.items():
                fn = lambda x, *p, ours=ours, kind=kind: ours(x, *p, eps=EPS[kind])  # noqa: E731
                (case,) = [c for c in norm_cases(f"{kind}_norm", rows, hidden, torch.bfloat16,
                                                 {name: (fn, [x, *params])}, PASSES["plain"]) if c.mode == mode]
                case.providers = {name: cuda_graphed(with_settings(case.providers[name], ln_module, values, caches))}
                cases.append(case)
    rows = run_cases("layernorm_sweep", cases)
    for key in sorted({(r["op"], r["shape"], r["mode"]) for r in rows}):
        group = [r for r in rows if (r["op"], r["shape"], r["mode"]) == key]
        best = min(group, key=lambda r: r["ms"])
        default = next(r for r in group if r["provider"] == "default")
        print(f"best {key}: {best['provider']} {best['ms']} ms ({best['pct_copy_bw']}% of copy); "
              f"default {default['ms']} ms ({default['pct_copy_bw']}%)")


def run(kind: str, name: str) -> None:
    # The compile peer specializes on each shape and dtype (dynamic=False). Keep all of those graphs.
    torch._dynamo.config.recompile_limit = 64
    main(name, lambda: build_cases(kind, "cuda", QUICK_SHAPES if flag("--quick") else SHAPES),
         lambda: build_cases(kind, "cpu", [(8, 40)], fused_shapes=[(8, 40)]), gpu_flags={"--sweep": sweep})


if __name__ == "__main__":
    run("layer", "layernorm")
