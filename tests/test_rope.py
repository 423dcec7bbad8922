import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from triformer.rope import (RopeFunction, RotaryEmbedding, apply_rope, apply_rope_reference, rope,
                            rope_cos_sin, rope_reference)
from triformer.testing import assert_close, kernel_device, random_tensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# The ops allocate their outputs with torch.empty: NaN there shows any element a kernel skips.
pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def hf_formula(x, cos, sin):
    """Hugging Face Llama's rotation, written out: x * cos + rotate_half(x) * sin, cos/sin [.., T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def heads(layout, B, H, T, D, dtype, scale=1.0):
    """[B, H, T, D] in a given memory layout: contiguous, a strided view (random_tensor's), or the q part
    of a fused qkv projection output [B, T, 3 * H * D] (the layout attention layers actually produce)."""
    if layout == "qkv":
        qkv = random_tensor((B, T, 3 * H * D), dtype, scale=scale)
        return qkv.view(B, T, 3, H, D)[:, :, 1].transpose(1, 2)
    return random_tensor((B, H, T, D), dtype, contiguous=layout == "contiguous", scale=scale)


def check_rope(q, k, cos, sin, position_offset=0):
    """Both outputs and both gradients against float64 (HF's formula); torch in the inputs' dtype with the
    same tables sets the fp16/bf16 bar."""
    leaves = [q.requires_grad_(), k.requires_grad_()]
    outs = apply_rope(q, k, cos, sin, position_offset)
    dys = [random_tensor(o.shape, o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, leaves, dys)

    T = q.shape[2]
    c64 = cos.double()[..., position_offset:position_offset + T, :]
    s64 = sin.double()[..., position_offset:position_offset + T, :]
    c64, s64 = (t[:, None] if t.dim() == 3 else t for t in (torch.cat([c64, c64], -1), torch.cat([s64, s64], -1)))
    ins64 = [t.detach().double().requires_grad_() for t in leaves]
    outs64 = [hf_formula(t, c64, s64) for t in ins64]
    grads64 = torch.autograd.grad(outs64, ins64, [dy.double() for dy in dys])

    ins_peer = [t.detach().clone().requires_grad_() for t in leaves]
    outs_peer = apply_rope_reference(*ins_peer, cos, sin, position_offset)
    grads_peer = torch.autograd.grad(outs_peer, ins_peer, dys)
    for name, o, o64, op, inp in zip("qk", outs, outs64, outs_peer, leaves):
        assert o.dtype == inp.dtype and o.shape == inp.shape and o.is_contiguous()
        assert_close(f"rope({name})", o, o64, op)
    for name, g, g64, gp in zip("qk", grads, grads64, grads_peer):
        assert_close(f"d{name}", g, g64, gp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "qkv"])
@pytest.mark.parametrize("D", [64, 40])
def test_apply_rope_matches_hf_formula(dtype, layout, D):
    B, H, Hk, T = 2, 4, 2, 37  # GQA: k has fewer heads; 296 q rows = two row tiles on the interpreter
    cos, sin = rope_cos_sin(T, D, device=kernel_device())
    check_rope(heads(layout, B, H, T, D, dtype), heads(layout, B, Hk, T, D, dtype), cos, sin)


@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
def test_position_offset_and_longer_table(table_dtype):
    cos, sin = rope_cos_sin(100, 32, base=500000.0, device=kernel_device(), dtype=table_dtype)
    q, k = heads("strided", 3, 5, 23, 32, torch.float16), heads("qkv", 3, 1, 23, 32, torch.float16)
    check_rope(q, k, cos, sin, position_offset=61)


def test_per_sequence_tables():
    # [B, positions, D/2] tables, e.g. cos[position_ids] for left-padded batches
    B, T, D = 3, 19, 48
    full_cos, full_sin = rope_cos_sin(64, D, device=kernel_device())
    position_ids = torch.stack([torch.arange(T) + start for start in (0, 7, 30)]).to(kernel_device())
    check_rope(heads("qkv", B, 4, T, D, torch.float32), heads("strided", B, 2, T, D, torch.float32),
               full_cos[position_ids], full_sin[position_ids])


def test_matches_transformers_apply_rotary_pos_emb():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    B, H, T, D = 2, 3, 29, 64
    cos, sin = rope_cos_sin(T, D, device=kernel_device())
    q, k = random_tensor((B, H, T, D), torch.float32), random_tensor((B, 1, T, D), torch.float32)
    hf_q, hf_k = llama.apply_rotary_pos_emb(q.double(), k.double(), torch.cat([cos, cos], -1)[None].double(),
                                           torch.cat([sin, sin], -1)[None].double())
    ours_q, ours_k = apply_rope(q, k, cos, sin)
    assert_close("q vs HF", ours_q, hf_q)
    assert_close("k vs HF", ours_k, hf_k)


def test_cos_sin_tables_match_transformers_llama():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    T, D, base = 4096, 64, 500000.0
    config = llama.LlamaConfig(hidden_size=4 * D, num_attention_heads=4, head_dim=D, max_position_embeddings=T,
                               rope_theta=base)
    hf = llama.LlamaRotaryEmbedding(config)
    hf_cos, hf_sin = hf(torch.ones(1), torch.arange(T)[None])
    cos64, sin64 = rope_cos_sin(T, D, base, dtype=torch.float64)
    # HF's frequencies exactly: our float64 angles are exact products of positions and HF's fp32 inv_freq
    angles = torch.arange(T, dtype=torch.float64)[:, None] * hf.inv_freq.double()[None, :]
    assert torch.equal(cos64, angles.cos()) and torch.equal(sin64, angles.sin())
    # HF's own fp32 tables round each angle in fp32: they agree with ours to within that rounding
    atol = 4 * T * 2.0 ** -24
    assert torch.allclose(hf_cos[0, :, : D // 2].double(), cos64, atol=atol, rtol=0)
    assert torch.allclose(hf_sin[0, :, : D // 2].double(), sin64, atol=atol, rtol=0)
    assert torch.equal(hf_cos[0, :, : D // 2], hf_cos[0, :, D // 2:])  # HF's [T, D] = two copies of [T, D/2]


def test_rope_cos_sin_offset_and_dtype():
    cos, sin = rope_cos_sin(10, 16, offset=5)
    full_cos, full_sin = rope_cos_sin(15, 16)
    assert cos.dtype == torch.float32 and cos.shape == (10, 8)
    assert torch.equal(cos, full_cos[5:]) and torch.equal(sin, full_sin[5:])
    assert_close("cos^2 + sin^2", cos.double() ** 2 + sin.double() ** 2, torch.ones(10, 8, dtype=torch.float64))


def test_single_tensor_rope_and_inverse():
    x = heads("qkv", 2, 3, 41, 32, torch.float32).requires_grad_()
    cos, sin = rope_cos_sin(50, 32, device=kernel_device())
    y = rope(x, cos, sin, position_offset=9)
    assert_close("rope", y, rope_reference(x.double(), cos.double(), sin.double(), 9))
    # the backward is the inverse rotation: the gradient of <rope(x), v> is rope^-1(v)
    v = random_tensor(y.shape, torch.float32)
    (dx,) = torch.autograd.grad(y, x, v)
    assert_close("rope^-1(rope(dx))", rope(dx, cos, sin, position_offset=9), v.double())


def test_rotary_embedding_module():
    module = RotaryEmbedding(head_dim=32, max_seq_len=64, base=10000.0).to(kernel_device())
    q, k = heads("contiguous", 2, 4, 30, 32, torch.float32), heads("strided", 2, 2, 30, 32, torch.float32)
    for got, want in zip(module(q, k, position_offset=34), apply_rope_reference(
            q.double(), k.double(), module.cos.double(), module.sin.double(), 34)):
        assert_close("RotaryEmbedding", got, want)
    with pytest.raises(ValueError, match="need cos/sin with more than 64 positions"):
        module(q, k, position_offset=35)
    with pytest.raises(ValueError, match="head_dim 32"):
        module(random_tensor((1, 1, 3, 16), torch.float32), random_tensor((1, 1, 3, 16), torch.float32))


def test_torch_compile_fullgraph_matches_eager():
    q = random_tensor((2, 4, 21, 32), torch.float32).requires_grad_()
    k = random_tensor((2, 2, 21, 32), torch.float32).requires_grad_()
    cos, sin = rope_cos_sin(30, 32, device=kernel_device())

    def f(q, k):
        q_rot, k_rot = apply_rope(q * 2, k, cos, sin, 3)
        return (q_rot.sum(1, keepdim=True) * k_rot).square().sum(), q_rot, k_rot

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (f, compiled):
        loss, q_rot, k_rot = fn(q, k)
        results.append((q_rot, k_rot, *torch.autograd.grad(loss, (q, k))))
    for eager, comp in zip(*results):
        assert_close("compiled", comp, eager.double())


@pytest.mark.filterwarnings("ignore:overflow encountered")
@given(
    B=st.integers(1, 3), H=st.integers(1, 5), Hk=st.integers(1, 3), T=st.integers(1, 40),
    half=st.integers(1, 40), offset=st.integers(0, 9),
    dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["contiguous", "strided", "qkv"]),
    scale=st.sampled_from([1e-3, 1.0, 100.0]), base=st.sampled_from([100.0, 10000.0, 1e6]),
)
def test_rope_property(B, H, Hk, T, half, offset, dtype, layout, scale, base):
    D = 2 * half
    if layout == "strided" and B * T == 1:
        layout = "contiguous"  # one position per head: random_tensor cannot make that non-contiguous
    cos, sin = rope_cos_sin(T + offset, D, base, device=kernel_device())
    check_rope(heads(layout, B, H, T, D, dtype, scale), heads(layout, B, Hk, T, D, dtype, scale), cos, sin, offset)


def test_empty_sequence():
    cos, sin = rope_cos_sin(4, 8, device=kernel_device())
    q = random_tensor((2, 3, 0, 8), torch.float32).requires_grad_()
    q_rot, k_rot = apply_rope(q, q, cos, sin)
    assert q_rot.shape == (2, 3, 0, 8)


def test_function_class_is_the_autograd_entry():
    cos, sin = rope_cos_sin(4, 8, device=kernel_device())
    y = rope(random_tensor((1, 1, 4, 8), torch.float32).requires_grad_(), cos, sin)
    assert y.grad_fn.name() == RopeFunction.__name__ + "Backward"


def test_bad_input():
    cos, sin = rope_cos_sin(8, 16, device=kernel_device())
    q, k = random_tensor((2, 4, 8, 16), torch.float32), random_tensor((2, 2, 8, 16), torch.float32)
    with pytest.raises(ValueError, match=r"q must be \[B, H, T, D\]"):
        apply_rope(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="even head dim"):
        rope(random_tensor((1, 1, 8, 15), torch.float32), cos, sin)
    with pytest.raises(TypeError, match="k must be float32"):
        apply_rope(q, k.double(), cos, sin)
    with pytest.raises(ValueError, match="k must be"):
        apply_rope(q, k[:, :, :7], cos, sin)
    with pytest.raises(ValueError, match="cos/sin must be"):
        apply_rope(q, k, cos[:, :4], sin[:, :4])
    with pytest.raises(ValueError, match="cos and sin must have the same shape"):
        apply_rope(q, k, cos, sin[:7])
    with pytest.raises(ValueError, match="need cos/sin with more than 8 positions"):
        apply_rope(q, k, cos, sin, position_offset=1)
    with pytest.raises(ValueError, match="position_offset must be"):
        apply_rope(q, k, cos, sin, position_offset=-1)
    with pytest.raises(ValueError, match="cos requires grad"):
        apply_rope(q, k, cos.clone().requires_grad_(), sin)
    with pytest.raises(ValueError, match="cos is on meta"):
        apply_rope(q, k, cos.to("meta"), sin)
    with pytest.raises(ValueError, match="head_dim must be a positive even int"):
        rope_cos_sin(8, 7)
    with pytest.raises(ValueError, match="base must be"):
        rope_cos_sin(8, 8, base=-1.0)
