"""Checkpoint files: exact round trip, atomic writes under SIGKILL, refusal of tampered / foreign / pickle files
and of checkpoints from a different model config."""
import math
import multiprocessing
import os
import pickle
import random
import signal
import time

import numpy as np
import pytest
import safetensors.torch
from hypothesis import given
from hypothesis import strategies as st
import torch
from safetensors.torch import save_file

from tests.helpers.checkpoints import flip_byte
from training import checkpoint
from training.checkpoint import CheckpointError, CheckpointManager, load_checkpoint, save_checkpoint


def _payload():
    emb = torch.randn(37, 5)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(5))], lr=1e-3)
    opt.param_groups[0]["params"][0].grad = torch.randn(3, 5)
    opt.param_groups[0]["params"][1].grad = torch.randn(5)
    opt.step()
    return {
        # tied weights: one tensor under two names, as GPT's embedding / LM head
        "model": {"wte.weight": emb, "head.weight": emb, "ln.bias": torch.randn(5, dtype=torch.bfloat16),
                  "mask": torch.rand(7) > 0.5, "view": torch.randn(6, 4).t()},
        "optimizer": opt.state_dict(),  # int keys, tuples (betas), scalar tensors
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "data": {"perm": np.random.permutation(1001).astype(np.uint32), "epoch": 3, "tokens": np.arange(5, dtype=np.uint16)},
        "step": 17, "best_val_loss": float("inf"), "val": None, "name": "x", "weird": {"__tensor__": 1, 2: (3, [4.5])},
    }


def _assert_same(a, b, path="root"):
    """Same structure, types and bits (NaNs included)."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(checkpoint.raw_bytes(a), checkpoint.raw_bytes(b)), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), path
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: {a.keys()} != {b.keys()}"
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_round_trip_is_exact(tmp_path):
    payload = _payload()
    path = save_checkpoint(tmp_path / "c.safetensors", payload)
    loaded = load_checkpoint(path)
    _assert_same(payload, loaded)
    assert loaded["model"]["wte.weight"] is loaded["model"]["head.weight"]  # stored once, tied again on load
    # RNG states restore to the same streams
    random.setstate(loaded["rng"]["python"])
    np.random.set_state(loaded["rng"]["numpy"])
    a = (random.random(), np.random.rand())
    random.setstate(payload["rng"]["python"])
    np.random.set_state(payload["rng"]["numpy"])
    assert a == (random.random(), np.random.rand())
    assert not [p for p in tmp_path.iterdir() if p.name != "c.safetensors"]  # no temporary left behind


_TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
                 torch.bool]
_NUMPY_DTYPES = [np.uint32, np.uint16, np.int64, np.float32, np.bool_]


@st.composite
def _tensors(draw):
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    t = (torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) * 1e3)
    t = t.to(draw(st.sampled_from(_TORCH_DTYPES)))
    if t.is_floating_point() and t.numel() and draw(st.booleans()):
        t.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.0]))
    if draw(st.booleans()) and t.dim() >= 2:
        t = t.transpose(0, 1)  # non-contiguous
    return t


def _arrays():
    return st.builds(lambda n, dt, seed: np.random.default_rng(seed).integers(0, 60000, n).astype(dt),
                     st.integers(0, 6), st.sampled_from(_NUMPY_DTYPES), st.integers(0, 99))


_leaves = (st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=True) | st.text(max_size=8)
           | _tensors() | _arrays())
_keys = st.text(max_size=6) | st.integers(-5, 5) | st.sampled_from(["__tensor__", "__tuple__", "__dict__", "__x"])
_trees = st.recursive(_leaves, lambda kids: st.lists(kids, max_size=3) | st.tuples(kids, kids)
                      | st.dictionaries(_keys, kids, max_size=3), max_leaves=12)


@given(tree=_trees)
def test_any_payload_round_trips_bit_exactly(tmp_path_factory, tree):
    path = save_checkpoint(tmp_path_factory.mktemp("p") / "c.safetensors", {"tree": tree})
    _assert_same({"tree": tree}, load_checkpoint(path))


def test_unstorable_value_is_named(tmp_path):
    with pytest.raises(TypeError, match="model/fn"):
        save_checkpoint(tmp_path / "c.safetensors", {"model": {"fn": print}})


def test_tampered_tensor_bytes_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", _payload())
    flip_byte(path, path.stat().st_size - 3)  # inside the last tensor's data
    with pytest.raises(CheckpointError, match="modified or is corrupted"):
        load_checkpoint(path)


def test_tampered_metadata_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", _payload())
    data = path.read_bytes()
    i = data.index(b'\\"step\\": 17')  # the JSON payload inside the header
    path.write_bytes(data[:i] + b'\\"step\\": 99' + data[i + len(b'\\"step\\": 17'):])
    with pytest.raises(CheckpointError, match="modified or is corrupted"):
        load_checkpoint(path)


def test_truncated_file_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", _payload())
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a triformer checkpoint"):
        load_checkpoint(path)


def test_foreign_safetensors_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(3)}, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a triformer checkpoint"):
        load_checkpoint(path)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Exploit(str(marker))}, path)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(path)
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(CheckpointError, match="not a triformer checkpoint"):
        load_checkpoint(raw)
    assert not marker.exists()


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_model_config_mismatch_names_keys():
    saved = {"n_layer": 2, "n_embd": 64, "kernels": "triton", "dropout": 0.0}
    checkpoint.check_model_config(saved, {**saved, "kernels": "torch"})  # kernels may differ
    with pytest.raises(CheckpointError, match=r"n_embd: checkpoint 64 vs current 32; n_layer: checkpoint 2 vs current 3"):
        checkpoint.check_model_config(saved, {**saved, "n_layer": 3, "n_embd": 32})


def test_manager_keeps_last_and_best(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step, best in ((1, True), (2, False), (3, True), (4, False)):
        mgr.save(step, {"step": step, "w": torch.full((3,), float(step))}, is_best=best)
    assert [s for s, _ in checkpoint.step_checkpoints(tmp_path)] == [3, 4]
    assert mgr.latest().name == "step_00000004.safetensors"
    assert load_checkpoint(tmp_path / "best.safetensors")["step"] == 3
    assert checkpoint.resolve_resume(str(tmp_path), tmp_path) == mgr.latest()
    assert checkpoint.resolve_resume(str(mgr.latest()), tmp_path) == mgr.latest()
    with pytest.raises(FileNotFoundError, match="resume='nowhere'"):
        checkpoint.resolve_resume("nowhere", tmp_path)


def test_resume_latest_is_the_newest_checkpoint_of_any_run(tmp_path):
    older = CheckpointManager(tmp_path / "run-b" / "checkpoints").save(9, {"step": 9})
    newer = CheckpointManager(tmp_path / "run-a" / "checkpoints").save(2, {"step": 2})
    os.utime(older, (1_000_000, 1_000_000))
    (tmp_path / "run-a" / "checkpoints" / ".step_00000003.safetensors.tmp-x").write_bytes(b"torn")
    assert checkpoint.resolve_resume("latest", tmp_path) == newer
    with pytest.raises(FileNotFoundError, match="no step_.*checkpoint of a run directly under"):
        checkpoint.resolve_resume("latest", tmp_path / "empty")


def test_resume_latest_never_picks_a_sweep_job_and_names_the_candidates(tmp_path):
    """Right after a sweep (python train.py -m ...) its jobs are the newest checkpoints under runs/<name>/, but
    each has other settings: latest means the newest plain run; a sweep job is the user's to name."""
    plain = CheckpointManager(tmp_path / "2026-01-01_00-00-00" / "checkpoints").save(4, {"step": 4})
    os.utime(plain, (1_000_000, 1_000_000))
    sweep = tmp_path / "multirun-2026-01-02_00-00-00"
    jobs = [sweep / f"{i}-loss.ce_chunks={c}" for i, c in enumerate((1, 4))]
    for job in jobs:
        CheckpointManager(job / "checkpoints").save(6, {"step": 6})
    assert checkpoint.resolve_resume("latest", tmp_path) == plain
    # a sweep's folder has no checkpoint of its own: its jobs are listed
    with pytest.raises(FileNotFoundError, match=f"the runs below it: {jobs[0]}, {jobs[1]} .*resume=<run directory>"):
        checkpoint.resolve_resume(str(sweep), tmp_path)
    plain.unlink()
    with pytest.raises(FileNotFoundError, match=f"the runs below it: {jobs[0]}, {jobs[1]}"):
        checkpoint.resolve_resume("latest", tmp_path)
    assert checkpoint.resolve_resume(str(jobs[1]), tmp_path) == jobs[1] / "checkpoints" / "step_00000006.safetensors"


