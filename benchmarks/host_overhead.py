"""Host (CPU) time per call of triformer's ops, layer by layer, against PyTorch's own kernels (GPU; see --cpu-stub).

    python -m benchmarks.host_overhead
    python -m benchmarks.host_overhead --cpu-stub   # CPU only (TRIFORMER_INTERPRET=1 on a GPU machine)

A GPT-2 step launches a few hundred kernels, most of them short, so the Python and launch time each op
spends on the host decides the step time whenever it exceeds the kernel's GPU time. Shapes here are tiny,
so the GPU is never the bottleneck and a loop's wall time over its call count is the host time per call.
Each op is timed through every layer of its stack (functional, autograd.Function, launcher, bare Triton
launch) so the difference between adjacent rows is what that layer costs, and with the host-side shortcuts
undone ("through the dispatcher" rows: the ops called through torch.library's registered op; "through the
autotuner" rows: attention's kernels launched through Triton's autotuner every time, not with the config it
chose); a cProfile of the functional form names the Python functions behind it. Writes
benchmarks/results/<card>/host_overhead.md.

``--cpu-stub`` times only triformer's own Python around the kernels, on CPU tensors: every kernel launch is
a no-op that counts itself, so neither Triton's launcher nor its interpreter runs. It also counts the
allocations each call makes. It prints, and writes nothing: CPU numbers compare two versions of the code on
one machine, and do not give the host time on a GPU machine.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import importlib
import io
import pstats
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import triformer  # before triton: it picks compile vs interpreter
import triton
import triton.language as tl
from triton.runtime.jit import KernelInterface
from triformer import layernorm as ln_mod
from benchmarks.common import environment, out_dir

# The module, not the function triformer exports under the same name (which ``from triformer import`` returns).
attn_mod = importlib.import_module("triformer.attention")


@triton.jit
def _empty_kernel(X):
    pass


@triton.jit
def _empty_kernel_many_args(X, R, W, B, Y, S, Mean, Rstd, M, N, rows_inner, eps, a, b, c, d, e, f,
                            RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            ONE_TILE: tl.constexpr):
    pass


def host_us(fn, calls: int = 400) -> float:
    """Microseconds of host time per call (the loop runs ahead of the GPU, which is idle most of the time);
    NaN, with the error printed, for a layer that fails."""
    try:
        for _ in range(20):
            fn()
    except Exception as exc:
        print(f"failed: {exc!r}"[:300])
        return float("nan")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / calls * 1e6


@contextlib.contextmanager
def through_dispatcher(module, *names):
    """The "before" of triformer's eager bypass: ``module``'s ops called through torch.library's registered op."""
    saved = {n: getattr(module, n) for n in names}
    try:
        for n, fn in saved.items():
            setattr(module, n, fn.op)
        yield
    finally:
        for n, fn in saved.items():
            setattr(module, n, fn)


class _NeverTuned(dict):
    """A tuned-config cache that keeps nothing."""

    def __setitem__(self, key, value):
        pass


@contextlib.contextmanager
def through_autotuner():
    """The "before" of attention's tuned-config launch: every launch goes through Triton's Autotuner.run."""
    saved, attn_mod._TUNED = attn_mod._TUNED, _NeverTuned()
    try:
        yield
    finally:
        attn_mod._TUNED = saved


