"""The one switch between triformer's Triton kernels and their plain-PyTorch twins.

Models hold their parameters in ordinary ``nn.Parameter``s and do all layer math through the namespace
returned by ``get_ops``, so a model built with ``kernels="triton"`` and one built with ``kernels="torch"``
have identical parameters and state-dict keys: a checkpoint moves between them, and tests compare them.
"""
from __future__ import annotations

from types import SimpleNamespace

import triformer

# kernels -> the suffix of the triformer functions of that variant
KERNELS = {"triton": "", "torch": "_reference"}

# Every layer op a model may call. The "torch" variant of each is triformer's ``<name>_reference``.
OP_NAMES = (
    "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm",
    "attention", "attention_packed", "dropout",
    "gelu", "gelu_linear", "swiglu", "glu_linear", "apply_rope",
    "cross_entropy", "linear_cross_entropy",
)
# Helpers that launch no kernel, shared by both variants.
SHARED_NAMES = ("rope_cos_sin", "split_qkv")


def check_kernels(kernels: str) -> None:
    """The one check of ``model.kernels``: every model config calls it (``TransformerConfig.__post_init__``),
    whichever path builds the model (train.py, eval.py, init_from, the registry, ``from_huggingface``)."""
    if kernels not in KERNELS:
        raise ValueError(f"model.kernels={kernels!r} is not one of: {', '.join(KERNELS)}")


def get_ops(kernels: str) -> SimpleNamespace:
    """The layer functions of one variant: ``"triton"`` (triformer's kernels) or ``"torch"`` (references).
    ``kernels`` comes from a model config, which has checked it."""
    suffix = KERNELS[kernels]
    wanted = {name: name + suffix for name in OP_NAMES} | {name: name for name in SHARED_NAMES}
    # callable(): ``triformer.<op>`` is the submodule, not the function, until __init__ exports the function
    missing = [attr for attr in wanted.values() if not callable(getattr(triformer, attr, None))]
    if missing:
        raise ImportError(f"triformer does not export {', '.join(missing)}, which the models need")
    return SimpleNamespace(**{name: getattr(triformer, attr) for name, attr in wanted.items()})
