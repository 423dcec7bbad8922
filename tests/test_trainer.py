"""The training loop on CPU: exact resume, gradient accumulation, non-finite losses, precision, run outputs.

Runs build on ``experiment=smoke`` (one-layer GPT, three stdlib files) with kernels=torch: the loop is under
test here, not the kernels (tests/test_memory_report.py and tests/test_ddp_cpu.py run triformer's)."""
import copy
import json
import math

import pytest
import torch

from training import checkpoint
from training.config import compose
from training.logging import wandb_logged_in, wandb_scalars
from training.optim import build_optimizer, lr_at, param_groups
from training.trainer import NonFiniteLossError, Trainer, train


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def _cfg(run_dir, data_cache, *overrides, experiment="smoke"):
    # the smoke run's stdlib text is tokenized once per module
    cache = [f"data.cache_dir={data_cache}", "data.num_proc=1"] if experiment == "smoke" else []
    return compose([f"experiment={experiment}", "model.kernels=torch", f"run_dir={run_dir}", *cache, *overrides])


def _records(run_dir, kind="train", key="loss"):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == kind:
            out[r["step"]] = r[key]
    return out


def _fit(cfg, hook=None):
    trainer = Trainer(cfg)
    if hook is not None:
        trainer.model.register_forward_hook(hook)
    try:
        return trainer, trainer.fit()
    finally:
        trainer.close()


def _nan_at(steps):
    """Forward hook making the loss NaN on the given (1-based) training forward calls."""
    calls = {"n": 0}

    def hook(module, args, out):
        if not module.training:
            return out
        calls["n"] += 1
        return (out[0], out[1] * float("nan")) if calls["n"] in steps else out
    return hook


@pytest.mark.parametrize("experiment", ["smoke", "smoke-vit"])
def test_resume_continues_exactly(tmp_path, data_cache, experiment):
    full = tmp_path / "full"
    # dropout: the RNG streams must be restored too
    summary = train(_cfg(full, data_cache, "model.dropout=0.1", "trainer.keep_last=5", experiment=experiment))
    resumed = tmp_path / "resumed"
    ckpt = full / "checkpoints" / "step_00000003.safetensors"
    train(_cfg(resumed, data_cache, "model.dropout=0.1", f"resume={ckpt}", experiment=experiment))
    a, b = _records(full), _records(resumed)
    assert a == b  # steps 1-3 carried over from the run it resumed, 4-6 trained again: bitwise the same floats
    assert _records(full, "eval", "val/loss")[6] == _records(resumed, "eval", "val/loss")[6]
    assert all(math.isfinite(v) for v in a.values()) and a[6] < a[1]
    # the final weights agree too
    wa = checkpoint.load_checkpoint(full / "checkpoints" / "step_00000006.safetensors")["model"]
    wb = checkpoint.load_checkpoint(resumed / "checkpoints" / "step_00000006.safetensors")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert summary["steps"] == 6 and summary["last_checkpoint"].endswith("step_00000006.safetensors")


def test_run_writes_records_plots_and_checkpoints(tmp_path, data_cache):
    # wandb's code path runs too (disabled: no service process, no files)
    train(_cfg(tmp_path, data_cache, "trainer.keep_last=1", "logger=wandb", "logger.mode=disabled"))
    for name in ("metrics.jsonl", "metrics.csv", "summary.json", "config.json", "loss.png", "lr.png",
                 "throughput.png", "memory.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert [s for s, _ in checkpoint.step_checkpoints(tmp_path / "checkpoints")] == [6]
    best = checkpoint.load_checkpoint(tmp_path / "checkpoints" / "best.safetensors")
    assert best["val"]["val/loss"] == best["best_val_loss"] == min(_records(tmp_path, "eval", "val/loss").values())
    assert best["config"]["trainer"]["max_steps"] == 6 and best["model_config"]["n_layer"] == 1
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"step", "loss", "lr", "throughput", "val/loss"} <= set(header)


