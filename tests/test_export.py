"""What a finished run keeps and exports: best.safetensors holds the weights only (resume reads step files), is
never worse than the starting weights, and exports to a weights-only file and to a Hugging Face directory that
transformers loads with the same logits."""
import pytest
import torch

from training import checkpoint
from training.config import compose
from training.evaluate import load_model, resolve_checkpoint
from training.export import export_huggingface, export_weights, main
from training.trainer import train


def _run(tmp_path, name, *overrides):
    return train(compose(["experiment=smoke", "model.kernels=torch", "trainer.max_steps=3", "trainer.eval_batches=1",
                          f"run_dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}", "data.num_proc=1",
                          *overrides]))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    _run(tmp, "run")
    return tmp / "run"


def test_best_holds_weights_only_and_exports(run_dir, tmp_path, capsys):
    step = run_dir / "checkpoints" / "step_00000003.safetensors"
    best = checkpoint.load_checkpoint(run_dir / "checkpoints" / "best.safetensors")
    assert set(best) <= set(checkpoint.WEIGHTS_KEYS) and "optimizer" not in best and "rng" not in best
    assert (run_dir / "checkpoints" / "best.safetensors").stat().st_size < step.stat().st_size / 2
    full = checkpoint.load_checkpoint(step)
    assert {"optimizer", "rng", "data"} <= set(full)  # the step file still resumes exactly
    main([str(step), str(tmp_path / "w.safetensors")])
    assert "weights only" in capsys.readouterr().out
    exported = checkpoint.load_checkpoint(tmp_path / "w.safetensors")
    assert set(exported) == set(best)
    assert all(torch.equal(exported["model"][k], full["model"][k]) for k in full["model"])
    assert export_weights(run_dir, tmp_path / "b.safetensors").is_file()  # a run directory: its best


def test_huggingface_export_loads_with_the_same_logits(run_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = export_huggingface(run_dir, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    model, _ = load_model(resolve_checkpoint(run_dir), kernels="torch")
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    ours, _ = model(x)
    torch.testing.assert_close(hf(x).logits, ours[..., :model.config.vocab_size], rtol=1e-5, atol=1e-5)
    with pytest.raises(FileExistsError):
        export_huggingface(run_dir, out)


def test_best_is_never_worse_than_the_start(tmp_path, capsys):
    summary = _run(tmp_path, "diverged", "trainer.eval_at_start=true", "optim.lr=30", "optim.warmup_steps=0")
    assert summary["final_val/loss"] > summary["initial_val/loss"]
    assert not (tmp_path / "diverged" / "checkpoints" / "best.safetensors").exists()
    assert "no evaluation beat the starting weights" in capsys.readouterr().err
