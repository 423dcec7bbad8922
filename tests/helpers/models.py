"""Model-level helpers shared by the model tests: the Triton model and its float64 PyTorch twin."""
import dataclasses

import torch

from models import GPT, GPTConfig, ViT, ViTConfig
from triformer.testing import kernel_device

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