def test_grad_accumulation_equals_one_big_batch(tmp_path, data_cache):
    """One step of 4 accumulated micro-batches updates the weights like one step on their concatenation."""
    cfg = _cfg(tmp_path, data_cache, "trainer.grad_accum=4", "trainer.max_steps=1", "trainer.eval_interval=0",
               "trainer.ckpt_interval=0")
    trainer = Trainer(cfg)
    reference = copy.deepcopy(trainer.model)
    state = copy.deepcopy(trainer.data.state_dict())
    micro = [trainer.data.next_batch(trainer.micro_batch) for _ in range(4)]
    trainer.data.load_state_dict(state)
    try:
        trainer.fit()
    finally:
        trainer.close()
    x, y = (torch.cat(t) for t in zip(*micro))
    assert x.shape[0] == cfg.trainer.batch_size
    _, loss = reference(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.trainer.grad_clip)
    opt = build_optimizer(reference, cfg.optim, torch.device("cpu"))
    for group in opt.param_groups:
        group["lr"] = lr_at(0, cfg.optim, 1)
    opt.step()
    assert _records(tmp_path)[1] == pytest.approx(loss.item(), rel=1e-6)
    for (name, p), q in zip(trainer.model.named_parameters(), reference.parameters()):
        assert float((p - q).detach().norm() / q.detach().norm()) <= 1e-5, name


def test_non_finite_steps_are_skipped(tmp_path, data_cache):
    trainer, summary = _fit(_cfg(tmp_path, data_cache, "trainer.max_bad_steps=3"), _nan_at({3, 4}))
    losses = _records(tmp_path)
    assert math.isnan(losses[3]) and math.isnan(losses[4]) and math.isfinite(losses[6])
    steps_taken = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert steps_taken == {4}  # 6 steps, 2 skipped: AdamW stepped 4 times
    # no checkpoint at step 3 (inside the bad run), one at step 6
    assert [s for s, _ in checkpoint.step_checkpoints(tmp_path / "checkpoints")] == [6]
    assert summary["steps"] == 6


def test_non_finite_run_stops_and_keeps_checkpoint_from_before(tmp_path, data_cache):
    cfg = _cfg(tmp_path, data_cache, "trainer.max_bad_steps=3", "trainer.ckpt_interval=1", "trainer.max_steps=10")
    with pytest.raises(NonFiniteLossError, match=r"non-finite for 3 steps in a row \(steps 3-5\).*step_00000002"):
        _fit(cfg, _nan_at(set(range(3, 100))))
    assert [s for s, _ in checkpoint.step_checkpoints(tmp_path / "checkpoints")][-1] == 2


def _skipping_on_device(trainer):
    """``trainer`` as it runs on CUDA with fused AdamW (which runs on the CPU too): the optimizer skips a non-finite
    step on the device, and the guard reads the steps' records only where it must."""
    o = trainer.cfg.optim
    trainer.optimizer = torch.optim.AdamW(param_groups(trainer.wrapped, o.weight_decay), lr=o.lr,
                                          betas=tuple(o.betas), eps=o.eps, fused=True)
    trainer.skips_on_device = True


def test_non_finite_steps_are_skipped_on_the_device(tmp_path, data_cache, monkeypatch):
    def no_pinning(self, *args, **kwargs):
        raise AssertionError("host batches are pinned only for a CUDA device")

    monkeypatch.setattr(torch.Tensor, "pin_memory", no_pinning)
    cfg = _cfg(tmp_path, data_cache, "trainer.max_bad_steps=3", "trainer.log_interval=6", "trainer.eval_interval=0")
    trainer = Trainer(cfg)
    _skipping_on_device(trainer)
    trainer.model.register_forward_hook(_nan_at({3, 4}))
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {4}  # 2 of 6 skipped on the device
    assert summary["steps"] == 6 and math.isfinite(_records(tmp_path)[6])
    assert [s for s, _ in checkpoint.step_checkpoints(tmp_path / "checkpoints")] == [6]


