"""Evaluation: sliding-window perplexity against a direct per-token computation, bits per byte, sampling,
image accuracy / confusion matrix, and eval.py's config + checkpoint path. Offline (IP sockets refused)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from training import evaluate as ev
from training.data import build_data, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("no_network")  # real code paths, local data only


class TinyLM(nn.Module):
    """A causal one-head attention LM with learned positions: its predictions depend on the window start."""

    def __init__(self, vocab_size=257, block_size=24, dim=12, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = SimpleNamespace(block_size=block_size, vocab_size=vocab_size)
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(block_size, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        assert T <= self.config.block_size
        h = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        att = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool, device=idx.device), 1), float("-inf"))
        logits = self.head(h + att.softmax(-1) @ v)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eos_token_id=None, generator=None):
        for _ in range(max_new_tokens):
            logits = self(idx)[0][:, -1] / temperature
            if top_k is not None:
                logits[logits < logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]] = float("-inf")
            idx = torch.cat([idx, torch.multinomial(logits.softmax(-1), 1, generator=generator)], dim=1)
        return idx


@torch.no_grad()
def direct_nll(model, tokens, context, stride):
    """Each target scored alone: position p is scored by window k = max(0, ceil((p - context) / stride)) (the
    first whose inputs reach it), with that window's inputs before it as context."""
    total = 0.0
    for p in range(1, len(tokens)):
        begin = max(0, -(-(p - context) // stride)) * stride
        x = torch.tensor(tokens[begin:p])[None]
        logits, _ = model(x)
        total += float(F.cross_entropy(logits[0, -1:].double(), torch.tensor(tokens[p: p + 1])))
    return total


@pytest.mark.parametrize("n,context,stride,batch", [(53, 8, 3, 4), (41, 8, 8, 2), (30, 10, 1, 5), (9, 16, 4, 3),
                                                    (25, 24, 7, 1)])
def test_sliding_window_nll_equals_direct_computation(n, context, stride, batch):
    model = TinyLM().double().eval()
    g = np.random.default_rng(n)
    tokens = g.integers(0, 257, n)
    tokens[::7] = 256  # end-of-text here and there: it scores but has no bytes
    byte_lengths = load_tokenizer("bytes").token_byte_lengths()
    stats = ev.sliding_window_nll(model, tokens, context, stride, batch, byte_lengths)
    assert stats["tokens"] == n - 1
    assert stats["bytes"] == int(byte_lengths[tokens[1:]].sum())
    expected = direct_nll(model, tokens.tolist(), context, stride)
    assert abs(stats["nll_sum"] - expected) <= 1e-9 * abs(expected)
    m = ev.perplexity_metrics(stats)
    assert m["perplexity"] == pytest.approx(math.exp(expected / (n - 1)), rel=1e-9)
    assert m["bits_per_byte"] == pytest.approx(expected / math.log(2) / stats["bytes"], rel=1e-9)


@given(n=st.integers(2, 300), context=st.integers(1, 64), stride_frac=st.floats(0.0, 1.0))
def test_sliding_windows_score_every_token_once_with_enough_context(n, context, stride_frac):
    stride = max(1, round(stride_frac * context))
    scored = []
    for begin, end, first in ev.sliding_windows(n, context, stride):
        assert 0 <= begin < end <= n - 1 and end - begin <= context and 0 <= first < end - begin
        for j in range(first, end - begin):
            p = begin + 1 + j  # the target's position; its context is tokens[begin:p]
            assert p - begin >= min(p, context - stride + 1)
            scored.append(p)
    assert scored == list(range(1, n))


def test_sliding_window_rejects_bad_arguments():
    with pytest.raises(ValueError, match="stride"):
        ev.sliding_windows(100, 8, 9)
    with pytest.raises(ValueError, match="context"):
        ev.sliding_windows(100, 0, 1)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        ev.sliding_windows(1, 8, 4)

    class LastOnly(TinyLM):
        def forward(self, idx, targets=None):
            return super().forward(idx)[0][:, -1:], None

    with pytest.raises(ValueError, match="every position"):
        ev.sliding_window_nll(LastOnly(), np.arange(20), 8, 4)


def real_gpt(**overrides):
    import models

    try:
        return models.create_model("gpt2-nano", kernels="torch", **overrides)
    except ImportError as e:  # the model stack is not importable yet in this checkout
        pytest.skip(f"models.create_model unavailable: {e}")


def test_sliding_window_on_the_real_gpt():
    model = real_gpt(vocab_size=257, block_size=16).eval()
    tokens = np.random.default_rng(0).integers(0, 257, 40)
    stats = ev.sliding_window_nll(model, tokens, 16, 5, 3)
    assert stats["nll_sum"] == pytest.approx(direct_nll(model, tokens.tolist(), 16, 5), rel=1e-5)


# ------------------------------------------------------------------------------------------------- sampling

class CountingLM(nn.Module):
    """generate() appends last+1, last+2, ...: every step of sample()'s plumbing is visible in the text."""

    def __init__(self, block_size=12, step=1):
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size, vocab_size=257)
        self.step = step
        self.calls = []

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eos_token_id=None, generator=None):
        self.calls.append(dict(idx=idx.clone(), temperature=temperature, top_k=top_k, eos=eos_token_id))
        steps = torch.arange(1, max_new_tokens + 1) * self.step
        return torch.cat([idx, (idx[:, -1:] + steps).clamp(max=256)], dim=1)


