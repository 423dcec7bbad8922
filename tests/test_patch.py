"""triformer.patch on randomly initialized transformers / timm models (no download): logits, loss and every
parameter gradient equal to the unpatched model's (fp32, relative error <= 1e-5, padded batches), every swapped
part actually runs its triformer kernel, and a patched model stays an ordinary object (pickle, deepcopy,
generate, save/load, torch.compile(fullgraph=True)) that changes nothing for other models in the process."""
import copy
import importlib
import inspect
import io
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import triformer
from tests.helpers.hf import DEVICE, FAMILIES, VOCAB, build, count_patch_calls, lm_batch, pair
from triformer.testing import FP32_RTOL, assert_close, rel_error

transformers = pytest.importorskip("transformers")
patch_module = importlib.import_module("triformer.patch")
KERNELS = ("_attention", "apply_rope", "rms_norm", "layer_norm", "gelu", "swiglu", "geglu", "glu_linear",
           "linear_cross_entropy")


@pytest.fixture
def calls(monkeypatch):
    return count_patch_calls(monkeypatch, KERNELS)


def patched_pair(family, **overrides):
    ref, patched = pair(family, **overrides)
    return ref, patched, triformer.patch(patched)


def check_lm_parity(ref, patched, ids, mask, labels, calls, expect):
    """Logits (eval, real tokens), the training loss and every parameter gradient; ``expect``: kernels that
    must have run."""
    ref.eval(), patched.eval()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = patched(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel_error(got[real], want[real]) <= FP32_RTOL
    ref.train(), patched.train()
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out = patched(input_ids=ids, attention_mask=mask, labels=labels)
    if "linear_cross_entropy" in expect:
        assert out.logits is None  # the fused loss never builds them
    assert rel_error(out.loss, out_ref.loss) <= FP32_RTOL
    out_ref.loss.backward()
    out.loss.backward()
    check_grads(ref, patched)
    for name in expect:
        assert calls[name] > 0, f"{name} never ran: {dict(calls)}"


def check_grads(ref, patched):
    """Every gradient within 1e-5 relative; those that are zero in exact arithmetic (a key projection's bias
    shifts a whole softmax row) only have to stay at roundoff size in both models."""
    params = list(zip(ref.named_parameters(), patched.named_parameters()))
    largest = max(float(p.grad.norm()) for (_, p), _ in params if p.grad is not None)
    n = 0
    for (name, p_ref), (_, p) in params:
        if p_ref.grad is None:
            assert p.grad is None, name
            continue
        if float(p_ref.grad.norm()) < 1e-7 * largest:
            assert float(p.grad.norm()) < 1e-7 * largest, name
            continue
        assert rel_error(p.grad, p_ref.grad) <= FP32_RTOL, (name, rel_error(p.grad, p_ref.grad))
        n += 1
    assert n > 0


# a dense gated MLP runs as glu_linear (its down_proj a plain nn.Linear); MoE experts call swiglu
DECODER = ("_attention", "apply_rope", "rms_norm", "glu_linear", "linear_cross_entropy")
MOE = ("_attention", "apply_rope", "rms_norm", "swiglu", "linear_cross_entropy")
GEMMA = DECODER
# family: (kernels that must run, parts left alone)
EXPECT = {
    "llama": (DECODER, ()), "mistral": (DECODER, ()), "qwen2": (DECODER, ()), "qwen3": (DECODER, ()),
    "phi3": (DECODER, ()), "olmo2": (DECODER, ()), "granite": (DECODER, ()), "smollm3": (DECODER, ()),
    "mixtral": (MOE, ()), "qwen3_moe": (MOE, ()),  # SwiGLU in every expert
    "gemma": (GEMMA, ()), "gemma3": (GEMMA, ()),
    # soft-capped attention (the kernel's softcap) and soft-capped logits (no fused loss): all but the loss
    "gemma2": (("_attention", "apply_rope", "rms_norm", "glu_linear"), ("loss",)),
    # partial, interleaved RoPE: the rest
    "glm4": (("_attention", "rms_norm", "glu_linear", "linear_cross_entropy"), ("rope",)),
    # RoPE through complex frequencies (no apply_rotary_pos_emb); the weightless q/k RMSNorms are swapped
    "llama4": (("_attention", "rms_norm", "glu_linear", "linear_cross_entropy"), ()),
    "gpt2": (("_attention", "layer_norm", "gelu", "linear_cross_entropy"), ()),
    "gpt_neox": (("_attention", "apply_rope", "layer_norm", "gelu", "linear_cross_entropy"), ()),
}


def test_expectations_cover_every_family():
    assert set(EXPECT) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_parity(calls, family):
    expect, left = EXPECT[family]
    ref, patched, report = patched_pair(family)
    assert sorted({what.split(":")[0] for _, what in report.left_alone}) == sorted(left), str(report)
    check_lm_parity(ref, patched, *lm_batch(padding="left" if family in ("llama", "gpt2") else "right"), calls,
                    expect)
    assert triformer.patch(patched).swapped == []  # patching again changes nothing


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("family", ["llama", "glm4"])  # separate gate/up projections, and one packed gate_up_proj
def test_gated_mlp_keeps_no_product_for_backward(family):
    """A patched dense gated MLP runs as triformer.glu_linear: autograd keeps gate and up, where the unpatched MLP
    also keeps act(gate) (for the product's backward) and the product (for down_proj's weight gradient)."""
    ref, patched, _ = patched_pair(family)
    x = torch.randn(2, 5, ref.config.hidden_size, device=DEVICE, requires_grad=True)
    mlps = [m.model.layers[0].mlp for m in (ref, patched)]
    want, got = (_saved_bytes(lambda m=m: m(x)) for m in mlps)
    assert want - got == 2 * x.shape[0] * x.shape[1] * ref.config.intermediate_size * x.element_size()
    torch.testing.assert_close(mlps[1](x), mlps[0](x))


@pytest.mark.parametrize("family", ["gemma", "gemma3"])
def test_gemma_real_head_dim_parity(calls, family):
    """Gemma's own head dim, 256 (the kernel's widest tile, where its configs change), not the tiny 8 of the
    family test: attention is patched and the whole model still matches."""
    ref, patched, report = patched_pair(family, head_dim=256)
    assert report.left_alone == [], str(report)
    check_lm_parity(ref, patched, *lm_batch(), calls, GEMMA)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def test_llama_bf16_matches_float64(calls):
    """A bf16 Llama, patched, against the unpatched one in float64; the unpatched one in bf16 (PyTorch's own
    rounding) sets the bar. On the CPU the interpreter's bf16 ``tl.dot`` once gave attention garbage here."""
    ref = build("llama", num_hidden_layers=1, rope_parameters=LLAMA3_ROPE).to(DEVICE, torch.float64)
    peer = copy.deepcopy(ref).to(torch.bfloat16)
    patched = copy.deepcopy(peer)
    triformer.patch(patched)
    ids, mask, labels = lm_batch()
    real = mask.bool()
    outs = {}
    for name, model in (("ref", ref), ("peer", peer), ("patched", patched)):
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[real]
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        outs[name] = (logits, loss, dict(model.named_parameters()))
    (logits64, loss64, params64), (logits_peer, loss_peer, params_peer), (logits, loss, params) = outs.values()
    assert logits.dtype == torch.bfloat16
    assert_close("logits", logits, logits64, peer=logits_peer)
    assert_close("loss", loss, loss64, peer=loss_peer)
    for name, p in params.items():
        assert_close(f"grad {name}", p.grad, params64[name].grad, peer=params_peer[name].grad)
    for name in DECODER:
        assert calls[name] > 0, f"{name} never ran: {dict(calls)}"


@pytest.mark.parametrize("rope", [LLAMA3_ROPE, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}])
def test_llama_tied_mqa_rope_scalings(calls, rope):
    ref, patched, report = patched_pair("llama", tie_word_embeddings=True, num_key_value_heads=1,
                                        rope_parameters=rope)
    assert report.left_alone == []
    assert report.parts() == {"attention": 2, "rope": 2, "mlp": 2, "norm": 5, "loss": 1}
    assert patched.lm_head.weight is patched.model.embed_tokens.weight
    check_lm_parity(ref, patched, *lm_batch(padding="none"), calls, DECODER)


