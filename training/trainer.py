"""The training loop behind ``train.py``: ``train(cfg)`` with the composed Hydra config.

One optimizer step = ``grad_accum`` micro-batches on each of ``world_size`` ranks; the global batch
(``trainer.batch_size`` sequences or images) stays the same whatever the number of processes, so a run's
losses do not depend on how it is launched. Everything a step depends on (weights, optimizer and scaler
state, RNG streams of every rank, the data position, the step) is in the checkpoint, so a resumed run
continues with exactly the losses an uninterrupted one would have had.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import models
from models.layers import set_activation_checkpointing
from training import checkpoint, distributed, graphs, init_from, memory, run, settings
from training.logging import RunLogger
from training.optim import build_optimizer, lr_at
from training.tasks import get_task

log = logging.getLogger("triformer.train")
CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """Training stopped after ``trainer.max_bad_steps`` non-finite steps in a row."""


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run the training described by ``cfg``; returns the run summary (also written to summary.json).

    A ``resume`` of a run that already reached ``trainer.max_steps`` trains nothing: it says so (and how to
    extend the run) and returns ``{"complete": True, ...}``."""
    run.setup_logging()
    try:
        trainer = Trainer(cfg)
    except run.RunComplete as done:
        log.info(done.args[0])
        return {"complete": True, **done.args[1]}
    try:
        with _tqdm_safe_logging():
            summary = trainer.fit()
        trainer.report_finished(summary)
        return summary
    except BaseException:
        trainer.failed = True
        raise
    finally:
        trainer.close()


@contextlib.contextmanager
def _tqdm_safe_logging():
    """Under Hydra its console handler writes to the terminal: route it through tqdm so bars stay whole."""
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:  # pragma: no cover
        yield
        return
    with logging_redirect_tqdm():
        yield


