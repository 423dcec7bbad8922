"""The activation-memory report: exact accounting of what autograd saves, a positive saving for triformer's
kernels on a tiny model against the plain PyTorch model of its size (models.plain), and the trainer's report line
(which must not disturb the run's random streams)."""
import json

import pytest
import torch
from torch import nn

import models
from models.plain import PlainGPT, PlainViT, plain_model_like
from training import memory
from training.config import compose
from training.trainer import train


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x, y):
        a = torch.tanh(x @ self.w)  # matmul saves x and w (a parameter: not an activation); tanh saves a
        v = a[:, :4]                # a view: mul saves it twice, but it is a's storage, counted once
        return None, ((v * v).sum() - y.sum())


def test_counts_unique_activation_storages():
    model, x, y = _Toy(), torch.randn(5, 8), torch.randn(3)
    sentinel = torch.full((8, 8), 7.0)
    model.w.grad = sentinel
    result = memory.measure_step(model, x, y)
    assert result.saved_bytes == x.nbytes + 5 * 8 * 4  # x + tanh's output; w and the views not counted
    assert result.cuda_peak_bytes is None
    assert model.w.grad is sentinel and torch.equal(sentinel, torch.full((8, 8), 7.0))  # caller's grads untouched


def test_message_reports_savings_and_losses():
    saves = memory.MemoryReport(memory.StepMemory(1 << 30, None), memory.StepMemory(3 << 30, None), "m, batch 4, fp32")
    assert saves.message() == ("triformer saves 2.0 GiB (67%) of activation memory vs plain PyTorch "
                               "(m, batch 4, fp32: 3.0 GiB -> 1.0 GiB)")
    uses = memory.MemoryReport(memory.StepMemory(3 << 20, None), memory.StepMemory(2 << 20, None), "m")
    assert uses.message().startswith("triformer uses 1.0 MiB (50%) more activation memory vs plain PyTorch")
    assert saves.metrics()["memory/activations_saved_fraction"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("name, overrides, make_batch", [
    ("gpt2-nano", dict(n_layer=1, n_head=2, n_embd=32, block_size=48, vocab_size=97),
     lambda g: (torch.randint(0, 97, (3, 48), generator=g), torch.randint(0, 97, (3, 48), generator=g))),
    ("vit-digits", dict(n_layer=1, n_head=2, n_embd=16),
     lambda g: (torch.randn(5, 1, 8, 8, generator=g), torch.randint(0, 10, (5,), generator=g))),
])
def test_triformer_saves_activation_memory_on_a_tiny_model(name, overrides, make_batch):
    triton_model = models.create_model(name, kernels="triton", dropout=0.1, **overrides)
    plain = plain_model_like(triton_model)
    assert isinstance(plain, PlainGPT if name.startswith("gpt") else PlainViT)  # not triformer's kernels=torch twin
    x, y = make_batch(torch.Generator().manual_seed(0))
    report = memory.compare(triton_model, plain, x, y, name)
    assert report.triformer.saved_bytes > 0
    assert report.saved_bytes > 0, report.message()
    assert report.message().startswith("triformer saves ")


def test_trainer_prints_report_without_changing_the_run(tmp_path, capsys):
    def run(where, report):
        return train(compose(["experiment=smoke", "model.kernels=torch", "model.dropout=0.1", "trainer.max_steps=3",
                              f"memory_report={report}", f"run_dir={tmp_path / where}", f"data.cache_dir={tmp_path}/c",
                              "data.num_proc=1"]))

    summary = run("with", "true")
    line = next(l for l in capsys.readouterr().err.splitlines() if "activation memory vs plain PyTorch" in l)
    assert line.startswith("triformer ") and "gpt2-nano, kernels=torch, micro-batch 8x32, fp32" in line
    assert summary["memory_savings"] == line
    written = json.loads((tmp_path / "with" / "summary.json").read_text())
    assert written["memory/activations_plain_bytes"] > 0 and written["memory_savings"] == line
    run("without", "false")
    losses = [[json.loads(r)["loss"] for r in (tmp_path / w / "metrics.jsonl").read_text().splitlines()
               if json.loads(r)["kind"] == "train"] for w in ("with", "without")]
    assert losses[0] == losses[1]  # the report's extra model and dropout masks drew from a forked RNG


def test_a_model_without_a_plain_twin_trains_and_the_report_says_it_skipped(tmp_path, capsys, monkeypatch):
    import models.plain

    assert models.plain.has_plain_twin(models.create_model("gpt2-nano", kernels="torch"))
    assert not models.plain.has_plain_twin(_Toy())
    monkeypatch.setattr(models.plain, "has_plain_twin", lambda model: False)  # as for a newly registered class
    summary = train(compose(["experiment=smoke", "model.kernels=torch", "trainer.max_steps=1", "memory_report=true",
                             f"run_dir={tmp_path}", f"data.cache_dir={tmp_path}/c", "data.num_proc=1"]))
    assert "memory_report: skipped, models/plain.py has no plain PyTorch twin of GPT" in capsys.readouterr().err
    assert summary["steps"] == 1 and "memory_savings" not in summary


def test_cuda_peak_is_kept_across_log_intervals_when_steps_replay_cuda_graphs(monkeypatch):
    """A replayed CUDA graph allocates nothing, so resetting the peak each interval would report only what lives
    outside the graphs: runs that replay graphs keep the run's peak."""
    resets = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 11 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    cuda = torch.device("cuda")
    assert memory.current_bytes(cuda, since_last=False) == 11 * 2**30 and resets == []
    assert memory.current_bytes(cuda) == 11 * 2**30 and resets == [cuda]


def test_line_says_where_savings_come_from():
    none = memory.savings_sources(0.0, "ce", False, (512, 257))
    assert none.startswith("This run has none of what saves memory: ")
    assert "model.dropout > 0" in none and "[512, 257] fp32 logits, 514.0 KiB" in none
    assert "trainer.activation_checkpointing=true" in none
    some = memory.savings_sources(0.1, "fused", False, (512, 257))
    assert some.startswith("Savings from: dropout masks never stored (model.dropout=0.1); the fused loss")
    assert "Not on in this run: activation checkpointing" in some
    report = memory.MemoryReport(memory.StepMemory(3, None), memory.StepMemory(2, None), "m", sources=none)
    assert report.message().endswith(". " + none)
    assert "logits" not in memory.savings_sources(0.1, None, True, None)  # an image model has no fused loss
    gelu = memory.savings_sources(0.0, "ce", False, (512, 257), gelu_mlp=True)
    assert gelu.startswith("Savings from: GELU outputs recomputed in backward")