def test_non_finite_run_stops_on_a_later_read_naming_the_same_steps(tmp_path, data_cache):
    cfg = _cfg(tmp_path, data_cache, "trainer.max_bad_steps=3", "trainer.log_interval=100", "trainer.eval_interval=0",
               "trainer.ckpt_interval=0", "trainer.max_steps=10")
    trainer = Trainer(cfg)
    _skipping_on_device(trainer)
    trainer.model.register_forward_hook(_nan_at(set(range(3, 100))))
    try:
        with pytest.raises(NonFiniteLossError, match=r"non-finite for 3 steps in a row \(steps 3-5\)"):
            trainer.fit()
    finally:
        trainer.close()
    # read after steps 1 (its log line), 4 and 7 (max_bad_steps records each): step 5's outcome is seen at step 7
    assert trainer.step == 7


def test_fp16_scaler_skips_non_finite_step(tmp_path, data_cache):
    trainer, _ = _fit(_cfg(tmp_path, data_cache, "trainer.precision=fp16", "trainer.eval_interval=0"), _nan_at({2}))
    scale = _records(tmp_path, key="loss_scale")
    scale[0] = 65536.0  # GradScaler's initial scale
    backed_off = {s for s in range(1, 7) if scale[s] < scale[s - 1]}  # the scaler skipped these steps
    assert 2 in backed_off  # the NaN step (others: routine fp16 gradient overflows)
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {6 - len(backed_off)}
    assert math.isfinite(_records(tmp_path)[6])


def test_bf16_autocast_trains(tmp_path, data_cache):
    train(_cfg(tmp_path, data_cache, "trainer.precision=bf16", "trainer.eval_interval=0"))
    losses = _records(tmp_path)
    assert all(math.isfinite(v) for v in losses.values()) and losses[6] < losses[1]


@pytest.mark.slow  # two whole runs; the fast suite covers the kernels in bf16 through test_models_gpt's autocast test
def test_bf16_triton_kernels_train_like_torch_kernels(tmp_path, data_cache):
    """train.py's bf16 run on the CPU through the interpreter's kernels: its losses were stuck at 5.594 while
    the PyTorch variant's fell (the interpreter's bf16 ``tl.dot`` gave attention garbage). The logged losses
    are rounded to bf16, 2**-5 apart at this size: the two variants may land one step apart."""
    runs = {}
    for kernels in ("torch", "triton"):
        train(_cfg(tmp_path / kernels, data_cache, f"model.kernels={kernels}", "trainer.precision=bf16",
                   "trainer.max_steps=3", "trainer.eval_interval=0"))
        runs[kernels] = _records(tmp_path / kernels)
    assert runs["triton"] == pytest.approx(runs["torch"], abs=2 ** -5)
    assert runs["triton"][3] < runs["triton"][1]


def test_compiled_model_trains_like_eager(tmp_path, data_cache):
    runs = {}
    for mode in ("false", "true"):
        train(_cfg(tmp_path / mode, data_cache, f"trainer.compile={mode}", "trainer.compile_backend=aot_eager",
                   "trainer.max_steps=3", "trainer.eval_interval=0"))
        runs[mode] = _records(tmp_path / mode)
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-6)


def test_compile_failure_is_loud_and_names_the_setting(tmp_path, data_cache, monkeypatch):
    """fullgraph=True: a graph break in the model stops the run at its first step with a message naming
    trainer.compile and what to run instead; nothing falls back to eager pieces silently."""
    import models.gpt

    forward = models.gpt.GPT.forward

    def forward_with_a_graph_break(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(models.gpt.GPT, "forward", forward_with_a_graph_break)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=r"torch.compile of model .* failed \(trainer.compile=true, compile_mode "
                                           r"default, fullgraph\).*\n.*trainer.compile=false"):
        train(_cfg(tmp_path, data_cache, "trainer.compile=true", "trainer.compile_backend=aot_eager",
                   "trainer.max_steps=2", "trainer.eval_interval=0"))


