"""triformer.patch on randomly initialized transformers / timm models (no download): logits, loss and every
parameter gradient equal to the unpatched model's (fp32, relative error <= 1e-5), and every swapped part
actually runs its triformer kernel."""
import collections
import copy
import importlib

import pytest
import torch

import triformer
from triformer.testing import FP32_RTOL, assert_close, kernel_device, rel_error

transformers = pytest.importorskip("transformers")
patch_module = importlib.import_module("triformer.patch")
KERNELS = ("_attention", "apply_rope", "rms_norm", "layer_norm", "gelu", "swiglu", "linear_cross_entropy")
DEVICE = kernel_device()


@pytest.fixture
def calls(monkeypatch):
    """Counts the triformer calls the patched forwards make (they look these names up in triformer.patch)."""
    counts = collections.Counter()
    for name in KERNELS:
        fn = getattr(patch_module, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            counts[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(patch_module, name, counted)
    return counts


def llama_config(family="Llama", **overrides):
    cfg = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=2, vocab_size=61, max_position_embeddings=64, tie_word_embeddings=False,
               attention_dropout=0.0)
    cfg.update(overrides)
    return getattr(transformers, f"{family}Config")(**cfg)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def lm_batch(vocab, B=2, T=9, padding="right", seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if padding == "right":
        mask[1, -3:] = 0
    elif padding == "left":
        mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


def pair(model_cls, config, **patch_kwargs):
    torch.manual_seed(0)
    ref = model_cls(config).float().to(DEVICE)
    patched = copy.deepcopy(ref)
    report = triformer.patch(patched, **patch_kwargs)
    return ref, patched, report


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


LLAMA_KERNELS = ("_attention", "apply_rope", "rms_norm", "swiglu", "linear_cross_entropy")


@pytest.mark.parametrize("padding", ["right", "left"])
def test_llama_gqa_untied_llama3_rope_padding(calls, padding):
    ref, patched, report = pair(transformers.LlamaForCausalLM, llama_config(rope_parameters=LLAMA3_ROPE))
    assert report.left_alone == []
    assert report.parts() == {"attention": 2, "rope": 2, "mlp": 2, "norm": 5, "loss": 1}
    check_lm_parity(ref, patched, *lm_batch(61, padding=padding), calls, LLAMA_KERNELS)


def test_llama_bf16_matches_float64(calls):
    """A bf16 Llama, patched, against the unpatched one in float64; the unpatched one in bf16 (PyTorch's own
    rounding) sets the bar. On the CPU the interpreter's bf16 ``tl.dot`` once gave attention garbage here."""
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(llama_config(num_hidden_layers=1, rope_parameters=LLAMA3_ROPE))
    ref = ref.to(DEVICE, torch.float64)
    peer = copy.deepcopy(ref).to(torch.bfloat16)
    patched = copy.deepcopy(peer)
    triformer.patch(patched)
    ids, mask, labels = lm_batch(61)
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
    for name in LLAMA_KERNELS:
        assert calls[name] > 0, f"{name} never ran: {dict(calls)}"


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
                                  {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}])
def test_llama_tied_other_rope_scalings(calls, rope):
    config = llama_config(tie_word_embeddings=True, num_key_value_heads=1, rope_parameters=rope)
    ref, patched, _ = pair(transformers.LlamaForCausalLM, config)
    assert patched.lm_head.weight is patched.model.embed_tokens.weight
    check_lm_parity(ref, patched, *lm_batch(61, padding="none"), calls, LLAMA_KERNELS)


@pytest.mark.parametrize("family", ["Mistral", "Qwen2"])
def test_mistral_and_qwen2(calls, family):
    extra = dict(sliding_window=4) if family == "Mistral" else {}  # the window reaches the kernel as the mask
    ref, patched, report = pair(getattr(transformers, f"{family}ForCausalLM"), llama_config(family, **extra))
    assert report.left_alone == []
    check_lm_parity(ref, patched, *lm_batch(61), calls, LLAMA_KERNELS)


def test_gpt2_tied_with_padding(calls):
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=67, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ref, patched, report = pair(transformers.GPT2LMHeadModel, config)
    assert report.parts() == {"attention": 2, "mlp": 2, "norm": 5, "loss": 1}
    check_lm_parity(ref, patched, *lm_batch(67), calls, ("_attention", "layer_norm", "gelu", "linear_cross_entropy"))


def test_vit_image_classification(calls):
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                    image_size=8, patch_size=4, num_labels=5, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    ref, patched, report = pair(transformers.ViTForImageClassification, config)
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
    torch.manual_seed(0)
    ref = VisionTransformer(img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=1.5,
                            num_classes=5).to(DEVICE)
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


