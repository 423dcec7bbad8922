"""Language-model data: a corpus tokenized once into a cached token stream, served as random windows.

Sources (``source`` in the config):
* ``stdlib``: the Python standard library's own ``.py`` files (no network; the default corpus);
* ``files``: local text files and folders (``paths``: a list, or a mapping split -> list);
* ``hf``: a Hugging Face ``datasets`` dataset (``hf_path``/``hf_name``/``splits``/``text_field``).

Each document is tokenized (in parallel: a process pool for files, ``datasets.map(num_proc)`` for hf),
followed by the end-of-text token (or ``separator`` text), and the documents are concatenated into one
uint16/uint32 stream per source split, cached on disk (``training.data.cache``) under a key made of the
source (file paths, sizes and mtimes, or the hf dataset coordinates), the tokenizer's fingerprint and the
separator. Local files are concatenated in a fixed shuffle of their sorted order, so that a split carved
from the tail is a random sample of files rather than the alphabetically last ones.

Text encoding (one policy, also ``eval.py text_file=``): files are read as UTF-8; bytes that are not valid UTF-8
become U+FFFD and a warning names each such file (``decode_utf8`` / ``read_text``).

Splits: the source's own splits where it has them; ``val``/``test`` missing from ``splits``/``paths`` are
carved from the end of the train stream (``val_fraction``, ``test_fraction`` of its tokens) in the order
train | val | test, so they never overlap.

Batches (``T = seq_len``): ``next_batch`` draws uniformly random window starts (counter-based, see ``common``),
``x = tokens[s : s + T]``, ``y = tokens[s + 1 : s + T + 1]``; ``eval_batches`` uses fixed windows tiling the
split (evenly spaced over it when ``max_batches`` keeps fewer), the same on every rank.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import sysconfig
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from training.data.cache import ArrayCache
from training.data.common import (Sampler, check_fraction, check_positive_int, parse_config)
from training.data.tokenizers import Tokenizer, load_tokenizer

log = logging.getLogger("triformer.data")
SPLITS = ("train", "val", "test")
# Fixed, so the concatenation order (and thus the carved splits) depends on the file list only.
_FILE_ORDER_SEED = 0


@dataclasses.dataclass
class TextConfig:
    task: str = "lm"
    name: str = "stdlib"                  # names the cache directory and logs
    source: str = "stdlib"                # stdlib | files | hf
    paths: Any = None                     # files: list of files/folders, or {split: list}
    pattern: str = "*.txt"                # files: which files to take from folders (recursive glob)
    max_files: int | None = None          # stdlib/files: keep only the first N files of each sorted list
    hf_path: str | None = None
    hf_name: str | None = None
    hf_revision: str | None = None
    hf_data_files: Any = None
    hf_cache_dir: str | None = None
    text_field: str = "text"
    splits: dict | None = None            # hf: {our split: source split}; default {train: train}
    val_fraction: float = 0.05            # carved from train's tail when the source has no val split
    test_fraction: float = 0.05
    separator: str | None = None          # None: end-of-text token after each document; else this text
    tokenizer: str = "bytes"              # bytes | gpt2 | tiktoken_file | hf (tokenizer_file: a HF directory)
    tokenizer_file: str | None = None
    seq_len: int = 128                    # window length T; must not exceed the model's block_size
    cache_dir: str | None = None          # default $TRIFORMER_DATA_CACHE or ~/.cache/triformer/data
    num_proc: int | None = None           # tokenizer processes; default min(8, cpu count)
    verify: str = "full"                  # full: checksum the cache on load; size: sizes only (huge corpora)
    repair_cache: bool = False            # prepare again (instead of raising) when the cache is corrupt

    def __post_init__(self):
        if self.task != "lm":
            raise ValueError(f"text data needs task='lm', got {self.task!r}")
        if self.source not in ("stdlib", "files", "hf"):
            raise ValueError(f"source must be 'stdlib', 'files' or 'hf', got {self.source!r}")
        check_positive_int("seq_len", self.seq_len)
        check_fraction("val_fraction", self.val_fraction)
        check_fraction("test_fraction", self.test_fraction)
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be < 1")
        if self.max_files is not None:
            check_positive_int("max_files", self.max_files)
        if self.num_proc is not None:
            check_positive_int("num_proc", self.num_proc)
        if self.source == "files" and not self.paths:
            raise ValueError("source=files needs paths: a list of files/folders, or {split: list}")
        if self.source == "hf" and not self.hf_path:
            raise ValueError("source=hf needs hf_path (a hub dataset id, or a builder such as 'json')")
        if self.splits is None:
            self.splits = {"train": "train"}
        if "train" not in self.splits or not set(self.splits) <= set(SPLITS):
            raise ValueError(f"splits must map 'train' (and optionally 'val', 'test') to source splits, "
                             f"got {self.splits!r}")

    def needs_val_fraction(self) -> bool:
        """Whether the val split is carved from train (``val_fraction``): the source has none of its own."""
        if self.source == "hf":
            return "val" not in self.splits
        return not (self.source == "files" and isinstance(self.paths, dict) and "val" in self.paths)


# ---------------------------------------------------------------------------------------------- sources

def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's ``.py`` files, sorted; without site-packages and the regression-test package
    (it holds deliberately malformed files)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        top = Path(dirpath) == root
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
                       and not (top and d == "test")]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _expand(paths: list, pattern: str) -> list[Path]:
    files = []
    for p in paths:
        p = Path(str(p)).expanduser()
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(q for q in p.rglob(pattern) if q.is_file())
            if not found:
                raise ValueError(f"data.paths: folder {str(p)!r} has no files matching {pattern!r}")
            files += found
        else:
            raise FileNotFoundError(f"data.paths: {str(p)!r} does not exist")
    return files


def _local_files(cfg: TextConfig) -> tuple[Path | None, dict[str, list[Path]]]:
    if cfg.source == "stdlib":
        root, files = stdlib_files()
        per_split = {"train": files}
    else:
        root = None
        spec = cfg.paths if isinstance(cfg.paths, dict) else {"train": cfg.paths}
        if "train" not in spec or not set(spec) <= set(SPLITS):
            raise ValueError(f"data.paths as a mapping needs a 'train' entry (and optionally val/test), got "
                             f"{sorted(spec)}")
        per_split = {s: _expand([v] if isinstance(v, (str, os.PathLike)) else list(v), cfg.pattern)
                     for s, v in spec.items()}
    for split, files in per_split.items():
        files = files[: cfg.max_files]
        order = np.random.RandomState(_FILE_ORDER_SEED).permutation(len(files))
        per_split[split] = [files[i] for i in order]
    return root, per_split


def _file_entry(path: Path, root: Path | None) -> list:
    st = path.stat()
    return [path.relative_to(root).as_posix() if root else str(path.resolve()), st.st_size, st.st_mtime_ns]


def _source_key(cfg: TextConfig, tokenizer: Tokenizer) -> tuple[dict, dict | None]:
    key: dict[str, Any] = dict(kind="text", source=cfg.source, tokenizer=tokenizer.fingerprint(),
                               separator=cfg.separator)
    if cfg.source == "hf":
        data_files = cfg.hf_data_files
        local = [] if data_files is None else _flatten_paths(data_files)
        key["hf"] = dict(path=cfg.hf_path, name=cfg.hf_name, revision=cfg.hf_revision, data_files=data_files,
                         splits=cfg.splits, text_field=cfg.text_field,
                         local_files=[_file_entry(Path(p), None) for p in local if Path(p).is_file()])
        return key, None
    root, files = _local_files(cfg)
    key["files"] = {s: [_file_entry(p, root) for p in fs] for s, fs in files.items()}
    return key, files


def _flatten_paths(data_files) -> list[str]:
    if isinstance(data_files, (str, os.PathLike)):
        return [str(data_files)]
    if isinstance(data_files, dict):
        return [p for v in data_files.values() for p in _flatten_paths(v)]
    return [p for v in data_files for p in _flatten_paths(v)]


# ------------------------------------------------------------------------------------------ preparation

_worker_tokenizer: Tokenizer | None = None
_worker_separator: str | None = None


def _init_worker(tokenizer: Tokenizer, separator: str | None) -> None:
    global _worker_tokenizer, _worker_separator
    _worker_tokenizer, _worker_separator = tokenizer, separator


def encode_document(text: str, tokenizer: Tokenizer, separator: str | None) -> np.ndarray:
    """One document's ids followed by its separator (end-of-text token, or the separator text)."""
    ids = tokenizer.encode(text if separator is None else text + separator)
    if separator is None:
        ids.append(tokenizer.eot_token_id)
    out = np.asarray(ids, dtype=np.int64)
    if out.size and (out.max() >= tokenizer.vocab_size or out.min() < 0):
        raise ValueError(f"tokenizer {tokenizer.name!r} produced ids in [{int(out.min())}, {int(out.max())}], "
                         f"outside its vocab of {tokenizer.vocab_size}")
    return out.astype(tokenizer.token_dtype)


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """The one text policy of training and ``eval.py text_file=``: files are UTF-8; bytes that are not valid
    UTF-8 become U+FFFD (the replacement character) and are counted, so the caller can name the file."""
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode("utf-8"))
    return text, bad


