"""Fused linear + cross-entropy benchmark (GPU): ``python -m benchmarks.linear_cross_entropy [--sweep|--profile]``.
Without a GPU it only builds small cases (smoke test); ``--profile`` then runs its code paths on tiny shapes.

fwd+bwd of ``loss = CE(hidden[N, H] @ weight[V, H]^T, targets)``, then gradients for hidden and weight via
``autograd.grad``. Compute-bound: flops are the three matmuls (logits, grad_hidden, grad_weight), 6*N*H*V.
Peak memory includes the two gradients the call returns; after the table, the triformer rows are also
reported as memory above those gradients (bounded by the chunk budget, triformer.linear_cross_entropy.CHUNK_BYTES). Providers:
triformer, PyTorch eager (F.linear + F.cross_entropy), torch.compile of it, and Liger's
``LigerFusedLinearCrossEntropyLoss`` when installed.

``--sweep`` times triformer at the headline shape for several chunk budgets (``CHUNK_BYTES``) and writes
``linear_cross_entropy_sweep``: the speed / memory trade-off of the chunk size.

``--profile`` (< 90 s on an H100) prints where the time goes at the headline shape: each per-chunk matmul with
the exact shapes and strides of the old layout (whole odd vocabulary, 656-row chunks), of eager's packed
logits, of the current one (aligned bulk + short tail, 640-row chunks) and of a fully padded weight (the
ceiling), with the cuBLAS kernel each one picks; the cross-entropy kernel on one chunk; full fwd+bwd runs per
chunk budget (time, memory above the gradients, host enqueue time, host syncs); then the llama-like head per
budget (cost of re-reading grad_W every chunk) and the fp32 head, old layout vs current.
"""
import contextlib
import statistics
import sys
import time
import warnings
from pathlib import Path


import torch
import torch.nn.functional as F

import triformer  # noqa: F401  (chooses compiled kernels vs the interpreter first)
import triton
import triton.testing
from benchmarks.common import Case, liger_import, main, out_dir, run_cases
from triformer.cross_entropy import launch_cross_entropy, mean_scale
from triformer.linear_cross_entropy import linear_cross_entropy

lce_module = sys.modules["triformer.linear_cross_entropy"]  # the package attribute of that name is the function

# (tokens, hidden, vocab, dtype): GPT-2 small's head (the goal), a llama-3-8B-like head, a 32k-vocab model,
# and GPT-2 in fp32.
GPU_SHAPES = [(16384, 768, 50257, torch.bfloat16), (8192, 4096, 128256, torch.bfloat16),
              (16384, 2048, 32000, torch.bfloat16), (8192, 768, 50257, torch.float32)]
CPU_SHAPES = [(96, 40, 1031, torch.float32)]


def eager(h, w, t):
    return F.cross_entropy(F.linear(h, w), t)


def liger_loss():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    return LigerFusedLinearCrossEntropyLoss


def peers() -> dict:
    fns = {
        "triformer": lambda h, w, t: linear_cross_entropy(h, w, t),
        "eager": eager,
        "compile": torch.compile(eager),
    }
    liger_class = liger_import(liger_loss)
    if liger_class is not None:
        liger = liger_class()
        fns["liger"] = lambda h, w, t: liger(w, h, t)
    return fns


class LazyInputs:
    """Inputs of the case being timed, created on first use and dropped when the next case asks."""

    def __init__(self, device):
        self.device, self.key, self.value = device, None, None

    def get(self, tokens, hidden, vocab, dtype):
        if self.key != (tokens, hidden, vocab, dtype):
            self.value = None
            if self.device == "cuda":
                torch.cuda.empty_cache()
            h = torch.randn(tokens, hidden, device=self.device, dtype=dtype, requires_grad=True)
            w = (torch.randn(vocab, hidden, device=self.device, dtype=dtype) / hidden ** 0.5).requires_grad_()
            t = torch.randint(0, vocab, (tokens,), device=self.device)
            t[::10] = -100
            self.key, self.value = (tokens, hidden, vocab, dtype), (h, w, t)
        return self.value