def test_sample_encodes_crops_stops_at_end_of_text_and_decodes():
    tok = load_tokenizer("bytes")
    model = CountingLM()
    assert ev.sample(model, tok, "ab", num_samples=2, max_new_tokens=3, temperature=0.5, top_k=7) == ["cde"] * 2
    call = model.calls[-1]
    assert call["idx"].tolist() == [[97, 98]] * 2 and (call["temperature"], call["top_k"], call["eos"]) == (0.5, 7, 256)
    assert ev.sample(model, tok, "0123456789", max_new_tokens=4) == [":;<="]
    assert model.calls[-1]["idx"].tolist() == [list(b"23456789")]  # kept the last block - max_new tokens
    assert ev.sample(model, tok, "", max_new_tokens=2) == [""]  # starts from end-of-text, which ends it
    assert model.calls[-1]["idx"].tolist() == [[256]]
    leaping = CountingLM(step=40)  # 'a' = 97 -> 137, 177, 217, then 256 (end-of-text): cut there
    assert ev.sample(leaping, tok, "a", max_new_tokens=6) == [tok.decode([137, 177, 217])]
    with pytest.raises(ValueError, match="block_size"):
        ev.sample(model, tok, "a", max_new_tokens=12)


# --------------------------------------------------------------------------------------------------- images

class PixelLinear(nn.Module):
    def __init__(self, in_features=64, classes=10):
        super().__init__()
        torch.manual_seed(3)
        self.fc = nn.Linear(in_features, classes)

    def forward(self, images, targets=None):
        return self.fc(images.flatten(1)), None


def test_classify_and_confusion_png(tmp_path):
    data = build_data({"task": "image"}, seed=0)
    model = PixelLinear()
    with torch.no_grad():  # a crude but far-from-chance classifier: least squares on the train split
        x = torch.cat([b[0] for b in data.eval_batches("train", 512)]).flatten(1)
        y = F.one_hot(data.splits["train"][1], 10).float()
        # gelsd: the minimum-norm solution; blank border pixels make the system rank-deficient, where the default
        # driver's answer (and so the accuracy) depends on the LAPACK build
        sol = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], 1), y, driver="gelsd").solution
        model.fc.weight.copy_(sol[:-1].T)
        model.fc.bias.copy_(sol[-1])
    r = ev.classify(model, data, "test", batch_size=37)
    images, labels = data.splits["test"]
    confusion = np.zeros((10, 10), dtype=np.int64)
    nll = 0.0
    for xb, yb in data.eval_batches("test", 360):
        logits = model(xb)[0].detach()
        nll += float(F.cross_entropy(logits.double(), yb, reduction="sum"))
        for t, p in zip(yb.tolist(), logits.argmax(-1).tolist()):
            confusion[t, p] += 1
    np.testing.assert_array_equal(r["confusion"], confusion)
    assert r["examples"] == 360 and r["accuracy"] == pytest.approx(np.trace(confusion) / 360)
    assert r["loss"] == pytest.approx(nll / 360, rel=1e-5)
    assert 0.8 < r["accuracy"] < 1.0
    png = ev.plot_confusion(r["confusion"], data.class_names, tmp_path / "sub" / "cm.png", title="digits")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.size[0] > 200 and im.size[1] > 200


