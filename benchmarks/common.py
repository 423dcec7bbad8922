"""Shared harness for the per-op benchmarks (GPU only).

Each op's benchmark (``benchmarks/<op>.py``) describes its cases as ``Case`` rows, each row a set of
``providers`` (triformer, eager, compile, liger) that compute the same thing (``mode_cases`` builds the fwd,
bwd and fwd+bwd rows of one setting), and hands its case builders to ``main``.
Timing is ``triton.testing.do_bench``'s median with the L2 flushed between repeats; memory is the peak
allocated during one call above what was allocated before it (inputs included in neither).
Results go to ``benchmarks/results/<card>/<op>.csv``/``.md``/``.png``, ``<card>`` named after the GPU (``card()``:
"h200", "h100"; "cpu" without one), or to ``$TRIFORMER_BENCH_OUT`` when set. ``scripts/gpu_run.sh`` sets it and
packs the folder into ``$OUT/results.tar.gz``: unpack that into ``benchmarks/results/<card>/`` (overwriting the
card's previous files) and add the run's date, versions and headline rows to docs/performance_history.md.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import gc
import os
import platform
import re
import sys
from pathlib import Path
from typing import Callable

import torch
import triton
import triton.testing

MODES = ("fwd", "bwd", "fwd+bwd")


@dataclasses.dataclass
class Case:
    op: str            # e.g. "layernorm"
    shape: str         # human-readable shape, e.g. "16384x768"
    dtype: str
    mode: str          # "fwd", "bwd" or "fwd+bwd"
    bytes_moved: float  # fewest bytes the mode must move through memory (0 if not memory-bound)
    flops: float        # floating-point operations of the mode (0 if not compute-bound)
    providers: dict[str, Callable[[], object]]


def liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except Exception:
        return False
    return True


def liger_import(load: Callable[[], object]):
    """What ``load`` imports from liger_kernel, or None when Liger is absent or this version lacks it (reported,
    not fatal: the other peers still run)."""
    if not liger_available():
        return None
    try:
        return load()
    except Exception as exc:
        print(f"liger import failed: {exc!r}")
        return None


def mode_providers(fn, inputs, mode):
    """A no-argument callable timing ``mode`` of ``fn(*inputs)``. Gradients go to every input requiring
    grad via autograd.grad (accumulating into .grad would add a read-modify-write). Nothing runs until the
    first call, which the harness makes outside the timing (so building cases stays cheap)."""
    wrt = [t for t in inputs if t.requires_grad]
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return fn(*inputs)
        return fwd

    state = {}

    def as_tuple(out):
        return out if isinstance(out, tuple) else (out,)

    def run():
        if not state:  # the graph bwd replays, and the incoming gradients
            state["outs"] = as_tuple(fn(*inputs))
            state["grads"] = [torch.randn_like(o) for o in state["outs"]]
        if mode == "bwd":
            return torch.autograd.grad(state["outs"], wrt, state["grads"], retain_graph=True)
        return torch.autograd.grad(as_tuple(fn(*inputs)), wrt, state["grads"])
    return run


def cuda_graphed(run: Callable[[], object]) -> Callable[[], None]:
    """``run`` captured into a CUDA graph on its first call (after warm-up calls on a side stream, which also
    autotune), then replayed: the GPU's time alone, without the host's launch and autograd work, which is what
    a graph-captured training step pays."""
    graph = []

    def replay():
        if not graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    run()
            torch.cuda.current_stream().wait_stream(side)
            graph.append(torch.cuda.CUDAGraph())
            with torch.cuda.graph(graph[0]):
                run()
        graph[0].replay()
    return replay


def with_settings(run: Callable[[], object], module, values: dict, caches=()) -> Callable[[], object]:
    """``run`` with ``module``'s globals (launch constants read at each launch) set to ``values`` for the call,
    the launch-plan ``caches`` (``functools.lru_cache`` functions) cleared before and after so they see them."""
    def timed():
        saved = {k: getattr(module, k) for k in values}
        vars(module).update(values)
        for cache in caches:
            cache.cache_clear()
        try:
            return run()
        finally:
            vars(module).update(saved)
            for cache in caches:
                cache.cache_clear()
    return timed


def mode_cases(op: str, shape: str, dtype, fns: dict, inputs=None, *, passes: dict | None = None,
               unit_bytes: float = 0, flops: dict | None = None, graphed: tuple[str, ...] = ()) -> list[Case]:
    """One Case per mode of MODES. ``fns`` maps a provider to ``fn(*inputs)``, or to ``(fn, its inputs)`` when it
    differentiates tensors of its own (a module's parameters). Memory-bound cases give ``passes`` (mode -> how
    many ``unit_bytes``-sized tensors it reads and writes), compute-bound ones ``flops`` (mode -> flops). The
    providers named in ``graphed`` are also timed as CUDA-graph replays, as "<name>_graph"."""
    def providers(mode):
        timed = {}
        for name, fn in fns.items():
            timed[name] = mode_providers(*(fn if isinstance(fn, tuple) else (fn, inputs)), mode)
            if name in graphed:
                timed[f"{name}_graph"] = cuda_graphed(timed[name])
        return timed

    return [Case(op=op, shape=shape, dtype=str(dtype).removeprefix("torch."), mode=mode,
                 bytes_moved=passes[mode] * unit_bytes if passes else 0, flops=flops[mode] if flops else 0,
                 providers=providers(mode))
            for mode in MODES]


def flag(name: str) -> bool:
    return name in sys.argv[1:]


def main(name: str, gpu_cases: Callable[[], list[Case]], cpu_cases: Callable[[], list[Case]], *,
         run_on_cpu: bool = False, report: Callable[[list[dict]], None] | None = None,
         gpu_flags: dict[str, Callable[[], None]] | None = None,
         cpu_flags: dict[str, Callable[[], None]] | None = None) -> None:
    """Entry point of ``benchmarks/<name>.py``. With a GPU: the action of the first of ``gpu_flags`` given on the
    command line, else time ``gpu_cases()`` (then ``report`` the rows). Without one (a smoke test): the action of
    the first of ``cpu_flags`` given, else build ``cpu_cases()``, small ones, and with ``run_on_cpu`` call every
    provider once."""
    cuda = torch.cuda.is_available()
    for f, action in ((gpu_flags if cuda else cpu_flags) or {}).items():
        if flag(f):
            return action()
    if cuda:
        rows = run_cases(name, gpu_cases())
        if report:
            report(rows)
        return
    cases = cpu_cases()
    if run_on_cpu:
        for case in cases:
            for fn in case.providers.values():
                fn()
    print(f"no GPU: built {'and ran ' if run_on_cpu else ''}{len(cases)} small {name} cases (timing needs CUDA)")


def activation_linear_main(op: str, shapes: list[tuple[str, int, int, int]], providers: Callable[[], dict],
                           inputs: Callable[[str, int, int, int], list[torch.Tensor]]) -> None:
    """``main`` of an activation + linear op whose point is what it keeps for backward (``gelu_linear``,
    ``glu_linear``). ``shapes``: (label, tokens, hidden, out); ``inputs(device, tokens, hidden, out)`` makes fresh
    inputs for the ``providers()``. Times each mode (fwd, bwd, fwd+bwd) in bf16 with the matmuls' TFLOP/s, then
    writes ``<op>_saved``: the MiB each provider keeps alive between forward and backward, above its inputs and
    output. Without a GPU: one tiny case per mode, each provider called once."""
    def label(name, tokens, hidden, out):
        return f"{name} {tokens}x{hidden}->{out}"

    def cases(device, case_shapes):
        built = []
        for name, tokens, hidden, out in case_shapes:
            mm = 2 * tokens * hidden * out
            built += mode_cases(op, label(name, tokens, hidden, out), torch.bfloat16, providers(),
                                inputs(device, tokens, hidden, out),
                                flops={"fwd": mm, "bwd": 2 * mm, "fwd+bwd": 3 * mm})
        return built

    def saved_memory(_rows=None):
        rows = []
        for shape in shapes:
            for name, fn in providers().items():
                args = inputs("cuda", *shape[1:])
                fn(*args).sum().backward()  # compile and warm up outside the measurement
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                y = fn(*args)
                kept = (torch.cuda.memory_allocated() - before - y.numel() * y.element_size()) / 2**20
                rows.append({"op": op, "shape": label(*shape), "provider": name, "saved_MiB": round(kept, 1)})
                print(rows[-1], flush=True)
                del y, args
        write_results(f"{op}_saved", rows)

    main(op, lambda: cases("cuda", shapes), lambda: cases("cpu", [("tiny", 16, 32, 8)]), run_on_cpu=True,
         report=saved_memory)


def environment() -> dict[str, str]:
    env = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        env.update({k: str(v) for k, v in measured_ceilings().items()})
    return env


@functools.lru_cache(maxsize=None)
def measured_ceilings() -> dict[str, float]:
    """The card's limits, measured in the same run as the numbers reported against them: a 4 GiB
    device-to-device copy (bytes read plus written) and an 8192^3 bf16 matmul on random data (zeros run
    faster and would flatter the ceiling)."""
    src = torch.randn(2**30, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    copy_gbps = 2 * src.numel() * src.element_size() / copy_ms / 1e6
    del src, dst
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return {"copy_GBps": round(copy_gbps, 1), "bf16_matmul_TFLOPs": round(2 * 8192**3 / mm_ms / 1e9, 1)}


def measure(fn: Callable[[], object]) -> tuple[float, float]:
    """(median ms, peak MiB allocated during one call above the memory in use before it)."""
    fn()  # compile / autotune outside the measurement
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    return ms, peak


# Dense (no sparsity) bf16 tensor-core peak of each card's SXM part, in FLOP/s, by ``card()`` name: the
# denominator of a benchmark's MFU. H200 has H100's compute (only its memory differs). A card missing here gets
# no MFU rather than one against another card's peak.
BF16_DENSE_PEAK_FLOPS = {"h100": 989e12, "h200": 989e12}


def card(device_name: str | None = None) -> str:
    """The results folder of a GPU (this machine's when ``device_name`` is None): "NVIDIA H200" -> "h200",
    "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA A100-SXM4-80GB" -> "a100", "NVIDIA GeForce RTX 4090" -> "rtx-4090";
    "cpu" without a GPU (``environment()``'s "none")."""
    if device_name is None:
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    if device_name == "none":
        return "cpu"
    words = [w for w in re.split(r"[\s_-]+", device_name.lower()) if w and w not in ("nvidia", "tesla", "geforce")]
    name = []
    for w in words:  # up to the first word with a digit: the model, not its memory size
        name.append(w)
        if any(c.isdigit() for c in w):
            break
    return "-".join(name) or "gpu"


def out_dir(device_name: str | None = None) -> Path:
    """``$TRIFORMER_BENCH_OUT``, else ``benchmarks/results/<card>/`` (``card(device_name)``), created."""
    d = Path(os.environ.get("TRIFORMER_BENCH_OUT") or Path(__file__).parent / "results" / card(device_name))
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_cases(name: str, cases: list[Case]) -> list[dict]:
    """Time every provider of every case, print a table, write CSV, markdown and a plot."""
    rows = []
    for case in cases:
        for provider, fn in case.providers.items():
            try:
                ms, peak = measure(fn)
            except Exception as exc:  # a peer that cannot run a shape is reported, not fatal
                print(f"{case.op} {case.shape} {case.dtype} {case.mode} {provider}: failed: {exc!r}"[:300])
                continue
            row = {
                "op": case.op, "shape": case.shape, "dtype": case.dtype, "mode": case.mode,
                "provider": provider, "ms": round(ms, 4), "peak_MiB": round(peak, 1),
                "GBps": round(case.bytes_moved / ms / 1e6, 1) if case.bytes_moved else "",
                "pct_copy_bw": (round(100 * case.bytes_moved / ms / 1e6 / measured_ceilings()["copy_GBps"], 1)
                                if case.bytes_moved else ""),
                "TFLOPs": round(case.flops / ms / 1e9, 1) if case.flops else "",
            }
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            torch.cuda.empty_cache()
        # a measured provider may hold a CUDA graph and its memory pool (cuda_graphed): let it go before the next
        case.providers = {}
        gc.collect()
        torch.cuda.empty_cache()
        write_results(name, rows)  # after every case, so a run stopped at its time limit keeps its rows
    return rows


def command_line() -> str:
    """This run's command, as run from the repository root: ``python -m benchmarks.<name> [args]``."""
    return " ".join(["python -m benchmarks." + Path(sys.argv[0]).stem, *sys.argv[1:]])


def write_results(name: str, rows: list[dict], env: dict[str, str] | None = None) -> None:
    if not rows:
        return
    env = env or environment()
    d = out_dir(env["gpu"])
    with open(d / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"# {name} benchmark", "", " | ".join(f"{k}: {v}" for k, v in env.items()), "",
             f"Command: `{command_line()}`; time is do_bench's median, "
             "memory the peak above inputs.", "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    (d / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(name, rows, d / f"{name}.png", env)


def plot(name: str, rows: list[dict], path: Path, env: dict[str, str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["dtype"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (dtype, mode) in zip(axes[0], groups):
        sub = [r for r in rows if r["dtype"] == dtype and r["mode"] == mode]
        shapes = list(dict.fromkeys(r["shape"] for r in sub))
        providers = list(dict.fromkeys(r["provider"] for r in sub))
        width = 0.8 / len(providers)
        for i, p in enumerate(providers):
            ms = [next((r["ms"] for r in sub if r["shape"] == s and r["provider"] == p), 0) for s in shapes]
            ax.bar([x + i * width for x in range(len(shapes))], ms, width, label=p)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))], shapes, rotation=30, fontsize=7)
        ax.set_title(f"{name} {mode} {dtype}")
        ax.set_ylabel("ms (median, lower is better)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{env['gpu']} · torch {env['torch']} · triton {env['triton']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_from_log(log_path: str) -> None:
    """Rebuild results files from a GPU run's log (``scripts/gpu_run.sh`` prints every row as ``key=value``),
    for a run whose result files were lost when it hit the device's time limit.

        python -m benchmarks.common /path/to/log.txt
    """
    lines = Path(log_path).read_text().splitlines()
    gpu = lines[0].split(",")[0].strip()
    versions = lines[1].split()  # "torch X triton Y"
    env = {"gpu": gpu, "torch": versions[1], "triton": versions[3], "python": "3.12", "source": Path(log_path).name}
    sections: dict[str, list[dict]] = {}
    name = None
    for line in lines:
        if line.startswith("== bench "):
            name = line.split()[2]
        elif name and line.startswith("op="):
            row = dict(re.findall(r"(\w+)=(.*?)(?= \w+=|$)", line))  # values may hold spaces ("B16 H12")
            row["ms"] = float(row["ms"])
            sections.setdefault(name, []).append(row)
    for name, rows in sections.items():
        write_results(name, rows, env)


if __name__ == "__main__":
    results_from_log(sys.argv[1])