def test_vit_image_classification(calls):
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                    image_size=8, patch_size=4, num_labels=5, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    ref = transformers.ViTForImageClassification(config).to(DEVICE)
    patched = copy.deepcopy(ref)
    report = triformer.patch(patched)
    assert report.parts() == {"attention": 2, "mlp": 2, "norm": 5}
    assert any(what.startswith("loss:") for _, what in report.left_alone)
    x = torch.randn(3, 3, 8, 8, device=DEVICE)
    y = torch.tensor([0, 3, 4], device=DEVICE)
    ref.train(), patched.train()
    out_ref, out = ref(pixel_values=x, labels=y), patched(pixel_values=x, labels=y)
    assert rel_error(out.logits, out_ref.logits) <= FP32_RTOL
    assert rel_error(out.loss, out_ref.loss) <= FP32_RTOL
    out_ref.loss.backward()
    out.loss.backward()
    check_grads(ref, patched)
    for name in ("_attention", "layer_norm", "gelu"):
        assert calls[name] > 0


def test_timm_vision_transformer(calls):
    try:
        from timm.models.vision_transformer import VisionTransformer
    except Exception as e:  # timm needs torchvision, which may not import beside this torch
        pytest.skip(f"timm does not import here: {type(e).__name__}: {e}")
    for kwargs in (dict(), dict(class_token=False, global_pool="avg")):  # ViT, and DeiT-style pooling
        torch.manual_seed(0)
        ref = VisionTransformer(img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=1.5,
                                num_classes=5, **kwargs).to(DEVICE)
        patched = copy.deepcopy(ref)
        report = triformer.patch(patched)
        assert report.parts() == {"attention": 2, "mlp": 2, "norm": 5}
        x = torch.randn(3, 3, 8, 8, device=DEVICE)
        out_ref, out = ref(x), patched(x)
        assert rel_error(out, out_ref) <= FP32_RTOL
        g = torch.randn_like(out)
        out_ref.backward(g)
        out.backward(g)
        check_grads(ref, patched)
    for name in ("_attention", "layer_norm", "gelu"):
        assert calls[name] > 0


