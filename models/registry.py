"""Model names -> configs; ``create_model`` is what the training framework calls.

A new model: a class that satisfies ``models.contract.TrainableModel`` (an ``nn.Module`` with ``task``,
``config``, ``num_params``, ``flops_per_example`` and ``forward(x, targets) -> (logits, loss)``), built from a
dataclass config, and one ``_register`` line below per size; then a configs/model/<name>.yaml (CONTRIBUTING.md,
"Adding an op, a model, a dataset")."""
from __future__ import annotations

import dataclasses

from torch import nn

from models.contract import check_model
from models.gpt import GPT, LLAMA_STYLE, GPTConfig
from models.vit import ViT, ViTConfig

# name -> (model class, config class, config fields). Configs are built only in create_model, from these
# fields plus the overrides (so derived defaults such as mlp_hidden follow an overridden n_embd), and a bad
# config raises before any parameter is allocated.
_MODELS: dict[str, tuple[type[nn.Module], type, dict]] = {}


def _register(name: str, model_cls, config_cls, **fields) -> None:
    _MODELS[name] = (model_cls, config_cls, fields)


def _gpt2(name, n_layer, n_head, n_embd, **kw):
    _register(name, GPT, GPTConfig, n_layer=n_layer, n_head=n_head, n_embd=n_embd, **kw)


def _llama(name, n_layer, n_head, n_embd, **kw):
    _gpt2(name, n_layer, n_head, n_embd, **LLAMA_STYLE, **kw)


# GPT-2 (OpenAI's sizes) and tiny ones for CPU runs
_gpt2("gpt2-nano", 3, 3, 96, block_size=128)
_gpt2("gpt2-micro", 6, 6, 192, block_size=256)
_gpt2("gpt2-small", 12, 12, 768)
_gpt2("gpt2-medium", 24, 16, 1024)
_gpt2("gpt2-large", 36, 20, 1280)
_gpt2("gpt2-xl", 48, 25, 1600)
# llama-style decoders with GPT-2's tokenizer; llama-small is about gpt2-small's size
_llama("llama-nano", 3, 4, 96, n_kv_head=2, block_size=128)
_llama("llama-micro", 6, 6, 192, n_kv_head=2, block_size=256)
_llama("llama-small", 12, 12, 768, n_kv_head=4, block_size=1024)
# ViT at 224x224 with 16x16 patches (the DeiT/timm sizes), and small-image variants
_register("vit-tiny", ViT, ViTConfig, n_layer=12, n_head=3, n_embd=192)
_register("vit-small", ViT, ViTConfig, n_layer=12, n_head=6, n_embd=384)
_register("vit-base", ViT, ViTConfig, n_layer=12, n_head=12, n_embd=768)
_register("vit-cifar", ViT, ViTConfig, n_layer=6, n_head=3, n_embd=192, image_size=32, patch_size=4, num_classes=10)
# sklearn's 8x8 digits: 1 channel, 2x2 patches
_register("vit-digits", ViT, ViTConfig, n_layer=4, n_head=4, n_embd=64, image_size=8, patch_size=2, in_channels=1,
          num_classes=10)


def list_models() -> list[str]:
    return list(_MODELS)


def registered(name: str) -> tuple[type, dict]:
    """(config class, the registry's fields) of model ``name``."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(_MODELS)}")
    return _MODELS[name][1:]


def model_config(name: str, kernels: str = "triton", **overrides):
    """The config ``create_model`` builds ``name`` from (no parameters allocated)."""
    config_cls, fields = registered(name)
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown} for {name!r}; fields: {', '.join(sorted(known))}")
    return config_cls(**{**fields, **overrides, "kernels": kernels})


def create_model(name: str, kernels: str = "triton", **overrides) -> nn.Module:
    """Build the registered model ``name`` with ``kernels`` ("triton" or "torch") and config ``overrides``
    (any config field, e.g. ``dropout=0.1``, ``vocab_size=65``, ``loss="fused"``)."""
    config = model_config(name, kernels, **overrides)
    model = _MODELS[name][0](config)
    check_model(model, name)
    return model