def test_activation_checkpointing_trains_like_without(tmp_path, data_cache):
    runs = {}
    for mode in ("false", "true"):
        train(_cfg(tmp_path / mode, data_cache, f"trainer.activation_checkpointing={mode}", "trainer.max_steps=3",
                   "trainer.eval_interval=0"))
        runs[mode] = _records(tmp_path / mode)
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_step_trains_like_eager(tmp_path, data_cache):
    # fp32, two micro-batches per step: the replayed graph must give the eager step's losses
    runs = {}
    for mode in ("false", "true"):
        train(_cfg(tmp_path / mode, data_cache, "model.kernels=triton", "trainer.device=cuda", "trainer.precision=fp32",
                   f"trainer.cuda_graph={mode}", "trainer.grad_accum=2", "trainer.eval_interval=0"))
        runs[mode] = _records(tmp_path / mode)
    assert len(runs["true"]) == 6 and runs["true"] == pytest.approx(runs["false"], rel=1e-6)


def test_resume_refuses_other_model_config(tmp_path, data_cache):
    train(_cfg(tmp_path / "a", data_cache, "trainer.max_steps=3"))
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000003.safetensors"
    with pytest.raises(checkpoint.CheckpointError, match=r"mismatching keys: n_layer: checkpoint 1 vs current 2$"):
        Trainer(_cfg(tmp_path / "b", data_cache, "model.n_layer=2", f"resume={ckpt}"))
    # the kernels backend may change: same weights
    Trainer(_cfg(tmp_path / "c", data_cache, "model.kernels=triton", f"resume={ckpt}")).close()


@pytest.mark.parametrize("override, message", [
    ("trainer.batch_size=7", "batch_size=7 must be divisible by world_size \\* grad_accum = 1 \\* 2"),
    ("trainer.precision=fp8", "trainer.precision='fp8' is not one of: auto, fp32, bf16, fp16"),
    ("model.kernels=cuda", "model.kernels='cuda' is not one of: triton, torch"),
    ("data.seq_len=64", "data.seq_len=64 exceeds the model's block_size=32"),
    ("trainer.cuda_graph=true", "trainer.cuda_graph=true: it needs a CUDA device"),
    ("trainer.cpu_threads=0", "trainer.cpu_threads must be >= 1, got 0"),
    ("trainer.compile_mode=fast", "trainer.compile_mode='fast' is not one of: default, reduce-overhead, "
                                  "max-autotune-no-cudagraphs, max-autotune"),
])
def test_bad_settings_fail_at_start(tmp_path, data_cache, override, message):
    with pytest.raises(ValueError, match=message):
        Trainer(_cfg(tmp_path, data_cache, "trainer.grad_accum=2", override))


def test_cpu_threads_sets_torch_threads(tmp_path, data_cache, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    Trainer(_cfg(tmp_path / "default", data_cache)).close()
    Trainer(_cfg(tmp_path / "three", data_cache, "trainer.cpu_threads=3")).close()
    assert calls == [3]
    Trainer(_cfg(tmp_path / "interpreted", data_cache, "model.kernels=triton")).close()
    assert calls == [3, 1]  # null with the interpreter: one thread


def test_fused_loss_is_for_language_models(tmp_path, data_cache):
    with pytest.raises(ValueError, match="loss=fused is for language models"):
        Trainer(_cfg(tmp_path, data_cache, "loss=fused", experiment="smoke-vit"))


def test_schedule_and_weight_decay_groups():
    cfg = compose(["optim.warmup_steps=10", "optim.lr=1.0", "optim.min_lr_ratio=0.1"]).optim
    assert lr_at(0, cfg, 110) == pytest.approx(0.1) and lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55) and lr_at(110, cfg, 110) == pytest.approx(0.1)
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.append(torch.nn.Linear(4, 5, bias=False))
    model[3].weight = model[0].weight  # tied: counted once
    decay, no_decay = param_groups(model, 0.1)
    assert [tuple(p.shape) for p in decay["params"]] == [(5, 4), (4, 4)] and decay["weight_decay"] == 0.1
    assert [tuple(p.shape) for p in no_decay["params"]] == [(4,), (4,), (4,)] and no_decay["weight_decay"] == 0.0