class WeightOnlyRMSNorm(torch.nn.Module):
    """An RMSNorm under a name patch has never seen."""

    def __init__(self, width, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(width) + 0.5)
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class CenteredRMSNorm(WeightOnlyRMSNorm):
    """Looks like one (a 1-D weight and an eps) but centers its input first."""

    def forward(self, x):
        return super().forward(x - x.mean(-1, keepdim=True))


def test_norms_are_recognised_by_what_they_compute(calls):
    model = torch.nn.Sequential(WeightOnlyRMSNorm(24), CenteredRMSNorm(24), torch.nn.Linear(24, 24)).to(DEVICE)
    ref = copy.deepcopy(model)
    report = triformer.patch(model)
    assert report.names("norm") == ["0"]
    assert [(name, why) for name, why in report.left_alone if why.startswith("norm")] == [
        ("1", "norm: CenteredRMSNorm does not compute a weight-only RMSNorm")]
    x = torch.randn(3, 5, 24, device=DEVICE)
    assert rel_error(model(x), ref(x)) <= FP32_RTOL
    assert calls["rms_norm"] == 1


def test_other_models_and_shared_configs_untouched(calls):
    config = transformers.LlamaConfig(**FAMILIES["llama"][2])
    a, b = transformers.LlamaForCausalLM(config).to(DEVICE), transformers.LlamaForCausalLM(config).to(DEVICE)
    triformer.patch(a)
    assert b.config._attn_implementation != "triformer" and a.config._attn_implementation == "triformer"
    assert all(type(m).__module__.startswith(("transformers.", "torch.")) for m in b.modules())
    ids, mask, labels = lm_batch()
    b.train()(input_ids=ids, attention_mask=mask, labels=labels)
    assert sum(calls.values()) == 0
    a.train()(input_ids=ids, attention_mask=mask, labels=labels)
    assert calls["apply_rope"] > 0 and calls["_attention"] > 0


