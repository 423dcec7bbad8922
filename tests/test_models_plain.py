"""models.plain: the plain PyTorch peers (the memory report's baseline and benchmarks/train_step.py's) have
triformer's sizes, the usual layouts and a correct loss, on the CPU."""
import math

import pytest
import torch
import torch.nn.functional as F

import models
from models.plain import PlainGPT, PlainViT, plain_model_like


def _block_params(model):
    return sum(p.numel() for b in model.blocks for p in b.parameters())


@pytest.mark.parametrize("name, overrides", [
    ("gpt2-nano", dict(vocab_size=97, n_layer=2)),
    ("llama-nano", dict(vocab_size=97, n_layer=2)),   # RMSNorm, SwiGLU, RoPE, grouped-query attention
    ("vit-digits", dict(n_layer=2)),
])
def test_plain_model_like_has_the_same_size(name, overrides):
    model = models.create_model(name, kernels="torch", dropout=0.1, **overrides)
    plain = plain_model_like(model)
    assert len(plain.blocks) == 2 and _block_params(plain) == _block_params(model)
    g = torch.Generator().manual_seed(0)
    if model.task == "lm":
        x, y = torch.randint(0, 97, (3, 17), generator=g), torch.randint(0, 97, (3, 17), generator=g)
        y[0, :5] = -100
        logits, loss = plain(x, y)
        assert logits.shape == (3, 17, 97)
        mask = y != -100
        expected = F.cross_entropy(logits[mask].double(), y[mask])
    else:
        x, y = torch.randn(3, 1, 8, 8, generator=g), torch.randint(0, 10, (3,), generator=g)
        logits, loss = plain(x, y)
        assert logits.shape == (3, 10)
        expected = F.cross_entropy(logits.double(), y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(loss.item() - math.log(logits.shape[-1])) < 1.0  # a fresh model guesses about uniformly
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in plain.parameters())
    assert plain(x)[1] is None


def test_plain_defaults_are_gpt2_small_and_vit_base():
    with torch.device("meta"):
        gpt, vit = PlainGPT(), PlainViT()
    assert sum(p.numel() for p in gpt.parameters()) == 124_475_904  # nanoGPT's count at vocab 50304
    assert gpt.head.weight is gpt.wte.weight
    assert len(vit.blocks) == 12 and vit.head.out_features == 1000


def test_plain_model_like_refuses_other_models():
    with pytest.raises(TypeError, match="models.GPT or models.ViT"):
        plain_model_like(torch.nn.Linear(2, 2))


def test_memory_chart_is_drawn_from_the_committed_results(tmp_path):
    from benchmarks.plot_memory import DEFAULT, load_rows, plot

    rows = load_rows(DEFAULT)
    assert {r["variant"] for r in rows} >= {"plain PyTorch GPT-2", "triformer (ce)"}
    assert not any("torch kernels" in r["variant"] for r in rows)  # the references' twin is not a peer
    png = plot(rows, tmp_path / "m.png", "t")
    assert png.read_bytes()[:4] == b"\x89PNG"
