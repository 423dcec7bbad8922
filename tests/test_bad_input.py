"""Bad-input cases of docs/bad_input.md that no op's own test file covers.

Each case asserts the exception type and that the message names the offending argument.
"""
import re

import pytest
import torch

import triformer as tf
from models.gpt import GPT, GPTConfig
from models.vit import ViT, ViTConfig
from triformer.testing import kernel_device, random_tensor

DEV = kernel_device()
F32 = torch.float32
V = 37  # odd vocab: the embedding is padded past it, which is what lets an out-of-range id slip through


def rows(*shape, dtype=F32):
    return random_tensor(shape, dtype)


def tokens(*ids):
    return torch.tensor([list(ids)], dtype=torch.int64, device=DEV)


@pytest.fixture(scope="module")
def gpt():
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=V)).to(DEV).eval()


@pytest.fixture(scope="module")
def vit():
    cfg = ViTConfig(n_layer=1, n_head=3, n_embd=48, image_size=10, patch_size=2, in_channels=3, num_classes=7)
    return ViT(cfg).to(DEV).eval()


def images(B=2):
    return rows(B, 3, 10, 10)


# ------------------------------------------------------------------------------------------------ mode
def test_interpreter_switched_after_import_is_refused_at_launch(monkeypatch):
    """TRITON_INTERPRET flipped after ``import triformer`` made Triton fail with a bare AssertionError inside
    the first launch; the launch now says what changed and what to do, and works again once it is restored."""
    x = rows(3, 8)
    mode = "1" if tf.INTERPRET else "0"
    monkeypatch.setenv("TRITON_INTERPRET", "0" if tf.INTERPRET else "1")
    restore = re.escape(f"Restore os.environ['TRITON_INTERPRET'] = '{mode}'")
    with pytest.raises(RuntimeError, match=f"TRITON_INTERPRET is .* now.*{restore}.*TRIFORMER_INTERPRET=0 or 1 set "
                                           "before `import triformer`"):
        tf.gelu(x)
    monkeypatch.setenv("TRITON_INTERPRET", "true" if tf.INTERPRET else "off")  # same mode, other spelling
    assert torch.allclose(tf.gelu(x), tf.gelu_reference(x), atol=1e-6)


def test_triformer_interpret_set_after_import_is_named(monkeypatch):
    """TRIFORMER_INTERPRET is read once, at import: a later change has no effect, and the device error a
    tensor for the other mode then gets says so."""
    monkeypatch.setenv("TRIFORMER_INTERPRET", "0" if tf.INTERPRET else "1")
    other = torch.empty(3, 8, device="meta" if tf.INTERPRET else "cpu")
    with pytest.raises(ValueError, match="x is on .*TRIFORMER_INTERPRET is '[01]' now but was .* when triformer was "
                                         "imported: it is read once, at import"):
        tf.gelu(other)


