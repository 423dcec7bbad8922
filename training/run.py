"""A run's lifecycle around the training loop: config validation before any work, ownership of the run
directory (a lock), cleanup of what a killed run left behind, resume checks, and the messages a user needs.

* ``validate_train_config(cfg)`` / ``validate_eval_config(cfg)``: every numeric value is checked before data is
  prepared or a model built; the message names the key (``trainer.log_interval must be a positive int, got 0``).
* ``RunDirLock``: ``<run_dir>/.lock``, held with ``fcntl.flock`` for the run's lifetime (the kernel releases it
  when the process dies, even by ``kill -9``, so a lock is never stale). A second run into the same directory
  is refused with ``RunDirBusyError`` naming the holder's pid.
* ``clean_stale_temporaries(checkpoint_dir)``: removes only our own checkpoint temporaries
  (``.step_*.safetensors.tmp-*``, ``.best.safetensors.tmp-*``, ``.tmp*``) and only while the lock of the run
  directory they belong to is held, so a live writer's file is never touched.
* ``check_resume(saved_config, cfg)``: refuses to resume with other batch or data settings (the run would no
  longer be the exact continuation) unless ``resume_allow_changes=true``.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("triformer.run")

LOCK_FILE = ".lock"
# What save_checkpoint / CheckpointManager (and tempfile.mkstemp's default prefix) name their temporaries.
STALE_TEMPORARY = re.compile(r"^\.(step_\d+|best)\.safetensors\.tmp-[A-Za-z0-9_]+$|^\.tmp[A-Za-z0-9_]{6,}$")
# Files Hydra writes into a job's output directory before our code runs: a run that failed while its
# directory holds only these leaves nothing of value. (A live run's .lock keeps its directory.)
HYDRA_FILES = {".hydra", "train.log", "eval.log"}


class RunDirBusyError(RuntimeError):
    """Another live process holds the run directory."""


class RunComplete(Exception):
    """``resume`` points at a run that already reached ``trainer.max_steps``: nothing to train."""


# ------------------------------------------------------------------------------------------ validation
def _check_number(key: str, value: Any, *, integer: bool = False, minimum: float | None = None,
                  maximum: float | None = None, min_exclusive: bool = False, max_exclusive: bool = False,
                  optional: bool = False) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool)
    if ok and not integer and value != value:  # NaN
        ok = False
    if ok and minimum is not None:
        ok = value > minimum if min_exclusive else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if max_exclusive else value <= maximum
    if not ok:
        null = "null or " if optional else ""
        if integer and minimum in (0, 1) and maximum is None and not min_exclusive:
            want = f"{null}a {'positive' if minimum == 1 else 'non-negative'} int"
        else:
            lo = "" if minimum is None else (f"> {minimum}" if min_exclusive else f">= {minimum}")
            hi = "" if maximum is None else (f"< {maximum}" if max_exclusive else f"<= {maximum}")
            bounds = " and ".join(b for b in (lo, hi) if b)
            want = f"{null}{'an int' if integer else 'a number'}{' ' + bounds if bounds else ''}"
        raise ValueError(f"{key} must be {want}, got {value!r}")


def _positive_int(key, value, optional=False):
    _check_number(key, value, integer=True, minimum=1, optional=optional)


def _non_negative_int(key, value, optional=False):
    _check_number(key, value, integer=True, minimum=0, optional=optional)


def validate_train_config(cfg) -> None:
    """Check every numeric value of a training config (``configs/train.yaml`` composed) before any work."""
    t, o, m = cfg.trainer, cfg.optim, cfg.model
    _check_number("seed", cfg.seed, integer=True)
    for key in ("batch_size", "grad_accum", "max_steps", "max_bad_steps", "keep_last", "log_interval"):
        _positive_int(f"trainer.{key}", t[key])
    for key in ("eval_interval", "ckpt_interval"):
        _non_negative_int(f"trainer.{key}", t[key])
    for key in ("eval_batches", "eval_batch_size", "cpu_threads"):
        _positive_int(f"trainer.{key}", t.get(key), optional=True)
    _check_number("trainer.grad_clip", t.grad_clip, minimum=0)
    _check_number("trainer.peak_flops", t.peak_flops, minimum=0, min_exclusive=True)
    _check_number("optim.lr", o.lr, minimum=0, min_exclusive=True)
    _check_number("optim.min_lr_ratio", o.min_lr_ratio, minimum=0, maximum=1)
    _check_number("optim.eps", o.eps, minimum=0)
    _check_number("optim.weight_decay", o.weight_decay, minimum=0)
    _non_negative_int("optim.warmup_steps", o.warmup_steps)
    betas = list(o.betas) if o.betas is not None and not isinstance(o.betas, (str, int, float)) else None
    if betas is None or len(betas) != 2:
        raise ValueError(f"optim.betas must be a pair [beta1, beta2], got {o.betas!r}")
    for i, b in enumerate(betas):
        _check_number(f"optim.betas[{i}]", b, minimum=0, maximum=1, max_exclusive=True)
    _check_number("model.dropout", m.get("dropout", 0.0), minimum=0, maximum=1, max_exclusive=True)
    for key in ("n_layer", "n_head", "n_embd", "n_kv_head", "mlp_hidden", "block_size"):
        if key in m:
            _positive_int(f"model.{key}", m[key], optional=True)
    _check_number("loss.label_smoothing", cfg.loss.get("label_smoothing", 0.0), minimum=0, maximum=1,
                  max_exclusive=True)
    if "ce_chunks" in cfg.loss:
        _positive_int("loss.ce_chunks", cfg.loss.ce_chunks)
    if "seq_len" in cfg.data:
        _positive_int("data.seq_len", cfg.data.seq_len)


def validate_eval_config(cfg: dict) -> None:
    """Check ``configs/eval.yaml``'s numeric values before a checkpoint is loaded."""
    _positive_int("batch_size", cfg.get("batch_size"))
    for key in ("max_batches", "context", "stride", "max_tokens"):
        _positive_int(key, cfg.get(key), optional=True)
    _positive_int("num_samples", cfg.get("num_samples", 1))
    _positive_int("max_new_tokens", cfg.get("max_new_tokens", 1))
    _check_number("temperature", cfg.get("temperature", 1.0), minimum=0, min_exclusive=True)
    _positive_int("top_k", cfg.get("top_k"), optional=True)
    if cfg.get("seed") is not None:
        _check_number("seed", cfg["seed"], integer=True)


