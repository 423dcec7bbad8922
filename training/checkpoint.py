"""Checkpoints that load without executing anything from the file, written so a crash never leaves a torn one.

Format: one safetensors file. Every tensor of the (nested) payload is a safetensors tensor; everything else
(step, config, optimizer hyper-parameters, RNG states, data position) is JSON in the file's metadata, with
the tensors replaced by references. Loading parses JSON and raw tensor bytes only, never a pickle, so a
foreign or malicious file cannot run code. A SHA-256 over the JSON and every tensor's bytes is stored too,
so a tampered or bit-rotted file is refused instead of silently resuming from wrong weights.

Writes go to a temporary file in the same directory, are fsync'ed, then ``os.replace``'d over the final
name (atomic on POSIX), and the directory is fsync'ed: a reader sees either the old file or the complete new
one. ``CheckpointManager`` keeps the last K step files (everything a resume needs) plus ``best.safetensors``
(lowest validation loss; weights only, ``weights_only``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "triformer-checkpoint/1"
# In the name of every temporary a checkpoint write makes (``.<final name>.triformer-tmp-<random>``): the only
# files a cleanup after a killed write may remove (training/run.py), never another program's ``.tmpXXXX``.
TEMP_MARK = ".triformer-tmp-"
STEP_FILE = re.compile(r"^step_(\d+)\.safetensors$")
BEST_FILE = "best.safetensors"

# numpy dtypes torch cannot hold are widened losslessly; the original dtype is restored on load.
_NUMPY_WIDEN = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: not ours, modified, or from a different model."""