def test_pickle_deepcopy_and_torch_save_round_trips(calls):
    ref, patched, _ = patched_pair("llama")
    unpatched_file = io.BytesIO()
    torch.save(build("llama"), unpatched_file)  # an unpatched model saved in the same process loads too
    ids, mask, labels = lm_batch()
    want = ref.train()(input_ids=ids, attention_mask=mask, labels=labels).loss
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    copies = [pickle.loads(pickle.dumps(patched)), copy.deepcopy(patched),
              torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)]
    for clone in copies:
        assert type(clone.model.layers[0].self_attn) is type(patched.model.layers[0].self_attn)
        assert clone.loss_function.__self__ is clone.lm_head
        calls.clear()
        got = clone.train()(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert rel_error(got, want) <= FP32_RTOL
        assert calls["apply_rope"] > 0 and calls["linear_cross_entropy"] == 1
    with torch.no_grad():  # the copies share nothing with the original
        copies[1].lm_head.weight.mul_(2.0)
    assert rel_error(patched(input_ids=ids, attention_mask=mask, labels=labels).loss, want) <= FP32_RTOL
    unpatched = torch.load(io.BytesIO(unpatched_file.getvalue()), weights_only=False)
    assert type(unpatched.model.layers[0].self_attn) is transformers.models.llama.modeling_llama.LlamaAttention
    assert triformer.patch(patched).swapped == []  # patching again changes nothing


def test_signature_return_dict_false_and_loss_options(calls):
    ref, patched, _ = patched_pair("llama")
    assert inspect.signature(patched.forward) == inspect.signature(ref.forward)
    ids, mask, labels = lm_batch()
    ref.train(), patched.train()
    want = ref(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    got = patched(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert len(got) == len(want) and got[1] is None  # the logits slot stays, empty
    assert rel_error(got[0], want[0]) <= FP32_RTOL
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    for kwargs in (dict(labels=labels, num_items_in_batch=torch.tensor(11, device=DEVICE)),
                   dict(labels=labels, shift_labels=shift)):
        assert rel_error(patched(input_ids=ids, attention_mask=mask, **kwargs).loss,
                         ref(input_ids=ids, attention_mask=mask, **kwargs).loss) <= FP32_RTOL
    patched.eval(), ref.eval()
    want = ref(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    got = patched(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert len(got) == len(want) and rel_error(got[1], want[1]) <= FP32_RTOL  # eval mode keeps the logits


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_left_padded_with_cache_matches_unpatched(calls, family):
    ref, patched, _ = patched_pair(family)
    ids, mask, _ = lm_batch(padding="left")
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=True)
    assert torch.equal(patched.eval().generate(ids, **kwargs), ref.eval().generate(ids, **kwargs))
    assert calls["_attention"] > 0


def test_save_pretrained_from_pretrained(tmp_path, calls):
    ref, patched, _ = patched_pair("llama")
    patched.save_pretrained(tmp_path)
    assert set(patched.state_dict()) == set(ref.state_dict())
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="triformer").to(DEVICE)
    assert loaded.config._attn_implementation == "triformer"
    ids, mask, _ = lm_batch()
    with torch.no_grad():
        want = ref.eval()(input_ids=ids, attention_mask=mask).logits
        got = loaded.eval()(input_ids=ids, attention_mask=mask).logits
    assert rel_error(got, want) <= FP32_RTOL and calls["_attention"] > 0


def test_fresh_process_registers_the_backend_and_loads_a_pickle(tmp_path):
    """In a fresh process: ``import triformer`` does not import transformers, ``attn_implementation="triformer"``
    works once it is imported, and a patched model saved with torch.save loads as the patched model."""
    _, patched, _ = patched_pair("llama")
    torch.save(patched, tmp_path / "model.pt")
    code = f"""
        import sys
        import triformer
        assert "transformers" not in sys.modules
        import torch, transformers
        config = transformers.LlamaConfig(hidden_size=16, intermediate_size=16, num_attention_heads=2,
                                          num_hidden_layers=1, vocab_size=32)
        model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="triformer")
        print(model.config._attn_implementation)
        model = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)
        print(type(model.model.layers[0].self_attn).__mro__[1].__name__, model.config._attn_implementation)
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=240,
                         cwd=Path(__file__).resolve().parents[1])  # this checkout's triformer first on the path
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["triformer", "_Subclass", "triformer"]


# Inductor on the CPU compiles the patched Llama in about 35 s (2 cores): slow
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_matches_eager(calls, backend):
    ref, patched, _ = patched_pair("llama")
    ids, mask, labels = lm_batch()
    ref.train(), patched.train()
    compiled = torch.compile(patched, fullgraph=True, backend=backend)
    got = compiled(input_ids=ids, attention_mask=mask, labels=labels).loss
    want = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert rel_error(got, want) <= FP32_RTOL
    got.backward()
    want.backward()
    check_grads(ref, patched)
    assert calls["linear_cross_entropy"] > 0 and calls["apply_rope"] > 0 and calls["glu_linear"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor's CUDA modes need a GPU")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_modes_gpu(mode):
    ref, patched, _ = patched_pair("llama")
    ids, mask, labels = lm_batch(padding="none")
    ref.train(), patched.train()
    compiled = torch.compile(patched, fullgraph=True, mode=mode)
    for _ in range(3):  # reduce-overhead records its CUDA graphs on a later call than the first
        patched.zero_grad(set_to_none=True)
        got = compiled(input_ids=ids, attention_mask=mask, labels=labels).loss
        got.backward()
    want = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    want.backward()
    assert rel_error(got.detach(), want.detach()) <= 1e-4  # Inductor reorders fp32 sums
    for (name, p_ref), p in zip(ref.named_parameters(), patched.parameters()):
        assert rel_error(p.grad, p_ref.grad) <= 1e-4, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast: the GPU step")
@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2", "qwen3_moe"])
def test_bf16_autocast_training_step_gpu(family):
    """Under bf16 autocast (fp32 weights) the patched model's loss and gradients stay within bf16 rounding of the
    unpatched model's: the fp32 float64-checked tests above hold the exact math, this holds the dtype handling."""
    ref, patched, _ = patched_pair(family)
    ids, mask, labels = lm_batch(B=4, T=32, padding="right")  # GPT-2 here has 32 positions
    losses = []
    for model in (ref, patched):
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.detach().float())
    assert rel_error(losses[1], losses[0]) <= 1e-2
    largest = max(float(p.grad.norm()) for p in ref.parameters() if p.grad is not None)
    for (name, p_ref), p in zip(ref.named_parameters(), patched.parameters()):
        if p_ref.grad is not None and float(p_ref.grad.norm()) > 1e-3 * largest:  # not roundoff-sized
            assert rel_error(p.grad, p_ref.grad) <= 5e-2, name


def test_unsupported_parts_are_left_alone_and_listed():
    config = transformers.GptOssConfig(hidden_size=32, intermediate_size=32, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8, num_hidden_layers=1, vocab_size=VOCAB,
                                       num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config)
    report = triformer.patch(model)
    reasons = " | ".join(what for _, what in report.left_alone)
    assert "attention sinks" in reasons
    assert model.config._attn_implementation != "triformer"
    assert report.parts().get("attention", 0) == 0
    str(report)  # printable


def test_wrappers_are_unwrapped():
    """torch.compile's OptimizedModule and DataParallel are patched through (PEFT: tests/test_patch_training.py)."""
    for wrap in (lambda m: torch.compile(m, backend="aot_eager"), torch.nn.DataParallel):
        _, model = pair("llama")
        report = triformer.patch(wrap(model))
        assert report.parts() == {"attention": 2, "rope": 2, "mlp": 2, "norm": 5, "loss": 1}
        assert type(model.lm_head) is patch_module._LMHead


def test_attention_function_refuses_sinks_and_position_bias():
    q = torch.randn(1, 2, 4, 8, device=DEVICE)
    for name in ("s_aux", "position_bias"):
        with pytest.raises(ValueError, match=name):
            patch_module.triformer_attention_forward(torch.nn.Module(), q, q, q, None, **{name: q})


@pytest.mark.parametrize("softcap", [None, 50.0, 0.7])
def test_attention_function_softcap_matches_gemma2_eager(softcap):
    """``softcap`` and ``scaling`` as Gemma-2's attention module passes them, with a padded causal mask and
    grouped-query k/v: output and gradients equal transformers' eager Gemma-2 attention."""
    gemma2 = importlib.import_module("transformers.models.gemma2.modeling_gemma2")
    module = torch.nn.Module()
    module.num_key_value_groups, module.head_dim, module.is_causal = 2, 8, True
    module.eval()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 7, 8, generator=g).to(DEVICE) * 3 for h in (4, 2, 2))
    allowed = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 1, 7, 7).clone()
    allowed[1, ..., :2] = False  # left padding
    allowed[1, :, :2, 0] = True  # (each padded query row still sees one key, as HF's masks have it)
    allowed = allowed.to(DEVICE)
    additive = torch.zeros(allowed.shape, device=DEVICE).masked_fill(~allowed, torch.finfo(torch.float32).min)
    results = []
    for fn, mask in ((gemma2.eager_attention_forward, additive), (patch_module.triformer_attention_forward, allowed)):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, _ = fn(module, *leaves, mask, dropout=0.0, scaling=0.3, softcap=softcap, sliding_window=None)
        results.append((out, *torch.autograd.grad(out, leaves, torch.ones_like(out))))
    for name, want, got in zip(("out", "dq", "dk", "dv"), *results):
        assert rel_error(got, want) <= FP32_RTOL, name