# --------------------------------------------------------------------------------------- directory lock
class RunDirLock:
    """Exclusive ownership of a run directory for one process (``acquire()`` ... ``release()``)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunDirBusyError(
                    f"run directory {self.directory} is in use by another run ({holder}); two runs in one "
                    f"directory would interleave their metrics and overwrite each other's checkpoints. Wait for "
                    f"it to finish, or choose another run_dir") from None
            # The holder before us may have unlinked the file after we opened it: then we locked an orphan.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiter re-checks the inode (see acquire)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def clean_stale_temporaries(checkpoint_dir: str | os.PathLike, lock: RunDirLock | None = None) -> list[Path]:
    """Remove checkpoint temporaries a killed writer left in ``checkpoint_dir``. ``lock`` is the held lock of
    the run directory above it; without one, the directory's lock is taken for the cleanup and, when another
    run holds it, nothing is removed (that run may be writing)."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return []
    own = None
    if lock is None or not lock.held:
        own = RunDirLock(directory.parent)
        try:
            own.acquire()
        except RunDirBusyError:
            return []
    removed = []
    try:
        for p in directory.iterdir():
            if STALE_TEMPORARY.match(p.name) and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                removed.append(p)
    finally:
        if own is not None:
            own.release()
    if removed:
        log.info(f"removed {len(removed)} temporary file(s) left in {directory} by an interrupted checkpoint write: "
                 + ", ".join(p.name for p in sorted(removed)))
    return removed


