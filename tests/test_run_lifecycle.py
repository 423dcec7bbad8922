"""A run's lifecycle (training/run.py and the trainer around it): config values checked before any work, a run
owns its directory, debris of a killed checkpoint write is cleaned, resume checks, what a finished, complete or
failed run says and leaves behind, plots, the offline wandb run, and the train.py/eval.py command lines."""
import glob
import multiprocessing
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import training.data
from training import checkpoint, run, settings
from training.config import compose
from training.trainer import Trainer, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def _cfg(data_cache, *overrides, experiment="smoke"):
    cache = [f"data.cache_dir={data_cache}", "data.num_proc=1"] if experiment == "smoke" else []
    return compose([f"experiment={experiment}", "model.kernels=torch", *cache, *overrides])


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("override, key", [
    ("trainer.log_interval=0", "trainer.log_interval must be >= 1, got 0"),
    ("optim.warmup_steps=-5", "optim.warmup_steps must be >= 0, got -5"),
    ("trainer.ckpt_interval=-3", "trainer.ckpt_interval must be >= 0, got -3"),
    ("trainer.eval_interval=-1", "trainer.eval_interval must be >= 0"),
    ("trainer.grad_clip=-1", "trainer.grad_clip must be >= 0, got -1"),
    ("trainer.eval_batches=0", "trainer.eval_batches must be >= 1"),
    ("trainer.max_steps=2.5", "trainer.max_steps must be an int, got 2.5"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("optim.lr=nan", "optim.lr must be a finite number"),
    ("optim.lr=inf", "optim.lr must be a finite number, got inf"),
    ("optim.eps=inf", "optim.eps must be a finite number"),
    ("optim.weight_decay=inf", "optim.weight_decay must be a finite number"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio must be >= 0 and <= 1"),
    ("optim.betas=[0.9,1.5]", r"optim.betas\[1\] must be >= 0 and < 1"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("optim.schedule=cosin", "optim.schedule='cosin' is not one of: cosine, linear, constant"),
    ("optim.name=sgd", "optim.name='sgd' is not one of: adamw"),
    ("model.dropout=1.0", r"model.dropout must be in \[0, 1\)"),
    ("model.n_layer=0", "model.n_layer must be a positive int"),
    ("model.n_head=5", r"model.n_embd \(32\) must be divisible by n_head \(5\)"),
    ("model.n_kv_head=3", "model.n_kv_head must be a positive divisor of n_head"),
    ("loss.ce_chunks=0", "loss.ce_chunks must be a positive int"),
    ("loss.label_smoothing=-0.1", r"loss.label_smoothing must be in \[0, 1\)"),
    ("data.seq_len=0", "data.seq_len must be a positive int"),
    ("data.seq_len=64", "data.seq_len=64 exceeds the model's block_size=32"),
    ("data.val_fraction=0", "data.val_fraction=0 leaves no validation split"),
    ("logger.name=tb", "logger.name='tb' is not one of: none, wandb"),
    ("trainer.compile_backend=indcutor", "trainer.compile_backend='indcutor' is not one of"),
    ("trainer.precision=fp8", "trainer.precision='fp8' is not one of"),
    ("seed=36893488147419103232", "seed must be >= 0 and < 18446744073709551616"),
    # a bool setting takes only true or false: "no" is a non-empty string, which Python calls true
    ("trainer.compile=no", "trainer.compile must be true or false, got 'no'"),
    ("trainer.activation_checkpointing=no", "trainer.activation_checkpointing must be true or false"),
    ("trainer.eval_at_start=off", "trainer.eval_at_start must be true or false, got 'off'"),
    ("trainer.test_at_end=nope", "trainer.test_at_end must be true or false"),
    ("memory_report=maybe", "memory_report must be true or false, got 'maybe'"),
    ("resume_allow_changes=1", "resume_allow_changes must be true or false, got 1"),
])
def test_settings_fail_before_any_work(tmp_path, data_cache, monkeypatch, override, key):
    def no_work(*args, **kwargs):
        raise AssertionError("data was prepared before the config was checked")

    monkeypatch.setattr(training.data, "build_data", no_work)
    with pytest.raises(ValueError, match=key):
        Trainer(_cfg(data_cache, f"run_dir={tmp_path / 'run'}", override))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, key", [
    ("experiment=smoke-vit", None),
    ("experiment=smoke-vit data.hflip=maybe", "data.hflip must be true or false, got 'maybe'"),
    ("experiment=smoke-vit data.mean=[nan]", "data.mean must be null or a list of finite numbers, got \\[nan\\]"),
    ("experiment=smoke-vit model.patch_size=3", r"model.image_size \(8\) must be divisible by patch_size \(3\)"),
    ("experiment=smoke-vit model.pool=max", "model.pool must be one of"),
    ("experiment=smoke-vit loss=fused", "loss=fused is for language models; image classifiers use loss=ce"),
])
def test_image_settings_fail_before_any_work(override, key):
    cfg = compose(["model.kernels=torch", *override.split()])
    if key is None:
        settings.check_train_config(cfg)
        return
    with pytest.raises(ValueError, match=key):
        settings.check_train_config(cfg)


def test_eval_values_are_checked_before_loading():
    for key, value, words in [("stride", 0, "stride must be >= 1, got 0"),
                              ("context", -1, "context must be >= 1"),
                              ("batch_size", 0, "batch_size must be >= 1"),
                              ("temperature", 0, "temperature must be > 0"),
                              ("top_k", 0, "top_k must be >= 1"),
                              ("perplexity", "no", "perplexity must be true or false, got 'no'"),
                              ("split", "dev", "split='dev' is not one of")]:
        cfg = _eval_cfg("missing.safetensors", "out", **{key: value})
        with pytest.raises(ValueError, match=words):
            settings.check_eval_config(cfg)
    with pytest.raises(ValueError, match="checkpoint= is required: python eval.py checkpoint=runs/"):
        settings.check_eval_config(_eval_cfg(None, "out"))


# ----------------------------------------------------------------------------------- run directory lock
def _hold_lock(directory, ready, release):
    lock = run.RunDirLock(directory).acquire()
    ready.set()
    release.wait(60)
    lock.release()


def _hold_lock_and_die(directory, ready):
    run.RunDirLock(directory).acquire()
    ready.set()
    os.kill(os.getpid(), 9)


def test_a_second_run_into_a_busy_directory_is_refused(tmp_path, data_cache):
    ctx = multiprocessing.get_context("forkserver")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(run.RunDirBusyError, match=rf"in use by another run \(pid {holder.pid} .*choose another run_dir"):
            Trainer(_cfg(data_cache, f"run_dir={tmp_path}"))
        assert (tmp_path / run.LOCK_FILE).exists()  # the refused run left the owner's directory alone
    finally:
        release.set()
        holder.join(60)
    # released at the owner's exit: the directory is free again
    Trainer(_cfg(data_cache, f"run_dir={tmp_path}")).close()
    assert not (tmp_path / run.LOCK_FILE).exists()


def test_lock_of_a_killed_run_is_free():
    import tempfile

    directory = tempfile.mkdtemp()
    ctx = multiprocessing.get_context("forkserver")
    ready = ctx.Event()
    p = ctx.Process(target=_hold_lock_and_die, args=(directory, ready))
    p.start()
    p.join(60)
    assert p.exitcode == -9 and ready.is_set()
    with run.RunDirLock(directory):  # kill -9 released it
        pass


def test_runs_started_together_without_run_dir_get_their_own_directories(tmp_path, data_cache):
    a = Trainer(_cfg(data_cache, f"runs_root={tmp_path}", "memory_report=false"))
    try:
        b = Trainer(_cfg(data_cache, f"runs_root={tmp_path}", "memory_report=false"))
        b.close()
    finally:
        a.close()
    assert a.run_dir != b.run_dir and a.run_dir.parent == b.run_dir.parent == tmp_path / "smoke"
    assert "%f" in (ROOT / "configs" / "train.yaml").read_text()  # Hydra's directory: microseconds too


# -------------------------------------------------------------------------------------- stale temporaries
def test_stale_checkpoint_temporaries_are_cleaned_under_the_lock(tmp_path, data_cache):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir(parents=True)
    stale = [".step_00000003.safetensors.triformer-tmp-k2j4h_x1", ".best.safetensors.triformer-tmp-4242"]
    # another program's temporaries (tempfile's .tmpXXXXXX) and names that are not ours stay
    keep = ["notes.txt", "step_00000003.safetensors.tmp-other", ".hidden_by_user", ".tmpa8b7c6d5",
            ".step_00000003.safetensors.tmp-k2j4h_x1"]
    for name in stale + keep:
        (ckpts / name).write_bytes(b"x" * 10)
    # while another run holds the directory, nothing is touched
    with run.RunDirLock(tmp_path):
        assert run.clean_stale_temporaries(ckpts) == []
    assert all((ckpts / n).exists() for n in stale)
    Trainer(_cfg(data_cache, f"run_dir={tmp_path}", "memory_report=false")).close()
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(keep)


def test_resume_cleans_the_source_run_temporaries(tmp_path, data_cache):
    train(_cfg(data_cache, f"run_dir={tmp_path / 'a'}", "trainer.max_steps=3"))
    debris = tmp_path / "a" / "checkpoints" / ".step_00000006.safetensors.triformer-tmp-abcdef12"
    debris.write_bytes(b"partial")
    train(_cfg(data_cache, f"run_dir={tmp_path / 'b'}", "trainer.max_steps=4", f"resume={tmp_path / 'a'}"))
    assert not debris.exists()


# ------------------------------------------------------------------------------------------------ resume
def test_resume_of_a_complete_run_trains_nothing_and_says_how_to_extend(tmp_path, data_cache, capsys):
    train(_cfg(data_cache, f"run_dir={tmp_path / 'a'}", "trainer.max_steps=3"))
    capsys.readouterr()
    summary = train(_cfg(data_cache, f"run_dir={tmp_path / 'b'}", "trainer.max_steps=3", f"resume={tmp_path / 'a'}"))
    err = capsys.readouterr().err
    assert summary["complete"] and summary["steps"] == 3
    assert "nothing to train" in err and "is complete" in err and "trainer.max_steps=6" in err
    assert "python eval.py checkpoint=" in err
    assert not (tmp_path / "b").exists()  # no empty folder
    extended = train(_cfg(data_cache, f"run_dir={tmp_path / 'c'}", "trainer.max_steps=5", f"resume={tmp_path / 'a'}"))
    assert extended["steps"] == 5


def test_resume_with_other_batch_or_data_settings_is_refused_unless_allowed(tmp_path, data_cache, capsys):
    train(_cfg(data_cache, f"run_dir={tmp_path / 'a'}", "trainer.max_steps=3"))
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000003.safetensors"
    for override, named in [("trainer.batch_size=4", "trainer.batch_size: checkpoint 8 vs now 4"),
                            ("data.max_files=2", "data.max_files: checkpoint 3 vs now 2")]:
        with pytest.raises(ValueError, match=f"{named}.*resume_allow_changes=true"):
            Trainer(_cfg(data_cache, f"run_dir={tmp_path / 'b'}", override, f"resume={ckpt}"))
        assert not (tmp_path / "b").exists()
    capsys.readouterr()
    summary = train(_cfg(data_cache, f"run_dir={tmp_path / 'c'}", "trainer.batch_size=4", "resume_allow_changes=true",
                         f"resume={ckpt}"))
    assert summary["steps"] == 6 and "trainer.batch_size: checkpoint 8 vs now 4" in capsys.readouterr().err


def _records(run_dir):
    import csv
    import json
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.reader(f))
    return jsonl, rows[0], rows[1:]


