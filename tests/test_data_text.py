"""Language-model data: tokenization, the on-disk cache (atomicity, corruption), batches, resume, DDP slicing.

Every test runs offline: sockets are disabled, so any network access fails the test."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from training.data import CacheError, build_data, load_tokenizer
from training.data import cache as cache_mod
from training.data import text as text_mod
from training.data.text import TextData, stdlib_files

REPO = Path(__file__).resolve().parents[1]
EOT = 256
WORDS = ["alpha", "beta", "γάμμα", "delta", "日本", "naïve", "\n", "  ", "x=1;", "<|endoftext|>", "🙂"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"a test tried to use the network: {address}")
        return real_connect(sock, address)  # local (unix) sockets, e.g. multiprocessing's, are fine

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))  # empty: no GPT-2 table here


def write_corpus(root: Path, n_files: int = 7, seed: int = 0, words: int = 400) -> list[Path]:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n_files):
        p = root / f"doc{i:02d}.txt"
        p.write_text(" ".join(rng.choice(WORDS) for _ in range(words + 37 * i)), encoding="utf-8")
        files.append(p)
    return files


def expected_stream(files: list[Path]) -> np.ndarray:
    """Bytes of each file in the documented order (a RandomState(0) shuffle of the sorted list), each followed
    by end-of-text."""
    files = sorted(files)
    order = np.random.RandomState(0).permutation(len(files))
    out = []
    for i in order:
        out += list(files[i].read_bytes()) + [EOT]
    return np.array(out, dtype=np.int64)


def files_cfg(tmp_path, paths, **kw):
    cfg = dict(task="lm", name="t", source="files", paths=[str(p) for p in paths] if isinstance(paths, list) else paths,
               seq_len=16, cache_dir=str(tmp_path / "cache"), num_proc=1)
    cfg.update(kw)
    return cfg


def find_window(stream: np.ndarray, row: np.ndarray) -> int:
    for s in np.flatnonzero(stream[: len(stream) - len(row) + 1] == row[0]):
        if np.array_equal(stream[s: s + len(row)], row):
            return int(s)
    raise AssertionError("window not found in the stream")


# ------------------------------------------------------------------------------------------------ corpora

def test_stdlib_corpus_is_the_stdlib_sources_in_a_fixed_order(tmp_path):
    data = build_data(dict(task="lm", source="stdlib", max_files=5, seq_len=32, val_fraction=0.1,
                           test_fraction=0.1, cache_dir=str(tmp_path / "cache"), num_proc=2), seed=3)
    root, files = stdlib_files()
    assert files == sorted(files, key=lambda p: p.relative_to(root).as_posix()) and len(files) > 500
    assert not any("site-packages" in p.parts for p in files)
    stream = expected_stream(files[:5])
    got = np.concatenate([np.asarray(data.splits[s], dtype=np.int64) for s in ("train", "val", "test")])
    np.testing.assert_array_equal(got, stream)
    n = len(stream)
    assert len(data.splits["val"]) == round(0.1 * n) == len(data.splits["test"])
    assert data.vocab_size == 257 and data.tokenizer.eot_token_id == EOT and data.task == "lm"
    x, y = data.next_batch(6)
    assert x.shape == y.shape == (6, 32) and x.dtype == y.dtype == torch.int64
    train = np.asarray(data.splits["train"], dtype=np.int64)
    for xr, yr in zip(x.numpy(), y.numpy()):
        s = find_window(train, np.concatenate([xr, yr[-1:]]))
        np.testing.assert_array_equal(yr, train[s + 1: s + 33])


def test_files_with_own_val_split_and_carved_test(tmp_path):
    train_files = write_corpus(tmp_path / "train", 5)
    val_files = write_corpus(tmp_path / "val", 2, seed=1)
    cfg = files_cfg(tmp_path, {"train": [str(tmp_path / "train")], "val": [str(p) for p in val_files]},
                    test_fraction=0.2, val_fraction=0.3)
    data = build_data(cfg, seed=0)
    stream = expected_stream(train_files)
    n_test = round(0.2 * len(stream))
    np.testing.assert_array_equal(data.splits["train"], stream[: len(stream) - n_test])
    np.testing.assert_array_equal(data.splits["test"], stream[len(stream) - n_test:])
    np.testing.assert_array_equal(data.splits["val"], expected_stream(val_files))  # val_fraction unused
    assert data.tokenizer.decode(data.splits["val"][:20].tolist()) == expected_text_prefix(val_files, 20)


def expected_text_prefix(files, n_bytes):
    first = sorted(files)[np.random.RandomState(0).permutation(len(files))[0]]
    return first.read_bytes()[:n_bytes].decode("utf-8", "replace")


def test_hf_source_offline_with_native_splits(tmp_path):
    rng = random.Random(5)
    docs = {s: [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 120))) for _ in range(23)]
            for s in ("train", "validation")}
    files = {}
    for s, rows in docs.items():
        files[s] = tmp_path / f"{s}.jsonl"
        files[s].write_text("".join(json.dumps({"body": r, "id": i}) + "\n" for i, r in enumerate(rows)))
    cfg = dict(task="lm", name="hfjson", source="hf", hf_path="json",
               hf_data_files={s: str(p) for s, p in files.items()}, hf_cache_dir=str(tmp_path / "hf"),
               text_field="body", splits={"train": "train", "val": "validation"}, test_fraction=0.25,
               seq_len=8, cache_dir=str(tmp_path / "cache"), num_proc=2)
    data = build_data(cfg, seed=0)
    tok = data.tokenizer
    expect = {s: np.array([t for r in rows for t in tok.encode(r) + [EOT]]) for s, rows in docs.items()}
    n_test = round(0.25 * len(expect["train"]))
    np.testing.assert_array_equal(data.splits["train"], expect["train"][:-n_test])
    np.testing.assert_array_equal(data.splits["test"], expect["train"][-n_test:])
    np.testing.assert_array_equal(data.splits["val"], expect["validation"])
    with pytest.raises(ValueError, match="text_field='text'"):
        build_data(dict(cfg, text_field="text", name="other"), seed=0)


def test_separator_text_instead_of_end_of_text(tmp_path):
    files = write_corpus(tmp_path / "c", 3)
    data = build_data(files_cfg(tmp_path, files, separator="\n\n", val_fraction=0, test_fraction=0), seed=0)
    order = np.random.RandomState(0).permutation(3)
    text = "".join(sorted(files)[i].read_text(encoding="utf-8") + "\n\n" for i in order)
    np.testing.assert_array_equal(data.splits["train"], list(text.encode()))
    assert set(data.splits) == {"train"}


# --------------------------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer_is_lossless_and_literal():
    tok = load_tokenizer("bytes")
    s = "".join(WORDS) + "\x00\t\r\n"
    ids = tok.encode(s)
    assert ids == list(s.encode("utf-8")) and tok.decode(ids) == s and EOT not in ids
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (257,) and lengths[:256].tolist() == [1] * 256 and lengths[EOT] == 0


@pytest.mark.parametrize("offline_env", [True, False])
def test_gpt2_without_local_table_fails_fast_with_instructions(monkeypatch, offline_env):
    for var in ("TRIFORMER_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    if offline_env:
        monkeypatch.setenv("TRIFORMER_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="tokenizer_file") as err:
        load_tokenizer("gpt2")  # without the env flag, the reachability probe meets the refused socket
    assert time.perf_counter() - t0 < 5
    assert "TIKTOKEN_CACHE_DIR" in str(err.value)


def write_table(path: Path, n_merges: int = 40) -> dict[bytes, int]:
    import base64

    ranks = {bytes([b]): b for b in range(256)}
    for a, b in [(x, y) for x in b"etaoin" for y in b"etaoin "][:n_merges]:
        ranks.setdefault(bytes([a, b]), len(ranks))
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


def test_tiktoken_file_tokenizer_and_gpt2_file_check(tmp_path):
    ranks = write_table(tmp_path / "small.tiktoken")
    tok = load_tokenizer("tiktoken_file", str(tmp_path / "small.tiktoken"))
    assert tok.vocab_size == len(ranks) + 1 and tok.eot_token_id == len(ranks)
    s = "tea at noon, eaten in a tent"
    ids = tok.encode(s)
    assert tok.decode(ids) == s and len(ids) < len(s.encode())  # merges were used
    files = write_corpus(tmp_path / "c", 3)
    data = build_data(files_cfg(tmp_path, files, tokenizer="tiktoken_file",
                                tokenizer_file=str(tmp_path / "small.tiktoken")), seed=0)
    whole = np.concatenate([data.splits[s] for s in ("train", "val", "test")])
    assert data.vocab_size == len(ranks) + 1 and whole.max() < data.vocab_size
    assert (whole == tok.eot_token_id).sum() == 3
    with pytest.raises(ValueError, match="not GPT-2's table"):
        load_tokenizer("gpt2", str(tmp_path / "small.tiktoken"))
    with pytest.raises(FileNotFoundError, match="tokenizer_file"):
        load_tokenizer("tiktoken_file", str(tmp_path / "missing.tiktoken"))
    (tmp_path / "bad.tiktoken").write_text("not base64 at all\n")
    with pytest.raises(ValueError, match="line 1"):
        load_tokenizer("tiktoken_file", str(tmp_path / "bad.tiktoken"))


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_configs_and_sources_raise_clear_errors(tmp_path):
    files = write_corpus(tmp_path / "c", 2)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) data.seqlen"):
        build_data(files_cfg(tmp_path, files, seqlen=3), seed=0)
    with pytest.raises(ValueError, match="data.task"):
        build_data({"task": "audio"}, seed=0)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        build_data(files_cfg(tmp_path, [tmp_path / "nope.txt"]), seed=0)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no files matching"):
        build_data(files_cfg(tmp_path, [tmp_path / "empty_dir"]), seed=0)
    (tmp_path / "e1.txt").write_text("")
    (tmp_path / "e2.txt").write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        build_data(files_cfg(tmp_path, [tmp_path / "e1.txt", tmp_path / "e2.txt"]), seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        build_data(files_cfg(tmp_path, files, seq_len=10**6), seed=0)
    for bad in (dict(val_fraction=1.5), dict(val_fraction=0.6, test_fraction=0.5), dict(seq_len=0),
                dict(num_proc=0), dict(source="web"), dict(tokenizer="word")):
        with pytest.raises(ValueError):
            build_data(files_cfg(tmp_path, files, **bad), seed=0)
    data = build_data(files_cfg(tmp_path, files), seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        data.next_batch(0)
    with pytest.raises(ValueError, match="no 'valid' split"):
        data.eval_batches("valid", 2)
    with pytest.raises(ValueError, match="rank"):
        build_data(files_cfg(tmp_path, files), seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="not a text data state"):
        data.load_state_dict({"batches": "3"})


def test_tokens_beyond_the_vocab_are_refused(tmp_path, monkeypatch):
    files = write_corpus(tmp_path / "c", 2)
    real = text_mod.Tokenizer.encode
    with monkeypatch.context() as m:
        m.setattr(text_mod.Tokenizer, "encode", lambda self, t: real(self, t) + [self.vocab_size])
        with pytest.raises(ValueError, match="outside its vocab of 257"):
            build_data(files_cfg(tmp_path, files), seed=0)
    data = build_data(files_cfg(tmp_path, files), seed=0)  # nothing half-written was left behind
    # a cache whose stored ids exceed the vocab (e.g. written by another tokenizer) is refused on load
    meta_path = data.cache_dir / "meta.json"
    train_bin = data.cache_dir / "train.bin"
    arr = np.fromfile(train_bin, dtype=np.uint16)
    arr[3] = 300
    arr.tofile(train_bin)
    meta = json.loads(meta_path.read_text())
    meta["arrays"]["train"]["blake2b"] = cache_mod._blake2b(train_bin)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tokens beyond the vocab of 257"):
        build_data(files_cfg(tmp_path, files), seed=0)


# --------------------------------------------------------------------------------------------------- cache

def test_cache_is_reused_and_keyed_by_the_source(tmp_path, monkeypatch):
    files = write_corpus(tmp_path / "c", 3)
    first = build_data(files_cfg(tmp_path, files), seed=0)

    def no_tokenizing(path):
        raise AssertionError("tokenized again although the cache is complete")

    with monkeypatch.context() as m:
        m.setattr(text_mod, "_encode_file", no_tokenizing)
        again = build_data(files_cfg(tmp_path, files), seed=0)
    assert again.cache_dir == first.cache_dir
    np.testing.assert_array_equal(again.splits["train"], first.splits["train"])
    files[1].write_text("changed text", encoding="utf-8")
    changed = build_data(files_cfg(tmp_path, files), seed=0)
    assert changed.cache_dir != first.cache_dir
    np.testing.assert_array_equal(np.concatenate([changed.splits[s] for s in ("train", "val", "test")]),
                                  expected_stream(files))


@pytest.mark.parametrize("damage", ["flip", "truncate", "meta", "missing"])
def test_corrupt_cache_is_detected_and_repairable(tmp_path, damage):
    files = write_corpus(tmp_path / "c", 3)
    cfg = files_cfg(tmp_path, files)
    good = build_data(cfg, seed=0)
    expected = np.array(good.splits["train"])
    d = good.cache_dir
    if damage == "flip":
        raw = bytearray((d / "train.bin").read_bytes())
        raw[len(raw) // 2] ^= 0x01
        (d / "train.bin").write_bytes(bytes(raw))
        message = "checksum"
    elif damage == "truncate":
        with open(d / "train.bin", "r+b") as f:
            f.truncate(101)
        message = "101 bytes"
    elif damage == "meta":
        (d / "meta.json").write_text('{"format": 1, "key": ')
        message = "unreadable"
    else:
        (d / "train.bin").unlink()
        message = "missing"
    with pytest.raises(CacheError, match=message):
        build_data(cfg, seed=0)
    if damage == "flip":  # a size-only check cannot see a flipped bit; it still loads
        build_data(dict(cfg, verify="size"), seed=0)
    repaired = build_data(dict(cfg, repair_cache=True), seed=0)
    np.testing.assert_array_equal(repaired.splits["train"], expected)


KILLER = textwrap.dedent("""
    import os, signal, sys
    from training.data import build_data, cache, text
    stage = sys.argv[1]
    if stage == "tokenizing":
        real = text._encode_file
        seen = []
        def encode(path):
            seen.append(path)
            if len(seen) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path)
        text._encode_file = encode
    else:  # just before the completion marker
        cache.atomic_write = lambda path, data: os.kill(os.getpid(), signal.SIGKILL)
    build_data({cfg!r}, seed=0)
    print("survived")
