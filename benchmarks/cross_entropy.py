"""Cross-entropy benchmark (GPU): ``python -m benchmarks.cross_entropy [--sweep]``. Without a GPU it only builds
small cases (smoke test).

fwd+bwd of ``loss = CE(logits[N, V], targets)`` then d(loss)/d(logits) via ``autograd.grad`` (no ``.grad``
accumulation). Memory-bound: bytes_moved is one read of the logits and one write of their gradient. Providers:
triformer (gradient in a fresh buffer), triformer_inplace (``inplace_backward=True``: the gradient overwrites
the logits), PyTorch eager, torch.compile of it, Liger's ``LigerCrossEntropyLoss`` (also in place) when
installed. All providers share one logits tensor per shape; in-place providers leave gradients in it, which
are still ordinary finite logits for the next call, so timings are unaffected.

``--sweep`` times triformer alone for a set of GPU launch plans (fused or split, programs, column ranges, tile
size) per shape, forward + gradient and the compiled step's statistics-only forward (``cross_entropy_stats``),
and writes ``cross_entropy_sweep``: the data behind ``triformer.cross_entropy``'s constants.
"""
import contextlib
import sys


import torch
import torch.nn.functional as F

import triformer  # noqa: F401  (chooses compiled kernels vs the interpreter first)
import triton
from benchmarks.common import Case, liger_import, main, run_cases
from triformer.cross_entropy import cross_entropy

ce_module = sys.modules["triformer.cross_entropy"]  # the package attribute of that name is the function

# (rows, vocab[, row stride]): inputs of 0.8-1.1 G elements, far beyond L2; 50257 (odd) is GPT-2's vocabulary,
# also as the logits of triformer's GPT-2 (a view of the LM head's output, whose rows are padded to 50304).
GPU_SHAPES = [(16384, 50257), (16384, 50257, 50304), (4096, 256000), (32768, 32000), (8192, 128256)]
CPU_SHAPES = [(64, 1031), (64, 1031, 1088)]


class LazyInputs:
    """Inputs of the case being timed, created on first use and dropped when the next case asks: only one
    case's [N, V] tensors are alive at a time."""

    def __init__(self, device):
        self.device, self.key, self.value = device, None, None

    def get(self, rows, vocab, dtype, row_stride=None):
        if self.key != (rows, vocab, dtype, row_stride):
            self.value = None
            if self.device == "cuda":
                torch.cuda.empty_cache()
            base = torch.randn(rows, row_stride or vocab, device=self.device, dtype=dtype, requires_grad=True)
            logits = base * 1.0  # an intermediate, like an LM head's output (inplace_backward needs one)
            if row_stride:
                logits = logits[:, :vocab]
            targets = torch.randint(0, vocab, (rows,), device=self.device)
            targets[::10] = -100
            self.key, self.value = (rows, vocab, dtype, row_stride), (logits, targets)
        return self.value


def provider(inputs, shape, loss_fn):
    def run():
        logits, targets = inputs.get(*shape)
        return torch.autograd.grad(loss_fn(logits, targets), logits)
    return run


def liger_loss():
    from liger_kernel.transformers import LigerCrossEntropyLoss
    return LigerCrossEntropyLoss


def peers() -> dict:
    fns = {
        "triformer": lambda x, t: cross_entropy(x, t),
        "triformer_inplace": lambda x, t: cross_entropy(x, t, inplace_backward=True),
        "eager": lambda x, t: F.cross_entropy(x, t),
        "compile": torch.compile(lambda x, t: F.cross_entropy(x, t)),
    }
    liger = liger_import(liger_loss)
    if liger is not None:
        fns["liger"] = liger()
    return fns


def build_cases(device: str, shapes, dtypes=(torch.float32, torch.bfloat16), fns=None) -> list[Case]:
    inputs = LazyInputs(device)
    fns = fns or peers()
    cases = []
    for dtype in dtypes:
        for rows, vocab, *row_stride in shapes:
            shape = (rows, vocab, dtype, *row_stride)
            cases.append(Case(
                op="cross_entropy", shape=shape_label(rows, vocab, row_stride),
                dtype=str(dtype).removeprefix("torch."),
                mode="fwd+bwd", bytes_moved=2 * rows * vocab * dtype.itemsize, flops=0,
                providers={name: provider(inputs, shape, fn) for name, fn in fns.items()
                           # writing into a view re-bases its autograd history (PyTorch's in-place rule), so
                           # autograd.grad with respect to the view itself fails; loss.backward() is unaffected
                           if not (row_stride and name.endswith("inplace"))}))
    return cases


# the sweep's shapes: GPT-2's logits (contiguous, and as the view of the LM head's padded rows that its training
# step passes), Llama-2/3 vocabularies, and one chunk of GPT-2's fused linear-CE as it lays the chunk out (the rows
# linear_cross_entropy.CHUNK_BYTES holds, at the padded width): whether a chunk-sized launch costs more per row
# than one over all rows (docs/performance_history.md)
SWEEP_SHAPES = [(16384, 50257), (16384, 50257, 50304), (32768, 32000), (8192, 128256), (2432, 50257, 50304)]


