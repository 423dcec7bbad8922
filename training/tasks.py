"""Everything the framework does differently per task, in one table: adding a task is one ``Task`` entry here.

A data config names its task (``task: lm`` in configs/data/*.yaml) and a model class declares the one it
solves (``GPT.task = "lm"``, see models/contract.py). The trainer, eval.py and ``training.data.build_data`` ask
``get_task(name)`` what differs (what a batch is, which model fields the data decides, which losses apply,
what is measured) and never branch on the name themselves.

The entry of a new task names its data builder and its eval.py work as "module:function" (imported at the
first call: this module imports nothing of training/, so everything may import it).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Task:
    name: str                      # data.task, and the model class's ``task``
    model_kind: str                # for messages: "language model"
    data_kind: str                 # for messages: "text (language-model) data"
    unit: str                      # what throughput counts: "tokens" (per second) ...
    unit_short: str                # ... and the progress bar's "tok/s"
    sequences: bool                # x is [batch, seq]: an example is seq tokens (throughput, FLOPs and the
                                   # model's block_size depend on seq); else one item per example
    accuracy: bool                 # evaluation reports top-1 accuracy too
    losses: tuple[str, ...]        # the loss group's options that apply (loss=<name>)
    loss_fields: tuple[str, ...]   # model config fields the loss group sets, under the same names; the field
                                   # ``loss`` is the loss group's choice (loss.name)
    data_fields: Callable[[Any], dict[str, Any]]  # data -> the model config fields the data decides
    build_data: str                # "module:function" (cfg.data as a dict, seed, rank, world_size) -> the data
    evaluate: str                  # "module:function" doing eval.py's work on a checkpoint of this task
    data_config: str               # "module:Class": the dataclass of the data group's settings (checked before
                                   # any work, training/settings.py)
    sample_prompt: str | None = None  # the prompt of the sampling command a finished run prints; None: no sampling

    def make_data(self, cfg: dict, seed: int, rank: int = 0, world_size: int = 1):
        return _function(self.build_data)(cfg, seed, rank, world_size)

    def run_eval(self, *args, **kwargs) -> dict[str, Any]:
        return _function(self.evaluate)(*args, **kwargs)

    def data_config_class(self) -> type:
        return _function(self.data_config)


def _function(spec: str) -> Callable:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _text_fields(data) -> dict[str, Any]:
    return {"vocab_size": data.vocab_size}


def _image_fields(data) -> dict[str, Any]:
    channels, height, width = data.image_shape
    if height != width:
        raise ValueError(f"the ViT models take square images, data gives {height}x{width}")
    return {"num_classes": data.num_classes, "in_channels": channels, "image_size": height}


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("lm", "language model", "text (language-model) data", "tokens", "tok", sequences=True, accuracy=False,
         losses=("ce", "fused"), loss_fields=("loss", "ce_chunks", "label_smoothing"), data_fields=_text_fields,
         build_data="training.data.text:build_text_data", evaluate="training.evaluate:evaluate_lm",
         data_config="training.data.text:TextConfig",
         sample_prompt="def main("),  # the default data is Python source; any text works as a prompt
    Task("image", "image classifier", "image-classification data", "images", "img", sequences=False, accuracy=True,
         losses=("ce",), loss_fields=("label_smoothing",), data_fields=_image_fields,
         build_data="training.data.vision:build_image_data", evaluate="training.evaluate:evaluate_image",
         data_config="training.data.vision:ImageConfig"),
)}


def get_task(name: Any) -> Task:
    if name not in TASKS:
        raise ValueError(f"data.task must be one of: {', '.join(TASKS)}; got {name!r}")
    return TASKS[name]


def with_article(noun: str) -> str:
    """``noun`` with its indefinite article: "an image classifier"."""
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun
