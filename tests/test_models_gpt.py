"""GPT-2 / llama-style models: registry, parameter counts, Triton vs PyTorch variants, generation, bad input."""
import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from models import GPT, GPTConfig, TrainableModel, create_model, list_models, model_config
from tests.helpers.gpt import V, batch, tiny
from tests.helpers.models import assert_grads_close, pair
from training.tasks import TASKS
from triformer.testing import assert_close, kernel_device

DEV = kernel_device()


# ---------------------------------------------------------------------------------------------------------
# registry and sizes

# published parameter counts (GPT-2 with its 50257-token vocab) plus the 47 padding rows of the 50304 vocab
PUBLISHED_GPT2 = {"gpt2-small": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
                  "gpt2-xl": 1_557_611_200}


def test_every_registered_model_builds_on_meta():
    names = list_models()
    assert {"gpt2-nano", "gpt2-micro", "llama-nano", "llama-micro", "llama-small", "vit-digits"} <= set(names)
    for name in names:
        with torch.device("meta"):
            model = create_model(name)
        assert model.config.kernels == "triton"
        assert isinstance(model, TrainableModel) and model.task in TASKS  # what the trainer relies on
        n = model.num_params(non_embedding=False)
        assert n == sum(p.numel() for p in model.parameters()) and 0 < model.num_params() <= n
        assert model.flops_per_example(None) > 6 * model.num_params()


@pytest.mark.parametrize("name", sorted(PUBLISHED_GPT2))
def test_gpt2_parameter_counts(name):
    with torch.device("meta"):
        model = create_model(name)
    cfg = model.config
    assert cfg.vocab_size == 50257 and cfg.padded_vocab_size == 50304 and cfg.block_size == 1024
    assert model.num_params(non_embedding=False) == PUBLISHED_GPT2[name] + 47 * cfg.n_embd
    assert model.num_params() == model.num_params(non_embedding=False) - 1024 * cfg.n_embd
    T = 1024
    assert model.flops_per_example(T) == 6 * model.num_params() * T + 12 * cfg.n_layer * cfg.n_embd * T * T


def test_gpt2_small_is_124m_and_llama_small_is_its_size():
    with torch.device("meta"):
        gpt2, llama = create_model("gpt2-small"), create_model("llama-small")
    assert gpt2.num_params(non_embedding=False) == 124_475_904
    # 12 x (attention 768 x (768 + 2 x 256) + 768^2, SwiGLU 3 x 768 x 2048, two RMSNorms)
    # + tied embedding 50304 x 768 + final norm
    assert llama.num_params(non_embedding=False) == 12 * (768 * 1280 + 768 ** 2 + 3 * 768 * 2048 + 2 * 768) \
        + 50304 * 768 + 768 == 114_150_144
    assert llama.num_params() == llama.num_params(non_embedding=False)  # no position embedding


def test_overrides_rederive_defaults_and_checkpoints_move_between_variants():
    m = create_model("llama-nano", kernels="torch", n_embd=48, n_head=4, vocab_size=V)
    assert m.config.mlp_hidden == 128 and m.config.n_kv_head == 2  # derived from the overridden n_embd
    t = create_model("llama-nano", kernels="triton", n_embd=48, n_head=4, vocab_size=V)
    assert list(t.state_dict()) == list(m.state_dict())
    t.load_state_dict(m.state_dict())


# ---------------------------------------------------------------------------------------------------------
# Triton variant vs the PyTorch variant in float64 (the interpreter is slow: one forward/backward per case)

@pytest.mark.parametrize("config", [
    # the registered CPU sizes (vocab and depth cut for the interpreter), and tiny ones for the fused loss
    model_config("gpt2-nano", n_layer=2, block_size=32, vocab_size=V, ce_chunks=2),
    model_config("llama-nano", n_layer=2, block_size=32, vocab_size=V),
    tiny("gpt2", loss="fused", n_layer=1),
    tiny("llama", loss="fused", n_layer=1)], ids=["gpt2-nano", "llama-nano", "gpt2-fused", "llama-fused"])
