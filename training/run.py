"""A run's lifecycle around the training loop: config validation before any work, ownership of the run
directory (a lock), cleanup of what a killed run left behind, resume checks, and the messages a user needs.

* Settings are checked before any work in ``training/settings.py``; ``user_errors()`` around train.py's and
  eval.py's work turns a refusal into one line (``error: ...``) instead of a traceback through Hydra.
* ``RunDirLock``: ``<run_dir>/.lock``, held with ``fcntl.flock`` for the run's lifetime (the kernel releases it
  when the process dies, even by ``kill -9``, so a lock is never stale). A second run into the same directory
  is refused with ``RunDirBusyError`` naming the holder's pid.
* ``clean_stale_temporaries(checkpoint_dir)``: removes only our own checkpoint temporaries
  (``.step_*.safetensors.triformer-tmp-*``, ``.best.safetensors.triformer-tmp-*``) and only while the lock of the
  run directory they belong to is held, so a live writer's file is never touched.
* ``Interrupted``: a run stopped by SIGINT (Ctrl-C) or SIGTERM after saving a checkpoint; its message is the
  one line saying where and how to resume (``resume_command``).
* ``check_resume(saved_config, cfg)``: refuses to resume with other batch or data settings (the run would no
  longer be the exact continuation) unless ``resume_allow_changes=true``.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from training.checkpoint import TEMP_MARK

log = logging.getLogger("triformer.run")

LOCK_FILE = ".lock"
# What save_checkpoint / CheckpointManager name their temporaries, and nothing else: a folder outside a run
# directory may hold another program's temporaries (``.tmpXXXXXX``), which are not ours to remove.
STALE_TEMPORARY = re.compile(rf"^\.(step_\d+|best)\.safetensors{re.escape(TEMP_MARK)}[A-Za-z0-9_]+$")
# What a run writes into its directory: a new run into a directory holding any of these would replace the other
# run's checkpoints and config and mix the two runs' metrics.
RUN_RECORDS = ("config.json", "metrics.jsonl", "metrics.csv", "summary.json", "checkpoints/step_*.safetensors",
               "checkpoints/best.safetensors")
# Files Hydra writes into a job's output directory before our code runs: a run that failed while its
# directory holds only these leaves nothing of value. (A live run's .lock keeps its directory.)
HYDRA_FILES = {".hydra", "train.log", "eval.log"}


class RunDirBusyError(RuntimeError):
    """Another live process holds the run directory."""


class RunComplete(Exception):
    """``resume`` points at a run that already reached ``trainer.max_steps``: nothing to train."""


class Interrupted(Exception):
    """The run stopped on a signal after saving a checkpoint; ``str()`` says where and how to resume."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


# What a user's mistake raises (a refused setting, a missing or modified file, a busy directory): one line.
USER_ERRORS = (ValueError, FileNotFoundError, RunDirBusyError)


@contextlib.contextmanager
def user_errors():
    """Around train.py's and eval.py's work: a user's mistake as the one line ``error: <message>`` and exit status
    1, not a traceback through Hydra (``HYDRA_FULL_ERROR=1`` keeps the traceback); a run stopped by a signal as
    its one line and status 128 + the signal. An output directory Hydra made for the refused work goes too."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except Interrupted as stop:
        log.warning(str(stop))
        raise SystemExit(128 + stop.signum) from None
    except KeyboardInterrupt:
        _remove_hydra_output()
        log.warning("interrupted: stopped at once, nothing saved since the last checkpoint (a single Ctrl-C during "
                    "training stops after the current step and saves one)")
        raise SystemExit(128 + signal.SIGINT) from None
    except (*USER_ERRORS, OmegaConfBaseException) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _remove_hydra_output()
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def _remove_hydra_output() -> None:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        remove_if_empty(HydraConfig.get().runtime.output_dir, remove_parent=True)


def resume_command(run_dir: str | os.PathLike) -> str:
    """The command that resumes the run in ``run_dir``: this command line's overrides (under Hydra) with
    ``resume=<run_dir>``."""
    from hydra.core.hydra_config import HydraConfig

    given = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    args = [a for a in given if not a.split("=", 1)[0].lstrip("+~") == "resume"] + [f"resume={run_dir}"]
    return "python train.py " + " ".join(shlex.quote(a) for a in args)


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
    if not directory.is_dir() or not os.access(directory, os.W_OK):  # read-only: nothing can be removed
        return []
    own = None
    if lock is None or not lock.held:
        own = RunDirLock(directory.parent)
        try:
            own.acquire()
        except (RunDirBusyError, OSError):  # busy, or a folder we may not write to: nothing is removed
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


def run_directory_of(checkpoint_path: str | os.PathLike) -> Path | None:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/step_N.safetensors``), or None for a
    checkpoint file elsewhere."""
    path = Path(checkpoint_path)
    return path.parent.parent if path.parent.name == "checkpoints" else None


def holds_run(directory: str | os.PathLike) -> list[str]:
    """The records of a run that ``directory`` holds (``RUN_RECORDS`` present in it)."""
    directory = Path(directory)
    return [name for name in RUN_RECORDS if any(directory.glob(name))]


def move_log(from_dir: Path, run_dir: Path) -> None:
    """Move the log files Hydra opened in its output directory ``from_dir`` (``train.log``) to ``run_dir``,
    appending: a resumed run continues in its own directory, and its log with it."""
    target = run_dir / "train.log"
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler) or Path(handler.baseFilename).parent != from_dir:
            continue
        handler.acquire()
        try:
            handler.close()
            old = Path(handler.baseFilename)
            with open(target, "a") as f:  # what was logged before the move
                f.write(old.read_text() if old.is_file() else "")
            old.unlink(missing_ok=True)
            handler.baseFilename, handler.mode = str(target), "a"
            handler.stream = handler._open()
        finally:
            handler.release()


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
# Where and how the data is read, not what is read: data.num_workers / prefetch_factor leave a streamed image
# folder's batches unchanged (tests/test_data_vision.py), so a resume may change them.
DATA_KEYS_IGNORED = ("cache_dir", "hf_cache_dir", "num_proc", "verify", "repair_cache", "num_workers",
                     "prefetch_factor")


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