def test_resumed_run_records_read_as_one_run(tmp_path, data_cache):
    """Resume from step 3 of a 6-step run: the run continues in its own directory, the records past step 3 are
    replaced by the resumed steps (no duplicates), and the CSV holds every step with its columns in one order."""
    a = tmp_path / "smoke" / "a"
    train(_cfg(data_cache, f"run_dir={a}"))
    first, header, _ = _records(a)
    losses = {r["step"]: r["loss"] for r in first if r["kind"] == "train"}
    train(_cfg(data_cache, f"resume={a / 'checkpoints' / 'step_00000003.safetensors'}"))
    again, header2, rows = _records(a)
    steps = [(r["kind"], r["step"]) for r in again]
    assert steps == [(r["kind"], r["step"]) for r in first] and len(set(steps)) == len(steps)
    assert {r["step"]: r["loss"] for r in again if r["kind"] == "train"} == losses  # an exact continuation
    assert header2 == header == ["kind", "step", "time", *sorted(set(header) - {"kind", "step", "time"})]
    assert [int(r[1]) for r in rows] == [r["step"] for r in again]
    assert [p.name for p in (tmp_path / "smoke").iterdir()] == ["a"]  # no second directory
    # resume=latest finds it under runs/<name>/ and extends it in place, from step 6
    train(_cfg(data_cache, f"runs_root={tmp_path}", "resume=latest", "trainer.max_steps=8"))
    extended, _, rows = _records(a)
    assert [r["step"] for r in extended if r["kind"] == "train"] == list(range(1, 9))
    assert [p.name for p in (tmp_path / "smoke").iterdir()] == ["a"]