def test_triton_matches_torch_float64(config):
    ours, ref = pair(config)
    idx, targets = batch(3, 13)
    idx = torch.cat([idx, idx], dim=1)[:, ::2]  # a non-contiguous view of the token ids
    logits, loss_val = ours(idx, targets, return_logits=True)
    logits_ref, loss_ref = ref(idx, targets, return_logits=True)
    assert logits.shape == (3, 13, V)
    assert_close("logits", logits, logits_ref)
    assert_close("loss", loss_val, loss_ref)
    loss_val.backward()
    loss_ref.backward()
    assert_grads_close(ours, ref)
    assert ours.wte.weight.grad[V:].abs().max() == 0  # padded vocab rows: no signal


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("style,loss", [("gpt2", "ce"), ("llama", "fused")])
def test_autocast_matches_torch_variant(style, loss, dtype):
    """Under autocast the stream runs in fp16 or bf16 with fp32 parameters: mixed dtypes in every op. Judged
    against the PyTorch variant under the same autocast (``peer``), both against the float64 reference. On the
    CPU, bf16 is the case where the interpreter's bf16 ``tl.dot`` gave attention (and the loss) garbage."""
    config = tiny(style, loss=loss, n_layer=1)
    ours, ref = pair(config)
    peer = GPT(dataclasses.replace(config, kernels="torch")).to(DEV)
    peer.load_state_dict(ours.state_dict())
    idx, targets = batch(2, 11, seed=9)
    with torch.autocast(DEV.type, dtype=dtype):
        logits, loss_val = ours(idx, targets, return_logits=True)
        peer_logits, peer_loss = peer(idx, targets, return_logits=True)
    logits_ref, loss_ref = ref(idx, targets, return_logits=True)
    assert logits.dtype == dtype and loss_val.dtype == torch.float32
    assert_close("logits", logits, logits_ref, peer=peer_logits)
    assert_close("loss", loss_val.to(dtype), loss_ref, peer=peer_loss.to(dtype))
    for model, value in ((ours, loss_val), (peer, peer_loss), (ref, loss_ref)):
        value.backward()
    named_peer, named_ref = dict(peer.named_parameters()), dict(ref.named_parameters())
    for name, p in ours.named_parameters():  # fp32 gradients of low-precision activations: judged at its bar
        assert p.grad.dtype == torch.float32
        assert_close(f"grad {name}", p.grad.to(dtype), named_ref[name].grad, peer=named_peer[name].grad.to(dtype))


@given(style=st.sampled_from(["gpt2", "llama"]), B=st.integers(1, 3), T=st.integers(1, 32),
       loss=st.sampled_from(["ce", "fused"]), smoothing=st.sampled_from([0.0, 0.1]),
       scale=st.sampled_from([1.0, 30.0]), seed=st.integers(0, 2 ** 16))
def test_property_loss_matches_float64(style, B, T, loss, smoothing, scale, seed):
    """Any batch shape (incl. T=1 and T=block_size), both losses, label smoothing, and large weights
    (``scale`` multiplies the token embedding: peaked softmaxes in attention and the loss)."""
    ours, ref = pair(tiny(style, loss=loss, label_smoothing=smoothing, n_layer=1))
    with torch.no_grad():
        ours.wte.weight.mul_(scale)
        ref.wte.weight.mul_(scale)
    idx, targets = batch(B, T, seed=seed, ignore=B > 1)
    assert_close("loss", ours(idx, targets)[1], ref(idx, targets)[1])


def test_logits_without_targets_and_padded_vocab_rows_affect_nothing():
    # model-level logic, the same for both variants: checked on the fast PyTorch one
    model = GPT(tiny(kernels="torch")).to(DEV).eval()
    idx, targets = batch(2, 9, seed=3)
    logits, loss = model(idx, targets, return_logits=True)
    all_logits, none = model(idx)
    last, _ = model(idx, last_only=True)
    assert none is None and torch.equal(all_logits, logits)
    assert_close("last logits", last, logits[:, -1:].double())
    assert model(idx, targets)[0] is None  # with targets, logits only on request
    tokens = model.generate(idx[:, :4], 5, temperature=0)
    with torch.no_grad():
        model.wte.weight[V:] = 1e4  # would dominate every logit if the padded rows were read
    logits2, loss2 = model(idx, targets, return_logits=True)
    assert torch.equal(logits, logits2) and torch.equal(loss, loss2)
    assert torch.equal(tokens, model.generate(idx[:, :4], 5, temperature=0))


def test_dropout_applies_in_training_only():
    model = GPT(tiny(dropout=0.3, n_layer=1)).to(DEV)
    idx, targets = batch(2, 9, seed=4)
    model.eval()
    eval_logits, _ = model(idx)
    model.train()
    train_logits, _ = model(idx)
    assert torch.isfinite(train_logits).all() and not torch.allclose(train_logits, eval_logits)
    plain = GPT(tiny(n_layer=1)).to(DEV).eval()
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain(idx)[0], eval_logits)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(style):
    """Recomputed blocks replay the same dropout masks (checkpoint restores the RNG state), so a checkpointed
    step equals the plain one exactly."""
    from models.layers import set_activation_checkpointing

    config = tiny(style, dropout=0.2)
    torch.manual_seed(3)
    plain = GPT(config).to(DEV)
    checkpointed = GPT(config).to(DEV)
    checkpointed.load_state_dict(plain.state_dict())
    assert set_activation_checkpointing(checkpointed, True) == config.n_layer
    idx, targets = batch(2, 11, seed=5)
    losses = []
    for model in (plain, checkpointed):
        torch.manual_seed(7)
        losses.append(model(idx, targets)[1])
        losses[-1].backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=f"grad {name}")
    with pytest.raises(ValueError, match="activation checkpointing needs a model built from"):
        set_activation_checkpointing(torch.nn.Linear(2, 2), True)


