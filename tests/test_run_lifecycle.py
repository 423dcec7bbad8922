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
from training import checkpoint, run
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
    ("trainer.log_interval=0", "trainer.log_interval must be a positive int, got 0"),
    ("optim.warmup_steps=-5", "optim.warmup_steps must be a non-negative int, got -5"),
    ("trainer.ckpt_interval=-3", "trainer.ckpt_interval must be a non-negative int, got -3"),
    ("trainer.eval_interval=-1", "trainer.eval_interval must be a non-negative int"),
    ("trainer.grad_clip=-1", "trainer.grad_clip must be a number >= 0, got -1"),
    ("trainer.eval_batches=0", "trainer.eval_batches must be null or a positive int"),
    ("trainer.max_steps=2.5", "trainer.max_steps must be a positive int, got 2.5"),
    ("optim.lr=0", "optim.lr must be a number > 0"),
    ("optim.lr=nan", "optim.lr must be a number > 0"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio must be a number >= 0 and <= 1"),
    ("optim.betas=[0.9,1.5]", r"optim.betas\[1\] must be a number >= 0 and < 1"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be a number >= 0"),
    ("model.dropout=1.0", "model.dropout must be a number >= 0 and < 1"),
    ("model.n_layer=0", "model.n_layer must be null or a positive int"),
    ("loss.ce_chunks=0", "loss.ce_chunks must be a positive int"),
    ("loss.label_smoothing=-0.1", "loss.label_smoothing must be a number >= 0 and < 1"),
    ("data.seq_len=0", "data.seq_len must be a positive int"),
])
def test_numeric_config_values_fail_before_any_work(tmp_path, data_cache, monkeypatch, override, key):
    def no_work(*args, **kwargs):
        raise AssertionError("data was prepared before the config was checked")

    monkeypatch.setattr(training.data, "build_data", no_work)
    with pytest.raises(ValueError, match=key):
        Trainer(_cfg(data_cache, f"run_dir={tmp_path / 'run'}", override))
    assert not (tmp_path / "run").exists()


def test_eval_values_are_checked_before_loading():
    for key, value, words in [("stride", 0, "stride must be null or a positive int, got 0"),
                              ("context", -1, "context must be null or a positive int"),
                              ("batch_size", 0, "batch_size must be a positive int"),
                              ("temperature", 0, "temperature must be a number > 0"),
                              ("top_k", 0, "top_k must be null or a positive int")]:
        cfg = {"checkpoint": "missing.safetensors", "batch_size": 8, key: value}
        with pytest.raises(ValueError, match=words):
            run.validate_eval_config(cfg)


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
    stale = [".step_00000003.safetensors.tmp-k2j4h_x1", ".best.safetensors.tmp-4242", ".tmpa8b7c6d5"]
    keep = ["notes.txt", "step_00000003.safetensors.tmp-other", ".hidden_by_user"]
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
    debris = tmp_path / "a" / "checkpoints" / ".step_00000006.safetensors.tmp-abcdef12"
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


# -------------------------------------------------------------------------------------------- messages
def _eval_cfg(checkpoint, out, **extra):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = [f"checkpoint={checkpoint}", f"output_dir={out}", "device=cpu", "max_tokens=200", "context=16"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
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