def test_attention_function_sliding_window_matches_mistral_eager():
    """Without a mask on the causal path, ``sliding_window`` reaches the kernel as ``window``: the band of
    transformers' ``sliding_window_causal_mask_function`` (``kv_idx > q_idx - sliding_window`` and causal), checked
    against Mistral's eager attention given that mask, output and gradients, with grouped-query k/v."""
    mistral = importlib.import_module("transformers.models.mistral.modeling_mistral")
    masking = importlib.import_module("transformers.masking_utils")
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    module.eval()
    T, window = 11, 4
    idx = torch.arange(T)
    allowed = masking.sliding_window_causal_mask_function(window)(0, 0, idx[:, None], idx[None, :]).to(DEVICE)
    assert int(allowed.sum()) < T * (T + 1) // 2  # the window drops keys the causal mask keeps
    additive = torch.zeros(T, T, device=DEVICE).masked_fill(~allowed, torch.finfo(torch.float32).min)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, T, 8, generator=g).to(DEVICE) for h in (4, 2, 2))
    results = []
    for fn, mask in ((mistral.eager_attention_forward, additive[None, None]),
                     (patch_module.triformer_attention_forward, None)):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, _ = fn(module, *leaves, mask, dropout=0.0, scaling=8 ** -0.5, sliding_window=window)
        results.append((out, *torch.autograd.grad(out, leaves, torch.ones_like(out))))
    for name, want, got in zip(("out", "dq", "dk", "dv"), *results):
        assert rel_error(got, want) <= FP32_RTOL, name