class Trainer:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.lock: run.RunDirLock | None = None
        self.logger: RunLogger | None = None
        self.failed = False
        self._created_run_dir = False
        self._auto_run_dir = not cfg.run_dir
        self.run_dir: Path | None = None
        self.ctx = None
        try:
            self._setup()
        except BaseException:
            self.failed = True  # a refused or complete run leaves no empty folder behind
            self.close()
            raise

    def _setup(self) -> None:
        """A run's start as named steps, in order: settings checked before any work, random draws in their places."""
        run.setup_logging()
        self._check_settings()
        self.resume_path, self.resume_state = self._check_resume() if self.cfg.resume else (None, None)
        # the run directory of the resumed checkpoint (None for a checkpoint file elsewhere): where the resumed run
        # continues unless run_dir says otherwise, and whose records it carries on
        self.resume_source = run.run_directory_of(self.resume_path) if self.resume_path is not None else None
        self._start_processes()
        self._plan_batches()
        self._claim_run_dir()
        self._prepare_data()
        self._build_model()
        self._report_memory()
        self._prepare_training()
        if self.resume_path is not None:
            self._resume()
        self._start_records()

    def _check_settings(self) -> None:
        """Every value and choice of the config, before any work: a typo fails in a second, not after the data."""
        settings.check_train_config(self.cfg)

    def _start_processes(self) -> None:
        """Threads, device and process group first: every later step needs the device and this rank."""
        cfg, t = self.cfg, self.cfg.trainer
        if t.cpu_threads is not None:
            torch.set_num_threads(t.cpu_threads)
        self.ctx = distributed.init(t.device, t.strategy)
        if t.cpu_threads is None and cfg.model.kernels == "triton" and self.ctx.device.type == "cpu":
            # The interpreter runs every kernel in this one Python thread; torch's other threads have only the
            # small ops between kernels to share, and on shared cores took CPU from it (the default run's 20
            # steps: 50 s with two threads, 32-41 s with one, the same losses)
            torch.set_num_threads(1)
        if cfg.model.kernels == "triton":
            import triformer

            if triformer.INTERPRET != (self.ctx.device.type == "cpu"):
                raise ValueError(f"model.kernels=triton runs {'interpreted on the CPU' if triformer.INTERPRET else 'on CUDA'}"
                                 f" but trainer.device is {self.ctx.device}; change one of them")

    def _plan_batches(self) -> None:
        """Micro-batch and precision follow from world size and device; refused before a directory or data exist."""
        cfg, t = self.cfg, self.cfg.trainer
        per_step = self.ctx.world_size * t.grad_accum
        if t.batch_size % per_step:
            raise ValueError(f"trainer.batch_size={t.batch_size} must be divisible by world_size * grad_accum = "
                             f"{self.ctx.world_size} * {t.grad_accum}")
        self.micro_batch = t.batch_size // per_step
        self.precision = t.precision if t.precision != "auto" else ("bf16" if self.ctx.device.type == "cuda" else "fp32")
        if t.cuda_graph:
            graphs.check_supported(cfg, self.ctx.device, self.ctx.world_size, self.precision)
        self.graphed: graphs.GraphedStep | None = None  # built at the first step, from its batches

    def _claim_run_dir(self) -> None:
        """Rank 0 picks and locks the run directory before anything is written; a killed run's temporaries go.
        A directory holding another run's records is refused: only a resume continues a run in its directory."""
        self.run_dir = self._run_dir()
        if self.ctx.is_main:
            self._created_run_dir = self._created_run_dir or not self.run_dir.exists()
            # this run owns the directory until close(): a second run into it is refused
            self.lock = run.RunDirLock(self.run_dir).acquire()
            records = run.holds_run(self.run_dir)
            if records and not self._continues_in_place:
                raise ValueError(
                    f"run_dir={self.run_dir} already holds a run ({', '.join(records)}); a new run there would replace "
                    f"its checkpoints, best.safetensors and config.json and mix the two runs' metrics. Choose another "
                    f"run_dir (or leave it unset for a new directory), or continue that run with resume={self.run_dir}")
            run.clean_stale_temporaries(self.run_dir / "checkpoints", self.lock)
            if self.resume_source is not None and not self._continues_in_place:
                run.clean_stale_temporaries(self.resume_path.parent)
            hydra_dir = _hydra_output_dir()
            if hydra_dir is not None and hydra_dir.resolve() != self.run_dir.resolve():
                run.move_log(hydra_dir, self.run_dir)  # the log goes with the run (run_dir, or the run resumed)
        distributed.barrier(self.ctx)

    @property
    def _continues_in_place(self) -> bool:
        """Whether this run resumes a checkpoint of its own run directory."""
        return self.resume_source is not None and self.resume_source.resolve() == self.run_dir.resolve()

    def _prepare_data(self) -> None:
        """The data before the model: it decides the vocabulary or classes, and its task what a batch is (tasks.py)."""
        cfg = self.cfg
        _seed_everything(cfg.seed)
        if cfg.get("init_from"):  # fine-tuning: the data may need the checkpoint's tokenizer
            init_from.prepare_config(cfg, self._say)
        from training.data import build_data

        self._say(f"run directory: {self.run_dir}")
        self._say(f"preparing data {cfg.data.name} ...")
        self.data = build_data(cfg.data, seed=cfg.seed, rank=self.ctx.rank, world_size=self.ctx.world_size)
        self.task = get_task(self.data.task)
        self.sample_batch = self._peek_batch()
        self.items_per_example = self.sample_batch[0].shape[1] if self.task.sequences else 1

    def _build_model(self) -> None:
        """Built on the CPU under the same seed on every rank, so every rank starts from the same weights."""
        cfg = self.cfg
        self.model_overrides = self._model_overrides()
        # Built on the CPU under the same seed on every rank (identical initial weights), then moved.
        self.model = (init_from.build_model(cfg, self.model_overrides, self._say) if cfg.get("init_from") else
                      models.create_model(cfg.model.name, kernels=cfg.model.kernels, **self.model_overrides))
        if self.task.sequences and self.items_per_example > self.model.config.block_size:
            raise ValueError(f"data.seq_len={self.items_per_example} exceeds the model's block_size="
                             f"{self.model.config.block_size}; lower data.seq_len or raise model.block_size")
        self.model.to(self.ctx.device)
        self._warn_if_slow_on_cpu()
        # Dropout masks differ between ranks, as they would between the rows of one big batch.
        _seed_everything(cfg.seed + self.ctx.rank)

    def _report_memory(self) -> None:
        """memory_report: one eager step of the bare model vs plain PyTorch, before wrapping or compiling."""
        from models.plain import has_plain_twin

        self.memory_report = None
        if self.cfg.memory_report and self.ctx.is_main and not has_plain_twin(self.model):
            self._say(f"memory_report: skipped, models/plain.py has no plain PyTorch twin of "
                      f"{type(self.model).__name__} to compare with")
        elif self.cfg.memory_report and self.ctx.is_main:
            self._say("measuring activation memory: one training step of this model and one of the plain PyTorch "
                      "model of its size ...")
            self.memory_report = self._measure_memory()
        distributed.barrier(self.ctx)

    def _prepare_training(self) -> None:
        """Wrap before the optimizer takes the parameters; checkpointing and compile on top; counters from zero."""
        cfg, t = self.cfg, self.cfg.trainer
        self.wrapped = distributed.wrap(self.model, self.ctx)
        if t.activation_checkpointing:
            n = set_activation_checkpointing(self.model, True)
            self._say(f"activation checkpointing: {n} blocks recompute their forward in backward")
        self.forward_model = self._compile(self.wrapped) if t.compile else self.wrapped
        self.optimizer = build_optimizer(self.wrapped, cfg.optim, self.ctx.device, sharded=self.ctx.sharded)
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=self.precision == "fp16")
        # Fused AdamW takes the skip of a non-finite step as a device flag (``found_inf``, as the fp16 scaler passes
        # it), so the host need not wait for each step's loss: the guard reads the steps' records later
        # (``_loop``). Other optimizers (the CPU's, FSDP's foreach) are told on the host, after a sync that costs
        # nothing on the CPU.
        self.skips_on_device = self.ctx.device.type == "cuda" and bool(self.optimizer.defaults.get("fused"))
        self._copy_stream = torch.cuda.Stream(self.ctx.device) if self.ctx.device.type == "cuda" else None
        self.ckpt = checkpoint.CheckpointManager(self.run_dir / "checkpoints", keep_last=t.keep_last)
        self.step = 0
        self.best_val = math.inf
        self.last_ckpt: Path | None = None

    def _start_records(self) -> None:
        """The logger last: a run refused by any step above writes no records (close() removes its folder)."""
        self.logger = RunLogger(self.run_dir, self.cfg.logger, OmegaConf.to_container(self.cfg, resolve=True),
                                enabled=self.ctx.is_main, throughput_unit=self.task.unit, history=self.resume_source,
                                until_step=self.step)
        if self.memory_report is not None:
            self._say(self.memory_report.message())
            self.logger.summary(memory_savings=self.memory_report.message(), **self.memory_report.metrics())

    def _compile(self, module: nn.Module) -> nn.Module:
        """``torch.compile`` with ``fullgraph=True``: a graph break is an error at the first step (see
        ``_train_step``), never a silent fallback to eager pieces."""
        t = self.cfg.trainer
        self._say(f"torch.compile (backend {t.compile_backend}, mode {t.compile_mode}, fullgraph): the first step "
                  "compiles, about a minute for a GPT-2 small on an H200")
        return torch.compile(module, backend=t.compile_backend, fullgraph=True,
                             mode=None if t.compile_mode == "default" else t.compile_mode)

    @contextlib.contextmanager
    def _compile_errors_named(self):
        """A compile failure surfaces at the first step, deep in Dynamo or Inductor: say which setting caused it
        and what to run instead, above the original error."""
        try:
            yield
        except torch._dynamo.exc.TorchDynamoException as exc:
            if not self.cfg.trainer.compile:
                raise
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise RuntimeError(
                f"torch.compile of model {self.cfg.model.name} failed (trainer.compile=true, compile_mode "
                f"{self.cfg.trainer.compile_mode}, fullgraph): {type(exc).__name__}: {first_line}\n"
                "Train without it (trainer.compile=false, optionally trainer.cuda_graph=true), and please report "
                "the error above.") from exc

    def _check_resume(self) -> tuple[Path, dict[str, Any]]:
        """Resolve ``resume``, load and verify the checkpoint (a modified or corrupted file is refused, as eval.py
        refuses it) and decide before any work: a finished run has nothing to train; other batch or data settings
        are refused unless ``resume_allow_changes``."""
        cfg = self.cfg
        path = checkpoint.resolve_resume(cfg.resume, Path(cfg.runs_root) / cfg.name)
        state = checkpoint.load_checkpoint(path)
        step, max_steps = state.get("step", 0), cfg.trainer.max_steps
        if step >= max_steps:
            source = run.run_directory_of(path) or path.parent
            best = path.parent / checkpoint.BEST_FILE
            best = best if best.is_file() else path
            raise run.RunComplete(
                f"nothing to train: {source} is complete ({path.name} is at step {step}, trainer.max_steps="
                f"{max_steps}). To train it further, raise the step budget, e.g. python train.py resume={cfg.resume} "
                f"trainer.max_steps={max(2 * step, step + 1)} (the learning-rate schedule then stretches to the new "
                f"max_steps). To evaluate it: {run.eval_command(best)}",
                {"steps": step, "resumed_from": str(path), "best_checkpoint": str(best)})
        saved = state.get("config") or {}
        current = OmegaConf.to_container(cfg, resolve=True)
        diffs = run.check_resume(saved, current, path, bool(cfg.get("resume_allow_changes", False)))
        if diffs:
            log.warning("resuming with other settings (resume_allow_changes=true): " + "; ".join(diffs)
                        + ". The run will not continue exactly as the original would have")
        return path, state

    def _warn_if_slow_on_cpu(self) -> None:
        """A large model on the CPU: say so before the minutes of silence (the estimate follows the first step)."""
        if self.ctx.device.type != "cpu":
            return
        params = self.model.num_params()
        if params > 20e6:
            how = "through Triton's interpreter" if self.cfg.model.kernels == "triton" else "with the PyTorch references"
            self._say(f"warning: {self.cfg.model.name} has {params / 1e6:.0f}M parameters and runs on the CPU {how}: "
                      "expect minutes per step (a time estimate follows the first step). A GPU (trainer=gpu) or a "
                      "small model (python train.py, model=gpt2-nano, experiment=vit-digits) is the practical choice")

    def _run_dir(self) -> Path:
        """run_dir, else the directory of the run a resume continues, else Hydra's output directory, else a
        timestamped one; rank 0's choice is every rank's."""
        source = self.resume_source
        if self.cfg.run_dir:
            path = self.cfg.run_dir
            # Hydra makes run_dir first (its .hydra/ and train.log go there too): holding only those, it is new
            self._created_run_dir = (not Path(path).exists()
                                     or {p.name for p in Path(path).iterdir()} <= run.HYDRA_FILES)
        elif source is not None and os.access(source, os.W_OK):  # a read-only run is continued in a new directory
            path = source
        else:
            try:
                from hydra.core.hydra_config import HydraConfig

                path = HydraConfig.get().runtime.output_dir
            except ValueError:  # not launched through Hydra's main (e.g. compose API)
                # microseconds: two runs started in the same second get two directories
                path = Path(self.cfg.runs_root) / self.cfg.name / datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
        # Ranks may resolve a timestamped directory a second apart: rank 0's choice is the run's.
        return Path(distributed.gather_objects(str(path), self.ctx)[0])

    def _model_overrides(self) -> dict[str, Any]:
        """The one place that decides a model's config fields (what ``create_model`` gets on top of the registry's
        entry for ``model.name``). Each field has one name from the command line to the config class. Later
        sources win:

        1. the config class's default (``GPTConfig`` / ``ViTConfig``);
        2. the registry's entry for ``model.name`` (models/registry.py);
        3. ``cfg.model``, which Hydra merges from configs/model_fields/<family>.yaml, configs/model/<name>.yaml,
           an experiment and the command line (``model.n_layer=4``); null keeps the registry's value;
        4. the loss group: ``loss=<name>`` sets the field ``loss``; ``loss.ce_chunks`` and ``loss.label_smoothing``
           set the fields of the same names;
        5. the data: ``vocab_size`` (text), ``num_classes`` / ``in_channels`` / ``image_size`` (images). These
           are facts of the dataset, not choices, so they always win.

        With ``init_from`` the checkpoint's architecture replaces 1-3 (training/init_from.py)."""
        m, loss, task = self.cfg.model, self.cfg.loss, self.task
        overrides = {k: v for k, v in m.items() if k not in ("name", "kernels") and v is not None}
        chosen = {**loss, "loss": loss.name}  # the field ``loss`` is the loss group's choice
        overrides.update({k: chosen[k] for k in task.loss_fields if k in chosen})
        overrides.update(task.data_fields(self.data))
        return overrides

    def _peek_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first micro-batch, without moving the data position (its state is put back exactly, since a
        resumed run must draw the same batches)."""
        state = copy.deepcopy(self.data.state_dict())
        batch = self.data.next_batch(self.micro_batch)
        self.data.load_state_dict(state)
        return batch

    def _measure_memory(self) -> memory.MemoryReport:
        """One step of this model against the plain PyTorch model of the same size (``models.plain``)."""
        from models.plain import plain_model_like

        m = self.cfg.model
        x, y = (t.to(self.ctx.device) for t in self.sample_batch)
        shape = "x".join(map(str, x.shape[:2] if self.task.sequences else x.shape[:1]))
        kernels = "" if m.kernels == "triton" else f", kernels={m.kernels}"
        # The plain model's initialization and the dropout masks draw random numbers; the run's streams must not
        # notice (a run with the report must train exactly like one without).
        with torch.random.fork_rng(devices=[self.ctx.device] if self.ctx.device.type == "cuda" else []):
            plain = plain_model_like(self.model)
            report = memory.compare(self.model, plain, x, y, f"{m.name}{kernels}, micro-batch {shape}, {self.precision}",
                                    self._autocast)
        vocab = getattr(self.model.config, "vocab_size", None)
        report.sources = memory.savings_sources(
            float(m.get("dropout", 0.0)), self.cfg.loss.name if "fused" in self.task.losses else None,
            bool(self.cfg.trainer.activation_checkpointing), (y.numel(), vocab) if vocab else None,
            gelu_mlp=getattr(self.model.config, "activation", "") in ("gelu", "gelu_tanh"))
        del plain
        if self.ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        return report

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def fit(self) -> dict[str, Any]:
        t = self.cfg.trainer
        summary = {}
        with self._stop_on_signals():
            val = self._loop(summary)
        summary |= {"steps": self.step, "params": self.model.num_params(), "run_dir": str(self.run_dir),
                   "last_checkpoint": str(self.last_ckpt) if self.last_ckpt else None,
                   "best_val_loss": self.best_val if math.isfinite(self.best_val) else None}
        if val is not None:
            summary.update({f"final_{k}": v for k, v in val.items()})
        if t.test_at_end:
            test = self._evaluate_and_log("test", None)
            self._say("test: " + ", ".join(f"{k} {v:.4f}" for k, v in test.items()))
            summary.update({f"final_{k}": v for k, v in test.items()})
        self.logger.summary(**summary)
        return {**self.logger.summary_data, **summary}

    def _loop(self, summary: dict[str, Any]) -> dict[str, float] | None:
        """The steps up to ``trainer.max_steps``; returns the last validation metrics."""
        t = self.cfg.trainer
        bad_steps, first_bad = 0, None
        pending: list[tuple[int, torch.Tensor]] = []  # (step, its record) not yet read by the guard
        window_time, window_steps = 0.0, 0  # training time only: evaluations and checkpoints excluded
        val = None
        first_step = True
        if t.eval_at_start and self.step == 0:
            start = self._evaluate_and_log("val", t.eval_batches)
            self._say("before training: " + ", ".join(f"{k} {v:.4f}" for k, v in start.items()))
            summary.update({f"initial_{k}": v for k, v in start.items()})
            # the starting weights are a candidate too: a checkpoint worse than them is not the best
            self.best_val = min(self.best_val, start["val/loss"])
        # after the evaluation at start: the bar's time estimate, like the CPU warning's, is from training steps
        bar = _progress(t, self.step, self.ctx.is_main)
        try:
            while self.step < t.max_steps:
                lr = lr_at(self.step, self.cfg.optim, t.max_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                started = time.perf_counter()
                pending.append((self.step + 1, self._train_step()))
                self.step += 1
                window_steps += 1
                logs = self.step % t.log_interval == 0 or self.step == t.max_steps or self.step == 1
                last = self.step == t.max_steps
                evaluates = bool(t.eval_interval and self.step % t.eval_interval == 0) or last
                saves = bool(t.ckpt_interval and self.step % t.ckpt_interval == 0) or last
                signum = self._stop_requested()
                # Reading a record waits for its step to finish on the device. With the skip on the device that wait
                # comes only where a step's outcome is needed (its log line, an evaluation, a checkpoint, a stop) or
                # max_bad_steps records have piled up, so a run that goes bad stops within max_bad_steps steps of
                # where it would with a read every step, naming the same steps; the skipped steps changed nothing.
                if not self.skips_on_device or logs or evaluates or saves or signum or len(pending) >= t.max_bad_steps:
                    records = torch.stack([r for _, r in pending]).tolist()
                    for (step, _), (loss, grad_norm, finite) in zip(pending, records):
                        if finite:
                            bad_steps = 0
                            continue
                        first_bad = step if bad_steps == 0 else first_bad
                        bad_steps += 1
                        self._say(f"step {step}: non-finite loss/gradient ({loss}, grad norm {grad_norm}); "
                                  f"step skipped ({bad_steps}/{t.max_bad_steps} in a row)")
                        if bad_steps >= t.max_bad_steps:
                            raise NonFiniteLossError(self._bad_message(first_bad, step))
                    pending.clear()
                elapsed = time.perf_counter() - started  # with the wait for the device above, when there was one
                window_time += elapsed
                if first_step and self.ctx.device.type == "cpu":
                    first_step = False
                    warning = run.cpu_estimate(elapsed, t.max_steps - self.step, self.cfg.model.name,
                                               self.model.num_params())
                    if warning:
                        self._say("warning: " + warning, logging.WARNING)
                if logs:
                    metrics = self._train_metrics(loss, grad_norm, lr, window_steps, window_time)
                    self.logger.log("train", self.step, metrics)
                    bar.set_postfix_str(self._postfix(metrics), refresh=False)
                    window_time, window_steps = 0.0, 0
                bar.update(1)
                evaluated = None
                if evaluates:
                    val = evaluated = self._evaluate_and_log("val", t.eval_batches)
                    self._say(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
                # never during a run of bad steps: the newest checkpoint stays one from before the trouble
                saved = bad_steps == 0 and saves
                if saved:
                    self._save(evaluated)
                if signum:
                    if not saved and bad_steps == 0:  # in a run of bad steps the last checkpoint stays the good one
                        self._save(None)
                    where = f"saved {self.last_ckpt}" if bad_steps == 0 else (
                        f"not saved (non-finite steps since {first_bad}); the last checkpoint is {self.last_ckpt}")
                    raise run.Interrupted(signum, f"stopped by {signal.Signals(signum).name} after step {self.step}, "
                                                  f"{where}; resume with: {run.resume_command(self.run_dir)}")
        finally:
            bar.close()
        return val

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT (Ctrl-C) and SIGTERM (a scheduler ending the job) stop the run after the current step, with a
        checkpoint of it (``_loop``), instead of a traceback (SIGINT) or nothing at all (SIGTERM) that lose every
        step since the last interval checkpoint. A second Ctrl-C stops at once."""
        self._stop_signal = None
        if threading.current_thread() is not threading.main_thread():  # only the main thread may handle signals
            yield
            return

        def request(signum, frame):
            if signum == signal.SIGINT and self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _stop_requested(self) -> int | None:
        """The signal that asked the run to stop, agreed by every rank: torchrun forwards it to each, and they may
        see it a step apart, but all must stop (and save) after the same step."""
        signum = self._stop_signal or 0
        if self.ctx.world_size > 1:
            anyone = distributed.total(torch.tensor(float(signum), device=self.ctx.device), self.ctx).item()
            signum = (signum or signal.SIGTERM) if anyone else 0
        return signum or None

    @property
    def _replays_cuda_graphs(self) -> bool:
        """Whether training steps replay CUDA graphs: trainer.cuda_graph, or a compile mode that captures them."""
        t = self.cfg.trainer
        return bool(t.cuda_graph or (t.compile and t.compile_mode in CUDAGRAPH_COMPILE_MODES))

    def _train_step(self) -> torch.Tensor:
        """One optimizer step; returns its record on the device, (loss, grad norm, 1.0 if the step counted as finite
        else 0.0), without waiting for it where the optimizer skips a non-finite step on the device."""
        t = self.cfg.trainer
        self.forward_model.train()
        batches = [self._to_device(self.data.next_batch(self.micro_batch)) for _ in range(t.grad_accum)]
        if t.cuda_graph:
            if self.graphed is None:
                self.graphed = graphs.GraphedStep(self.forward_model, batches, self._autocast)
            total = self.graphed.replay(batches)
        else:
            if self._replays_cuda_graphs:
                # a compile mode that replays CUDA graphs: mark where a step begins, so its replay may reuse the
                # memory of the last step's outputs
                torch.compiler.cudagraph_mark_step_begin()
            total = torch.zeros((), device=self.ctx.device)
            for i, (x, y) in enumerate(batches):
                with distributed.gradient_sync(self.wrapped, self.ctx, enabled=i == t.grad_accum - 1):
                    with self._autocast(), self._compile_errors_named():
                        _, loss = self.forward_model(x, y)
                    self.scaler.scale(loss / t.grad_accum).backward()
                total += loss.detach().float()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        stats = torch.stack([distributed.mean(total / t.grad_accum, self.ctx), grad_norm.float()])
        if self.scaler.is_enabled():
            # fp16: an overflowing gradient is routine (the scaler skips the step and lowers the scale); only a
            # non-finite loss counts as a bad step.
            finite = stats[0].isfinite()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            finite = stats.isfinite().all()
            if self.skips_on_device:
                self.optimizer.found_inf = (~finite).float()
                self.optimizer.step()
            elif finite:
                self.optimizer.step()
        if not t.cuda_graph:  # a captured step's gradients live in its graph's memory, rewritten by each replay
            self.optimizer.zero_grad(set_to_none=True)
        return torch.cat([stats, finite.float()[None]])

    def _to_device(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A host batch on the run's device. On CUDA it is pinned and copied on a side stream: a copy from pinned
        memory runs without the host, and with the host a step ahead of the device (``_loop`` does not wait for
        each step) it overlaps the previous step's kernels instead of queueing behind them."""
        if self._copy_stream is None:
            return batch[0].to(self.ctx.device), batch[1].to(self.ctx.device)
        compute = torch.cuda.current_stream(self.ctx.device)
        with torch.cuda.stream(self._copy_stream):
            out = tuple(b.pin_memory().to(self.ctx.device, non_blocking=True) for b in batch)
        compute.wait_stream(self._copy_stream)
        for b in out:  # allocated on the copy stream, used on the compute stream
            b.record_stream(compute)
        return out

    def _train_metrics(self, loss: float, grad_norm: float, lr: float, steps: int, elapsed: float) -> dict[str, float]:
        t = self.cfg.trainer
        examples_per_s = steps * t.batch_size / max(elapsed, 1e-9)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr,
                   "throughput": examples_per_s * self.items_per_example,
                   "memory_gib": memory.current_bytes(self.ctx.device,
                                                      since_last=not self._replays_cuda_graphs) / 2**30}
        if self.ctx.device.type == "cuda":
            seq = self.items_per_example if self.task.sequences else None
            flops = self.model.flops_per_example(seq) * examples_per_s
            metrics["mfu"] = flops / (t.peak_flops * self.ctx.world_size)
        if self.scaler.is_enabled():
            metrics["loss_scale"] = self.scaler.get_scale()
        return metrics

    def _postfix(self, m: dict[str, float]) -> str:
        parts = [f"loss {m['loss']:.4f}", f"{m['throughput']:,.0f} {self.task.unit_short}/s"]
        if "mfu" in m:
            parts.append(f"MFU {m['mfu']:.1%}")
        parts.append(f"mem {m['memory_gib']:.2f} GiB")
        return ", ".join(parts)

    @torch.no_grad()
    def evaluate(self, split: str, max_batches: int | None) -> dict[str, float]:
        """Mean loss over ``split`` (per target token / image); accuracy too for image models. Every rank
        gets the same batches and computes its slice of each, so the result does not depend on world size."""
        t = self.cfg.trainer
        model = distributed.unwrap(self.wrapped)  # eager, outside DDP: evaluation needs no gradient sync
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.ctx.device)  # loss * n, n, correct
        try:
            for x, y in self.data.eval_batches(split, t.eval_batch_size or t.batch_size // t.grad_accum, max_batches):
                xs, ys = (v.tensor_split(self.ctx.world_size)[self.ctx.rank] for v in (x, y))
                weight = 1
                if xs.shape[0] == 0:  # a short last batch: FSDP's forward is a collective, so run one, count none
                    xs, ys, weight = x[:1], y[:1], 0
                xs, ys = xs.to(self.ctx.device), ys.to(self.ctx.device)
                with self._autocast():
                    logits, loss = model(xs, ys)
                n = (ys != -100).sum() * weight
                sums[0] += loss.double() * n
                sums[1] += n
                if self.task.accuracy:
                    sums[2] += (logits.argmax(-1) == ys).sum() * weight
        finally:
            model.train(was_training)
        sums = distributed.total(sums, self.ctx)
        if sums[1] == 0:
            raise ValueError(f"data split {split!r} produced no evaluation examples")
        out = {f"{split}/loss": float(sums[0] / sums[1])}
        if self.task.accuracy:
            out[f"{split}/accuracy"] = float(sums[2] / sums[1])
        return out

    def _evaluate_and_log(self, split: str, max_batches: int | None) -> dict[str, float]:
        result = self.evaluate(split, max_batches)
        self.logger.log("eval", self.step, result)
        return result

    def _save(self, val: dict[str, float] | None) -> None:
        is_best = val is not None and val["val/loss"] < self.best_val
        if is_best:
            self.best_val = val["val/loss"]
        model_state, optim_state = distributed.full_state(self.wrapped, self.optimizer, self.ctx)
        rng = distributed.gather_objects(_rng_state(self.ctx.device), self.ctx)
        data = distributed.gather_objects(self.data.state_dict(), self.ctx)
        if self.ctx.is_main:
            payload = {
                "model": model_state, "optimizer": optim_state, "scaler": self.scaler.state_dict(),
                "step": self.step, "best_val_loss": self.best_val, "val": val,
                "model_name": self.cfg.model.name, "model_config": dataclasses.asdict(self.model.config),
                "config": OmegaConf.to_container(self.cfg, resolve=True), "rng": rng, "data": data,
                "world_size": self.ctx.world_size,
            }
            self.last_ckpt = self.ckpt.save(self.step, payload, is_best=is_best)
        distributed.barrier(self.ctx)

    def _resume(self) -> None:
        """Load the checkpoint into what setup built: weights, optimizer, scaler, step, data position, RNG streams."""
        path, state = self.resume_path, self.resume_state
        self.resume_state = None  # the tensors are in the model and optimizer now
        if state["model_name"] != self.cfg.model.name:
            raise checkpoint.CheckpointError(f"{path} holds a {state['model_name']!r} model, but model.name is "
                                             f"{self.cfg.model.name!r}")
        checkpoint.check_model_config(state["model_config"], dataclasses.asdict(self.model.config), path)
        distributed.load_full_state(self.wrapped, self.optimizer, state["model"], state["optimizer"], self.ctx)
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best_val, self.last_ckpt = state["step"], state["best_val_loss"], path
        rank = self.ctx.rank if state["world_size"] == self.ctx.world_size else 0
        if state["world_size"] != self.ctx.world_size:
            self._say(f"resuming a {state['world_size']}-process run with {self.ctx.world_size}: "
                      "random streams restart from rank 0's, so losses will not match the original run exactly")
        self.data.load_state_dict(state["data"][rank])
        _set_rng_state(state["rng"][rank], self.ctx.device)
        self._say(f"resumed from {path} at step {self.step}")

    def _bad_message(self, first_bad: int, last_bad: int) -> str:
        where = (f"the last checkpoint, {self.last_ckpt}, is from before step {first_bad}" if self.last_ckpt
                 else "no checkpoint was written")
        return (f"the loss or gradient was non-finite for {self.cfg.trainer.max_bad_steps} steps in a row (steps "
                f"{first_bad}-{last_bad}); stopping. {where}. Try a lower optim.lr, trainer.grad_clip, or "
                f"precision bf16/fp32 instead of fp16.")

    def _say(self, message: str, level: int = logging.INFO) -> None:
        if self.ctx is None or self.ctx.is_main:
            log.log(level, message)

    def report_finished(self, summary: dict[str, Any]) -> None:
        """Where the finished run is, its best checkpoint, final metrics and the command to evaluate it."""
        finals = {k[len("final_"):]: v for k, v in summary.items()
                  if k.startswith("final_") and isinstance(v, (int, float))}
        best = self.run_dir / "checkpoints" / checkpoint.BEST_FILE
        lines = [f"finished: {summary.get('steps')} steps", f"  run directory:   {self.run_dir}"]
        if best.is_file():
            lines.append(f"  best checkpoint: {best} (val/loss {self.best_val:.4f})")
        elif "initial_val/loss" in summary and self.last_ckpt:
            lines.append(f"  best checkpoint: none; no evaluation beat the starting weights (val/loss "
                         f"{summary['initial_val/loss']:.4f} before training): train longer or with another optim.lr")
        if self.last_ckpt:
            lines.append(f"  last checkpoint: {self.last_ckpt}")
        if finals:
            lines.append("  final metrics:   " + ", ".join(f"{k} {v:.4f}" for k, v in finals.items()))
        target = best if best.is_file() else self.last_ckpt
        if target:
            lines.append(f"  evaluate it:     {run.eval_command(target)}")
            if self.task.sample_prompt is not None:
                lines.append(f"  sample from it:  {run.sample_command(target, self.task.sample_prompt)}")
        self._say("\n".join(lines))

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.ctx is None or self.ctx.is_main:
            hydra_dir = _hydra_output_dir()
            if self.failed:
                # a run refused before its directory was chosen still had one made by Hydra
                target = self.run_dir or (None if self.cfg.run_dir else hydra_dir)
                if target is not None and (self._auto_run_dir or self._created_run_dir):
                    run.remove_if_empty(target, remove_parent=self._auto_run_dir)
            if hydra_dir is not None and self.run_dir is not None and hydra_dir.resolve() != self.run_dir.resolve():
                run.remove_if_empty(hydra_dir)  # the run went to run_dir or the run it resumed, its log with it
        if self.ctx is not None:
            distributed.shutdown()
            self.ctx = None


def _hydra_output_dir() -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _progress(t, start: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=t.max_steps, initial=start, disable=not (enabled and t.progress), dynamic_ncols=True,
                desc="train", file=sys.stderr, mininterval=1.0)
