"""Every setting of a training run, checked before any data or model work: one check per knob, in one place.

Each config group has a dataclass: ``RunSettings`` (the top-level keys), ``TrainerSettings``, ``OptimSettings``,
``LoggerSettings`` here; the data group is the task's data config (``TextConfig`` / ``ImageConfig``) and the model
and loss groups are the registry's model config (``GPTConfig`` / ``ViTConfig``), the classes that consume them.
``build(prefix, cls, values)`` checks every value against its field's annotation first (a ``bool`` field takes
only true or false, since ``trainer.compile=no`` is the string "no", which Python calls true; an ``int`` is not a
bool; a ``float`` is finite), then the class's ``__post_init__`` checks the values, and any failure becomes one
``ValueError`` naming the key: ``trainer.compile must be true or false, got 'no'``. These classes have no
defaults: the yaml files are the one place where a default is set.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Union

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
DEVICES = ("auto", "cpu", "cuda")
STRATEGIES = ("ddp", "fsdp")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw",)
LOGGERS = ("none", "wandb")
WANDB_MODES = ("auto", "online", "offline", "disabled")
# torch.manual_seed takes seeds below 2**64; numpy's generators are seeded with seed % 2**32
MAX_SEED = 2**64


# ------------------------------------------------------------------------------------------ the checks
def _accepts(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_accepts(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if hint is list or origin is list:
        return isinstance(value, (list, tuple)) and all(_accepts(v, args[0]) for v in value if args)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True  # a type this module does not know: the class's own checks decide


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return ("null or " if type(None) in args else "") + " or ".join(parts)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    return {bool: "true or false", int: "an int", float: "a finite number", str: "a string", list: "a list",
            dict: "a mapping"}.get(hint, getattr(hint, "__name__", str(hint)))


def check_value(key: str, value: Any, hint: Any) -> None:
    """``ValueError("<key> must be <what the annotation allows>, got <value>")`` unless ``value`` fits ``hint``."""
    if not _accepts(value, hint):
        raise ValueError(f"{key} must be {_describe(hint)}, got {value!r}")


def build(prefix: str, cls: type, values: dict[str, Any], keys: dict[str, str] | None = None, **fixed: Any):
    """``cls(**values, **fixed)`` with each of ``values`` type-checked first; errors name the key
    (``keys[field]``, else ``<prefix>.<field>``)."""
    keys = keys or {}
    name = {f.name: keys.get(f.name, f"{prefix}.{f.name}") for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(name))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(f'{prefix}.{k}' for k in unknown)}; {prefix} has: "
                         f"{', '.join(sorted(name))}")
    hints = typing.get_type_hints(cls)
    for field, value in values.items():
        check_value(name[field], value, hints[field])
    try:
        return cls(**{**fixed, **values})
    except (TypeError, ValueError) as e:
        raise ValueError(named(str(e), name, prefix)) from None


def named(message: str, keys: dict[str, str], prefix: str) -> str:
    """A class's message (which names its field: ``n_head must be ...``) with the field's config key instead."""
    first = re.split(r"[ =\[]", message, maxsplit=1)[0]
    if first in keys:
        return keys[first] + message[len(first):]
    return f"{prefix}: {message}"


def check_choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not one of: {', '.join(map(str, choices))}")


def check_range(key: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """``value`` (already type-checked) within the bounds; the message says which."""
    ok = (low is None or (value > low if low_open else value >= low)) and \
         (high is None or (value < high if high_open else value <= high))
    if not ok:
        bounds = [f"{'>' if low_open else '>='} {low}" if low is not None else "",
                  f"{'<' if high_open else '<='} {high}" if high is not None else ""]
        raise ValueError(f"{key} must be {' and '.join(b for b in bounds if b)}, got {value!r}")


def at_least(settings: Any, low: float, *keys: str) -> None:
    """``check_range(key, value, low)`` for each of ``keys`` of ``settings`` that is set (null passes)."""
    for key in keys:
        if getattr(settings, key) is not None:
            check_range(key, getattr(settings, key), low)


# --------------------------------------------------------------------------------------------- groups
@dataclasses.dataclass
class RunSettings:
    """configs/train.yaml's own keys."""
    name: str
    seed: int
    runs_root: str
    run_dir: str | None
    resume: str | None
    resume_allow_changes: bool
    memory_report: bool
    init_from: str | None

    def __post_init__(self):
        check_range("seed", self.seed, 0, MAX_SEED, high_open=True)
        for key in ("name", "runs_root", "run_dir", "resume", "init_from"):
            if getattr(self, key) == "":
                raise ValueError(f"{key} must not be empty (null for none)")


