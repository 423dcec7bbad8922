"""What the training framework relies on from a model, as code: the ``TrainableModel`` protocol.

train.py and eval.py build a model with ``models.create_model(name, kernels, **fields)`` and then use only what
is written here (plus ``nn.Module``'s own methods: ``to``, ``parameters``, ``state_dict``, ``train``/``eval``).
A model class that satisfies it and is registered in models/registry.py trains and evaluates with no change
in training/; ``create_model`` checks it, so a missing member fails at construction, not mid-run.

``task`` names an entry of ``training.tasks.TASKS`` ("lm", "image"): that entry says what the batches ``(x, y)``
are, which fields of the config the data decides, and how the task is evaluated. GPT and ViT satisfy it
(tests/test_models_gpt.py, tests/test_models_vit.py).
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class TrainableModel(Protocol):
    # "lm": x and y are [B, T] token ids (y = x shifted by one, -100 ignored); "image": x is [B, C, H, W] floats,
    # y is [B] class ids. Another value needs its entry in training/tasks.py.
    task: str
    # A dataclass: checkpoints save ``dataclasses.asdict(config)`` and rebuild the model with
    # ``create_model(name, **fields)``. A sequence task's config has ``block_size`` (the longest sequence).
    config: Any

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (logged, and the basis of the MFU estimate)."""

    def flops_per_example(self, seq_len: int | None = None) -> float:
        """Forward + backward FLOPs of one example (a sequence of ``seq_len`` tokens, or one image with
        ``seq_len=None``): the trainer's MFU on a GPU."""

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor | None,
                                                                                      torch.Tensor | None]:
        """``(logits, loss)``. With ``targets``: the mean loss over the targets that are not -100, a 0-d float
        tensor (logits may then be None); without: the logits and None."""


MEMBERS = (*TrainableModel.__annotations__, "num_params", "flops_per_example", "forward")


def check_model(model: Any, name: str) -> None:
    """``TypeError`` naming what ``model`` (registered as ``name``) lacks of the contract."""
    missing = [member for member in MEMBERS if not hasattr(model, member)]
    if missing or not isinstance(model, torch.nn.Module):
        what = f"lacks {', '.join(missing)}" if missing else "is not a torch.nn.Module"
        raise TypeError(f"model {name!r} ({type(model).__name__}) {what}: a model must satisfy "
                        "models.contract.TrainableModel (models/contract.py)")