@pytest.mark.parametrize("T", [9, 3])
def test_mistral_sliding_window_unpadded(calls, monkeypatch, T):
    """An unpadded batch through Mistral (sliding_window=4). transformers (5.25) builds the sliding-window mask for
    the triformer backend (registered with SDPA's mask function) whenever the window reaches back past the first
    key (kv_length >= sliding_window: ``_ignore_causal_mask_sdpa`` refuses to skip it), so at T=9 the kernel gets
    the band as a boolean mask; at T=3 the mask is skipped and the window, passed as ``window``, drops nothing.
    Parity with the unpatched model either way."""
    seen = []
    attention = patch_module._attention

    def recording(*args, **kwargs):
        seen.append((kwargs.get("attn_mask") is not None, kwargs.get("window")))
        return attention(*args, **kwargs)
    monkeypatch.setattr(patch_module, "_attention", recording)
    ref, patched, report = patched_pair("mistral")
    check_lm_parity(ref, patched, *lm_batch(T=T, padding="none"), calls, DECODER)
    assert seen and set(seen) == ({(True, None)} if T >= 4 else {(False, 4)}), seen


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_soft_capped_attention_parity(calls, family):
    """A cap the scores actually reach: at initialization they are ~1e-3 and tanh(s / 50) is s / 50 to 1e-10, so
    the family test above cannot tell a cap from none. Larger q/k projections (Gemma-3: larger q/k norm weights,
    its q and k being RMS-normalized per head) and a cap of 1 make it bite. Gemma-3's config has
    ``attn_logit_softcapping`` too, and patch no longer refuses it; its attention module (transformers 5.25) passes
    no ``softcap`` to the attention function, so there the cap changes nothing, patched or not."""
    ref = pair(family, attn_logit_softcapping=1.0, final_logit_softcapping=None)[0]
    with torch.no_grad():
        for layer in ref.model.layers:
            attn = layer.self_attn
            for proj, norm in ((attn.q_proj, getattr(attn, "q_norm", None)),
                               (attn.k_proj, getattr(attn, "k_norm", None))):
                proj.weight.mul_(60.0)
                if norm is not None:  # Gemma's RMSNorm multiplies by 1 + weight
                    norm.weight.add_(7.0)
    uncapped = copy.deepcopy(ref)
    uncapped.config.attn_logit_softcapping = None
    for layer in uncapped.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    patched = copy.deepcopy(ref)
    report = triformer.patch(patched)
    assert report.left_alone == [] and report.parts()["attention"] == 2, str(report)
    ids, mask, labels = lm_batch(padding="right")
    if family == "gemma2":
        with torch.no_grad():  # the cap changes the model's output
            want, free = (m.eval()(input_ids=ids, attention_mask=mask).logits for m in (ref, uncapped))
        assert rel_error(free, want) > 1e-2
    check_lm_parity(ref, patched, ids, mask, labels, calls, GEMMA)