# ----------------------------------------------------------------------------------------- eval.py config

def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return hydra_compose("eval", overrides=overrides)


def save_tiny_checkpoint(path, model, name, model_config, data_cfg):
    from training.checkpoint import save_checkpoint

    return save_checkpoint(path, {"model": model.state_dict(), "model_name": name, "model_config": model_config,
                                  "config": {"data": data_cfg, "seed": 1}, "step": 7})


def test_run_lm_checkpoint_text_file_and_samples(tmp_path, monkeypatch, capsys):
    import models

    def create_model(name, kernels="triton", **cfg):
        assert name == "tiny" and kernels == "torch"
        return TinyLM(**cfg)

    monkeypatch.setattr(models, "create_model", create_model)
    trained = TinyLM(block_size=16, seed=4)
    data_cfg = dict(task="lm", source="stdlib", max_files=2, seq_len=16, cache_dir=str(tmp_path / "cache"))
    ckpt = save_tiny_checkpoint(tmp_path / "ck.safetensors", trained, "tiny",
                                dict(vocab_size=257, block_size=16, dim=12, kernels="triton"), data_cfg)
    text = "def f(x):\n    return x + 1  # ünïcode\n"
    (tmp_path / "t.py").write_text(text, encoding="utf-8")
    cfg = compose([f"checkpoint={ckpt}", f"output_dir={tmp_path / 'out'}", f"text_file={tmp_path / 't.py'}",
                   "context=16", "stride=6", "batch_size=3", "prompt=ab", "max_new_tokens=5", "device=cpu"])
    results = ev.run(cfg)
    tokens = [256] + list(text.encode())
    expected = direct_nll(trained.eval(), tokens, 16, 6)
    key = f"{tmp_path / 't.py'}"
    assert results[f"{key}/tokens"] == len(tokens) - 1 and results[f"{key}/bytes"] == len(text.encode())
    assert results[f"{key}/loss"] == pytest.approx(expected / (len(tokens) - 1), rel=1e-5)
    assert results[f"{key}/bits_per_byte"] == pytest.approx(expected / math.log(2) / len(text.encode()), rel=1e-5)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["step"] == 7 and saved[f"{key}/perplexity"] == pytest.approx(results[f"{key}/perplexity"])
    again = ev.sample(trained, load_tokenizer("bytes"), "ab", 1, 5, temperature=0.8, top_k=200, seed=1337)
    assert (tmp_path / "out" / "samples.txt").read_text() == "ab" + again[0]
    split = ev.run(compose([f"checkpoint={ckpt}", f"output_dir={tmp_path / 'out2'}", "split=val", "context=16",
                            "max_tokens=200", "device=cpu"]))
    val = build_data(data_cfg, seed=0).split_tokens("val")[:200]
    assert split["val/loss"] == pytest.approx(direct_nll(trained, val.astype(np.int64).tolist(), 16, 8) / 199, rel=1e-5)
    other = save_tiny_checkpoint(tmp_path / "v.safetensors", TinyLM(300, 16), "tiny",
                                 dict(vocab_size=300, block_size=16), data_cfg)
    with pytest.raises(ValueError, match="vocab_size=300"):
        ev.run(compose([f"checkpoint={other}", f"output_dir={tmp_path / 'o3'}", "device=cpu"]))


