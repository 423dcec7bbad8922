"""SwiGLU + linear benchmark (GPU): ``python -m benchmarks.glu_linear``. Without a GPU it only builds small cases
(smoke test).

``glu_linear`` (one op, keeping only gate and up) against the same two steps as separate ops (triformer's SwiGLU
then ``F.linear``, which keeps their product too), plain PyTorch eager and torch.compile of it, at the MLP tails of
Llama-3.2-1B (8 x 1024 tokens, 8192 -> 2048) and llama-small (16 x 1024 tokens, 2048 -> 768), bf16 with fp32
weights as under autocast. Time per mode (fwd, bwd, fwd+bwd) with the matmuls' TFLOP/s, then ``glu_linear_saved``:
the memory each provider keeps from forward to backward (what the op exists to cut).
"""
import torch
import torch.nn.functional as F

import triformer  # noqa: F401  (chooses compiled kernels vs the interpreter first)
from benchmarks.common import activation_linear_main
from triformer.glu_linear import glu_linear
from triformer.swiglu import swiglu

SHAPES = [("Llama-3.2-1B", 8192, 8192, 2048), ("llama-small", 16384, 2048, 768)]  # (label, tokens, hidden, out)


def providers() -> dict:
    def separate(g, u, w):
        return F.linear(swiglu(g, u), w.to(g.dtype))

    def eager(g, u, w):
        return F.linear(F.silu(g) * u, w.to(g.dtype))

    return {"triformer": glu_linear, "separate ops": separate, "eager": eager, "compile": torch.compile(eager)}


def inputs(device: str, tokens: int, hidden: int, out: int) -> list[torch.Tensor]:
    return [torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True),
            torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True),
            (torch.randn(out, hidden, device=device) * hidden ** -0.5).requires_grad_()]


if __name__ == "__main__":
    activation_linear_main("glu_linear", SHAPES, providers, inputs)
