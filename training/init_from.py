"""``init_from=<Hugging Face Hub name | local Hugging Face directory | triformer checkpoint | run directory>``:
fine-tune from weights.

* A Hub name (``gpt2``, ``gpt2-xl``, ``openai-community/gpt2-medium``, a Llama repository), as nanoGPT's
  ``init_from='gpt2-xl'``: that repository's config, safetensors weights and tokenizer files, from the local
  Hugging Face cache or downloaded with ``huggingface_hub.snapshot_download``; then as a local directory. Where
  the Hub cannot be reached and nothing is cached, one line says so and what to do instead.

* A directory with a ``config.json`` written by ``save_pretrained`` (GPT-2 or Llama, ``model.safetensors`` or
  sharded): ``GPT.from_huggingface`` reads it with the safetensors library, offline. Its architecture comes
  from its config; the run's model fields that do not change the weights (dropout, kernels, loss settings)
  still apply, and the architecture fields the run's config sets are ignored (and listed).
* A triformer checkpoint (``.safetensors`` written by train.py), or a run directory / ``latest`` as for
  ``resume`` (its newest checkpoint): the model it holds, weights only. Unlike ``resume``, the optimizer, the
  step, the data position and the random streams start fresh.

The tokenizer: the data must produce the ids the checkpoint was trained on. A text run left at the default
byte tokenizer takes the checkpoint's: GPT-2's BPE for a Hugging Face GPT-2 directory with its 50257-token
vocabulary, the directory's own ``tokenizer.json`` for any other (a Llama's: ``data.tokenizer=hf``), or the
tokenizer a triformer checkpoint's run used. Any other mismatch between the data's vocabulary
and the checkpoint's is an error that says so.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
from omegaconf import DictConfig, open_dict

import models
from training import checkpoint
from training.data import tokenizers

# GPTConfig/ViTConfig fields a fine-tuning run may change without changing what the weights mean
RUN_FIELDS = ("kernels", "dropout", "loss", "ce_chunks", "label_smoothing")
GPT2_VOCAB = 50257


def _hf_config(path: Path) -> dict | None:
    """The config.json of a Hugging Face directory. A triformer run directory has a config.json too (the run's
    config): Hugging Face's always names its ``model_type``, the run's never does."""
    config = path / "config.json"
    if path.is_dir() and config.is_file():
        with open(config) as f:
            hf = json.load(f)
        return hf if isinstance(hf, dict) and "model_type" in hf else None
    return None


# The files of a Hub repository a model needs: its config, safetensors weights (sharded or not), the tokenizer.
HUB_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "generation_config.json"]
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class HubUnavailable(ValueError):
    """A Hub name that is neither cached nor downloadable here (a user error: one line, no traceback)."""


def hub_snapshot(name: str) -> Path:
    """The local directory of Hub repository ``name`` (its HUB_FILES): the cached snapshot, else downloaded."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or only partly): download below
        pass
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    if tokenizers.offline_requested() or not tokenizers.network_reachable(host):
        raise HubUnavailable(
            f"init_from={name}: not a local directory or checkpoint, and the Hugging Face Hub is not reachable from "
            f"here (nor is {name} in the local cache): on a machine with network run `hf download {name} --local-dir "
            f"DIR` and pass init_from=DIR")
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001 - unknown repository, gated model, network failure: one line
        raise HubUnavailable(f"init_from={name}: could not download it from the Hugging Face Hub: "
                             f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None


def resolve(spec: str, cfg: DictConfig) -> tuple[str, Path]:
    """("hf", directory) or ("triformer", checkpoint file); a Hub name becomes its local snapshot directory."""
    path = Path(str(spec)).expanduser()
    if _hf_config(path) is not None:
        return "hf", path
    try:
        return "triformer", checkpoint.resolve_resume(str(path), Path(cfg.runs_root) / cfg.name, key="init_from")
    except FileNotFoundError as e:
        missing = e
    if not path.exists() and _HUB_NAME.match(str(spec)) and str(spec) != "latest":
        snapshot = hub_snapshot(str(spec))
        if _hf_config(snapshot) is not None:
            return "hf", snapshot
    raise ValueError(f"{missing}. init_from takes a local Hugging Face save_pretrained directory (with its "
                     f"config.json), a triformer checkpoint or run directory, latest, or a Hugging Face Hub name")


def prepare_config(cfg: DictConfig, say: Callable[[str], None]) -> None:
    """Before the data is built: give a text run at the default byte tokenizer the checkpoint's tokenizer."""
    kind, path = resolve(cfg.init_from, cfg)
    if cfg.data.get("task") != "lm" or cfg.data.get("tokenizer", "bytes") != "bytes":
        return
    tokenizer = None
    if kind == "hf":
        hf = _hf_config(path)
        if hf.get("model_type") == "gpt2" and hf.get("vocab_size") == GPT2_VOCAB:
            tokenizer = {"tokenizer": "gpt2"}
        elif (path / "tokenizer.json").is_file():  # e.g. a Llama: its own tokenizer, read with `tokenizers`
            tokenizer = {"tokenizer": "hf", "tokenizer_file": str(path)}
    else:
        data = (checkpoint.load_checkpoint(path).get("config") or {}).get("data") or {}
        if data.get("tokenizer", "bytes") != "bytes":
            tokenizer = {"tokenizer": data["tokenizer"], "tokenizer_file": data.get("tokenizer_file")}
    if tokenizer:
        with open_dict(cfg):
            for key, value in tokenizer.items():
                if value is not None or key in cfg.data:
                    cfg.data[key] = value
        say(f"init_from: data.tokenizer={tokenizer['tokenizer']} (the checkpoint's tokenizer)")


def _check_architecture(overrides: dict[str, Any], config: Any, source: Path,
                        say: Callable[[str], None]) -> dict[str, Any]:
    """The run's overrides that apply to a model whose architecture comes from ``config``; architecture fields
    the run's config sets otherwise (an experiment's n_layer, say) are ignored, and said so."""
    current = dataclasses.asdict(config)
    ignored = [f"{k}={v!r} (checkpoint: {current[k]!r})" for k, v in overrides.items()
               if k not in RUN_FIELDS and k in current and current[k] != v and k not in ("vocab_size", "num_classes")]
    if ignored:
        say(f"init_from={source}: the architecture is the checkpoint's; ignoring the run's " + ", ".join(ignored))
    return {k: v for k, v in overrides.items() if k in RUN_FIELDS}


def build_model(cfg: DictConfig, overrides: dict[str, Any], say: Callable[[str], None]) -> torch.nn.Module:
    """The model of ``cfg.init_from`` with its weights, on the CPU, with the run's non-architecture ``overrides``."""
    kind, path = resolve(cfg.init_from, cfg)
    kernels = cfg.model.kernels
    if kind == "hf":
        hf = _hf_config(path)
        if hf.get("model_type") not in ("gpt2", "llama"):
            raise ValueError(f"init_from={path}: Hugging Face model_type {hf.get('model_type')!r} is not supported "
                             "(gpt2 or llama)")
        import transformers

        from models.interchange import gpt_config_from_huggingface
        config = models.GPTConfig(**gpt_config_from_huggingface(transformers.AutoConfig.from_pretrained(path)),
                                  kernels=kernels)
        run = _check_architecture(overrides, config, path, say)
        # fp32 master weights whatever the directory stores (bf16 saves are common): precision=bf16 is autocast
        # over fp32 parameters, and an optimizer stepping bf16 weights would lose the small updates
        model = models.GPT.from_huggingface(path, kernels=kernels, dtype=torch.float32, **run)
        source = f"Hugging Face {hf['model_type']} directory {path}"
    else:
        state = checkpoint.load_checkpoint(path)
        saved = {k: v for k, v in state["model_config"].items() if k != "kernels"}
        name = state["model_name"]
        base = models.model_config(name, kernels, **saved)
        run = _check_architecture(overrides, base, path, say)
        model = models.create_model(name, kernels=kernels, **{**saved, **run})
        model.load_state_dict(state["model"])  # copies into the new model's fp32 parameters, whatever was saved
        source = f"triformer checkpoint {path} (step {state.get('step')})"
    vocab = overrides.get("vocab_size")
    if vocab is not None and getattr(model.config, "vocab_size", vocab) != vocab:
        raise ValueError(f"init_from={path}: the checkpoint's vocabulary has {model.config.vocab_size} tokens but the "
                         f"data's tokenizer gives {vocab}; use the tokenizer the checkpoint was trained with "
                         "(data.tokenizer=..., data.tokenizer_file=...)")
    classes = overrides.get("num_classes")
    if classes is not None and getattr(model.config, "num_classes", classes) != classes:
        raise ValueError(f"init_from={path}: the checkpoint classifies {model.config.num_classes} classes, the data "
                         f"has {classes}")
    say(f"init_from: {source}, {sum(p.numel() for p in model.parameters()):,} parameters")
    return model
