"""``train.py init_from=...``: fine-tuning starts from a local Hugging Face directory (saved here from random
weights, offline) or a triformer checkpoint, with the run's own optimizer, step and data position."""
import pytest
import torch

from models import GPT
from training import checkpoint, init_from
from training.config import compose
from training.trainer import Trainer

transformers = pytest.importorskip("transformers")
BYTES_VOCAB = 257  # the smoke run's byte-level tokenizer


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def _cfg(run_dir, data_cache, *overrides):
    return compose(["experiment=smoke", "model.kernels=torch", f"run_dir={run_dir}", f"data.cache_dir={data_cache}",
                    "data.num_proc=1", "trainer.max_steps=2", "trainer.eval_interval=2", "trainer.ckpt_interval=2",
                    *overrides])


def _fit(cfg):
    trainer = Trainer(cfg)
    try:
        return trainer, trainer.fit()
    finally:
        trainer.close()


def hf_gpt2(vocab=BYTES_VOCAB):
    torch.manual_seed(5)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=vocab, bos_token_id=0, eos_token_id=0))


def hf_llama():
    torch.manual_seed(6)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=48,
        max_position_embeddings=64, vocab_size=BYTES_VOCAB, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _same_weights(model, hf):
    expected = model.convert_hf_state_dict(hf.state_dict())
    for name, t in model.state_dict().items():
        if name in expected:
            assert torch.equal(t.cpu(), expected[name].to(t.dtype)), name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_init_from_huggingface_directory(tmp_path, data_cache, family):
    hf = hf_gpt2() if family == "gpt2" else hf_llama()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB" if family == "llama" else "5GB")
    trainer = Trainer(_cfg(tmp_path / "run", data_cache, f"init_from={tmp_path / 'hf'}", "model.dropout=0.1"))
    try:
        assert trainer.model.config.dropout == 0.1 and trainer.model.config.n_embd == 32
        _same_weights(trainer.model, hf)
        summary = trainer.fit()
    finally:
        trainer.close()
    assert summary["final_val/loss"] < 10
    # what it wrote is an ordinary triformer checkpoint that the next run can start from
    ckpt = checkpoint.resolve_resume(str(tmp_path / "run"), tmp_path)
    trainer2, _ = _fit(_cfg(tmp_path / "run2", data_cache, f"init_from={ckpt}"))
    state = checkpoint.load_checkpoint(ckpt)
    assert trainer2.step == 2  # its own two steps, not the first run's step count on top
    assert state["model_config"]["n_embd"] == 32


def test_init_from_triformer_checkpoint_weights_only(tmp_path, data_cache):
    first, _ = _fit(_cfg(tmp_path / "a", data_cache))
    ckpt = checkpoint.resolve_resume(str(tmp_path / "a"), tmp_path)
    saved = checkpoint.load_checkpoint(ckpt)["model"]
    trainer = Trainer(_cfg(tmp_path / "b", data_cache, f"init_from={ckpt}"))
    try:
        assert trainer.step == 0
        for name, t in trainer.model.state_dict().items():
            assert torch.equal(t, saved[name]), name
    finally:
        trainer.close()


def test_init_from_refuses_mismatches(tmp_path, data_cache):
    hf_gpt2(vocab=300).save_pretrained(tmp_path / "v300")
    with pytest.raises(ValueError, match="vocabulary has 300 tokens"):
        Trainer(_cfg(tmp_path / "r1", data_cache, f"init_from={tmp_path / 'v300'}"))
    hf_gpt2().save_pretrained(tmp_path / "ok")
    trainer = Trainer(_cfg(tmp_path / "r2", data_cache, f"init_from={tmp_path / 'ok'}", "model.n_embd=64"))
    try:
        assert trainer.model.config.n_embd == 32  # the checkpoint's architecture wins
    finally:
        trainer.close()
    with pytest.raises(ValueError, match="no such checkpoint file or run directory. init_from takes a local Hugging"):
        Trainer(_cfg(tmp_path / "r3", data_cache, f"init_from={tmp_path / 'nothing'}"))