@dataclasses.dataclass
class TrainerSettings:
    """configs/trainer/*.yaml."""
    device: str
    strategy: str
    precision: str
    compile: bool
    compile_mode: str
    compile_backend: str
    cuda_graph: bool
    activation_checkpointing: bool
    cpu_threads: int | None
    batch_size: int
    grad_accum: int
    max_steps: int
    grad_clip: float
    log_interval: int
    eval_interval: int
    eval_at_start: bool
    eval_batches: int | None
    eval_batch_size: int | None
    test_at_end: bool
    ckpt_interval: int
    keep_last: int
    max_bad_steps: int
    peak_flops: float
    progress: bool

    def __post_init__(self):
        check_choice("device", self.device, DEVICES)
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("compile_mode", self.compile_mode, COMPILE_MODES)
        if self.compile_backend != "inductor":  # the default is always there; importing dynamo to list them costs ~3 s
            import torch._dynamo

            check_choice("compile_backend", self.compile_backend, torch._dynamo.list_backends(exclude_tags=()))
        at_least(self, 1, "batch_size", "grad_accum", "max_steps", "max_bad_steps", "keep_last", "log_interval",
                 "cpu_threads", "eval_batches", "eval_batch_size")
        at_least(self, 0, "eval_interval", "ckpt_interval", "grad_clip")
        check_range("peak_flops", self.peak_flops, 0, low_open=True)


