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
from benchmarks.common import activation_linear_main
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


if __name__ == "__main__":
    activation_linear_main("gelu_linear", SHAPES, providers, inputs)