def test_a_new_run_into_a_finished_run_is_refused(tmp_path, data_cache):
    train(_cfg(data_cache, f"run_dir={tmp_path}", "trainer.max_steps=3"))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(ValueError, match=f"run_dir={tmp_path} already holds a run .*config.json.*resume={tmp_path}"):
        Trainer(_cfg(data_cache, f"run_dir={tmp_path}", "trainer.max_steps=3"))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


@pytest.mark.parametrize("complete", [True, False])
def test_resume_verifies_the_checkpoint(tmp_path, data_cache, complete):
    """One changed byte is refused as eval.py refuses it: not "nothing to train", not a silent resume."""
    from tests.helpers.checkpoints import flip_byte
    train(_cfg(data_cache, f"run_dir={tmp_path / 'a'}", "trainer.max_steps=3"))
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000003.safetensors"
    flip_byte(ckpt, -3)
    with pytest.raises(checkpoint.CheckpointError, match="modified or is corrupted"):
        train(_cfg(data_cache, f"resume={ckpt}", f"trainer.max_steps={3 if complete else 4}"))


def _read_only(monkeypatch, root):
    """Writes under ``root`` fail as on a read-only mount (the tests run as root, whom chmod does not stop)."""
    import errno
    real_open, real_access = os.open, os.access

    def under(path):
        return os.path.abspath(path).startswith(str(root))

    def open_(path, flags, *args, **kwargs):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: not (under(path) and mode & os.W_OK)
                        and real_access(path, mode, **kw))


