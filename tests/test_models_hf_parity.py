"""Our GPT-2 and llama-style decoders (Triton kernels, fp32) against randomly initialized Hugging Face
GPT2LMHeadModel / LlamaForCausalLM run in float64: logits, the shifted-LM loss and every gradient."""
import pytest
import torch

from models import GPT, create_model
from triformer.testing import assert_close, kernel_device

transformers = pytest.importorskip("transformers")

DEV = kernel_device()
V = 101


def randomized(model):
    """Random norm weights and biases too (init leaves them 1 and 0), so every mapped tensor matters."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model.eval()


def hf_gpt2(**kw):
    torch.manual_seed(2)
    return randomized(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=3, n_embd=48, n_positions=40, vocab_size=V, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **kw)))


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}


def hf_llama(tied=True, rope=None):
    torch.manual_seed(2)
    return randomized(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=48, intermediate_size=80,
        max_position_embeddings=40, vocab_size=V, tie_word_embeddings=tied, rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 500.0, **(rope or {"rope_type": "default"})},
        bos_token_id=0, eos_token_id=0, pad_token_id=0)))


@pytest.mark.parametrize("family,loss", [("gpt2", "ce"), ("gpt2", "fused"), ("llama", "ce"), ("llama-untied-llama3", "ce"),
                                         ("llama-untied-llama3", "fused"), ("llama-linear", "ce")])
def test_matches_huggingface(family, loss):
    if family == "gpt2":
        hf = hf_gpt2()
    elif family == "llama":
        hf = hf_llama()
    elif family == "llama-linear":
        hf = hf_llama(rope={"rope_type": "linear", "factor": 4.0})
    else:  # what Llama 3.x checkpoints have: an LM head of its own and llama3 RoPE scaling (and GQA, as all here)
        hf = hf_llama(tied=False, rope=LLAMA3)
    ours = GPT.from_huggingface(hf, kernels="triton", loss=loss).to(DEV)
    assert ours.config.padded_vocab_size == 128 and ours.config.block_size == 40
    if family.startswith("llama"):
        assert (ours.config.n_kv_head, ours.config.mlp_hidden, ours.config.rope_base) == (2, 80, 500.0)
        assert ours.config.tie_embeddings == (family != "llama-untied-llama3")
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, V, (2, 19), generator=g)
    # HF shifts the labels inside; we pass next-token targets with the last position ignored
    targets = torch.cat([idx[:, 1:], torch.full((2, 1), -100)], dim=1)
    hf = hf.double()
    ref = hf(input_ids=idx, labels=idx)
    ref.loss.backward()

    logits, loss_val = ours(idx.to(DEV), targets.to(DEV), return_logits=True)
    assert_close("logits", logits, ref.logits)
    assert_close("loss", loss_val, ref.loss)
    loss_val.backward()
    expected = ours.convert_hf_state_dict({n: p.grad for n, p in hf.named_parameters()})
    for name, p in ours.named_parameters():
        assert_close(f"grad {name}", p.grad, expected[name])


def test_gpt2_roundtrip_through_save_pretrained(tmp_path):
    hf = hf_gpt2(activation_function="gelu_pytorch_tanh", layer_norm_epsilon=1e-6)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_huggingface(tmp_path, kernels="torch")
    assert ours.config.norm_eps == 1e-6 and ours.config.activation == "gelu_tanh"
    back = ours.to_huggingface().state_dict()
    for name, t in hf.state_dict().items():
        assert torch.equal(back[name], t), name
    idx = torch.randint(0, V, (1, 11))
    with torch.no_grad():
        assert_close("logits", ours(idx)[0], hf.double()(input_ids=idx).logits)


def test_unsupported_huggingface_configs():
    with pytest.raises(ValueError, match="activation_function='relu'"):
        GPT.from_huggingface(hf_gpt2(activation_function="relu"))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        GPT.from_huggingface(hf_gpt2(scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(ValueError, match="rope scaling"):
        GPT.from_huggingface(hf_llama(rope={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="only GPT-2-style"):
        create_model("gpt2-nano", kernels="torch", norm="rmsnorm").to_huggingface()


@pytest.mark.parametrize("tied", [False, True])
def test_llama_sharded_save_pretrained_roundtrip(tmp_path, tied):
    """A sharded safetensors directory (what real Llama checkpoints are) loads without building the HF model,
    computes HF's logits, and exports back to the same tensors and config."""
    hf = hf_llama(tied=tied, rope=LLAMA3)
    hf.save_pretrained(tmp_path / "in", max_shard_size="40KB")
    assert (tmp_path / "in" / "model.safetensors.index.json").exists()
    ours = GPT.from_huggingface(tmp_path / "in", kernels="torch")
    assert ours.config.rope_scaling["rope_type"] == "llama3" and ours.config.tie_embeddings == tied
    idx = torch.randint(0, V, (1, 23))
    with torch.no_grad():
        assert_close("logits", ours(idx)[0], hf.double()(input_ids=idx).logits)
    back = ours.to_huggingface()
    back.save_pretrained(tmp_path / "out")
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert again.config.rope_parameters["rope_type"] == "llama3"
    assert again.config.tie_word_embeddings == tied
    for name, t in hf.state_dict().items():
        assert torch.equal(again.state_dict()[name], t.float()), name


def _edit_config(directory, **changes):
    import json
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("family, changes, match", [
    # a vocabulary the embedding does not have: neither zero-padded nor truncated
    ("gpt2", {"vocab_size": 300}, "says vocab_size=300 but wte.weight has 101 rows"),
    ("gpt2", {"vocab_size": 60}, "says vocab_size=60 but wte.weight has 101 rows"),
    # one layer fewer than the weights hold: the second layer is not dropped
    ("gpt2", {"n_layer": 1}, r"tensor\(s\) its config has no place for \(h\.1\."),
    ("gpt2", {"n_layer": 3}, "no tensor 'h.2.ln_1.weight'"),
    ("gpt2", {"n_positions": 50}, "do not fit the architecture of its config"),
    ("llama", {"num_hidden_layers": 1}, r"no place for \(layers\.1\."),
    ("llama", {"vocab_size": 128}, "says vocab_size=128 but embed_tokens.weight has 101 rows"),
    ("llama", {"intermediate_size": 64}, "do not fit the architecture of its config"),
])
def test_a_config_that_disagrees_with_its_weights_is_refused(tmp_path, family, changes, match):
    (hf_gpt2() if family == "gpt2" else hf_llama(tied=False)).save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        GPT.from_huggingface(tmp_path, kernels="torch")


def test_a_tied_config_with_a_separate_lm_head_is_refused(tmp_path):
    hf_llama(tied=False).save_pretrained(tmp_path)
    _edit_config(tmp_path, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="ties the LM head to the token embedding but lm_head.weight holds other"):
        GPT.from_huggingface(tmp_path, kernels="torch")


@pytest.mark.parametrize("shard", ["../elsewhere.safetensors", "/abs/elsewhere.safetensors", "sub/../../x.safetensors",
                                   "link.safetensors"])
def test_an_index_naming_shards_outside_the_directory_is_refused(tmp_path, shard):
    import json
    model_dir = tmp_path / "model"
    hf_llama().save_pretrained(model_dir, max_shard_size="20KB")
    (tmp_path / "elsewhere.safetensors").write_bytes(b"someone else's file")
    (model_dir / "link.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"names the shard '{shard}', which is not a file in"):
        GPT.from_huggingface(model_dir, kernels="torch")