# ---------------------------------------------------------------------------------------------------------
# generation

def test_generate_with_cache_on_triton_kernels():
    """Prefill then one-token steps: rotary offsets, GQA and bottom-right causal attention over the cache."""
    model = GPT(tiny("llama", n_layer=1)).to(DEV).eval()
    prompt, _ = batch(2, 5, seed=6)
    greedy = model.generate(prompt, 3, temperature=0)
    assert greedy.shape == (2, 8) and torch.equal(greedy[:, :5], prompt)
    logits, _ = model(greedy[:, :-1])  # greedy really is the argmax of the uncached forward at each step
    assert torch.equal(greedy[:, 5:], logits[:, 4:].argmax(-1))


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_generate_same_tokens_with_and_without_cache(style):
    model = GPT(tiny(style, kernels="torch")).to(DEV).eval()
    prompt, _ = batch(2, 5, seed=6)
    greedy = model.generate(prompt, 9, temperature=0)
    assert greedy.shape == (2, 14)
    assert torch.equal(greedy, model.generate(prompt, 9, temperature=0, use_cache=False))
    sampled = [model.generate(prompt, 9, temperature=0.8, top_k=20, use_cache=c,
                              generator=torch.Generator(DEV).manual_seed(7)) for c in (True, False)]
    assert torch.equal(sampled[0], sampled[1])
    assert not torch.equal(sampled[0], greedy)  # the sampler samples


def test_generate_stops_at_eos():
    model = GPT(tiny(kernels="torch")).to(DEV).eval()
    prompt, _ = batch(2, 4, seed=8)
    free = model.generate(prompt, 6, temperature=0)
    eos = int(free[0, 5])  # row 0's second generated token
    out = model.generate(prompt, 6, temperature=0, eos_token_id=eos)
    for row in range(2):  # each row follows the free run up to its first eos, then repeats eos
        hits = (free[row, 4:] == eos).nonzero()
        stop = 4 + int(hits[0]) + 1 if len(hits) else 10
        assert torch.equal(out[row, :stop], free[row, :stop]) and (out[row, stop:] == eos).all()
    # generation ends early only once every row has finished
    assert out.shape[1] == 10 or (out[:, 4:] == eos).any(dim=1).all()


# ---------------------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("overrides,match", [
    (dict(n_embd=50, n_head=3), "divisible by n_head"),
    (dict(n_kv_head=2), "n_kv_head"),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(loss="mse"), "loss must be one of"),
    (dict(position="rope", n_embd=45, n_head=3), "even head dim"),
    (dict(dropout=1.0), "dropout"),
    (dict(kernels="cuda"), "model.kernels='cuda' is not one of: triton, torch"),
])
def test_bad_configs(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_gpt_satisfies_the_training_contract_and_a_model_that_does_not_is_refused(monkeypatch):
    model = GPT(tiny(kernels="torch"))
    assert isinstance(model, TrainableModel) and TASKS[model.task].sequences
    logits, loss = model(*(t.cpu() for t in batch(2, 8)))
    assert logits is None and loss.dim() == 0

    class NoFlops(torch.nn.Module):  # a registered model without flops_per_example
        task = "lm"

        def __init__(self, config):
            super().__init__()
            self.config = config

        def num_params(self, non_embedding=True):
            return 0

    from models import registry
    monkeypatch.setitem(registry._MODELS, "no-flops", (NoFlops, GPTConfig, {}))
    with pytest.raises(TypeError, match="'no-flops' .NoFlops. lacks flops_per_example.*TrainableModel"):
        create_model("no-flops", kernels="torch")


def test_bad_names_and_inputs():
    with pytest.raises(ValueError, match="unknown model 'gpt5'.*gpt2-small.*vit-digits"):
        create_model("gpt5")
    with pytest.raises(ValueError, match="unknown config field.*n_layers"):
        create_model("gpt2-nano", n_layers=2)
    model = GPT(tiny()).to(DEV)
    idx, _ = batch(1, 33)  # block_size is 32
    with pytest.raises(ValueError, match="exceeds block_size 32"):
        model(idx)
    with pytest.raises(ValueError, match="exceeds block_size 32"):
        model.generate(idx[:, :30], 3)
    with pytest.raises(TypeError, match="idx must be an int64/int32"):
        model(torch.rand(1, 4, device=DEV))
    with pytest.raises(ValueError, match="targets must have idx's shape"):
        model(idx[:, :4], idx[:, :5])
    with pytest.raises(ValueError, match="temperature"):
        model.generate(idx[:, :4], 2, temperature=-1.0)