def layer_norm_rows():
    x = torch.randn(64, 768, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(768, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(768, device="cuda", dtype=torch.bfloat16)
    xg = x.clone().requires_grad_()
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    dy = torch.randn_like(x)
    y = torch.empty_like(x)
    mean = torch.empty(64, device="cuda")
    rstd = torch.empty(64, device="cuda")
    x3 = x.unsqueeze(1)

    def raw_launch():
        ln_mod._norm_fwd_kernel[(1,)](
            x3, None, w, b, y, None, mean, rstd, 64, 768, 1, 1e-5, *x3.stride(), *x3.stride(),
            RMS=False, HAS_RESIDUAL=False, HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_M=4, BLOCK_N=1024, ONE_TILE=True,
            num_warps=8)

    def fwd_bwd_torch():
        F.layer_norm(xg, (768,), wg, bg).backward(dy)

    def fwd_bwd_triformer():
        triformer.layer_norm(xg, wg, bg).backward(dy)

    with torch.no_grad():
        rows = [
            ("layer_norm fwd", "torch F.layer_norm", lambda: F.layer_norm(x, (768,), w, b)),
            ("layer_norm fwd", "triformer.layer_norm", lambda: triformer.layer_norm(x, w, b)),
            ("layer_norm fwd", "LayerNormFunction.apply", lambda: ln_mod.LayerNormFunction.apply(x, w, b, 1e-5)),
            ("layer_norm fwd", "launcher norm_forward", lambda: ln_mod.norm_forward(x, None, w, b, 1e-5, False)),
            ("layer_norm fwd", "bare Triton launch", raw_launch),
            ("triton", "empty kernel, 1 arg", lambda: _empty_kernel[(1,)](x)),
            ("triton", "empty kernel, 25 args", lambda: _empty_kernel_many_args[(1,)](
                x3, None, w, b, y, None, mean, rstd, 64, 768, 1, 1e-5, 768, 768, 1, 768, 768, 1,
                RMS=False, HAS_RESIDUAL=False, HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_M=4, BLOCK_N=1024,
                ONE_TILE=True)),
            ("torch", "torch.empty_like", lambda: torch.empty_like(x)),
        ]
        measured = [(op, layer, host_us(fn)) for op, layer, fn in rows]
    measured += [("layer_norm fwd+bwd", "torch", host_us(fwd_bwd_torch)),
                 ("layer_norm fwd+bwd", "triformer", host_us(fwd_bwd_triformer))]
    with through_dispatcher(ln_mod, "layer_norm_fwd", "layer_norm_bwd"):
        measured.append(("layer_norm fwd+bwd", "triformer, ops through the dispatcher", host_us(fwd_bwd_triformer)))
    return measured, fwd_bwd_triformer


def attention_rows():
    q, k, v = (torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)

    def fwd_bwd_sdpa():
        F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(do)

    def fwd_bwd_triformer():
        triformer.attention(qg, kg, vg, is_causal=True).backward(do)

    def fwd_triformer():
        triformer.attention(q, k, v, is_causal=True)

    with torch.no_grad():
        rows = [
            ("attention fwd", "torch SDPA", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
            ("attention fwd", "triformer.attention", fwd_triformer),
        ]
        measured = [(op, layer, host_us(fn)) for op, layer, fn in rows]
        with through_autotuner():
            measured.append(("attention fwd", "triformer.attention, through the autotuner", host_us(fwd_triformer)))
    measured += [("attention fwd+bwd", "torch SDPA", host_us(fwd_bwd_sdpa)),
                 ("attention fwd+bwd", "triformer", host_us(fwd_bwd_triformer))]
    with through_autotuner():
        measured.append(("attention fwd+bwd", "triformer, through the autotuner", host_us(fwd_bwd_triformer)))
    with through_dispatcher(attn_mod, "_attention_fwd", "_attention_bwd"):
        measured.append(("attention fwd+bwd", "triformer, ops through the dispatcher", host_us(fwd_bwd_triformer)))
    return measured, fwd_bwd_triformer


def other_rows():
    x = torch.randn(64, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 1000, (64,), device="cuda")
    dy = torch.randn_like(x)
    return [
        ("gelu fwd+bwd", "torch", host_us(lambda: F.gelu(x, approximate="tanh").backward(dy))),
        ("gelu fwd+bwd", "triformer", host_us(lambda: triformer.gelu(x, approximate="tanh").backward(dy))),
        ("cross_entropy fwd+bwd", "torch", host_us(lambda: F.cross_entropy(logits, targets).backward())),
        ("cross_entropy fwd+bwd", "triformer", host_us(lambda: triformer.cross_entropy(logits, targets).backward())),
    ]


def cprofile(fn, calls: int = 300) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    return out.getvalue()


class _KernelStub:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` only counts the launch."""

    def __init__(self, name: str, launches: collections.Counter):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self.launches[self.name] += 1


@contextlib.contextmanager
def stubbed_kernels(launches: collections.Counter):
    """Every kernel of triformer's modules replaced by a _KernelStub counting into ``launches``."""
    kernels = [(mod, name, obj) for mod in list(sys.modules.values()) if mod.__name__.startswith("triformer")
               for name, obj in list(vars(mod).items()) if isinstance(obj, KernelInterface)]
    for mod, name, _ in kernels:
        setattr(mod, name, _KernelStub(name, launches))
    try:
        yield
    finally:
        for mod, name, obj in kernels:
            setattr(mod, name, obj)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def cpu_us(fn, calls: int = 3000, repeats: int = 5) -> float:
    """Microseconds per call, the best of ``repeats`` loops (the least disturbed by the rest of the machine)."""
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def cpu_stub_rows():
    """(op, us/call, launches, allocations) of the norms and GELU with every kernel stubbed."""
    x, r, w, b = (torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
                  for shape in ((64, 768), (64, 768), 768, 768))
    dy = torch.randn(64, 768, dtype=torch.bfloat16)
    # autograd.grad, not backward: accumulating the stubs' uninitialized gradients into .grad can hit
    # denormals, which made some loops 30x slower.
    cases = [
        ("layer_norm fwd", lambda: triformer.layer_norm(x.detach(), w.detach(), b.detach())),
        ("layer_norm fwd+bwd", lambda: torch.autograd.grad(triformer.layer_norm(x, w, b), (x, w, b), dy)),
        ("rms_norm fwd+bwd", lambda: torch.autograd.grad(triformer.rms_norm(x, w), (x, w), dy)),
        ("add_layer_norm fwd+bwd",
         lambda: torch.autograd.grad(triformer.add_layer_norm(x, r, w, b), (x, r, w, b), (dy, dy))),
        ("gelu fwd+bwd", lambda: torch.autograd.grad(triformer.gelu(x), x, dy)),
        ("gelu with bias fwd+bwd", lambda: torch.autograd.grad(triformer.gelu(x, bias=b), (x, b), dy)),
    ]
    launches = collections.Counter()
    rows = []
    with stubbed_kernels(launches):
        for name, fn in cases:
            us = cpu_us(fn)
            launches.clear()
            with _CountOps() as counted:
                fn()
            allocations = sum(n for op, n in counted.ops.items() if op.startswith(("empty", "new_empty", "zeros")))
            rows.append((name, us, sum(launches.values()), allocations))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-stub", action="store_true", help="time triformer's Python alone, with no-op kernels")
    if parser.parse_args().cpu_stub:
        if not triformer.INTERPRET:
            parser.error("--cpu-stub runs on CPU tensors: set TRIFORMER_INTERPRET=1")
        print(" | ".join(f"{k}: {v}" for k, v in environment().items()), "| kernels stubbed", "\n")
        print("| op | host us/call | launches | allocations |\n|---|---|---|---|")
        for name, us, launches, allocations in cpu_stub_rows():
            print(f"| {name} | {us:.1f} | {launches} | {allocations} |")
        return
    ln, ln_step = layer_norm_rows()
    at, at_step = attention_rows()
    rows = ln + at + other_rows()
    lines = ["# Host time per call", "", " | ".join(f"{k}: {v}" for k, v in environment().items()), "",
             "Command: `python -m benchmarks.host_overhead`: tiny shapes, so the loop's wall time per call is host time.",
             "", "| op | layer | host us/call |", "|---|---|---|"]
    lines += [f"| {op} | {layer} | {us:.1f} |" for op, layer, us in rows]
    for name, step in (("layer_norm fwd+bwd", ln_step), ("attention fwd+bwd", at_step)):
        lines += ["", f"## cProfile: triformer {name}, 300 calls, by own time", "", "```", cprofile(step), "```"]
    text = "\n".join(lines)
    print(text)
    (out_dir() / "host_overhead.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