def provider(inputs, shape, loss_fn):
    def run():
        h, w, t = inputs.get(*shape)
        return torch.autograd.grad(loss_fn(h, w, t), (h, w))
    return run


def case(inputs, shape, fns) -> Case:
    tokens, hidden, vocab, dtype = shape
    return Case(op="linear_cross_entropy", shape=f"{tokens}x{hidden}x{vocab}", dtype=str(dtype).removeprefix("torch."),
                mode="fwd+bwd", bytes_moved=0, flops=6.0 * tokens * hidden * vocab,
                providers={name: provider(inputs, shape, fn) for name, fn in fns.items()})


def report_above_gradients(rows) -> None:
    for r in rows:
        if r["provider"].startswith("triformer"):
            tokens, hidden, vocab = (int(x) for x in r["shape"].split("x"))
            grads_mib = (tokens + vocab) * hidden * getattr(torch, r["dtype"]).itemsize / 2**20
            print(f"{r['shape']} {r['dtype']} {r['provider']}: {r['ms']} ms, "
                  f"{r['peak_MiB'] - grads_mib:.1f} MiB above the returned gradients")


def sweep() -> None:
    inputs = LazyInputs("cuda")
    shape = GPU_SHAPES[0]
    providers = {}
    for mib in (16, 32, 48, 64, 96, 128):
        def run(mib=mib):
            lce_module.CHUNK_BYTES = mib << 20
            h, w, t = inputs.get(*shape)
            return torch.autograd.grad(linear_cross_entropy(h, w, t), (h, w))
        providers[f"triformer_chunk{mib}MiB"] = run
    c = case(inputs, shape, {})
    c.providers = providers
    report_above_gradients(run_cases("linear_cross_entropy_sweep", [c]))


@contextlib.contextmanager
def chunk_policy(chunk_bytes: int, vocab_align: int, row_align: int):
    """Run the op with another chunk budget / layout: vocab_align = row_align = 1 is the old layout (one matmul
    over the whole vocabulary, chunks spread evenly at any row count)."""
    saved = lce_module.CHUNK_BYTES, lce_module.VOCAB_ALIGN, lce_module.CHUNK_ROW_ALIGN
    lce_module.CHUNK_BYTES, lce_module.VOCAB_ALIGN, lce_module.CHUNK_ROW_ALIGN = chunk_bytes, vocab_align, row_align
    try:
        yield
    finally:
        lce_module.CHUNK_BYTES, lce_module.VOCAB_ALIGN, lce_module.CHUNK_ROW_ALIGN = saved


OLD, NEW = (1, 1), (lce_module.VOCAB_ALIGN, lce_module.CHUNK_ROW_ALIGN)


def bench_ms(fn) -> float:
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # CPU smoke run of the profile: wall clock, only to exercise the code
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def kernel_names(fn) -> str:
    """The GPU kernels one call of ``fn`` launches (cuBLAS names tell TMA / alignment), '' on CPU."""
    if not torch.cuda.is_available():
        return ""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    try:
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = [e.key for e in prof.key_averages()
                 if (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)) > 0]
    except Exception as exc:
        return f"(profiler failed: {exc!r})"[:200]
    return " + ".join(n[:110] for n in names)