def test_wandb_goes_online_only_when_logged_in(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.com login a password b\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert not wandb_logged_in()
    netrc.write_text("machine api.wandb.ai login user password key\n")
    assert wandb_logged_in()
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    assert not wandb_logged_in()
    monkeypatch.setenv("WANDB_API_KEY", "key")
    assert wandb_logged_in()


def test_wandb_scalars_are_named_by_section():
    assert wandb_scalars("train", {"loss": 1.5, "lr": 0.1, "throughput": 9, "flag": True, "note": "x"}) == {
        "train/loss": 1.5, "train/lr": 0.1, "train/throughput": 9}
    assert wandb_scalars("eval", {"val/loss": 2.0, "val/accuracy": 0.5}) == {"val/loss": 2.0, "val/accuracy": 0.5}


def test_progress_bar_starts_after_the_evaluation_at_start(tmp_path, data_cache, monkeypatch):
    """The bar's time estimate, like the CPU warning's, comes from training steps, not the evaluation before
    them (on gpt2-small on a CPU the two read 7 h and 3.2 h)."""
    import training.trainer as trainer_module

    order = []
    progress, evaluate = trainer_module._progress, Trainer.evaluate
    monkeypatch.setattr(trainer_module, "_progress", lambda *a: order.append("bar") or progress(*a))
    monkeypatch.setattr(Trainer, "evaluate", lambda self, *a: order.append("eval") or evaluate(self, *a))
    train(_cfg(tmp_path, data_cache, "trainer.eval_at_start=true", "trainer.max_steps=1"))
    assert order[:2] == ["eval", "bar"]


def _streamed_folder(root):
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(0)
    for i in range(24):
        d = root / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(g.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return ["data=image_folder", f"data.root={root}", "data.stream=true", "data.image_size=8",
            "data.val_fraction=0.25", "data.test_fraction=0"]


@pytest.mark.parametrize("workers", [0, 2])
def test_vit_trains_on_a_streamed_image_folder(tmp_path, data_cache, workers):
    run = tmp_path / "run"
    summary = train(_cfg(run, data_cache, *_streamed_folder(tmp_path / "imgs"), f"data.num_workers={workers}",
                         experiment="smoke-vit"))
    losses = _records(run)
    assert summary["steps"] == len(losses) == 6 and all(math.isfinite(v) for v in losses.values())


def test_streamed_image_folder_resumes_exactly(tmp_path, data_cache):
    data = _streamed_folder(tmp_path / "imgs")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(_cfg(full, data_cache, *data, "data.num_workers=2", "trainer.keep_last=5", experiment="smoke-vit"))
    ckpt = full / "checkpoints" / "step_00000003.safetensors"
    # another worker count: it leaves the batches unchanged, so the resume is still exact and allowed
    train(_cfg(resumed, data_cache, *data, "data.num_workers=0", f"resume={ckpt}", experiment="smoke-vit"))
    assert len(_records(full)) == 6 and _records(full) == _records(resumed)


def test_vit_trains_with_mixup_and_cutmix_and_resumes_exactly(tmp_path, data_cache):
    mix = ["data.mixup_alpha=0.4", "data.cutmix_alpha=1.0", "trainer.keep_last=5", "model.kernels=triton"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    summary = train(_cfg(full, data_cache, *mix, experiment="smoke-vit"))
    losses = _records(full)
    assert summary["steps"] == len(losses) == 6 and all(math.isfinite(v) for v in losses.values())
    ckpt = full / "checkpoints" / "step_00000003.safetensors"
    train(_cfg(resumed, data_cache, *mix, f"resume={ckpt}", experiment="smoke-vit"))
    assert _records(full) == _records(resumed)