# ------------------------------------------------------------------------------------------------ ops
# (call, exception type, text that must appear: it names the argument)
OP_CASES = {
    "rms_norm_x_not_tensor": (lambda: tf.rms_norm([[1.0, 2.0]]), TypeError, "x must be a torch.Tensor"),
    "rms_norm_weight_device": (lambda: tf.rms_norm(rows(3, 8), torch.ones(8, device="meta")), ValueError,
                               "weight is on meta"),
    "rms_norm_eps_nan": (lambda: tf.rms_norm(rows(3, 8), None, float("nan")), ValueError, "eps must be finite"),
    "add_layer_norm_x_dtype": (lambda: tf.add_layer_norm(rows(3, 8).double(), rows(3, 8), None, None), TypeError,
                               "x must be float32"),
    "add_layer_norm_eps": (lambda: tf.add_layer_norm(rows(3, 8), rows(3, 8), None, None, -1.0), ValueError,
                           "eps must be finite and >= 0"),
    "add_rms_norm_weight_shape": (lambda: tf.add_rms_norm(rows(3, 8), rows(3, 8), rows(7)), ValueError,
                                  r"weight must have shape \(8,\)"),
    "softmax_x_device": (lambda: tf.softmax(torch.empty(3, 4, device="meta")), ValueError, "x is on meta"),
    "dropout_x_device": (lambda: tf.dropout(torch.empty(3, 4, device="meta"), 0.5, True), ValueError, "x is on meta"),
    "cross_entropy_targets_device": (
        lambda: tf.cross_entropy(rows(3, 5), torch.tensor([1, 2, 3], device="meta")), ValueError, "targets is on meta"),
    "cross_entropy_label_smoothing_type": (
        lambda: tf.cross_entropy(rows(3, 5), tokens(1, 2, 3)[0], label_smoothing="0.1"), TypeError,
        "label_smoothing must be a float"),
    "cross_entropy_ignore_index_bool": (
        lambda: tf.cross_entropy(rows(3, 5), tokens(1, 2, 3)[0], ignore_index=True), TypeError,
        "ignore_index must be an int"),
    "linear_cross_entropy_hidden_scalar": (
        lambda: tf.linear_cross_entropy(torch.tensor(1.0, device=DEV), rows(5, 1), torch.tensor(1, device=DEV)),
        ValueError, "hidden must have shape"),
    "linear_cross_entropy_weight_dtype": (
        lambda: tf.linear_cross_entropy(rows(3, 4), rows(5, 4).double(), tokens(1, 2, 3)[0]), TypeError,
        "weight must be float32"),
    "linear_cross_entropy_z_loss_type": (
        lambda: tf.linear_cross_entropy(rows(3, 4), rows(5, 4), tokens(1, 2, 3)[0], z_loss="0"), TypeError,
        "z_loss must be a float"),
    "linear_cross_entropy_targets_device": (
        lambda: tf.linear_cross_entropy(rows(3, 4), rows(5, 4), torch.tensor([1, 2, 3], device="meta")), ValueError,
        "targets is on meta"),
    "gelu_linear_weight_device": (lambda: tf.gelu_linear(rows(3, 8), torch.ones(4, 8, device="meta")), ValueError,
                                  "weight is on meta"),
    "gelu_linear_x_dtype": (lambda: tf.gelu_linear(rows(3, 8).double(), rows(4, 8)), TypeError, "x must be float32"),
    "glu_linear_weight_device": (lambda: tf.glu_linear(rows(3, 8), rows(3, 8), torch.ones(4, 8, device="meta")),
                                 ValueError, "weight is on meta"),
    "glu_linear_gate_dtype": (lambda: tf.glu_linear(rows(3, 8).double(), None, rows(4, 4)), TypeError,
                              "gate must be float32"),
    "glu_linear_weight_shape": (lambda: tf.glu_linear(rows(3, 8), None, rows(4, 8)), ValueError,
                                r"weight must have shape \[N, 4\]"),
    "cross_entropy_num_classes": (lambda: tf.cross_entropy(rows(3, 5), tokens(1, 2, 3)[0], num_classes=6), ValueError,
                                  r"num_classes must be an int in \[1, 5\]"),
    "attention_attn_mask_not_tensor": (
        lambda: tf.attention(rows(1, 2, 8, 16), rows(1, 2, 8, 16), rows(1, 2, 8, 16), attn_mask=[[0.0]]), TypeError,
        "attn_mask must be a torch.Tensor"),
    "attention_scale_inf": (
        lambda: tf.attention(rows(1, 2, 8, 16), rows(1, 2, 8, 16), rows(1, 2, 8, 16), scale=float("inf")),
        ValueError, "scale must be None or a finite float"),
    "geglu_gate_dtype": (lambda: tf.geglu(torch.ones(2, 4, dtype=torch.int32, device=DEV)), TypeError,
                         "gate must be float32"),
    "rope_position_offset_bool": (
        lambda: tf.rope(rows(1, 1, 4, 8), *tf.rope_cos_sin(8, 8, device=DEV), position_offset=True), ValueError,
        "position_offset must be a non-negative int"),
    "rope_cos_sin_seq_len": (lambda: tf.rope_cos_sin(-1, 8), ValueError, "seq_len must be a non-negative int"),
    "rotary_embedding_max_seq_len": (lambda: tf.RotaryEmbedding(8, 0), ValueError, "max_seq_len must be a positive"),
}


@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_op_rejects_bad_input(name):
    call, error, words = OP_CASES[name]
    with pytest.raises(error, match=words):
        call()


# ------------------------------------------------------------------------------------------- models
def test_gpt_forward_rejects_bad_idx_and_targets(gpt):
    with pytest.raises(ValueError, match=r"idx must be 2-D"):
        gpt(tokens(1, 2)[0])
    with pytest.raises(TypeError, match="targets must be an int64/int32"):
        gpt(tokens(1, 2), tokens(1, 2).float())


def test_gpt_generate_rejects_bad_options(gpt):
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        gpt.generate(tokens(1, 2), -1)
    with pytest.raises(ValueError, match="top_k must be None or an int >= 1"):
        gpt.generate(tokens(1, 2), 1, top_k=0)


def test_vit_rejects_float_targets(vit):
    with pytest.raises(ValueError, match="targets must be int64/int32"):
        vit(images(), torch.tensor([1.0, 2.0], device=DEV))


# ------------------------------------------------------------------------------------ known defects
@pytest.mark.skipif(DEV.type == "cuda", reason="on CUDA an out-of-range id is a device-side assert (async)")
def test_gpt_rejects_token_id_past_vocab(gpt):
    with pytest.raises(ValueError, match="idx"):
        gpt(tokens(1, V + 3))


@pytest.mark.skipif(DEV.type == "cuda", reason="on CUDA an out-of-range id is a device-side assert (async)")
def test_gpt_rejects_negative_token_id(gpt):
    with pytest.raises(ValueError, match="idx"):
        gpt(tokens(1, -1))


def test_gpt_rejects_empty_sequence(gpt):
    with pytest.raises(ValueError, match="idx"):
        gpt(torch.zeros(1, 0, dtype=torch.int64, device=DEV))


def test_generate_rejects_str_temperature(gpt):
    with pytest.raises(TypeError, match="temperature"):
        gpt.generate(tokens(1, 2), 1, temperature="hot")


def test_vit_rejects_list_targets(vit):
    with pytest.raises((TypeError, ValueError), match="targets"):
        vit(images(), [1, 2])


def test_vit_rejects_float64_images(vit):
    with pytest.raises((TypeError, ValueError), match="images"):
        vit(images().double())