def guarded(fn, *args, **kwargs):
    """Run one profile section; a failure is printed and the next section still runs."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        print(f"{fn.__name__} failed: {exc!r}"[:300], flush=True)
        return None


def tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def profile_matmuls(shape, rows_old: int, rows_new: int) -> dict:
    """Per-chunk matmuls of each layout; returns {layout: (rows, fwd + grad_h + grad_W ms)}."""
    n_tok, n_hid, n_voc, dtype = shape
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    padded = triton.cdiv(n_voc, lce_module.ROW_ALIGN) * lce_module.ROW_ALIGN
    split = n_voc - n_voc % NEW[0]
    rows = max(rows_old, rows_new)
    h = torch.randn(n_tok, n_hid, device=dev, dtype=dtype)
    w = torch.randn(n_voc, n_hid, device=dev, dtype=dtype) / n_hid ** 0.5
    w_pad = torch.zeros(padded, n_hid, device=dev, dtype=dtype)
    w_pad[:n_voc] = w
    buf = torch.randn(rows, padded, device=dev, dtype=dtype) * 1e-3  # padded rows, as the op allocates
    packed = torch.randn(rows_new, n_voc, device=dev, dtype=dtype) * 1e-3  # eager's logits: ld = V
    grad_h = torch.empty(rows, n_hid, device=dev, dtype=dtype)
    grad_w = torch.zeros(padded, n_hid, device=dev, dtype=dtype)

    def ops(r, logits, weight, gw, accumulate=True):
        hc, gh = h[:r], grad_h[:r]
        gw_op = (lambda: gw.addmm_(logits.t(), hc)) if accumulate else (lambda: torch.mm(logits.t(), hc, out=gw))
        return (lambda: torch.mm(hc, weight.t(), out=logits), lambda: torch.mm(logits, weight, out=gh), gw_op)

    variants = {  # name: (rows, vocabulary columns, (fwd, grad_h, grad_W))
        f"old r={rows_old} V={n_voc} ld={padded}": (rows_old, n_voc, ops(rows_old, buf[:rows_old, :n_voc], w,
                                                                          grad_w[:n_voc])),
        f"old-layout r={rows_new}": (rows_new, n_voc, ops(rows_new, buf[:rows_new, :n_voc], w, grad_w[:n_voc])),
        f"eager-like ld={n_voc} r={rows_new}": (rows_new, n_voc, ops(rows_new, packed, w, grad_w[:n_voc])),
        f"new bulk V={split} r={rows_new}": (rows_new, split, ops(rows_new, buf[:rows_new, :split], w[:split],
                                                                   grad_w[:split])),
        "new bulk, grad_W first chunk (mm)": (rows_new, split, ops(rows_new, buf[:rows_new, :split], w[:split],
                                                                    grad_w[:split], accumulate=False)),
        f"new tail V={n_voc - split} r={rows_new}": (rows_new, n_voc - split,
                                                     ops(rows_new, buf[:rows_new, split:n_voc], w[split:],
                                                         grad_w[split:n_voc])),
        f"padded-W V={padded} r={rows_new}": (rows_new, padded, ops(rows_new, buf[:rows_new], w_pad, grad_w)),
    }
    print(f"\n== per-chunk matmuls {n_tok}x{n_hid}x{n_voc} {dtype}: ms (TFLOP/s) ==")
    print(f"{'layout':<40} {'fwd h@W^T':>17} {'grad_h g@W':>17} {'grad_W +=g^T@h':>17} {'sum':>8}")
    sums = {}
    for name, (r, cols, fns) in variants.items():
        if cols == 0:
            continue
        times = [bench_ms(fn) for fn in fns]
        flops = 2.0 * r * n_hid * cols
        sums[name] = (r, sum(times))
        print(f"{name:<40} " + " ".join(f"{t:8.4f} ({tflops(flops, t):5.0f})" for t in times) + f" {sum(times):8.4f}",
              flush=True)
    print("kernels per matmul:")
    for name in list(variants)[:1] + list(variants)[2:4] + list(variants)[5:]:
        r, cols, fns = variants[name]
        if cols and torch.cuda.is_available():
            for stage, fn in zip(("fwd", "grad_h", "grad_W"), fns):
                print(f"  {' '.join(name.split()[:2])} {stage}: {kernel_names(fn)}", flush=True)
    return sums


def profile_cross_entropy(shape, row_counts) -> dict:
    """The cross-entropy kernel alone on one chunk (in place, mean scale: as the op launches it)."""
    n_tok, n_hid, n_voc, dtype = shape
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    padded = triton.cdiv(n_voc, lce_module.ROW_ALIGN) * lce_module.ROW_ALIGN
    targets = torch.randint(0, n_voc, (n_tok,), device=dev)
    loss_rows = torch.empty(n_tok, device=dev)
    scale = mean_scale(targets, -100)
    out = {}
    print("\n== cross-entropy kernel on one chunk (logits -> gradient in place): ms (GB/s of 1 read + 1 write) ==")
    for r in row_counts:
        logits3 = (torch.randn(r, padded, device=dev, dtype=dtype)[:, :n_voc]).unsqueeze(0)
        ms = bench_ms(lambda: launch_cross_entropy(logits3, targets[:r], loss_rows[:r], logits3, scale, -100, 0.0, 0.0))
        out[r] = ms
        print(f"rows={r:<6} {ms:8.4f} ms  {2 * r * n_voc * dtype.itemsize / ms / 1e6:7.0f} GB/s", flush=True)
    return out


def profile_full(shape, configs, check_syncs: bool = False) -> None:
    """fwd+bwd (loss, then autograd.grad for hidden and weight) per (label, chunk bytes, layout) config."""
    n_tok, n_hid, n_voc, dtype = shape
    cuda = torch.cuda.is_available()
    inputs = LazyInputs("cuda" if cuda else "cpu")
    grads_mib = (n_tok + n_voc) * n_hid * dtype.itemsize / 2**20
    print(f"\n== fwd+bwd {n_tok}x{n_hid}x{n_voc} {dtype}: ms, TFLOP/s (6NHV), chunks, MiB above grads, "
          f"host enqueue ms ==")
    for label, chunk_bytes, layout in configs:
        def run():
            h, w, t = inputs.get(*shape)
            if layout is None:
                return torch.autograd.grad(eager(h, w, t), (h, w))
            with chunk_policy(chunk_bytes, *layout):
                return torch.autograd.grad(linear_cross_entropy(h, w, t), (h, w))
        try:
            run()
            ms = bench_ms(run)
            above = enqueue = float("nan")
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                run()
                enqueue = 1e3 * (time.perf_counter() - t0)
                torch.cuda.synchronize()
                above = (torch.cuda.max_memory_allocated() - before) / 2**20 - grads_mib
        except Exception as exc:  # one failing config must not hide the others
            print(f"{label}: failed: {exc!r}"[:300], flush=True)
            continue
        chunks = "-"
        if layout is not None:
            with chunk_policy(chunk_bytes, *layout):
                chunks = triton.cdiv(n_tok, lce_module._chunk_rows(n_tok, n_voc, dtype.itemsize))
        print(f"{label:<34} {ms:8.3f} ms {tflops(6.0 * n_tok * n_hid * n_voc, ms):6.0f} TF/s  chunks={chunks!s:<4} "
              f"+{above:7.1f} MiB  enqueue {enqueue:6.2f} ms", flush=True)
    if check_syncs and cuda:
        label, chunk_bytes, layout = configs[-1]
        h, w, t = inputs.get(*shape)
        with warnings.catch_warnings(record=True) as caught, chunk_policy(chunk_bytes, *layout):
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                torch.autograd.grad(linear_cross_entropy(h, w, t), (h, w))
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [str(c.message)[:120] for c in caught if "synchroniz" in str(c.message)]
        print(f"host syncs in one fwd+bwd ({label}): {len(syncs)} {syncs[:2]}", flush=True)
    inputs.value = None


def predict(n_tok: int, rows: dict, sums: dict, ce: dict) -> None:
    print("\npredicted fwd+bwd from the stages (chunks x (3 matmuls + CE)):")
    for name in ("old", "new"):
        keys = [k for k in sums if k.startswith(name) and "first chunk" not in k and "layout" not in k]
        per_chunk = sum(sums[k][1] for k in keys) + ce[rows[name]]
        chunks = triton.cdiv(n_tok, rows[name])
        print(f"  {name}: {chunks} x {per_chunk:.4f} = {chunks * per_chunk:.2f} ms", flush=True)


def profile_grad_w_traffic(shape, r: int) -> None:
    """One chunk's grad_W += g^T h at a large V x H: bound by reading and writing grad_W, not by flops."""
    n_tok, n_hid, n_voc, dtype = shape
    g = torch.randn(r, n_voc, device="cuda", dtype=dtype) * 1e-3
    hc = torch.randn(r, n_hid, device="cuda", dtype=dtype)
    gw = torch.zeros(n_voc, n_hid, device="cuda", dtype=dtype)
    ms = bench_ms(lambda: gw.addmm_(g.t(), hc))
    moved = (2 * n_voc * n_hid + r * (n_voc + n_hid)) * dtype.itemsize
    print(f"{n_hid}x{n_voc} grad_W += g^T h at r={r}: {ms:.4f} ms, {tflops(2.0 * r * n_hid * n_voc, ms):.0f} TF/s, "
          f"{moved / ms / 1e6:.0f} GB/s (grad_W read + written)", flush=True)


