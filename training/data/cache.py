"""A directory of prepared arrays on disk that is either complete and verified, or not used at all.

Layout: ``<root>/<name>-<key hash>/`` holds one raw ``<array>.bin`` per array and ``meta.json``. Arrays are
written to ``*.tmp-<pid>`` files, fsynced and renamed into place; ``meta.json`` (shapes, dtypes, byte sizes,
blake2b checksums and the full key) is written last, the same way, and is the only completion marker. So a
preparation killed at any point leaves no ``meta.json`` and the next run prepares again from scratch, and a
truncated, edited or swapped file fails the size/checksum check with a message instead of being trained on.
Concurrent preparers (e.g. DDP ranks on one host) serialize on an ``fcntl`` lock; the first one prepares,
the others wait and then load.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from training.checkpoint import atomic_write

FORMAT_VERSION = 1
_CHUNK = 1 << 24


class CacheError(RuntimeError):
    """A cache directory exists but cannot be trusted."""


def default_cache_root() -> Path:
    return Path(os.environ.get("TRIFORMER_DATA_CACHE", Path.home() / ".cache" / "triformer" / "data"))


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class Writer:
    """Streams named arrays into temporary files, hashing as it goes; ``commit`` publishes them."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._files: dict[str, dict] = {}

    def append(self, name: str, chunk: np.ndarray) -> None:
        """Append ``chunk`` along axis 0 of array ``name`` (created on first use with chunk's dtype/row shape)."""
        chunk = np.ascontiguousarray(chunk)
        entry = self._files.get(name)
        if entry is None:
            tmp = self.directory / f"{name}.bin.tmp-{os.getpid()}"
            entry = self._files[name] = dict(tmp=tmp, f=open(tmp, "wb"), hash=hashlib.blake2b(), rows=0,
                                             dtype=chunk.dtype.str, row_shape=list(chunk.shape[1:]))
        if chunk.dtype.str != entry["dtype"] or list(chunk.shape[1:]) != entry["row_shape"]:
            raise ValueError(f"array {name!r}: chunk {chunk.dtype}{chunk.shape} does not continue "
                             f"{entry['dtype']}{entry['row_shape']}")
        data = memoryview(chunk).cast("B")  # no copy
        entry["f"].write(data)
        entry["hash"].update(data)
        entry["rows"] += chunk.shape[0]

    def commit(self, extra: dict, key: dict) -> None:
        arrays = {}
        for name, e in self._files.items():
            e["f"].flush()
            os.fsync(e["f"].fileno())
            e["f"].close()
            os.replace(e["tmp"], self.directory / f"{name}.bin")
            nbytes = e["rows"] * int(np.prod(e["row_shape"], dtype=np.int64)) * np.dtype(e["dtype"]).itemsize
            arrays[name] = dict(dtype=e["dtype"], shape=[e["rows"]] + e["row_shape"], nbytes=int(nbytes),
                                blake2b=e["hash"].hexdigest())
        meta = dict(format=FORMAT_VERSION, key=key, arrays=arrays, extra=extra)
        atomic_write(self.directory / "meta.json", json.dumps(meta, indent=1, sort_keys=True).encode())

    def abort(self) -> None:
        for e in self._files.values():
            e["f"].close()
            e["tmp"].unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(directory: Path):
    with open(directory / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[data] waiting for another process preparing {directory} ...", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class ArrayCache:
    """Prepared arrays for one ``key`` (a JSON-able dict saying everything the arrays depend on)."""

    def __init__(self, root: str | os.PathLike | None, name: str, key: dict):
        self.key = dict(key, format=FORMAT_VERSION)
        root = Path(root).expanduser() if root else default_cache_root()
        self.directory = root / f"{name}-{key_hash(self.key)}"

    @property
    def meta_path(self) -> Path:
        return self.directory / "meta.json"

    def get_or_build(self, build: Callable[[Writer], dict], verify: str = "full",
                     repair: bool = False) -> tuple[dict[str, np.ndarray], dict]:
        """Load the arrays (read-only memmaps) and ``extra``, preparing them with ``build(writer) -> extra``
        first if no complete copy exists. A copy that fails verification raises ``CacheError``, or with
        ``repair`` is prepared again."""
        if verify not in ("full", "size"):
            raise ValueError(f"verify must be 'full' or 'size', got {verify!r}")
        loaded = self._try_load(verify, repair)
        if loaded is not None:
            return loaded
        self.directory.mkdir(parents=True, exist_ok=True)
        with _locked(self.directory):
            loaded = self._try_load(verify, repair)  # another process may have finished while we waited
            if loaded is not None:
                return loaded
            # No meta.json from here on until the new one is complete: an interruption leaves "not prepared".
            self.meta_path.unlink(missing_ok=True)
            for stale in self.directory.iterdir():
                if ".tmp-" in stale.name or stale.suffix == ".bin":
                    stale.unlink()
            writer = Writer(self.directory)
            try:
                extra = build(writer)
            except BaseException:
                writer.abort()
                raise
            writer.commit(extra, self.key)
        return self.load(verify)

    def _try_load(self, verify: str, repair: bool):
        if not self.meta_path.exists():
            return None
        try:
            return self.load(verify)
        except CacheError as e:
            if not repair:
                raise
            print(f"[data] {e}; preparing it again", file=sys.stderr, flush=True)
            return None

    def load(self, verify: str = "full") -> tuple[dict[str, np.ndarray], dict]:
        fix = f"delete {self.directory} (or set data.repair_cache=true) to prepare it again"
        try:
            meta = json.loads(self.meta_path.read_text())
            arrays_meta, extra = meta["arrays"], meta["extra"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CacheError(f"data cache {self.meta_path} is unreadable ({e}); {fix}") from e
        if meta.get("key") != self.key:
            raise CacheError(f"data cache {self.directory} was prepared for a different source/tokenizer; {fix}")
        arrays = {}
        for name, m in arrays_meta.items():
            path = self.directory / f"{name}.bin"
            size = path.stat().st_size if path.exists() else None
            if size != m["nbytes"]:
                raise CacheError(f"data cache file {path} has {size} bytes, expected {m['nbytes']} "
                                 f"(truncated, missing or replaced); {fix}")
            if verify == "full" and _blake2b(path) != m["blake2b"]:
                raise CacheError(f"data cache file {path} fails its checksum (corrupted); {fix}")
            if m["nbytes"] == 0:
                arrays[name] = np.empty(m["shape"], dtype=m["dtype"])
            else:
                arrays[name] = np.memmap(path, dtype=m["dtype"], mode="r", shape=tuple(m["shape"]))
        return arrays, extra


def _blake2b(path: Path) -> str:
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