def test_run_image_checkpoint_with_data_override(tmp_path, monkeypatch):
    import models

    monkeypatch.setattr(models, "create_model", lambda name, kernels="triton", **cfg: PixelLinear(**cfg))
    ckpt = save_tiny_checkpoint(tmp_path / "img.safetensors", PixelLinear(), "pix", dict(in_features=64, classes=10),
                                {"task": "image", "name": "digits-old"})
    cfg = compose([f"checkpoint={ckpt}", f"output_dir={tmp_path / 'out'}", "data=digits", "batch_size=50",
                   "device=cpu"])
    assert cfg.data.name == "digits"
    results = ev.run(cfg)
    direct = ev.classify(PixelLinear(), build_data(dict(cfg.data), seed=0), "test", 64)
    assert results["test/accuracy"] == pytest.approx(direct["accuracy"]) and results["test/examples"] == 360
    assert Path(results["confusion_png"]).read_bytes()[:4] == b"\x89PNG"
    assert "data" not in compose([f"checkpoint={ckpt}"])  # no override: the checkpoint's data config is used
    # a checkpoint trained with RandAugment evaluates where no torchvision imports (evaluation never augments)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    augmented = save_tiny_checkpoint(tmp_path / "aug.safetensors", PixelLinear(), "pix",
                                     dict(in_features=64, classes=10),
                                     {"task": "image", "name": "digits", "source": "digits", "test_fraction": 0.2,
                                      "crop_padding": 1, "hflip": False, "randaugment_ops": 2})
    assert ev.run(compose([f"checkpoint={augmented}", f"output_dir={tmp_path / 'aug'}", "batch_size=50",
                           "device=cpu"]))["test/examples"] == 360


CLI_WITH_TINY_MODEL = """
import math, runpy, sys
from types import SimpleNamespace
import torch
import torch.nn.functional as F
from torch import nn
import models
{tiny_lm}
models.create_model = lambda name, kernels="triton", **cfg: TinyLM(**cfg)
sys.argv = ["eval.py"] + sys.argv[1:]
runpy.run_path("eval.py", run_name="__main__")
"""


def test_eval_cli_reads_a_checkpoint(tmp_path):
    """``python eval.py checkpoint=...`` end to end: Hydra config, checkpoint, tokenizer, perplexity, samples.
    With the real GPT when the model stack imports, else with TinyLM standing in for models.create_model."""
    import dataclasses

    import models

    try:
        model = models.create_model("gpt2-nano", kernels="torch", vocab_size=257, block_size=32)
        model_name, model_config = "gpt2-nano", dataclasses.asdict(model.config)
        command = [sys.executable, "eval.py"]
    except ImportError:
        model, model_name = TinyLM(block_size=32, seed=2), "tiny"
        model_config = dict(vocab_size=257, block_size=32, dim=12)
        import inspect

        command = [sys.executable, "-c", CLI_WITH_TINY_MODEL.format(tiny_lm=inspect.getsource(TinyLM))]
    data_cfg = dict(task="lm", source="stdlib", max_files=2, seq_len=32, cache_dir=str(tmp_path / "cache"))
    ckpt = save_tiny_checkpoint(tmp_path / "m.safetensors", model, model_name, model_config, data_cfg)
    (tmp_path / "t.txt").write_text("hello, world\n" * 5)
    out = tmp_path / "out"
    args = [f"checkpoint={ckpt}", f"text_file={tmp_path / 't.txt'}", "context=32", "stride=16", "device=cpu",
            "prompt=hi", "max_new_tokens=4", f"hydra.run.dir={out}"]
    proc = subprocess.run(command + args, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    expected = ev.sliding_window_nll(model.eval(), [256] + list(b"hello, world\n" * 5), 32, 16)
    assert metrics[f"{tmp_path / 't.txt'}/loss"] == pytest.approx(expected["nll_sum"] / expected["tokens"], rel=1e-5)
    assert metrics["step"] == 7 and (out / "samples.txt").read_text().startswith("hi")