def test_resume_from_a_read_only_run_and_a_folder_of_other_files(tmp_path, data_cache, monkeypatch):
    train(_cfg(data_cache, f"run_dir={tmp_path / 'ro'}", "trainer.max_steps=3"))
    # a checkpoint copied into a folder of other things: another program's temporaries there are not ours
    folder = tmp_path / "downloads"
    folder.mkdir()
    source = tmp_path / "ro" / "checkpoints" / "step_00000003.safetensors"
    (folder / "step_00000003.safetensors").write_bytes(source.read_bytes())
    others = [folder / ".tmpa8b7c6d5", folder / ".step_00000004.safetensors.tmp-k2j4h_x1"]
    for p in others:
        p.write_bytes(b"not ours")
    train(_cfg(data_cache, f"run_dir={tmp_path / 'b'}", "trainer.max_steps=4", f"resume={folder}"))
    assert all(p.exists() for p in others) and not (folder / run.LOCK_FILE).exists()
    # a read-only run: continued in a new directory, its records carried over
    _read_only(monkeypatch, tmp_path / "ro")
    summary = train(_cfg(data_cache, f"runs_root={tmp_path}", "trainer.max_steps=4", f"resume={tmp_path / 'ro'}"))
    assert summary["steps"] == 4 and Path(summary["run_dir"]).parent == tmp_path / "smoke"
    steps = [r["step"] for r in _records(Path(summary["run_dir"]))[0] if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------- failure and finish
def test_failed_run_leaves_no_empty_folder(tmp_path, data_cache):
    with pytest.raises(ValueError, match="data.seq_len=64 exceeds the model's block_size=32"):
        Trainer(_cfg(data_cache, f"runs_root={tmp_path}", "data.seq_len=64"))
    assert list(tmp_path.iterdir()) == []


def test_finished_run_names_its_directory_checkpoint_metrics_and_eval_command(tmp_path, data_cache, capsys):
    train(_cfg(data_cache, f"run_dir={tmp_path}", "trainer.max_steps=3"))
    err = capsys.readouterr().err
    best = tmp_path / "checkpoints" / "best.safetensors"
    assert f"run directory:   {tmp_path}" in err and f"best checkpoint: {best}" in err
    assert "final metrics:   val/loss " in err and f"evaluate it:     python eval.py checkpoint={best}" in err
    assert not (tmp_path / run.LOCK_FILE).exists()


def test_cpu_estimate_suggests_a_gpu_or_a_small_model():
    message = run.cpu_estimate(95.0, 199, "gpt2-small", 124_000_000)
    assert "95.0 s" in message and "5.3 h" in message and "GPU" in message and "small model" in message
    assert run.cpu_estimate(0.5, 200, "gpt2-nano", 400_000) is None


def test_checkpoints_get_the_mode_of_the_run_files(tmp_path):
    old = os.umask(0o022)
    try:
        path = checkpoint.save_checkpoint(tmp_path / "c.safetensors", {"w": torch.ones(2)})
        other = tmp_path / "x.json"
        other.write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(other.stat().st_mode) == 0o644


# ------------------------------------------------------------------------------------------------ plots
def test_image_run_plots_accuracy_and_labels_memory(tmp_path):
    train(compose(["experiment=smoke-vit", "model.kernels=torch", f"run_dir={tmp_path}", "memory_report=true",
                   "trainer.test_at_end=true"]))
    for name in ("accuracy.png", "loss.png", "memory.png", "activation_memory.png"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_memory_plot_says_what_it_measures(tmp_path, monkeypatch):
    import matplotlib.axes

    from training.logging import RunLogger

    labels = []
    real = matplotlib.axes.Axes.set_ylabel
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", lambda ax, text, *a, **k: (labels.append(text),
                                                                                        real(ax, text, *a, **k))[1])
    logger = RunLogger(tmp_path, compose().logger, {})
    for step in (1, 2):
        logger.log("train", step, {"loss": 1.0 / step, "memory_gib": 0.5, "throughput": 10.0, "lr": 0.1})
    logger.summary(**{"memory/activations_plain_bytes": 4 << 20, "memory/activations_triformer_bytes": 1 << 20})
    logger.close()
    assert "process resident memory, CPU (GiB)" in labels
    assert "activations saved for backward, one step (MiB)" in labels