def test_parts_are_optional_and_other_instances_untouched(calls):
    config = llama_config(rope_parameters=LLAMA3_ROPE)
    ref, patched, report = pair(transformers.LlamaForCausalLM, config, attention=False, rope=False, loss=False)
    assert report.parts() == {"mlp": 2, "norm": 5}
    assert patched.config._attn_implementation != "triformer"
    ids, mask, labels = lm_batch(61)
    check_lm_parity(ref, patched, ids, mask, labels, calls, ("rms_norm", "swiglu"))
    assert calls["_attention"] == calls["apply_rope"] == calls["linear_cross_entropy"] == 0
    # a fully patched model of the same class leaves the unpatched one running its own code
    full = copy.deepcopy(ref)
    triformer.patch(full)
    calls.clear()
    ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert sum(calls.values()) == 0
    full(input_ids=ids, attention_mask=mask, labels=labels)
    assert calls["apply_rope"] > 0


def test_loss_options_shift_labels_and_num_items(calls):
    ref, patched, _ = pair(transformers.LlamaForCausalLM, llama_config())
    ids, mask, labels = lm_batch(61)
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    for kwargs in (dict(labels=labels, num_items_in_batch=torch.tensor(11, device=DEVICE)),
                   dict(labels=labels, shift_labels=shift)):
        want = ref(input_ids=ids, attention_mask=mask, **kwargs).loss
        got = patched(input_ids=ids, attention_mask=mask, **kwargs).loss
        assert rel_error(got, want) <= FP32_RTOL
    # return_dict=False: (loss, ...) as HF orders it
    got = patched(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert rel_error(got[0], ref(input_ids=ids, attention_mask=mask, labels=labels).loss) <= FP32_RTOL
    # eval mode keeps the logits
    patched.eval()
    assert patched(input_ids=ids, labels=labels).logits is not None


def test_unsupported_parts_are_left_alone_and_listed():
    config = transformers.Gemma2Config(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                       num_key_value_heads=2, num_hidden_layers=1, vocab_size=61, head_dim=8,
                                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config)
    report = triformer.patch(model)
    left = dict((what.split(":")[0], name) for name, what in report.left_alone)
    reasons = " | ".join(what for _, what in report.left_alone)
    assert "softcapping" in reasons and "Gemma2RMSNorm is not a supported norm" in reasons
    assert "attention" in left and "norm" in left and "loss" in left
    assert model.config._attn_implementation != "triformer"
    assert report.parts().get("attention", 0) == 0
    str(report)  # printable


def test_attention_function_refuses_softcap():
    q = torch.randn(1, 2, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="softcap"):
        patch_module.triformer_attention_forward(torch.nn.Module(), q, q, q, None, softcap=30.0)


def test_bad_arguments():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        triformer.patch("model")
    with pytest.raises(TypeError, match="norm must be a bool"):
        triformer.patch(torch.nn.Linear(2, 2), norm=1)


def test_benchmark_script_smoke(tmp_path, monkeypatch):
    """benchmarks/patch_llama.py's code path on tiny configs (1 step each, in this process; pytest's
    ``pythonpath`` puts the repository root, and so ``benchmarks``, on sys.path)."""
    monkeypatch.setenv("TRIFORMER_BENCH_OUT", str(tmp_path))
    bench = importlib.import_module("benchmarks.patch_llama")
    rows = bench.main(["--smoke", "--in-process", "--only", "llama", "--variants", "unpatched,triformer"])
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["triformer"]["swapped"] == "attention=2 rope=2 mlp=2 norm=5 loss=1"
    assert by_variant["triformer"]["loss_first"] == pytest.approx(by_variant["unpatched"]["loss_first"], rel=1e-5)
    assert (tmp_path / "patch_llama_smoke.md").exists() and (tmp_path / "patch_llama_smoke.csv").exists()


def test_deepcopy_of_patched_model_is_independent(calls):
    ref, patched, _ = pair(transformers.LlamaForCausalLM, llama_config())
    clone = copy.deepcopy(patched)
    attn = clone.model.layers[0].self_attn
    assert attn.forward.__self__ is attn and attn._triformer_inner_forward.__self__ is attn
    assert clone._triformer_inner_forward.__self__ is clone
    ids, mask, labels = lm_batch(61)
    with torch.no_grad():
        clone.lm_head.weight.mul_(2.0)
        clone.model.layers[0].self_attn.q_proj.weight.mul_(-1.0)
    patched.train(), clone.train()
    a = patched(input_ids=ids, attention_mask=mask, labels=labels).loss
    b = clone(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert rel_error(a, ref.train()(input_ids=ids, attention_mask=mask, labels=labels).loss) <= FP32_RTOL
    assert abs(float(a.detach()) - float(b.detach())) > 1e-3
    assert calls["apply_rope"] > 0 and calls["linear_cross_entropy"] == 2
    report = triformer.patch(clone)  # patching again changes nothing
    assert report.swapped == [] and clone.forward.__func__ is patch_module._fused_loss_forward
