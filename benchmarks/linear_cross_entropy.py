"""Fused linear + cross-entropy benchmark (GPU): ``python benchmarks/linear_cross_entropy.py [--sweep]``.
Without a GPU it only builds small cases (smoke test).

fwd+bwd of ``loss = CE(hidden[N, H] @ weight[V, H]^T, targets)``, then gradients for hidden and weight via
``autograd.grad``. Compute-bound: flops are the three matmuls (logits, grad_hidden, grad_weight), 6*N*H*V.
Peak memory includes the two gradients the call returns; after the table, the triformer rows are also
reported as memory above those gradients (the goal: <= 64 MiB at 16384x768x50257 bf16). Providers:
triformer, PyTorch eager (F.linear + F.cross_entropy), torch.compile of it, and Liger's
``LigerFusedLinearCrossEntropyLoss`` when installed.

``--sweep`` times triformer at the headline shape for several chunk budgets (``CHUNK_BYTES``) and writes
``linear_cross_entropy_sweep``: the speed / memory trade-off of the chunk size.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import triformer  # noqa: E402,F401  (chooses compiled kernels vs the interpreter first)
from benchmarks.common import Case, liger_available, run_cases  # noqa: E402
from triformer.linear_cross_entropy import linear_cross_entropy  # noqa: E402

lce_module = sys.modules["triformer.linear_cross_entropy"]  # the package attribute of that name is the function

# (tokens, hidden, vocab, dtype): GPT-2 small's head (the goal), a llama-3-8B-like head, a 32k-vocab model,
# and GPT-2 in fp32.
GPU_SHAPES = [(16384, 768, 50257, torch.bfloat16), (8192, 4096, 128256, torch.bfloat16),
              (16384, 2048, 32000, torch.bfloat16), (8192, 768, 50257, torch.float32)]
CPU_SHAPES = [(96, 40, 1031, torch.float32)]


def eager(h, w, t):
    return F.cross_entropy(F.linear(h, w), t)


def peers() -> dict:
    fns = {
        "triformer": lambda h, w, t: linear_cross_entropy(h, w, t),
        "eager": eager,
        "compile": torch.compile(eager),
    }
    if liger_available():
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
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


if __name__ == "__main__":
    if not torch.cuda.is_available():
        inputs = LazyInputs("cpu")
        fns = {"triformer": lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows=32), "eager": eager}
        cases = [case(inputs, shape, fns) for shape in CPU_SHAPES]
        for c in cases:  # smoke: every provider runs once on small CPU inputs
            for fn in c.providers.values():
                fn()
        print(f"built and ran {len(cases)} small CPU case(s) (no GPU: nothing timed)")
    elif "--sweep" in sys.argv:
        sweep()
    else:
        inputs, fns = LazyInputs("cuda"), peers()
        report_above_gradients(run_cases("linear_cross_entropy", [case(inputs, s, fns) for s in GPU_SHAPES]))