def test_gpt2_directory_picks_gpt2_tokenizer(tmp_path, data_cache):
    """A real GPT-2 directory (50257 tokens) turns the default byte tokenizer into GPT-2's BPE."""
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32)
    (tmp_path / "gpt2").mkdir()
    config.save_pretrained(tmp_path / "gpt2")
    cfg = _cfg(tmp_path / "run", data_cache, f"init_from={tmp_path / 'gpt2'}")
    messages = []
    init_from.prepare_config(cfg, messages.append)
    assert cfg.data.tokenizer == "gpt2" and "gpt2" in messages[0]


def test_from_huggingface_reads_directory_without_transformers_model(tmp_path):
    hf = hf_llama()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    model = GPT.from_huggingface(tmp_path, kernels="torch", dtype=torch.bfloat16)
    assert model.wte.weight.dtype == torch.bfloat16 and model.lm_head is not None


def test_bf16_directory_trains_fp32_master_weights(tmp_path, data_cache):
    hf_llama().to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    trainer, _ = _fit(_cfg(tmp_path / "run", data_cache, f"init_from={tmp_path / 'hf'}", "trainer.precision=fp32"))
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    states = [s for s in trainer.optimizer.state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)


def test_init_from_a_run_directory_and_a_read_only_checkpoint(tmp_path, data_cache):
    """A triformer run directory has a config.json (the run's config) but is not a Hugging Face directory."""
    first, _ = _fit(_cfg(tmp_path / "a", data_cache))
    trainer = Trainer(_cfg(tmp_path / "b", data_cache, f"init_from={tmp_path / 'a'}"))
    trainer.close()
    assert trainer.model.config.n_embd == 32


def test_init_from_a_name_that_is_nothing_says_so_in_one_message(tmp_path, data_cache, monkeypatch):
    """Not a path, and a Hub name the Hub cannot give here: one message naming the setting (no resume, no chain)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError) as info:
        Trainer(_cfg(tmp_path / "r", data_cache, "init_from=gpt2"))
    message = str(info.value)
    assert message.startswith("init_from=gpt2: ") and "hf download gpt2" in message and "resume" not in message
    assert info.value.__cause__ is None and not info.value.__context__
def _llama_with_its_tokenizer(directory):
    """A tiny Llama directory with its own BPE tokenizer.json (trained here, offline) and eos token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def main():\n    return 0\n", "import os, sys\nclass A:\n    pass\n"] * 20, trainer)
    hf = hf_llama()
    hf.resize_token_embeddings(tok.get_vocab_size())
    hf.config.eos_token_id = tok.token_to_id("</s>")
    hf.save_pretrained(directory)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    return tok


def test_llama_directory_trains_with_its_own_tokenizer(tmp_path, data_cache):
    tok = _llama_with_its_tokenizer(tmp_path / "llama")
    cfg = _cfg(tmp_path / "run", data_cache, f"init_from={tmp_path / 'llama'}", "trainer.max_steps=1")
    trainer, summary = _fit(cfg)
    assert cfg.data.tokenizer == "hf" and trainer.data.vocab_size == tok.get_vocab_size()
    assert summary["steps"] == 1 and summary["final_val/loss"] > 0


def test_hub_name_from_the_local_cache_or_one_line_when_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    cfg = compose(["experiment=smoke", "init_from=someone/tiny-llama"])
    with pytest.raises(init_from.HubUnavailable, match=r"^init_from=someone/tiny-llama: .*Hub is not reachable.*"
                                                       r"hf download someone/tiny-llama"):
        init_from.resolve(cfg.init_from, cfg)
    # the layout huggingface_hub's cache has after a download: refs/main names the snapshot
    repo = tmp_path / "hub" / "models--someone--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abc")
    hf_llama().save_pretrained(repo / "snapshots" / "0123abc")
    kind, path = init_from.resolve(cfg.init_from, cfg)
    assert kind == "hf" and path == repo / "snapshots" / "0123abc"