def remove_if_empty(run_dir: str | os.PathLike, remove_parent: bool = False) -> bool:
    """Delete a failed run's directory when it holds nothing but Hydra's bookkeeping (and our lock)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    names = {p.name for p in run_dir.iterdir()}
    if not names <= HYDRA_FILES:
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    if remove_parent:  # the experiment's folder too (runs/<name>), if this was its only run
        try:
            run_dir.parent.rmdir()
        except OSError:
            pass
    return True


# ------------------------------------------------------------------------------------------------ resume
# Settings a resumed run must share with the checkpoint's to continue exactly: the global batch and the data.
RESUME_KEYS = ("trainer.batch_size", "seed")
DATA_KEYS_IGNORED = ("cache_dir", "hf_cache_dir", "num_proc", "verify", "repair_cache")


def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<missing>"
        node = node[part]
    return node


def resume_differences(saved: dict, current: dict) -> list[str]:
    """``key: checkpoint X vs now Y`` for each batch/data setting that differs."""
    diffs = [f"{k}: checkpoint {_get(saved, k)!r} vs now {_get(current, k)!r}" for k in RESUME_KEYS
             if _get(saved, k) != _get(current, k)]
    sd, cd = saved.get("data") or {}, current.get("data") or {}
    for k in sorted(set(sd) | set(cd)):
        if k not in DATA_KEYS_IGNORED and sd.get(k, "<missing>") != cd.get(k, "<missing>"):
            diffs.append(f"data.{k}: checkpoint {sd.get(k, '<missing>')!r} vs now {cd.get(k, '<missing>')!r}")
    return diffs


def check_resume(saved: dict, current: dict, path, allow_changes: bool) -> list[str]:
    """Refuse (``ValueError``) to resume with other batch/data settings unless ``allow_changes``; then the
    differences are returned for a warning."""
    diffs = resume_differences(saved, current)
    if diffs and not allow_changes:
        raise ValueError(f"resuming {path} with other batch or data settings would not continue the run exactly: "
                         + "; ".join(diffs) + ". Use the checkpoint's settings, or pass resume_allow_changes=true "
                         "to resume anyway")
    return diffs


# --------------------------------------------------------------------------------------------- messages
def eval_command(checkpoint: str | os.PathLike) -> str:
    return f"python eval.py checkpoint={shlex.quote(str(checkpoint))}"


def sample_command(checkpoint: str | os.PathLike, prompt: str) -> str:
    """eval.py sampling from ``checkpoint``, ready to paste into a POSIX shell. Hydra's override grammar reads
    ``(``, ``,``, ``=`` and spaces itself, so the prompt goes to it as a double-quoted string and the shell gets
    the whole override in single quotes. Inside Hydra's quotes a backslash is literal except before a quote or
    at the end, where it is doubled; a quote is escaped."""
    value = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', prompt)
    value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)
    override = 'prompt="' + value + '"'
    return f"{eval_command(checkpoint)} perplexity=false {shlex.quote(override)}"


def cpu_estimate(seconds_per_step: float, steps_left: int, model_name: str, params: int) -> str | None:
    """The warning for a run that will take long on the CPU (None when it will not)."""
    total = seconds_per_step * steps_left
    if total < 30 * 60:
        return None
    return (f"the first step of {model_name} ({params / 1e6:.1f}M parameters) took {seconds_per_step:.1f} s on the "
            f"CPU: {steps_left} steps would take about {_duration(total)}. Run it on a GPU (trainer=gpu), or try a "
            f"small model on the CPU (python train.py, or model=gpt2-nano / experiment=vit-digits), or fewer steps "
            f"(trainer.max_steps=...)")


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


class _StderrHandler(logging.Handler):
    """Messages to the current ``sys.stderr`` through tqdm (never tearing a progress bar)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never fail a run
            self.handleError(record)


def setup_logging() -> None:
    """Under Hydra (``train.py``/``eval.py``) the ``triformer`` loggers propagate to Hydra's handlers: the
    console and ``<run_dir>/train.log`` (``eval.log``). Elsewhere (compose API, notebooks, tests) they print to
    stderr."""
    logger = logging.getLogger("triformer")
    logger.setLevel(logging.INFO)
    try:
        from hydra.core.hydra_config import HydraConfig

        under_hydra = HydraConfig.initialized()
    except Exception:  # noqa: BLE001
        under_hydra = False
    ours = [h for h in logger.handlers if isinstance(h, _StderrHandler)]
    if under_hydra:
        for h in ours:
            logger.removeHandler(h)
        logger.propagate = True
    elif not ours:
        logger.addHandler(_StderrHandler())
        logger.propagate = False
