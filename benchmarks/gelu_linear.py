"""GELU + linear benchmark (GPU): ``python -m benchmarks.gelu_linear``. Without a GPU it only builds small cases
(smoke test).

``gelu_linear`` (one op, keeping only GELU's input) against the same two steps as separate ops (triformer's GELU
then ``F.linear``, which keeps GELU's output too), plain PyTorch eager and torch.compile of it, at the MLP shapes
of GPT-2 small (16 x 1024 tokens, 3072 -> 768) and ViT-B/16 (128 x 197 tokens), bf16 with fp32 weights as under
autocast. Time per mode (fwd, bwd, fwd+bwd) with the matmuls' TFLOP/s, then ``gelu_linear_saved``: the memory
each provider keeps from forward to backward (what the op exists to cut).
"""
import torch
import torch.nn.functional as F

import triformer  # noqa: F401  (chooses compiled kernels vs the interpreter first)
from benchmarks.common import Case, main, mode_cases, saved_memory
from triformer.gelu import gelu, gelu_reference
from triformer.gelu_linear import gelu_linear

SHAPES = [("GPT-2", 16384, 3072, 768), ("ViT-B/16", 25216, 3072, 768)]  # (label, tokens, hidden, out)


def providers() -> dict:
    def separate(x, w, b, gb):
        return F.linear(gelu(x, "tanh", gb), w.to(x.dtype), b.to(x.dtype))

    def eager(x, w, b, gb):
        return F.linear(gelu_reference(x, "tanh", gb), w.to(x.dtype), b.to(x.dtype))

    return {"triformer": lambda x, w, b, gb: gelu_linear(x, w, b, "tanh", gb), "separate ops": separate,
            "eager": eager, "compile": torch.compile(eager)}


def inputs(device: str, tokens: int, hidden: int, out: int) -> list[torch.Tensor]:
    return [torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True),
            (torch.randn(out, hidden, device=device) * hidden ** -0.5).requires_grad_(),
            torch.zeros(out, device=device, requires_grad=True),
            torch.zeros(hidden, device=device, requires_grad=True)]


def build_cases(device: str, shapes=SHAPES) -> list[Case]:
    cases = []
    for label, tokens, hidden, out in shapes:
        mm = 2 * tokens * hidden * out
        cases += mode_cases("gelu_linear", f"{label} {tokens}x{hidden}->{out}", torch.bfloat16, providers(),
                            inputs(device, tokens, hidden, out), flops={"fwd": mm, "bwd": 2 * mm, "fwd+bwd": 3 * mm})
    return cases


def saved_memory_report(_rows=None) -> None:
    saved_memory("gelu_linear", [(f"{label} {tokens}x{hidden}->{out}", providers(),
                                  lambda t=tokens, h=hidden, o=out: inputs("cuda", t, h, o))
                                 for label, tokens, hidden, out in SHAPES])


if __name__ == "__main__":
    main("gelu_linear", lambda: build_cases("cuda"), lambda: build_cases("cpu", [("tiny", 16, 32, 8)]),
         run_on_cpu=True, report=saved_memory_report)