# ------------------------------------------------------------------------------------------------ wandb
def _wandb_history(path):
    """History records of an offline run's .wandb file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, parts, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        parts += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            if record.WhichOneof("record_type") == "history":
                out.append({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
    return out


def test_wandb_is_opt_in_and_an_offline_run_records_the_metrics(tmp_path, data_cache, monkeypatch):
    pytest.importorskip("wandb", reason="wandb does not import here")
    assert compose().logger.name == "none"  # the default keeps local records only
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(_cfg(data_cache, f"run_dir={tmp_path}", "logger=wandb", "trainer.max_steps=3"))
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    history = _wandb_history(runs[0])
    steps = {int(h["_step"]) for h in history if "train/loss" in h}
    assert steps == {1, 2, 3} and not any("loss" in h for h in history)  # scalars named by section
    assert any("val/loss" in h for h in history) and any("plots/loss/path" in h for h in history)


# ---------------------------------------------------------------------------------------- command lines
def test_train_and_eval_command_lines_log_to_their_directories(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    common = ["experiment=smoke", "model.kernels=torch", f"runs_root={tmp_path}/runs",
              f"data.cache_dir={tmp_path}/cache", "data.num_proc=1", "trainer.max_steps=3"]

    def cli(*args):
        out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout + out.stderr

    cli("train.py", *common)
    (run_dir,) = (tmp_path / "runs" / "smoke").iterdir()
    log = (run_dir / "train.log").read_text()
    assert "preparing data" in log and "step 3: val/loss" in log and "evaluate it:     python eval.py checkpoint=" in log
    # resume=latest of the finished run: says it is complete, makes no folder
    said = cli("train.py", *common, "resume=latest")
    assert "nothing to train" in said and "trainer.max_steps=6" in said
    assert [p.name for p in (tmp_path / "runs" / "smoke").iterdir()] == [run_dir.name]
    # eval.py with the run directory: takes its best checkpoint, says what it evaluates, logs to eval.log
    out = cli("eval.py", f"checkpoint={run_dir}", "max_tokens=200", "context=16", f"hydra.run.dir={tmp_path}/eval")
    assert "checkpoints/best.safetensors" in out and "perplexity on test" in out
    assert "evaluating" in (tmp_path / "eval" / "eval.log").read_text()


@pytest.fixture
def start():
    """``start(script, *args)`` runs it in a subprocess; whatever is still running at the test's end is killed
    (a failed assertion must not leave a 100000-step training run behind)."""
    started = []

    def run(script, *args):
        # offline: init_from=gpt2 must not download anything where the Hub happens to be reachable
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0",
               "HF_HUB_OFFLINE": "1"}
        started.append(subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True))
        return started[-1]
    yield run
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_command_lines_refuse_in_one_line_and_stop_on_signals_with_a_checkpoint(tmp_path, data_cache, start):
    """train.py/eval.py in subprocesses, started together (each pays Python's and torch's start-up, in parallel):
    a refused setting is one line and leaves no folder; SIGINT and SIGTERM stop training after a step with a
    checkpoint and one line saying how to resume."""
    import signal
    import time
    smoke = ["experiment=smoke", "model.kernels=torch", f"data.cache_dir={data_cache}", "data.num_proc=1"]
    refused = {
        "error: trainer.compile must be true or false, got 'no'":
            start("train.py", *smoke, f"runs_root={tmp_path}/runs", "trainer.compile=no"),
        "error: init_from=gpt2: not a local directory or checkpoint, and the Hugging Face Hub is not reachable":
            start("train.py", *smoke, f"runs_root={tmp_path}/runs", "init_from=gpt2"),
        "error: checkpoint= is required: python eval.py checkpoint=runs/":
            start("eval.py", f"hydra.run.dir={tmp_path}/eval/x"),
    }
    stopped = {sig: (tmp_path / sig.name, start("train.py", *smoke, f"run_dir={tmp_path / sig.name}",
                                                "trainer.max_steps=100000", "trainer.ckpt_interval=0",
                                                "trainer.eval_interval=0"))
               for sig in (signal.SIGINT, signal.SIGTERM)}
    for expected, process in refused.items():
        out = process.communicate(timeout=240)[0]
        lines = [line for line in out.splitlines() if line.strip()]
        assert process.returncode == 1 and len(lines) == 1 and lines[0].startswith(expected), out
    assert not list((tmp_path / "runs").glob("*")) and not (tmp_path / "eval").exists()  # runs_root itself may stay
    for sig, (run_dir, process) in stopped.items():
        metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 180
        while '"step": 2,' not in (metrics.read_text() if metrics.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.2)
        process.send_signal(sig)
    for sig, (run_dir, process) in stopped.items():
        out = process.communicate(timeout=120)[0]
        assert process.returncode == 128 + sig, out
        assert "Traceback" not in out and "KeyboardInterrupt" not in out
        (said,) = [line for line in out.splitlines() if "resume with:" in line]
        assert f"stopped by {sig.name} after step " in said and "resume=" in said and "experiment=smoke" in said
        (ckpt,) = run_dir.glob("checkpoints/step_*.safetensors")
        step = checkpoint.load_checkpoint(ckpt)["step"]  # complete and verified
        assert f"after step {step}, saved {ckpt}" in said
    # the printed command continues the run where it stopped (SIGTERM's, the last of the loop)
    summary = train(_cfg(data_cache, f"run_dir={run_dir}", f"resume={run_dir}", "data.num_proc=1",
                         f"trainer.max_steps={step + 1}", "trainer.ckpt_interval=0", "trainer.eval_interval=0"))
    assert summary["steps"] == step + 1


# -------------------------------------------------------------------------------------------- messages
def _eval_cfg(checkpoint, out, **extra):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    values = {"checkpoint": checkpoint, "output_dir": out, "device": "cpu", "max_tokens": 200, "context": 16, **extra}
    overrides = [f"{k}={v}" for k, v in values.items() if v is not None]  # checkpoint None: left missing (???)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("eval", overrides=overrides)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("smoke_run")
    train(_cfg(data_cache, f"run_dir={run_dir}", "trainer.max_steps=3"))
    return run_dir


def test_eval_checkpoint_directory(tmp_path, smoke_run):
    from training import evaluate as ev

    results = ev.run(_eval_cfg(smoke_run, tmp_path / "out"))  # the run directory: its best checkpoint
    assert results["checkpoint"] == str(smoke_run / "checkpoints" / "best.safetensors")
    assert "test/loss" in results
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"checkpoint=.*empty is a directory without checkpoints"):
        ev.run(_eval_cfg(empty, tmp_path / "out2"))
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        ev.run(_eval_cfg(tmp_path / "missing.safetensors", tmp_path / "out3"))


def test_language_model_checkpoint_with_image_data_names_the_mismatch(tmp_path, smoke_run):
    from training import evaluate as ev

    with pytest.raises(ValueError, match=r"holds a language model \(gpt2-nano\) but data=digits is image-classification"):
        ev.run(_eval_cfg(smoke_run, tmp_path / "out", data="digits"))


def test_one_utf8_policy_for_eval_and_training(tmp_path, smoke_run, data_cache, capsys):
    from training import evaluate as ev

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait, na\u00efve\n".encode("latin-1") * 3)
    results = ev.run(_eval_cfg(smoke_run, tmp_path / "out", text_file=bad))
    assert results[f"{bad}/tokens"] > 0
    err = capsys.readouterr().err
    assert f"{bad} (6 invalid sequences)" in err and "not valid UTF-8" in err and "U+FFFD" in err
    # training reads its files under the same policy and names the file too
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("plain text " * 200, encoding="utf-8")
    (corpus / "bad.txt").write_bytes(bad.read_bytes() * 50)
    build = training.data.build_data(dict(task="lm", name="utf8", source="files", paths=[str(corpus)],
                                          cache_dir=str(tmp_path / "cache"), num_proc=1, seq_len=16), seed=0)
    assert build.vocab_size == 257
    err = capsys.readouterr().err
    assert f"{corpus / 'bad.txt'} (300 invalid sequences)" in err and "good.txt" not in err


def test_hub_dataset_offline_gives_one_clear_message(tmp_path, no_network, monkeypatch):
    from training.data.text import DataUnavailableError

    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    cfg = compose(["data=openwebtext", "data.tokenizer=bytes", f"data.cache_dir={tmp_path}/c",
                   f"data.hf_cache_dir={tmp_path}/hf", "data.num_proc=1"])
    with pytest.raises(DataUnavailableError) as caught:
        training.data.build_data(cfg.data, seed=0)
    message = str(caught.value)
    assert "Skylion007/openwebtext" in message and "not in the local cache" in message and f"{tmp_path}/hf" in message
    assert "data=text_files" in message and "data.hf_data_files" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no chained traceback wall


def test_large_model_on_the_cpu_is_announced_and_estimated(tmp_path, data_cache, monkeypatch, capsys):
    import models

    monkeypatch.setattr(models.GPT, "num_params", lambda self, non_embedding=True: 124_000_000)
    calls = []

    def estimate(seconds, steps_left, name, params):
        calls.append((steps_left, name, params))
        return f"estimate for {name}"

    monkeypatch.setattr(run, "cpu_estimate", estimate)
    train(_cfg(data_cache, f"run_dir={tmp_path}", "trainer.max_steps=3", "trainer.eval_interval=0"))
    err = capsys.readouterr().err
    assert "gpt2-nano has 124M parameters and runs on the CPU" in err and "A GPU (trainer=gpu)" in err
    assert err.index("124M parameters") < err.index("step 3: val/loss")  # up front
    assert calls == [(2, "gpt2-nano", 124_000_000)] and "warning: estimate for gpt2-nano" in err  # after step 1 only
