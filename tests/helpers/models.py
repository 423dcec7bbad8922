"""Model-level helpers shared by the model tests: the Triton model and its float64 PyTorch twin."""
import dataclasses

import torch

from models import GPT, GPTConfig, ViT, ViTConfig
from triformer.testing import assert_close, kernel_device

_MODEL_OF = {GPTConfig: GPT, ViTConfig: ViT}


def pair(config):
    """The Triton model (fp32, on the kernel device) and its PyTorch-kernels twin in float64 with the same
    weights, for a GPTConfig or a ViTConfig."""
    model_cls = _MODEL_OF[type(config)]
    torch.manual_seed(1)
    ours = model_cls(config).to(kernel_device())
    ref = model_cls(dataclasses.replace(config, kernels="torch"))
    ref.load_state_dict(ours.state_dict())
    return ours, ref.to(kernel_device(), torch.float64)


def assert_grads_close(ours, ref):
    """Every parameter of ``ours`` has a gradient, within tolerance of its namesake's in the float64 ``ref``."""
    named_ref = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert_close(f"grad {name}", p.grad, named_ref[name].grad)