def sweep_plans(rows: int, vocab: int, dtype: torch.dtype, per_sm_counts=(1, 2, 3, 4)) -> dict:
    """Launch plans to time at one shape: fused with ``per_sm_counts`` persistent programs per SM (3: the rows in
    flight of GPT-2's vocabulary then fit the L2) at three tile sizes and two warp counts (registers decide how
    many programs fit an SM: `python -m benchmarks.cross_entropy_sm90`; 32 warps never won on the H100), and the
    split pair with 2-8 column ranges; plus "default", whatever ``_plan`` picks."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    plans = {"default": None}
    for tile in (8192, 16384, 32768):
        block_v = min(triton.next_power_of_2(vocab), tile // dtype.itemsize)
        for warps in (8, 16):
            for per_sm in per_sm_counts:
                plans[f"fused_t{tile >> 10}k_w{warps}_p{per_sm}"] = ce_module.Plan(1, block_v, warps, per_sm * sms)
        if tile == 32768:
            for splits in (2, 4, 8):
                if splits <= triton.cdiv(vocab, block_v):
                    plans[f"split_t{tile >> 10}k_s{splits}"] = ce_module.Plan(1, block_v, 16, 0, splits)
    return plans


@contextlib.contextmanager
def planned(plan):
    """Every launch inside uses ``plan`` (None: whatever ``_plan`` picks)."""
    chosen = ce_module._plan
    if plan is not None:
        ce_module._plan = lambda *args: plan
    try:
        yield
    finally:
        ce_module._plan = chosen


def shape_label(rows: int, vocab: int, row_stride) -> str:
    """``RxV``, and the row stride where the rows are a view of wider ones."""
    return f"{rows}x{vocab}" + (f" (rows of {row_stride[0]})" if row_stride else "")


def sweep() -> None:
    """triformer alone under several launch plans per shape (``_plan`` replaced while each runs), the gradient
    written over the logits (as the fused linear-CE and eager training steps launch it) and into a fresh buffer,
    and the statistics-only forward of torch.compile's step: the data behind the constants of
    ``triformer.cross_entropy``'s GPU launch. Writes ``cross_entropy_sweep``."""
    inputs = LazyInputs("cuda")
    cases = []
    for dtype in (torch.bfloat16,):  # what training steps pass; fp32 rows only move twice the bytes per element
        for rows, vocab, *row_stride in SWEEP_SHAPES:
            shape = (rows, vocab, dtype, *row_stride)
            for inplace in (True, False):
                if row_stride and inplace:  # autograd.grad cannot differentiate a view written in place
                    continue
                providers = {}
                for name, plan in sweep_plans(rows, vocab, dtype).items():
                    def run(plan=plan, shape=shape, inplace=inplace):
                        with planned(plan):
                            logits, targets = inputs.get(*shape)
                            return torch.autograd.grad(cross_entropy(logits, targets, inplace_backward=inplace),
                                                       logits)
                    providers[name] = run
                cases.append(Case(op="cross_entropy" + ("_inplace" if inplace else ""),
                                  shape=shape_label(rows, vocab, row_stride),
                                  dtype=str(dtype).removeprefix("torch."), mode="fwd+bwd",
                                  bytes_moved=2 * rows * vocab * dtype.itemsize, flops=0, providers=providers))
            # The compiled step's loss forward (grad_in_backward): row statistics only, one read of the logits.
            # Without a gradient the kernel needs far fewer registers (benchmarks/cross_entropy_sm90.py), so more
            # programs fit an SM than the forward + gradient plan gives it.
            providers = {}
            for name, plan in sweep_plans(rows, vocab, dtype, per_sm_counts=(1, 2, 4, 6, 8)).items():
                def run_stats(plan=plan, shape=shape, vocab=vocab):
                    with planned(plan):
                        logits, targets = inputs.get(*shape)
                        return ce_module._cross_entropy_fwd_stats(logits.detach(), targets, -100, 0.0, "mean", 1,
                                                                  vocab)
                providers[name] = run_stats
            cases.append(Case(op="cross_entropy_stats", shape=shape_label(rows, vocab, row_stride),
                              dtype=str(dtype).removeprefix("torch."), mode="fwd",
                              bytes_moved=rows * vocab * dtype.itemsize, flops=0, providers=providers))
    best = {}
    results = run_cases("cross_entropy_sweep", cases)
    for r in results:
        key = (r["op"], r["shape"], r["dtype"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    default = {(r["op"], r["shape"], r["dtype"]): r["ms"] for r in results if r["provider"] == "default"}
    for key, r in best.items():
        print(f"best {key}: {r['provider']} {r['ms']} ms ({r.get('pct_copy_bw')}% of copy); default {default[key]} ms")


if __name__ == "__main__":
    main("cross_entropy", lambda: build_cases("cuda", GPU_SHAPES),
         lambda: build_cases("cpu", CPU_SHAPES, fns={"triformer": lambda x, t: cross_entropy(x, t),
                                                     "eager": lambda x, t: F.cross_entropy(x, t)}),
         run_on_cpu=True, gpu_flags={"--sweep": sweep})