def _slow_save_file(tensors, filename, metadata=None):
    """safetensors' bytes, written in small flushed pieces: a large checkpoint on a slow disk, so that a kill
    lands inside the write most of the time."""
    data = safetensors.torch.save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        for i in range(0, len(data), 1 << 18):
            f.write(data[i:i + (1 << 18)])
            f.flush()
            time.sleep(0.005)


def _writer(directory, writing):
    checkpoint.save_file = _slow_save_file  # this child process only
    payload = {"w": torch.randn(1_000_000), "step": 0}
    mgr = CheckpointManager(directory, keep_last=2)
    step = max([s for s, _ in checkpoint.step_checkpoints(directory)], default=0)
    writing.set()
    while True:
        step += 1
        payload["step"] = step
        mgr.save(step, payload, is_best=step % 3 == 0)


def test_sigkill_during_writes_never_leaves_a_torn_checkpoint(tmp_path):
    """A writer saving back to back is SIGKILLed 20 times at random moments; afterwards every visible
    checkpoint (the newest complete one included) loads, and interrupted writes left only temporaries."""
    ctx = multiprocessing.get_context("forkserver")  # torch preloaded there (conftest)
    rng = random.Random(0)
    last_step, interrupted, seen = 0, 0, set()
    for _ in range(20):
        writing = ctx.Event()
        proc = ctx.Process(target=_writer, args=(tmp_path, writing))
        proc.start()
        # the kill's moment counts from the first write, not from the start: a busy machine can take longer
        # to start the child (it imports this module) than the whole random interval
        assert writing.wait(120), "the writer process did not start"
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        temporaries = {p.name for p in tmp_path.glob(".*tmp-*")}
        interrupted += bool(temporaries - seen)  # this kill left a new half-written temporary
        seen = temporaries
        visible = checkpoint.step_checkpoints(tmp_path)
        for step, path in visible:
            assert load_checkpoint(path)["step"] == step
        if visible:
            latest = CheckpointManager(tmp_path).latest()
            assert load_checkpoint(latest)["step"] >= last_step
            last_step = load_checkpoint(latest)["step"]
        if (tmp_path / "best.safetensors").exists():
            assert load_checkpoint(tmp_path / "best.safetensors")["step"] % 3 == 0
    assert last_step > 0, "the writer never completed a checkpoint: the test exercised nothing"
    assert interrupted >= 5, f"only {interrupted} of 20 kills landed inside a write: the test exercised little"