def read_text(path: str | os.PathLike) -> str:
    """A text file under ``decode_utf8``'s policy, with a warning naming the file when bytes were replaced."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a text file")
    text, bad = decode_utf8(path.read_bytes())
    if bad:
        log.warning(utf8_warning([(path, bad)]))
    return text


def utf8_warning(files: list[tuple[Path, int]]) -> str:
    named = ", ".join(f"{p} ({n} invalid sequence{'s' * (n != 1)})" for p, n in files[:5])
    more = f" and {len(files) - 5} more" if len(files) > 5 else ""
    return (f"{len(files)} file(s) are not valid UTF-8: {named}{more}; the invalid bytes were read as U+FFFD "
            f"(the replacement character). Convert the file(s) to UTF-8 (e.g. iconv -f latin1 -t utf-8) to keep them")


def _encode_file(path: Path) -> tuple[np.ndarray, int, int]:
    text, bad = decode_utf8(path.read_bytes())
    return encode_document(text, _worker_tokenizer, _worker_separator), len(text), bad


def _num_proc(cfg: TextConfig, jobs: int) -> int:
    return max(1, min(cfg.num_proc or min(8, os.cpu_count() or 1), jobs))


def _tokenize_files(writer, split: str, files: list[Path], cfg: TextConfig, tokenizer: Tokenizer) -> dict:
    n_proc = _num_proc(cfg, len(files))
    bar = tqdm(total=len(files), desc=f"tokenizing {cfg.name}/{split}", unit="file", mininterval=2.0)
    tokens = chars = 0
    not_utf8: list[tuple[Path, int]] = []
    if n_proc == 1:
        _init_worker(tokenizer, cfg.separator)
        results = map(_encode_file, files)
        pool = None
    else:
        # forkserver, not fork: by now this process may hold threads (tqdm's monitor, wandb) whose locks a fork
        # could copy while held, and a worker would then wait on them forever
        pool = multiprocessing.get_context("forkserver").Pool(n_proc, initializer=_init_worker,
                                                              initargs=(tokenizer, cfg.separator))
        results = pool.imap(_encode_file, files, chunksize=4)  # ordered: the stream order is the file order
    try:
        for path, (ids, n_chars, bad) in zip(files, results):
            if bad:
                not_utf8.append((path, bad))
            writer.append(split, ids)
            tokens += ids.size
            chars += n_chars
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    if not_utf8:
        log.warning(utf8_warning(not_utf8))
    return dict(tokens=tokens, chars=chars, documents=len(files))


def _encode_rows(batch: dict, tokenizer: Tokenizer, field: str, separator: str | None) -> dict:
    ids = [encode_document(t or "", tokenizer, separator) for t in batch[field]]
    return {"ids": ids, "chars": [len(t or "") for t in batch[field]]}


class DataUnavailableError(RuntimeError):
    """A dataset that is neither in the local cache nor reachable (offline)."""


def _hub_dataset(hf_path: str) -> bool:
    """A Hub dataset id (``owner/name``), as opposed to a builder (json, parquet, text) or a local folder."""
    return "/" in hf_path and not Path(hf_path).exists()


@contextlib.contextmanager
def _hf_offline_mode():
    """datasets/huggingface_hub in offline mode for one call: the local cache only, no 5 retries per file.
    (Their flags are read from the environment at import; this sets the imported values.)"""
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _load_hf(cfg: TextConfig, source_split: str):
    import datasets

    from training.data.tokenizers import network_reachable, offline_requested

    def load():
        return datasets.load_dataset(cfg.hf_path, cfg.hf_name, split=source_split, revision=cfg.hf_revision,
                                     data_files=cfg.hf_data_files, cache_dir=cfg.hf_cache_dir)

    if not _hub_dataset(cfg.hf_path):
        return load()
    offline = offline_requested() or not network_reachable("huggingface.co")
    if not offline:
        return load()
    try:
        with _hf_offline_mode():
            return load()
    except Exception as e:  # noqa: BLE001 - whatever datasets raises offline, the remedy is the same
        cache = cfg.hf_cache_dir or os.environ.get("HF_DATASETS_CACHE") or "~/.cache/huggingface/datasets"
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DataUnavailableError(
            f"data={cfg.name} needs the Hugging Face dataset {cfg.hf_path!r} (split {source_split!r}), which is not "
            f"in the local cache ({cache}) and the Hub is unreachable (offline; datasets said: {reason}). Either run "
            f"once with network access to download it (then it works offline), copy a prepared datasets cache there "
            f"(or set data.hf_cache_dir), or point the config at local files: data=text_files "
            f"data.paths=[/path/to/texts] (plain text), or data.hf_path=parquet (or json) "
            f"data.hf_data_files=/path/to/*.parquet with data.text_field=<column>") from None


def _tokenize_hf(writer, split: str, source_split: str, cfg: TextConfig, tokenizer: Tokenizer) -> dict:
    ds = _load_hf(cfg, source_split)
    if cfg.text_field not in ds.column_names:
        raise ValueError(f"hf dataset {cfg.hf_path!r} split {source_split!r} has no column "
                         f"text_field={cfg.text_field!r}; columns: {ds.column_names}")
    n_proc = _num_proc(cfg, len(ds))
    tok = ds.map(_encode_rows, batched=True, num_proc=n_proc if n_proc > 1 else None,
                 remove_columns=ds.column_names, desc=f"tokenizing {cfg.name}/{split}",
                 fn_kwargs=dict(tokenizer=tokenizer, field=cfg.text_field, separator=cfg.separator))
    tokens = chars = 0
    with tqdm(desc=f"writing {cfg.name}/{split}", unit="tok", unit_scale=True, mininterval=2.0) as bar:
        # Arrow batches flatten without a per-document Python loop.
        for batch in tok.with_format("arrow").iter(batch_size=4096):
            ids = batch.column("ids").combine_chunks().flatten().to_numpy().astype(tokenizer.token_dtype)
            writer.append(split, ids)
            tokens += ids.size
            chars += int(np.asarray(batch.column("chars")).sum())
            bar.update(ids.size)
    return dict(tokens=tokens, chars=chars, documents=len(ds))


def _builder(cfg: TextConfig, tokenizer: Tokenizer, files: dict | None):
    def build(writer) -> dict:
        stats = {}
        for split in SPLITS:
            if files is not None and split in files:
                stats[split] = _tokenize_files(writer, split, files[split], cfg, tokenizer)
            elif files is None and split in cfg.splits:
                stats[split] = _tokenize_hf(writer, split, cfg.splits[split], cfg, tokenizer)
            else:
                continue
            if stats[split]["chars"] == 0:
                raise ValueError(f"empty corpus: data {cfg.name!r} split {split!r} has no text")
        return dict(stats=stats, vocab_size=tokenizer.vocab_size, tokenizer=tokenizer.name)
    return build


# ----------------------------------------------------------------------------------------------- data

class TextData:
    """Token windows for language modelling; see the module docstring and ``training.data.common``."""

    task = "lm"

    def __init__(self, cfg: TextConfig, splits: dict[str, np.ndarray], tokenizer: Tokenizer,
                 seed: int, rank: int = 0, world_size: int = 1, cache_dir: Path | None = None):
        self.cfg = cfg
        self.name = cfg.name
        self.seq_len = cfg.seq_len
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.splits = splits
        self.cache_dir = cache_dir
        self._sampler = Sampler(seed, rank, world_size)
        for split, tokens in splits.items():
            if len(tokens) < self.seq_len + 1:
                raise ValueError(
                    f"data {cfg.name!r} split {split!r} has {len(tokens)} tokens, fewer than seq_len + 1 = "
                    f"{self.seq_len + 1}; use a larger corpus, smaller seq_len or larger {split}_fraction")

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(t):,}" for s, t in self.splits.items())
        return f"TextData({self.name!r}, {self.tokenizer.name}, seq_len={self.seq_len}, tokens: {sizes})"

    def split_tokens(self, split: str) -> np.ndarray:
        if split not in self.splits:
            raise ValueError(f"data {self.name!r} has no {split!r} split (has {sorted(self.splits)})")
        return self.splits[split]

    def _windows(self, tokens: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = torch.from_numpy(tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64))
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``batch_size`` random training windows: ``x, y`` int64 ``[batch_size, seq_len]``."""
        s = self._sampler
        n = s.global_size(batch_size)
        train = self.splits["train"]
        starts = torch.randint(len(train) - self.seq_len, (n,), generator=s.generator("windows"))
        s.batches += 1
        return self._windows(train, starts[s.mine(batch_size)].numpy())

    def eval_batches(self, split: str, batch_size: int,
                     max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed windows ``tokens[i*T : i*T + T + 1]`` (``T = seq_len``) tiling ``split``, the same on every
        rank; with ``max_batches``, that many batches of windows spaced evenly over the split."""
        tokens = self.split_tokens(split)
        check_positive_int("batch_size", batch_size)
        if max_batches is not None:
            check_positive_int("max_batches", max_batches)
        total = (len(tokens) - 1) // self.seq_len
        n = total if max_batches is None else min(total, batch_size * max_batches)
        starts = (np.arange(n, dtype=np.int64) * total // n) * self.seq_len

        def batches():
            for i in range(0, n, batch_size):
                yield self._windows(tokens, starts[i: i + batch_size])
        return batches()

    def state_dict(self) -> dict:
        return {"task": "lm", "batches": self._sampler.batches}

    def load_state_dict(self, state: dict) -> None:
        if state.get("task") != "lm" or not isinstance(state.get("batches"), int):
            raise ValueError(f"not a text data state: {state!r}")
        self._sampler.batches = state["batches"]


def _carve(arrays: dict[str, np.ndarray], cfg: TextConfig) -> dict[str, np.ndarray]:
    train = arrays["train"]
    n = len(train)
    cut = {s: round(n * getattr(cfg, f"{s}_fraction")) for s in ("val", "test") if s not in arrays}
    cut = {s: c for s, c in cut.items() if c > 0}
    end_train = n - sum(cut.values())
    splits = {"train": train[:end_train]}
    pos = end_train
    for s in ("val", "test"):
        if s in arrays:
            splits[s] = arrays[s]
        elif s in cut:
            splits[s] = train[pos: pos + cut[s]]
            pos += cut[s]
    return splits


def build_text_data(cfg_dict: dict, seed: int, rank: int = 0, world_size: int = 1) -> TextData:
    cfg = parse_config(TextConfig, cfg_dict)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.tokenizer_file)
    key, files = _source_key(cfg, tokenizer)
    key_splits = set(files if files is not None else cfg.splits)
    cache = ArrayCache(cfg.cache_dir, f"{cfg.name}-{tokenizer.name}", key)
    arrays, extra = cache.get_or_build(_builder(cfg, tokenizer, files), verify=cfg.verify,
                                       repair=cfg.repair_cache)
    if set(arrays) != key_splits or extra.get("vocab_size") != tokenizer.vocab_size:
        raise ValueError(f"data cache {cache.directory} does not hold splits {sorted(key_splits)} for vocab "
                         f"{tokenizer.vocab_size}; delete it to prepare again")
    for split, tokens in arrays.items():
        top = int(tokens.max()) if cfg.verify == "full" else None
        if tokens.dtype != tokenizer.token_dtype or (top is not None and top >= tokenizer.vocab_size):
            raise ValueError(f"data cache {cache.directory} split {split!r} holds tokens beyond the vocab of "
                             f"{tokenizer.vocab_size} (max id {top}, dtype {tokens.dtype}); delete it")
    return TextData(cfg, _carve(arrays, cfg), tokenizer, seed, rank, world_size, cache.directory)