# ----------------------------------------------------------------------------------------------- encoding
def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor], aliases: dict, storages: set) -> Any:
    """JSON-able copy of ``obj`` with tensors moved into ``tensors`` (keyed by their path in the tree)."""
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": _add_tensor(obj, path, tensors, aliases, storages)}
    if isinstance(obj, np.ndarray):
        target = _NUMPY_WIDEN.get(obj.dtype, obj.dtype)
        key = _add_tensor(torch.from_numpy(np.ascontiguousarray(obj.astype(target))), path, tensors, aliases, storages)
        return {"__ndarray__": key, "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors, aliases, storages) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors, aliases, storages) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        # JSON objects only have string keys: other keys (e.g. optimizer state's parameter indices) and keys
        # that look like our markers go through the explicit pair form.
        plain = all(isinstance(k, str) and not k.startswith("__") for k in obj)
        items = [(k, _encode(v, f"{path}/{k}", tensors, aliases, storages)) for k, v in obj.items()]
        if plain:
            return dict(items)
        return {"__dict__": [[_encode(k, path, tensors, aliases, storages), v] for k, v in items]}
    raise TypeError(f"checkpoint payload at {path or '/'}: cannot store a {type(obj).__name__}")


def _add_tensor(t: torch.Tensor, path: str, tensors: dict, aliases: dict, storages: set) -> str:
    t = t.detach()
    # Tied weights (token embedding == LM head) are one tensor under two names: store it once.
    signature = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
    if signature in aliases:
        return aliases[signature]
    cpu = t.to("cpu").contiguous()
    # safetensors refuses overlapping storages; a partial view of an already stored storage gets its own copy.
    if (cpu.untyped_storage().data_ptr(), cpu.device) in storages:
        cpu = cpu.clone()
    storages.add((cpu.untyped_storage().data_ptr(), cpu.device))
    key = path.lstrip("/") or "tensor"
    tensors[key] = cpu
    aliases[signature] = key
    return key


def _decode(obj: Any, tensors: dict[str, torch.Tensor] | None) -> Any:
    """The payload tree back from its JSON form; ``tensors=None``: tensors and arrays become ``None``."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return None if tensors is None else tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return None if tensors is None else tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]))
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__dict__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def _digest(payload_json: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(payload_json.encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"\0{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(raw_bytes(t).numpy())
    return h.hexdigest()


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as a flat uint8 tensor (any dtype, layout or size, including empty and 0-d)."""
    flat = torch.empty(t.numel(), dtype=t.dtype)
    flat.copy_(t.reshape(-1))
    return flat.view(torch.uint8)


# ------------------------------------------------------------------------------------------- save / load
def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (nested dicts/lists/tuples of tensors, numpy arrays and JSON scalars) atomically."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(payload, "", tensors, {}, set())
    payload_json = json.dumps(tree, sort_keys=True)
    metadata = {"format": FORMAT, "payload": payload_json, "sha256": _digest(payload_json, tensors)}
    with _replacing(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def write_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` into ``path`` as checkpoints are written: a reader never sees half a file, and an interrupted
    write leaves the old one (reports, result tables)."""
    path = Path(path)
    with _replacing(path) as tmp:
        Path(tmp).write_bytes(data)
    return path


@contextlib.contextmanager
def _replacing(path: Path):
    """A temporary name beside ``path`` to write to; once written it is fsync'ed and renamed over ``path`` (then
    the directory fsync'ed), and on any failure removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, file_mode())  # mkstemp's 0600 -> what open() would give: the rest of the run's files' mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the process's umask (0644 under the usual 022)."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)  # read it by setting it (not thread-safe, hence the fallback only)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader, or the file after a crash, is the old file or the whole new
    one: a temporary beside it, fsync'ed, renamed over it, then the directory fsync'ed."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory handles: the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; refuse anything else.

    Returns the payload the trainer stored: ``model`` (state dict), ``config`` (resolved run config),
    ``model_name``, ``model_config``, ``step``, ``optimizer``, ``scaler``, ``rng``, ``data``, ...
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CheckpointError(
                    f"{path} is a safetensors file but not a triformer checkpoint (format "
                    f"{metadata.get('format')!r}, expected {FORMAT!r}); refusing to load it")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except Exception as e:  # not safetensors at all (pickle, zip, truncated, garbage)
        hint = ""
        with open(path, "rb") as raw:
            head = raw.read(4)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            hint = " It looks like a torch.save/pickle file, which is never loaded because unpickling can run code."
        raise CheckpointError(f"{path} is not a triformer checkpoint (cannot parse it as safetensors: {e}).{hint}") from e
    payload_json = metadata.get("payload", "")
    expected = metadata.get("sha256")
    if expected is None or _digest(payload_json, {k: t.cpu() for k, t in tensors.items()}) != expected:
        raise CheckpointError(f"{path} was modified or is corrupted (checksum mismatch); refusing to load it")
    return _decode(json.loads(payload_json), tensors)


def check_model_config(saved: dict[str, Any], current: dict[str, Any], path: str | os.PathLike = "checkpoint",
                       ignore: tuple[str, ...] = ("kernels",)) -> None:
    """Refuse a checkpoint whose model config differs from ``current`` (``ignore``: keys that do not change
    the weights' meaning, e.g. which kernels compute them)."""
    keys = sorted((set(saved) | set(current)) - set(ignore))
    diffs = [f"{k}: checkpoint {saved.get(k, '<missing>')!r} vs current {current.get(k, '<missing>')!r}"
             for k in keys if saved.get(k, "<missing>") != current.get(k, "<missing>")]
    if diffs:
        raise CheckpointError(f"{path} was written for a different model config; mismatching keys: " + "; ".join(diffs))


# --------------------------------------------------------------------------------------------- directory
def step_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete step checkpoints in ``directory`` (temporary files of interrupted writes are ignored), by step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))]
    return sorted(found)


# What a checkpoint needs to be evaluated, sampled, fine-tuned from (init_from) or exported: the weights and what
# describes them; the training state (optimizer, scaler, RNG streams, data position) is for resume only.
WEIGHTS_KEYS = ("model", "model_name", "model_config", "config", "step", "val", "best_val_loss")


def weights_only(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: payload[k] for k in WEIGHTS_KEYS if k in payload}


class CheckpointManager:
    """``step_<N>.safetensors`` files in one directory: keeps the newest ``keep_last`` and a ``best`` link."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def save(self, step: int, payload: dict[str, Any], is_best: bool = False) -> Path:
        """The step file keeps everything a resume needs; ``best.safetensors`` only the weights and what
        describes them (``weights_only``): resume reads step files, so optimizer and RNG state there would only
        make the file a user keeps and copies several times larger."""
        path = save_checkpoint(self.directory / f"step_{step:08d}.safetensors", payload)
        if is_best:
            save_checkpoint(self.directory / BEST_FILE, weights_only(payload))
        for _, old in step_checkpoints(self.directory)[:-self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> Path | None:
        found = step_checkpoints(self.directory)
        return found[-1][1] if found else None


def resolve_resume(spec: str, runs_root: str | os.PathLike, key: str = "resume") -> Path:
    """The checkpoint ``<key>=spec`` means: a checkpoint file; a run directory (its last step checkpoint, in its
    ``checkpoints/`` folder or in the directory itself); or ``latest``: the most recently written step checkpoint of
    the runs directly under ``runs_root`` (``runs/<name>/<time>``). ``latest`` never picks a sweep's job
    (``multirun-*/<job>``): the jobs of a sweep differ in their settings, so which one to continue is the user's
    choice, and the error lists them; so does a directory with runs below it but no checkpoint of its own."""
    where = Path(runs_root) if spec == "latest" else Path(spec)
    if spec != "latest" and where.is_file():
        return where
    if not where.is_dir() and spec != "latest":
        raise FileNotFoundError(f"{key}={spec!r}: no such checkpoint file or run directory")
    if spec == "latest":
        runs = sorted(d for d in where.iterdir() if d.is_dir()) if where.is_dir() else []
        found = [p for d in runs for p in _run_checkpoints(d)[-1:]]
        if found:
            return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name))
    else:
        found = _run_checkpoints(where)
        if found:
            return found[-1]
    below = sorted({str(p.parent.parent if p.parent.name == "checkpoints" else p.parent)
                    for p in where.rglob("step_*.safetensors") if STEP_FILE.match(p.name)}) if where.is_dir() else []
    runs = (f"; the runs below it: {', '.join(below)} (pass the one to continue as {key}=<run directory>)"
            if below else "")
    raise FileNotFoundError(f"{key}={spec!r}: no step_*.safetensors checkpoint of a run "
                            f"{'directly under' if spec == 'latest' else 'in'} {where}{runs}")


def _run_checkpoints(run_dir: Path) -> list[Path]:
    """A run directory's step checkpoints, by step (in ``checkpoints/``, or in the directory itself)."""
    return [p for folder in (run_dir / "checkpoints", run_dir) for _, p in step_checkpoints(folder)]