""")


@pytest.mark.parametrize("stage", ["tokenizing", "publishing"])
def test_killed_preparation_is_never_used(tmp_path, stage):
    files = write_corpus(tmp_path / "c", 6)
    cfg = files_cfg(tmp_path, files)
    script = KILLER.format(cfg=cfg)  # PYTHONPATH below makes the repository importable
    proc = subprocess.run([sys.executable, "-c", script, stage], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (cache_dir,) = (tmp_path / "cache").iterdir()
    assert not (cache_dir / "meta.json").exists()
    leftovers = sorted(p.name for p in cache_dir.iterdir())
    if stage == "publishing":
        assert "train.bin" in leftovers  # complete-looking data without the marker must still not be used
    else:
        assert any(".tmp-" in name for name in leftovers)
    data = build_data(cfg, seed=0)  # prepares again instead of reading the partial files
    np.testing.assert_array_equal(np.concatenate([data.splits[s] for s in ("train", "val", "test")]),
                                  expected_stream(files))
    assert not any(".tmp-" in p.name for p in cache_dir.iterdir())
    clean = build_data(dict(cfg, cache_dir=str(tmp_path / "clean")), seed=0)
    assert [p.name for p in sorted(cache_dir.glob("*.bin"))] == [p.name for p in sorted(clean.cache_dir.glob("*.bin"))]
    for x, y in zip(data.eval_batches("val", 4), clean.eval_batches("val", 4)):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


def test_concurrent_preparers_tokenize_once(tmp_path, monkeypatch, capfd):
    import threading

    files = write_corpus(tmp_path / "c", 4)
    cfg = files_cfg(tmp_path, files)
    calls = []
    preparing = threading.Event()
    real = text_mod._encode_file

    def slow_encode(path):
        calls.append(path)
        preparing.set()
        time.sleep(0.2)
        return real(path)

    monkeypatch.setattr(text_mod, "_encode_file", slow_encode)
    results = [None, None]

    def worker(i):
        results[i] = build_data(cfg, seed=0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    threads[0].start()
    assert preparing.wait(30)
    threads[1].start()  # finds no completion marker while the first is mid-way: must wait, not prepare too
    for t in threads:
        t.join()
    assert len(calls) == len(files)  # the second preparer waited on the lock, then loaded the first's result
    assert "waiting for another process" in capfd.readouterr().err
    np.testing.assert_array_equal(results[0].splits["train"], results[1].splits["train"])


# ------------------------------------------------------------------------------------------------- batches

@pytest.fixture(scope="module")
def corpus_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    files = write_corpus(tmp / "c", 6)
    return build_data(files_cfg(tmp, files, seq_len=12), seed=11)


def clone(data: TextData, seed=11, rank=0, world_size=1, seq_len=None) -> TextData:
    cfg = data.cfg if seq_len is None else type(data.cfg)(**{**data.cfg.__dict__, "seq_len": seq_len})
    return TextData(cfg, data.splits, data.tokenizer, seed, rank, world_size)


def test_resume_gives_identical_batches(corpus_data):
    a = clone(corpus_data)
    for _ in range(3):
        a.next_batch(5)
    state = json.loads(json.dumps(a.state_dict()))  # plain JSON
    expected = [a.next_batch(5) for _ in range(4)]
    b = clone(corpus_data)
    b.next_batch(2)
    b.load_state_dict(state)
    for (x, y), (bx, by) in zip(expected, [b.next_batch(5) for _ in range(4)]):
        assert torch.equal(x, bx) and torch.equal(y, by)
    other = clone(corpus_data, seed=12)
    other.load_state_dict(state)
    assert not torch.equal(other.next_batch(5)[0], expected[0][0])


def test_eval_batches_fixed_tiling_and_spread(corpus_data):
    T = corpus_data.seq_len
    val = np.asarray(corpus_data.splits["val"], dtype=np.int64)
    batches = list(corpus_data.eval_batches("val", 7))
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    n = (len(val) - 1) // T
    assert xs.shape == (n, T) and [len(x) for x, _ in batches][:-1] == [7] * (len(batches) - 1)
    np.testing.assert_array_equal(xs.numpy(), val[: n * T].reshape(n, T))
    np.testing.assert_array_equal(ys.numpy(), val[1: n * T + 1].reshape(n, T))
    few = torch.cat([x for x, _ in corpus_data.eval_batches("val", 3, max_batches=2)])
    starts = np.arange(6) * n // 6 * T  # evenly spread over the split, not its first 6 windows
    np.testing.assert_array_equal(few.numpy(), val[starts[:, None] + np.arange(T)])
    again = torch.cat([x for x, _ in clone(corpus_data, rank=1, world_size=3).eval_batches("val", 3, 2)])
    assert torch.equal(few, again)  # the same on every rank


@given(world_size=st.integers(1, 4), batch=st.integers(1, 5), steps=st.integers(1, 3), seq_len=st.integers(1, 40),
       seed=st.integers(0, 2**62))
def test_ddp_ranks_partition_the_single_process_batch(corpus_data, world_size, batch, steps, seq_len, seed):
    single = clone(corpus_data, seed=seed, seq_len=seq_len)
    ranks = [clone(corpus_data, seed=seed, rank=r, world_size=world_size, seq_len=seq_len) for r in range(world_size)]
    train = np.asarray(corpus_data.splits["train"], dtype=np.int64)
    for _ in range(steps):
        x1, y1 = single.next_batch(batch * world_size)
        parts = [r.next_batch(batch) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x1) and torch.equal(torch.cat([p[1] for p in parts]), y1)
        assert x1.shape == (batch * world_size, seq_len)
        assert torch.equal(x1[:, 1:], y1[:, :-1])
        row = np.concatenate([x1[-1].numpy(), y1[-1, -1:].numpy()])
        find_window(train, row)
    assert all(r.state_dict() == single.state_dict() for r in ranks)


def test_every_lm_data_config_is_valid():
    from omegaconf import OmegaConf

    from training.data.common import parse_config

    found = []
    for path in sorted((Path(__file__).resolve().parents[1] / "configs" / "data").glob("*.yaml")):
        cfg = OmegaConf.to_container(OmegaConf.load(path))
        if cfg["task"] != "lm":
            continue
        cfg.update({k: v for k, v in {"paths": ["x.txt"]}.items() if cfg.get(k) == "???"})
        parsed = parse_config(text_mod.TextConfig, cfg)  # unknown keys or bad values raise
        found.append(parsed.name)
    assert len(found) >= 7, found