class Tee:
    """stdout that is also written to a file (the GPU run script keeps only the tail of stdout)."""

    def __init__(self, path: Path):
        self.stream, self.file = sys.stdout, open(path, "w")

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()


def profile() -> None:
    path = out_dir() / "linear_cross_entropy_profile.txt"
    tee = Tee(path)
    with contextlib.redirect_stdout(tee):
        profile_sections()
    tee.file.close()
    print(f"(also written to {path})")


def profile_sections() -> None:
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    mib = 1 << 20 if cuda else 1 << 14  # CPU smoke: tiny budgets on a tiny shape, so that there are several chunks
    head = GPU_SHAPES[0] if cuda else (600, 24, 1031, torch.float32)
    n_tok, n_voc, itemsize = head[0], head[2], head[3].itemsize
    rows = {}
    for name, layout in (("old", OLD), ("new", NEW)):
        with chunk_policy(64 * mib, *layout):
            rows[name] = lce_module._chunk_rows(n_tok, n_voc, itemsize)
    sums = guarded(profile_matmuls, head, rows["old"], rows["new"])
    ce = guarded(profile_cross_entropy, head, sorted(set(rows.values())))
    if sums and ce:
        guarded(predict, n_tok, rows, sums, ce)
    guarded(profile_full, head, [("eager", 0, None), ("old layout 64MiB", 64 * mib, OLD),
                                 ("vocab split only (old rows) 64MiB", 64 * mib, (NEW[0], 1))]
            + [(f"new {b}MiB", b * mib, NEW) for b in (256, 128, 32, 64)], check_syncs=True)
    if cuda:  # grad_W (V x H) is read and written once per chunk: the llama-like head pays for small chunks
        llama, fp32 = GPU_SHAPES[1], GPU_SHAPES[3]
        guarded(profile_full, llama, [(f"new {b}MiB", b << 20, NEW) for b in (64, 256, 1024)])
        guarded(profile_grad_w_traffic, llama, 256)
        torch.cuda.empty_cache()
        guarded(profile_full, fp32, [("old layout 64MiB", 64 << 20, OLD), ("new 64MiB", 64 << 20, NEW)])
    print(f"\nprofile took {time.perf_counter() - t_start:.0f} s")


def build_cases(device: str, shapes, fns) -> list[Case]:
    inputs = LazyInputs(device)
    return [case(inputs, shape, fns) for shape in shapes]


if __name__ == "__main__":
    cpu_fns = {"triformer": lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows=32), "eager": eager}
    main("linear_cross_entropy", lambda: build_cases("cuda", GPU_SHAPES, peers()),
         lambda: build_cases("cpu", CPU_SHAPES, cpu_fns),
         run_on_cpu=True, report=report_above_gradients,
         gpu_flags={"--sweep": sweep, "--profile": profile}, cpu_flags={"--profile": profile})