@dataclasses.dataclass
class OptimSettings:
    """configs/optim/*.yaml."""
    name: str
    lr: float
    min_lr_ratio: float
    betas: list[float]
    eps: float
    weight_decay: float
    warmup_steps: int
    schedule: str

    def __post_init__(self):
        check_choice("name", self.name, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_range("lr", self.lr, 0, low_open=True)
        check_range("min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_range("eps", self.eps, 0)
        check_range("weight_decay", self.weight_decay, 0)
        check_range("warmup_steps", self.warmup_steps, 0)
        if len(self.betas) != 2:
            raise ValueError(f"betas must be a pair [beta1, beta2], got {self.betas!r}")
        for i, beta in enumerate(self.betas):
            check_range(f"betas[{i}]", beta, 0, 1, high_open=True)


@dataclasses.dataclass
class LoggerSettings:
    """configs/logger/*.yaml: ``name`` only for logger=none, wandb's fields for logger=wandb."""
    name: str
    project: str | None = None
    entity: str | None = None
    group: str | None = None
    tags: list[str] | None = None
    mode: str = "auto"
    init_timeout: float = 60.0

    def __post_init__(self):
        check_choice("name", self.name, LOGGERS)
        check_choice("mode", self.mode, WANDB_MODES)
        check_range("init_timeout", self.init_timeout, 0, low_open=True)


GROUPS = {"trainer": TrainerSettings, "optim": OptimSettings, "logger": LoggerSettings}


def check_train_config(cfg) -> None:
    """Every value of a composed training config, before any work (``Trainer._check_settings``)."""
    from omegaconf import OmegaConf

    import models
    from training.tasks import TASKS, get_task

    plain = OmegaConf.to_container(cfg, resolve=True)
    top = {k: v for k, v in plain.items() if k not in (*GROUPS, "data", "model", "loss")}
    build("run", RunSettings, top, keys={f.name: f.name for f in dataclasses.fields(RunSettings)})
    for group, cls in GROUPS.items():
        build(group, cls, plain[group])
    data, model, loss = plain["data"], plain["model"], plain["loss"]
    task = get_task(data.get("task"))
    data_config = build("data", task.data_config_class(), data)
    if loss["name"] not in task.losses:
        users = " and ".join(t.model_kind + "s" for t in TASKS.values() if loss["name"] in t.losses) or "no task"
        raise ValueError(f"loss={loss['name']} is for {users}; {task.model_kind}s use loss={' or '.join(task.losses)}")
    if data_config.needs_val_fraction() and data_config.val_fraction == 0:
        raise ValueError(f"data.val_fraction=0 leaves no validation split (data {data_config.name} has none of its "
                         "own) but training evaluates on it; set data.val_fraction > 0")
    check_choice("model.name", model.get("name"), models.list_models())
    # the model's own fields, then the loss group's (which set model fields of the same names: they are checked
    # by the model's config class, named by their loss.* keys)
    fields = {k: v for k, v in model.items() if k not in ("name", "kernels") and v is not None}
    chosen = {**loss, "loss": loss["name"]}
    losses = {k: chosen[k] for k in task.loss_fields if k in chosen}
    keys = {k: ("loss" if k == "loss" else f"loss.{k}") for k in losses}
    if cfg.get("init_from"):  # the architecture is the checkpoint's: only the run's own fields apply
        from training.init_from import RUN_FIELDS
        fields = {k: v for k, v in fields.items() if k in RUN_FIELDS}
    config_cls, registered = models.registry.registered(model["name"])
    config = build("model", config_cls, {"kernels": model.get("kernels"), **fields, **losses}, keys=keys,
                   **registered)
    if task.sequences and not cfg.get("init_from") and data_config.seq_len > config.block_size:
        raise ValueError(f"data.seq_len={data_config.seq_len} exceeds the model's block_size={config.block_size}; "
                         "lower data.seq_len or raise model.block_size")


@dataclasses.dataclass
class EvalSettings:
    """configs/eval.yaml."""
    checkpoint: str
    split: str
    device: str
    kernels: str
    precision: str
    batch_size: int
    max_batches: int | None
    perplexity: bool
    text_file: str | None
    context: int | None
    stride: int | None
    max_tokens: int | None
    prompt: str | None
    num_samples: int
    max_new_tokens: int
    temperature: float
    top_k: int | None
    seed: int
    output_dir: str
    data: dict | None = None

    def __post_init__(self):
        check_choice("split", self.split, ("train", "val", "test"))
        check_choice("device", self.device, DEVICES)
        check_choice("kernels", self.kernels, ("auto", "triton", "torch"))
        check_choice("precision", self.precision, PRECISIONS)
        at_least(self, 1, "batch_size", "max_batches", "context", "stride", "max_tokens", "num_samples",
                 "max_new_tokens", "top_k")
        check_range("temperature", self.temperature, 0, low_open=True)
        check_range("seed", self.seed, 0, MAX_SEED, high_open=True)


def check_eval_config(cfg) -> dict:
    """Every value of eval.py's config before a checkpoint is loaded; returns it as a plain dict."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        cfg = {} if OmegaConf.is_missing(cfg, "checkpoint") else OmegaConf.to_container(cfg, resolve=True)
    if not cfg.get("checkpoint"):
        raise ValueError("checkpoint= is required: python eval.py checkpoint=runs/<name>/<time> (a run directory: "
                         "its best checkpoint) or checkpoint=path/to/step_N.safetensors")
    build("eval", EvalSettings, cfg, keys={f.name: f.name for f in dataclasses.fields(EvalSettings)})
    return cfg
