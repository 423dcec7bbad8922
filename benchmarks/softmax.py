"""Softmax benchmark (GPU): ``python -m benchmarks.softmax [--sweep]``. Without a GPU it only builds small cases.

Memory-bound: bytes_moved counts one read of each input and one write of each output per pass (fwd: x -> y;
bwd: y, dy -> dx). In the causal case only the visible triangle must be read (masked entries are written as
zeros). Peers: torch.softmax eager (causal: masked_fill then softmax, as users write it), torch.compile of
that, and Liger's LigerSoftmaxFunction (no causal or scale variant).

``--sweep`` times triformer alone at the long-row shapes for a few GPU launch settings (longest row kept in
registers, forward and backward; column tile of the two-sweep path) and writes ``softmax_sweep``.
"""
import sys


import torch

import triformer  # noqa: F401  (chooses compiled kernels vs the interpreter first)
from benchmarks.common import Case, liger_import, main, mode_cases, run_cases, with_settings
from triformer.softmax import softmax

softmax_module = sys.modules["triformer.softmax"]

# (shape, dtype): rows 4k-32k, columns 1k-32k, each tensor well above the 50 MB L2 except the 16384x1024
# anchor (the shape of the published eager/Liger numbers); the L2 is flushed between repeats anyway.
PLAIN = [
    ((16384, 1024), torch.bfloat16),
    ((32768, 4096), torch.bfloat16),
    ((4096, 32768), torch.bfloat16),
    ((8192, 32768), torch.bfloat16),
    ((16384, 1024), torch.float32),
    ((32768, 4096), torch.float32),
    ((4096, 32768), torch.float32),
]
CAUSAL = [((16, 4096, 4096), torch.bfloat16), ((16, 4096, 4096), torch.float32)]  # [batch * heads, T, T]
SCALE = 0.125


def liger_softmax():
    from liger_kernel.ops.softmax import LigerSoftmaxFunction
    return LigerSoftmaxFunction.apply


def eager_plain(x):
    return torch.softmax(x, dim=-1)


def eager_causal(x):
    t = x.shape[-1]
    hidden = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
    return torch.softmax((x * SCALE).masked_fill(hidden, float("-inf")), dim=-1)


def build_cases(device: str, shrink: int = 1) -> list[Case]:
    """``shrink`` divides every dimension (a CPU smoke test builds tiny cases)."""
    liger = liger_import(liger_softmax)
    cases = []
    for causal, configs in ((False, PLAIN), (True, CAUSAL)):
        for shape, dtype in configs:
            shape = tuple(max(1, n // shrink) for n in shape)
            x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
            if causal:
                t = shape[-1]
                visible = (t + 1) / (2 * t)  # fraction of the scores a causal row may read
                passes = {"fwd": 1 + visible, "bwd": 1 + 2 * visible, "fwd+bwd": 2 + 3 * visible}
                fns = {"triformer": lambda x: softmax(x, True, SCALE), "eager": eager_causal,
                       "compile": torch.compile(eager_causal)}
            else:
                passes = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}
                fns = {"triformer": softmax, "eager": eager_plain, "compile": torch.compile(eager_plain)}
                if liger is not None:
                    fns["liger"] = liger
            cases += mode_cases("softmax_causal" if causal else "softmax", "x".join(map(str, shape)), dtype, fns, [x],
                                passes=passes, unit_bytes=x.numel() * x.element_size())
    return cases


SWEEP = [((8192, 32768), torch.bfloat16), ((4096, 32768), torch.float32), ((32768, 4096), torch.float32),
         ((4096, 65536), torch.bfloat16)]


def sweep() -> None:
    """The launch constants of ``triformer.softmax`` (module globals read at each launch) over their candidates."""
    settings = {f"single{s >> 10}k_loop{b >> 10}k": dict(MAX_SINGLE_BLOCK=max(s, 32768), MAX_SINGLE_BLOCK_BWD=s,
                                                          LOOP_BLOCK=b)
                for s in (16384, 32768, 65536) for b in (4096, 8192, 16384)}
    cases = []
    for shape, dtype in SWEEP:
        x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
        for name, values in settings.items():
            for case in mode_cases("softmax", "x".join(map(str, shape)), dtype, {name: softmax}, [x],
                                   passes={"fwd": 2, "bwd": 3, "fwd+bwd": 5}, unit_bytes=x.numel() * x.element_size()):
                case.providers = {name: with_settings(case.providers[name], softmax_module, values)}
                cases.append(case)
    run_cases("softmax_sweep", cases)


if __name__ == "__main__":
    main("softmax", lambda: build_cases("cuda"), lambda: build_cases("cpu", shrink=256), gpu_flags={"--sweep": sweep})
