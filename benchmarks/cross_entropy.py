"""Cross-entropy benchmark (GPU): ``python benchmarks/cross_entropy.py [--sweep]``. Without a GPU it only builds
small cases (smoke test).

fwd+bwd of ``loss = CE(logits[N, V], targets)`` then d(loss)/d(logits) via ``autograd.grad`` (no ``.grad``
accumulation). Memory-bound: bytes_moved is one read of the logits and one write of their gradient. Providers:
triformer (gradient in a fresh buffer), triformer_inplace (``inplace_backward=True``: the gradient overwrites
the logits), PyTorch eager, torch.compile of it, Liger's ``LigerCrossEntropyLoss`` (also in place) when
installed. All providers share one logits tensor per shape; in-place providers leave gradients in it, which
are still ordinary finite logits for the next call, so timings are unaffected.

``--sweep`` times triformer alone at the headline shapes for a few GPU launch settings (tile bytes, warps,
L2 budget of ``triformer.cross_entropy``) and writes ``cross_entropy_sweep``: the data to retune them.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import triformer  # noqa: E402,F401  (chooses compiled kernels vs the interpreter first)
from benchmarks.common import Case, liger_import, main, run_cases  # noqa: E402
from triformer.cross_entropy import cross_entropy  # noqa: E402

ce_module = sys.modules["triformer.cross_entropy"]  # the package attribute of that name is the function

# (rows, vocab): inputs of 0.8-1.1 G elements, far beyond L2; 50257 (odd) is GPT-2's vocabulary.
GPU_SHAPES = [(16384, 50257), (4096, 256000), (32768, 32000), (8192, 128256)]
CPU_SHAPES = [(64, 1031)]


class LazyInputs:
    """Inputs of the case being timed, created on first use and dropped when the next case asks: only one
    case's [N, V] tensors are alive at a time."""

    def __init__(self, device):
        self.device, self.key, self.value = device, None, None

    def get(self, rows, vocab, dtype):
        if self.key != (rows, vocab, dtype):
            self.value = None
            if self.device == "cuda":
                torch.cuda.empty_cache()
            base = torch.randn(rows, vocab, device=self.device, dtype=dtype, requires_grad=True)
            logits = base * 1.0  # an intermediate, like an LM head's output (inplace_backward needs one)
            targets = torch.randint(0, vocab, (rows,), device=self.device)
            targets[::10] = -100
            self.key, self.value = (rows, vocab, dtype), (logits, targets)
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
        for rows, vocab in shapes:
            shape = (rows, vocab, dtype)
            cases.append(Case(
                op="cross_entropy", shape=f"{rows}x{vocab}", dtype=str(dtype).removeprefix("torch."),
                mode="fwd+bwd", bytes_moved=2 * rows * vocab * dtype.itemsize, flops=0,
                providers={name: provider(inputs, shape, fn) for name, fn in fns.items()}))
    return cases


def sweep() -> None:
    """triformer at the headline shape under several launch settings (module globals read at each launch)."""
    # the L2 budget sets the programs per SM: 1 at 24 MiB for both dtypes here, several at 96 MiB
    settings = [(tile, warps, l2) for tile in (16384, 32768, 65536) for warps in (8, 16, 32)
                for l2 in (24 << 20, 96 << 20)]
    inputs = LazyInputs("cuda")
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        shape = (16384, 50257, dtype)
        providers = {}
        for tile, warps, l2 in settings:
            def run(tile=tile, warps=warps, l2=l2, shape=shape):
                ce_module.TILE_BYTES, ce_module.GPU_WARPS, ce_module.L2_ROW_BUDGET = tile, warps, l2
                logits, targets = inputs.get(*shape)
                return torch.autograd.grad(cross_entropy(logits, targets), logits)
            providers[f"tile{tile // 1024}k_w{warps}_l2{l2 >> 20}M"] = run
        cases.append(Case(op="cross_entropy", shape="16384x50257", dtype=str(dtype).removeprefix("torch."),
                          mode="fwd+bwd", bytes_moved=2 * 16384 * 50257 * dtype.itemsize, flops=0,
                          providers=providers))
    best = {}
    for r in run_cases("cross_entropy_sweep", cases):
        if r["dtype"] not in best or r["ms"] < best[r["dtype"]]["ms"]:
            best[r["dtype"]] = r
    for dtype, r in best.items():
        print(f"best {dtype}: {r['provider']} {r['ms']} ms")


if __name__ == "__main__":
    main("cross_entropy", lambda: build_cases("cuda", GPU_SHAPES),
         lambda: build_cases("cpu", CPU_SHAPES, fns={"triformer": lambda x, t: cross_entropy(x, t),
                                                     "eager": lambda x, t: F.cross_entropy(x, t)}),
         run_on_cpu=True, gpu_flags={"--sweep": sweep})