def test_bad_arguments():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        triformer.patch("model")
    with pytest.raises(TypeError, match="norm must be a bool"):
        triformer.patch(torch.nn.Linear(2, 2), norm=1)
    bench = importlib.import_module("benchmarks.patch_llama")
    with pytest.raises(SystemExit, match="--only: unknown"):
        bench.main(["--smoke", "--only", "mistral"])


def test_benchmark_script_smoke(tmp_path, monkeypatch):
    """benchmarks/patch_llama.py's code path on tiny configs (1 step each, in this process; pytest's
    ``pythonpath`` puts the repository root, and so ``benchmarks``, on sys.path)."""
    monkeypatch.setenv("TRIFORMER_BENCH_OUT", str(tmp_path))
    bench = importlib.import_module("benchmarks.patch_llama")
    rows = bench.main(["--smoke", "--in-process", "--only", "llama", "--variants", "unpatched,triformer",
                       "--modes", "eager"])
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["triformer"]["swapped"] == "attention=2 rope=2 mlp=2 norm=5 loss=1"
    assert by_variant["triformer"]["loss_first"] == pytest.approx(by_variant["unpatched"]["loss_first"], rel=1e-5)
    assert (tmp_path / "patch_llama_smoke.md").exists() and (tmp_path / "patch_llama_smoke.csv").exists()
