import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from triformer.attention import (Attention, AttentionFunction, attention, attention_dropout_mask,
                                 attention_packed, attention_packed_reference, attention_reference, split_qkv)
from triformer.dropout import dropout, dropout_keep_reference
from triformer.testing import (FP32_RTOL, LOW_PRECISION_FLOOR, LOW_PRECISION_SLACK, assert_close, kernel_device,
                               poisoned_empty, random_tensor, rel_error)
from tests.helpers.ops import NoLaunch

import triton  # noqa: E402  (after triformer, which picks compile vs interpreter)

# triformer.attention is also the name of the exported function, which shadows the module as an attribute.
attention_module = importlib.import_module("triformer.attention")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _multi_block_interpreter_tiles(monkeypatch):
    """64-row interpreter blocks, so that the sequences here (up to 150) cross block boundaries on the CPU too."""
    monkeypatch.setattr(attention_module, "INTERPRET_BLOCK", 64)


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    """Every buffer the op allocates (through its own ``_empty``, not torch.empty) starts as NaN (255 for
    bytes), so an element a kernel skips shows."""
    with poisoned_empty(attention_module, "_empty"):
        yield


def qkv(B, H, Tq, Tk, D, dtype, contiguous=True, scale=1.0, generator=None):
    return (random_tensor((B, H, Tq, D), dtype, contiguous=contiguous, scale=scale, generator=generator),
            random_tensor((B, H, Tk, D), dtype, contiguous=contiguous, scale=scale, generator=generator),
            random_tensor((B, H, Tk, D), dtype, contiguous=contiguous, generator=generator))


def check_attention(q, k, v, grad_out=None, **kwargs):
    """Output and dq, dk, dv against the float64 reference; for fp16/bf16 the reference run in that dtype
    (PyTorch's own math at that precision) sets the bar. Returns the kernel's output."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    grad_out = random_tensor(out.shape, out.dtype) if grad_out is None else grad_out
    grads = torch.autograd.grad(out, leaves, grad_out)

    def run_reference(dtype, **options):  # with dropout, the reference regenerates the kernel's mask from the seed
        ins = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        ref = attention_reference(*ins, **options)
        return (ref, *torch.autograd.grad(ref, ins, grad_out.to(dtype)))

    refs = run_reference(torch.float64, **kwargs)
    peers = run_reference(q.dtype, **kwargs)
    sizes = natural_sizes(q, k, v, grad_out, **kwargs)
    moves = score_rounding_moves(run_reference, refs, q, k, **kwargs)
    subnormal = subnormal_sizes(q, k, v, grad_out, kwargs.get("scale"))
    for name, ours, ref, theirs, moved in zip(("out", "dq", "dk", "dv"), (out, *grads), refs, peers, moves):
        assert ours.dtype == q.dtype and ours.shape == ref.shape
        assert_close(name, ours, ref, theirs, rtol=tolerance(ref, theirs, sizes.get(name), moved, subnormal[name]))
    return out


def natural_sizes(q, k, v, grad_out, **kwargs):
    """dq and dk come from dS = P * (dP - delta), whose two terms cancel where a softmax row is (nearly)
    one-hot: the exact gradient can then be orders of magnitude below the size its rounding error scales
    with, scale * sqrt(sum_i |dO_i|^2 |P_i|^2) * max|V| * max|K| (max|Q| for dk), in any implementation
    (FlashAttention's included). P comes from the reference itself, applied to an identity "v"."""
    q64, k64, v64, do64 = (t.detach().double() for t in (q, k, v, grad_out))
    eye = torch.eye(k.shape[2], dtype=torch.float64, device=k.device).expand(*k.shape[:2], -1, -1)
    probs = attention_reference(q64, k64, eye, **kwargs)
    scale = kwargs.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    core = scale * (do64.norm(dim=-1) * probs.norm(dim=-1)).norm() * v64.norm(dim=-1).max()
    return {"dq": core * k64.norm(dim=-1).max(), "dk": core * q64.norm(dim=-1).max()}


def score_rounding_moves(run_reference, exact, q, k, attn_mask=None, draws=4, **kwargs):
    """How far rounding the scores moves out, dq, dk and dv, in any implementation: the float64 reference rerun
    with each score moved by +-sqrt(D) fp32 unit roundoffs of scale * sum_d |q_d k_d| (a D-term dot product's
    typical error; random signs, through the additive mask), the largest move over ``draws`` draws. With scores
    in the tens it exceeds 1e-5 of the result where a row's mass sits on small probabilities (its dominant keys
    dropped or masked): the long profile's fp32 out had 2.4e-5 there, PyTorch's fp32 math up to 5.2e-5.
    ``exact`` is run_reference's float64 result with these ``attn_mask`` and ``kwargs``."""
    q64, k64 = q.detach().double(), k.detach().double()
    scale = kwargs.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    size = math.sqrt(q.shape[-1]) * 2.0 ** -24 * abs(scale) * (q64.abs() @ k64.abs().transpose(-1, -2))
    if attn_mask is None:
        base_mask = torch.zeros((), dtype=torch.float64, device=q.device)
    elif attn_mask.dtype == torch.bool:
        base_mask = torch.zeros(attn_mask.shape, dtype=torch.float64, device=q.device)
        base_mask.masked_fill_(~attn_mask, -math.inf)
    else:
        base_mask = attn_mask.double()
    gen = torch.Generator().manual_seed(0)
    moves = [0.0] * len(exact)
    for _ in range(draws):
        signs = torch.randint(0, 2, size.shape, generator=gen).to(size.device) * 2 - 1
        moved = run_reference(torch.float64, attn_mask=base_mask + signs * size, **kwargs)
        moves = [max(m, float((a - b).detach().norm())) for m, a, b in zip(moves, moved, exact)]
    return moves


def subnormal_sizes(q, k, v, grad_out, scale=None):
    """What P and dS entries below the dtype's normal range (6e-5 in fp16) cost: the kernel rounds them to the
    inputs' dtype for its matmuls, as PyTorch's math does, losing up to half a subnormal spacing each, so out
    may move by sum_j |v_j| of those (dv by sum_i |dO_i|, dq and dk by scale sum |K| and sum |Q|). With every
    row's dominant keys dropped, the long profile's fp16 case (magnitude 8) had ||out|| = 1.1e-6 and ||dq|| =
    1.6e-5 and relative errors 0.21 and 0.26 (PyTorch's fp16 math: 0.21 and 0.09); this bound is 43 and 3.0
    times those norms there."""
    q64, k64, v64, do64 = (t.detach().double().abs() for t in (q, k, v, grad_out))
    scale = abs(scale or 1.0 / math.sqrt(q.shape[-1]))
    ones = torch.ones(*q.shape[:3], k.shape[2], dtype=torch.float64, device=q.device)
    return {"out": float((ones @ v64).norm()), "dv": float((ones.transpose(-1, -2) @ do64).norm()),
            "dq": scale * float((ones @ k64).norm()), "dk": scale * float((ones.transpose(-1, -2) @ q64).norm())}


def tolerance(ref64, peer, size=None, moved=0.0, subnormal=0.0):
    """assert_close's bar (fp32: 1e-5; fp16/bf16: set by PyTorch's own result in that dtype), loosened where
    PyTorch's own result is worse (fp32 too: with scores in the hundreds, rounding the scores alone moves
    the probabilities by ~1e-4) or where rounding the scores moves the result further (``moved``, see
    score_rounding_moves; PyTorch's error is one draw of such a move, which ours exceeded up to 7 times; over
    250 random fp32 cases, 9 of 1000 results failed the bar without it, none twice the move), and for dq/dk never
    below one unit roundoff of their natural size (about the low-precision floors where rows are not one-hot,
    far below 1e-5 for fp32), nor below half a subnormal spacing of ``subnormal`` (see subnormal_sizes; far
    below the other bars unless results approach the subnormal range). Where ref64 is exactly 0, rel_error
    compares absolute errors, and so do these."""
    dtype = peer.dtype
    fi = torch.finfo(dtype)
    norm = float(ref64.detach().norm()) or 1.0
    bar = max(LOW_PRECISION_FLOOR.get(dtype, FP32_RTOL), LOW_PRECISION_SLACK * rel_error(peer, ref64),
              LOW_PRECISION_SLACK * moved / norm, fi.tiny * fi.eps / 2 * subnormal / norm)
    if size is not None:
        bar = max(bar, fi.eps / 2 * float(size) / norm)
    return bar


# Interpreter blocks are 64 rows/keys: these lengths span two or three blocks with ragged ends, and
# Tq != Tk in both directions exercises the bottom-right causal alignment (Tq > Tk leaves rows empty).
@pytest.mark.parametrize("Tq,Tk", [(100, 100), (67, 150), (130, 77), (1, 91)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_matches_reference(Tq, Tk, is_causal):
    check_attention(*qkv(2, 2, Tq, Tk, 40, torch.float32), is_causal=is_causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [16, 64, 80, 128, 200, 256])  # 200: a 256-wide tile, masked columns
def test_attention_head_dims_and_dtypes(dtype, D):
    check_attention(*qkv(1, 2, 90, 75, D, dtype), is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_non_contiguous_inputs_and_grad(dtype):
    q, k, v = qkv(2, 3, 70, 83, 24, dtype, contiguous=False)
    grad_out = random_tensor((2, 3, 70, 24), dtype, contiguous=False)
    check_attention(q, k, v, grad_out, scale=0.3)


@pytest.mark.parametrize("B,T", [(2, 97), (6, 5)])  # a GPT's blocks; a ViT's 5 tokens, packed on the CPU
def test_attention_reads_fused_qkv_projection_in_place(B, T):
    """The models' layout: q, k, v are strided views of one [B, T, 3, H, D] projection, output feeds a
    [B, T, H*D] reshape. The kernel reads the views as they are and its output reshapes without a copy."""
    H, D = 3, 32
    fused = random_tensor((B, T, 3, H, D), torch.float32)
    q, k, v = fused.permute(2, 0, 3, 1, 4)
    out = check_attention(q, k, v, is_causal=True)
    assert out.transpose(1, 2).reshape(B, T, H * D).data_ptr() == out.data_ptr()
    # an expanded upstream gradient (zero strides), as out.sum().backward() produces
    check_attention(q, k, v, torch.ones(1, 1, 1, 1, device=q.device).expand(B, H, T, D), is_causal=True)


@pytest.mark.parametrize("n_head,n_kv_head,T,is_causal,dropout_p", [(3, 3, 37, True, 0.0), (4, 2, 19, False, 0.0),
                                                                    (2, 1, 33, True, 0.25)])
def test_attention_packed_matches_reference_with_one_gradient_tensor(n_head, n_kv_head, T, is_causal, dropout_p):
    """attention_packed on a fused projection's output [B, T, (H + 2 H_kv) D]: output and d(qkv) against the
    float64 reference on the same views; the gradient is one fresh tensor shaped like qkv, every element
    written (poisoned buffers), equal to what attention on split views gives."""
    qkv = random_tensor((2, T, (n_head + 2 * n_kv_head) * 16), torch.float32).requires_grad_()
    check_packed(qkv, n_head, n_kv_head, dict(is_causal=is_causal, dropout_p=dropout_p, seed=7 if dropout_p else None))


def check_packed(qkv, n_head, n_kv_head, kwargs):
    """attention_packed(qkv, ...) against the float64 reference (output and d(qkv), one contiguous tensor with
    every element written), and equal, output and gradients, to attention on the split views."""
    out = attention_packed(qkv, n_head, n_kv_head, **kwargs)
    grad_out = random_tensor(out.shape, out.dtype)
    (dqkv,) = torch.autograd.grad(out, qkv, grad_out)
    assert dqkv.shape == qkv.shape and dqkv.is_contiguous() and not dqkv.isnan().any()
    q64 = qkv.detach().double().requires_grad_()
    ref = attention_packed_reference(q64, n_head, n_kv_head, **kwargs)
    (ref_grad,) = torch.autograd.grad(ref, q64, grad_out.double())
    assert_close("out", out, ref)
    assert_close("dqkv", dqkv, ref_grad)
    views = [t.detach().requires_grad_() for t in split_qkv(qkv.detach(), n_head, n_kv_head)]
    split_out = attention(*views, **kwargs)
    torch.testing.assert_close(out, split_out, rtol=0, atol=0)
    for ours, theirs in zip(split_qkv(dqkv, n_head, n_kv_head), torch.autograd.grad(split_out, views, grad_out)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_packed_low_precision_matches_reference(dtype):
    """attention_packed in fp16/bf16 (bf16 on the CPU too: the interpreter's bf16 tl.dot once returned ~1e9):
    output and d(qkv) against the float64 reference, the reference run in that dtype setting the bar."""
    n_head, n_kv_head, T, D = 4, 2, 45, 16
    qkv = random_tensor((2, T, (n_head + 2 * n_kv_head) * D), dtype).requires_grad_()
    grad_out = random_tensor((2, n_head, T, D), dtype)
    results = []
    for x in (qkv, qkv.detach().double().requires_grad_(), qkv.detach().clone().requires_grad_()):
        fn = attention_packed if x is qkv else attention_packed_reference
        out = fn(x, n_head, n_kv_head, is_causal=True)
        results.append((out, *torch.autograd.grad(out, x, grad_out.to(x.dtype))))
    for name, ours, ref, peer in zip(("out", "dqkv"), *results):
        assert ours.dtype == dtype
        assert_close(name, ours, ref, peer)


def test_attention_packed_double_backward_and_bad_input():
    qkv = random_tensor((1, 9, 3 * 2 * 8), torch.float32).requires_grad_()
    out = attention_packed(qkv, 2, is_causal=True)
    (g,) = torch.autograd.grad(out.square().sum(), qkv, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), qkv)
    q64 = qkv.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(attention_packed_reference(q64, 2, is_causal=True).square().sum(), q64,
                                 create_graph=True)
    assert_close("ddqkv", gg, torch.autograd.grad(g64.sum(), q64)[0])
    for args, error, message in [((qkv[..., :-1], 2), ValueError, "must be \\(n_head \\+ 2 \\* n_kv_head\\)"),
                                 ((qkv, 0), ValueError, "n_head must be a positive int"),
                                 ((qkv, 2, True), ValueError, "n_kv_head must be a positive int"),
                                 ((qkv[0], 2), ValueError, "qkv must be a 3-D tensor"),
                                 ((random_tensor((1, 48, 9), torch.float32).transpose(1, 2), 2), ValueError,
                                  "contiguous in its last")]:
        with pytest.raises(error, match=message):
            attention_packed(*args)


def test_causal_alignment_matches_incremental_decoding():
    """Bottom-right alignment: the last query rows alone, against all keys, equal the tail of the full
    causal attention (what a KV cache computes); and the reference agrees with SDPA where they overlap."""
    q, k, v = qkv(1, 2, 120, 120, 32, torch.float32)
    full = attention(q, k, v, is_causal=True)
    for new in (1, 7, 66):
        torch.testing.assert_close(attention(q[:, :, -new:], k, v, is_causal=True), full[:, :, -new:],
                                   rtol=1e-5, atol=1e-6)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    torch.testing.assert_close(attention_reference(q64, k64, v64, is_causal=True),
                               F.scaled_dot_product_attention(q64, k64, v64, is_causal=True))


# Sequences that fit in one interpreter tile go in whole, several (batch, head) pairs per program: 15 pairs
# of 5 tokens leave the last program short of pairs, Tq != Tk both ways, one query row, 33 keys (one pair
# per tile). On a GPU these are ordinary single-block cases.
@pytest.mark.parametrize("B,H,Tq,Tk", [(3, 5, 5, 5), (2, 3, 12, 8), (4, 2, 1, 7), (2, 2, 9, 33)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_short_sequences_many_pairs(B, H, Tq, Tk, is_causal):
    check_attention(*qkv(B, H, Tq, Tk, 24, torch.float32), is_causal=is_causal)


@pytest.mark.skipif(kernel_device().type == "cuda", reason="interpreter tiles")
def test_interpreter_packs_short_sequences():
    """What makes a ViT on 8x8 digits (5 tokens, batch 32, one head) train in minutes on a CPU: 8 programs
    of 4 pairs per launch instead of 32."""
    tiles = attention_module._tiles(5, 5, 32)
    assert (tiles["BLOCK_M"] // tiles["SEQ_M"], tiles["SEQ_M"], tiles["SEQ_N"]) == (4, 8, 8)
    assert attention_module._tiles(100, 5, 32)["SEQ_M"] == 0  # too long to pack: 64 x 64 blocks


class _RecordingKernel(triton.runtime.KernelInterface):
    """Stands in for a compiled kernel under triton.autotune: records each launch's grid and keywords."""

    def __init__(self, kernel):
        self.fn, self.arg_names, self.launches = kernel.fn, kernel.arg_names, []

    def run(self, *args, grid, warmup, **kwargs):
        meta = {**dict(zip(self.arg_names, args)), **kwargs}
        self.launches.append((grid(meta) if callable(grid) else grid, kwargs))


@pytest.mark.skipif(kernel_device().type == "cuda", reason="a recorder on CPU tensors stands in for the kernel")
def test_tuned_config_launch(monkeypatch):
    """The GPU launch path, with the kernel replaced by a recorder: a launch whose tuning key was seen skips
    Triton's autotuner and launches the config it chose, with the grid it would have used; a new dtype (of q
    or of the mask), head dim, causal flag, mask, dropout, soft-capping or window flag or sequence bucket goes
    through the autotuner once more."""
    recorder = _RecordingKernel(attention_module._attn_fwd_kernel)
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": 32}, num_warps=w) for m, w in ((128, 8), (64, 4))]

    def bench(call, quantiles):  # the second config wins, so a cached first one would show
        call()
        return [recorder.launches[-1][1]["BLOCK_M"]] * 3
    tuner = triton.autotune(configs=configs, key=attention_module._TUNE_KEY, do_bench=bench)(recorder)
    tuner_runs, tuner_run = [], tuner.run

    def counted_run(*args, **kwargs):
        tuner_runs.append(1)
        return tuner_run(*args, **kwargs)
    monkeypatch.setattr(tuner, "run", counted_run)
    monkeypatch.setattr(attention_module, "_attn_fwd", tuner)
    monkeypatch.setattr(attention_module, "_tiles", lambda Tq, Tk, n_pairs: dict(SEQ_M=0, SEQ_N=0))
    monkeypatch.setattr(attention_module, "_TUNED", {})

    def forward(B=1, H=2, Tq=100, Tk=100, D=64, dtype=torch.float16, is_causal=False, dropout_p=0.0, mask=None,
                softcap=0.0, window=None):
        """(autotuner runs, (grid, keywords) of the launch) of one forward; ``mask``: an additive mask's dtype."""
        q, k, v = (torch.empty(B, H, T, D, dtype=dtype) for T in (Tq, Tk, Tk))
        attn_mask = None if mask is None else torch.zeros(Tq, Tk, dtype=mask)
        runs = len(tuner_runs)
        attention_module._attention_fwd(q, k, v, attn_mask, None, torch.tensor(7) if dropout_p else None,
                                        is_causal, dropout_p, 0.125, softcap, window)
        return len(tuner_runs) - runs, recorder.launches[-1]

    for variant in [{}, dict(dtype=torch.bfloat16), dict(dtype=torch.float32), dict(D=40), dict(is_causal=True),
                    dict(dropout_p=0.1), dict(Tq=200), dict(Tk=300), dict(mask=torch.float16),
                    dict(mask=torch.float32), dict(softcap=30.0), dict(is_causal=True, window=64)]:
        runs, tuned = forward(**variant)
        assert runs == 1, variant
        assert tuned[1]["BLOCK_M"] == 64 and tuned[1]["num_warps"] == 4
        assert forward(**variant) == (0, tuned), variant
    # the same key (Tq 100 -> 120 stays in bucket 128) with another grid: the cached BLOCK_M sizes it
    runs, (grid, kwargs) = forward(B=3, H=5, Tq=120)
    assert runs == 0 and grid == (triton.cdiv(120, 64) * 15,) and kwargs["BLOCK_M"] == 64
    # a kernel tiled along the keys (dK/dV) sizes its grid by BLOCK_N, tuned or cached
    for _ in range(2):
        attention_module._launch(tuner, 300, "BLOCK_N", 6, dict(SEQ_M=0, SEQ_N=0), (torch.empty(1),),
                                 **{name: 1 for name in attention_module._TUNE_KEY})
        assert recorder.launches[-1][0] == (triton.cdiv(300, 32) * 6,)
    assert len(tuner_runs) == 13


@pytest.mark.skipif(kernel_device().type != "cuda", reason="autotuned kernels run on a GPU only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cached_config_launch_equals_tuned_launch(monkeypatch, dtype):
    """On the GPU: the first call tunes (through Triton's autotuner), the next ones launch the cached config;
    outputs and all three gradients are bitwise equal, and each kernel was tuned once."""
    monkeypatch.setattr(attention_module, "_TUNED", {})
    q, k, v = (random_tensor((2, 4, 300, 64), dtype).requires_grad_() for _ in range(3))
    do = random_tensor((2, 4, 300, 64), dtype)
    runs = []
    for _ in range(3):
        out = attention(q, k, v, is_causal=True)
        runs.append((out, *torch.autograd.grad(out, (q, k, v), do)))
    assert len(attention_module._TUNED) == 3  # forward, dK/dV, dQ
    for later in runs[1:]:
        for name, a, b in zip(("out", "dq", "dk", "dv"), runs[0], later):
            assert torch.equal(a, b), name


def random_masks(B, H, Tq, Tk, kind, generator=None):
    """Masks with some query rows and some keys fully excluded (so rows with nothing to attend occur)."""
    if kind == "additive":
        mask = torch.randn(Tq, Tk, generator=generator).to(kernel_device())
        mask[::3] = float("-inf")  # whole rows masked through -inf
        mask[:, Tk // 2] = float("-inf")  # and a key column
        return dict(attn_mask=mask)
    if kind == "bool":
        mask = torch.rand(B, 1, Tq, Tk, generator=generator).to(kernel_device()) > 0.3
        mask[0, 0, Tq // 2] = False
        return dict(attn_mask=mask)
    padding = torch.zeros(B, Tk, dtype=torch.bool, device=kernel_device())
    padding[0, Tk // 2:] = True
    padding[-1, :] = True  # a sequence that is all padding
    return dict(key_padding_mask=padding)


@pytest.mark.parametrize("kind", ["additive", "bool", "padding"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("B,H,Tq,Tk", [(2, 2, 75, 101), (3, 3, 6, 11)])
def test_attention_masks(kind, is_causal, B, H, Tq, Tk):
    masks = random_masks(B, H, Tq, Tk, kind)
    out = check_attention(*qkv(B, H, Tq, Tk, 32, torch.float32), is_causal=is_causal, **masks)
    assert torch.isfinite(out).all()


def test_bool_masks_reach_the_kernels_as_bool():
    """Bool attention and padding masks are handed to the kernels as they are, never as a byte view: Inductor
    cannot lower a bool -> uint8 view (torch 2.11, "torch.bool is not supported by torch.iinfo"), which broke every
    compiled HF model on a GPU, since transformers passes a bool mask there."""
    from triformer.attention import _kernel_operands

    dev = kernel_device()
    q = torch.zeros(2, 2, 5, 16, device=dev)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool, device=dev)
    padding = torch.zeros(2, 5, dtype=torch.bool, device=dev)
    attn_mask, kpm, *_ = _kernel_operands(q, q, mask, padding, None, 0.0, False, 0.0, None)
    assert attn_mask.dtype == torch.bool and attn_mask.untyped_storage().data_ptr() == mask.data_ptr()
    assert kpm is padding


def test_fully_masked_rows_give_zero_output_and_gradients():
    q, k, v = qkv(2, 1, 70, 70, 16, torch.float32)
    padding = torch.zeros(2, 70, dtype=torch.bool, device=q.device)
    padding[1] = True
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, key_padding_mask=padding)
    out.sum().backward()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for t in leaves:
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1])) and t.grad[0].abs().sum() > 0


def test_extreme_logits_stay_finite():
    """Scores with a standard deviation of ~150 (exp overflows fp32 beyond 88): the online softmax must
    rescale, not overflow."""
    check_attention(*qkv(1, 2, 80, 130, 32, torch.float32, scale=12.0), is_causal=True)


# Tk % 4 == 0 lets one Philox call serve four keys; other lengths draw per element: test both, in blocks
# and in packed short sequences.
@pytest.mark.parametrize("B,H,Tq,Tk", [(1, 2, 70, 100), (1, 2, 70, 99), (3, 3, 6, 12), (3, 3, 6, 7)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_dropout_matches_reference(B, H, Tq, Tk, is_causal):
    check_attention(*qkv(B, H, Tq, Tk, 32, torch.float32), is_causal=is_causal, dropout_p=0.3, seed=1234,
                    key_padding_mask=torch.rand(B, Tk, device=kernel_device()) > 0.8)


@pytest.mark.parametrize("shape", [(2, 3, 77, 132), (1, 2, 70, 131)])
def test_dropout_mask_contract_and_statistics(shape):
    """The keep bit of (b, h, i, j) is triformer.dropout's bit for element ((b*H + h)*Tq + i)*Tk + j of a
    flat tensor: checked against dropout's plain-PyTorch Philox and against dropout itself."""
    p, seed = 0.25, 2**40 + 99
    keep = attention_dropout_mask(shape, p, seed)
    assert keep.view(torch.uint8).max() <= 1  # every element written
    index = torch.arange(math.prod(shape), device=keep.device).reshape(shape)
    assert torch.equal(keep, dropout_keep_reference(index, seed, p))
    ones = torch.ones(shape, device=keep.device)
    assert torch.equal(keep, dropout(ones, p, seed=seed) != 0)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert not torch.equal(keep, attention_dropout_mask(shape, p, seed + 1))


def test_dropout_reference_accepts_the_kernel_mask():
    q, k, v = qkv(1, 2, 66, 80, 16, torch.float32)
    mask = attention_dropout_mask((1, 2, 66, 80), 0.5, 21)
    expected = attention_reference(q.double(), k.double(), v.double(), dropout_p=0.5, dropout_mask=mask)
    assert_close("out", attention(q, k, v, dropout_p=0.5, seed=21), expected)


def test_dropout_seed_reproducibility():
    q, k, v = qkv(1, 2, 66, 66, 16, torch.float32)
    a = attention(q, k, v, dropout_p=0.5, seed=7)
    assert torch.equal(a, attention(q, k, v, dropout_p=0.5, seed=7))
    assert not torch.equal(a, attention(q, k, v, dropout_p=0.5, seed=8))
    torch.manual_seed(3)
    b = attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    assert torch.equal(b, attention(q, k, v, dropout_p=0.5))


def test_module_and_function():
    q, k, v = qkv(1, 2, 65, 65, 16, torch.float32)
    layer = Attention(is_causal=True, dropout_p=0.4)
    assert "dropout_p=0.4" in repr(layer)
    expected = attention(q, k, v, is_causal=True)
    assert torch.equal(layer.eval()(q, k, v), expected)
    assert not torch.equal(layer.train()(q, k, v), expected)
    direct = AttentionFunction.apply(q, k, v, True, 0.0, 0.25, None, None, None)  # pre-validated arguments
    assert torch.equal(direct, expected)
    capped = Attention(is_causal=True, softcap=3.0)
    assert "softcap=3.0" in repr(capped) and "softcap" not in repr(layer)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    direct = AttentionFunction.apply(*leaves, True, 0.0, 0.25, None, None, None, 3.0)
    assert direct.grad_fn.name() == "AttentionFunctionBackward"
    assert torch.equal(direct, capped(q, k, v))
    torch.autograd.grad(direct.sum(), leaves)  # ten gradients for ten arguments


@pytest.mark.parametrize("softcap,window", [(0.0, None), (2.5, None), (0.0, 9)])
def test_torch_compile_fullgraph_matches_eager(softcap, window):
    q, k, v = qkv(1, 2, 70, 70, 16, torch.float32)
    mask = torch.randn(70, 70, device=q.device)

    def loss(q, k, v):  # the default seed is drawn inside the graph, from torch's generator
        out = attention(q, k, v, is_causal=True, dropout_p=0.2, attn_mask=mask, softcap=softcap, window=window)
        return (out * out).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (loss, compiled):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(5)
        value = fn(*leaves)
        results.append((value, *torch.autograd.grad(value, leaves)))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)


def test_bad_arguments_raise_before_launch():
    q, k, v = qkv(1, 2, 8, 8, 16, torch.float32)
    cases = [
        (dict(q=q.half()), TypeError, "share a dtype"),
        (dict(q=q.long()), TypeError, "q must be float32"),
        (dict(k=k[0]), ValueError, "k must be 4-D"),
        (dict(v=v[:, :1]), ValueError, "k and v must be"),
        (dict(q=q[..., :8]), ValueError, "k and v must be"),
        (dict(q=torch.empty(1, 2, 0, 16)), ValueError, "non-empty"),
        (dict(zip("qkv", qkv(1, 1, 8, 8, 264, torch.float32))), ValueError, "head_dim must be at most 256"),
        (dict(is_causal=1), TypeError, "is_causal must be a bool"),
        (dict(dropout_p=1.0), ValueError, "dropout_p must be in"),
        (dict(dropout_p="0.1"), TypeError, "dropout_p must be a float"),
        (dict(scale=float("nan")), ValueError, "scale must be"),
        (dict(softcap=-1.0), ValueError, "softcap must be a finite number >= 0"),
        (dict(softcap=float("inf")), ValueError, "softcap must be a finite number >= 0"),
        (dict(softcap=float("nan")), ValueError, "softcap must be a finite number >= 0"),
        (dict(softcap="30"), TypeError, "softcap must be a float"),
        (dict(softcap=True), TypeError, "softcap must be a float"),
        (dict(softcap=None), TypeError, "softcap must be a float"),
        (dict(seed=-1, dropout_p=0.1), ValueError, "seed must be"),
        (dict(attn_mask=torch.zeros(3, 8, 8)), ValueError, "attn_mask must broadcast"),
        (dict(attn_mask=torch.zeros(8, 8, dtype=torch.int32)), TypeError, "attn_mask must be float32"),
        (dict(attn_mask=torch.zeros(8, 8, requires_grad=True)), ValueError, "attn_mask gets no gradient"),
        (dict(key_padding_mask=torch.zeros(1, 8)), TypeError, "key_padding_mask must be a bool"),
        (dict(key_padding_mask=torch.zeros(1, 9, dtype=torch.bool)), ValueError, "key_padding_mask must be"),
    ]
    if q.device.type == "cpu":
        cases.append((dict(q=q.to("meta")), ValueError, "on meta"))
    for override, error, message in cases:
        args = dict(q=q, k=k, v=v) | override
        with pytest.raises(error, match=message):
            attention(**args)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_long_sequences(dtype):
    check_attention(*qkv(2, 3, 700, 1100, 96, dtype), is_causal=True)
    check_attention(*qkv(2, 3, 513, 513, 64, dtype), dropout_p=0.1, seed=3,
                    **random_masks(2, 3, 513, 513, "padding"))


@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 150), st.integers(1, 150),
                    st.sampled_from([8, 24, 32, 40, 64, 96])),
    dtype=st.sampled_from(DTYPES),
    contiguous=st.booleans(),
    is_causal=st.booleans(),
    magnitude=st.sampled_from([1e-3, 1.0, 8.0]),
    mask=st.sampled_from([None, "additive", "bool", "padding"]),
    dropout_p=st.sampled_from([0.0, 0.0, 0.6]),
    seed=st.integers(0, 2**31 - 1),
    softcap=st.sampled_from([0.0, 0.0, 0.5, 20.0]),
    window=st.sampled_from([None, None, 1, 4, 40]),
)
# the long profile's failure, reproduced with a seed: dominant keys dropped, fp32 out 4.8e-5 (PyTorch's 1.4e-5)
@example(shape=(1, 2, 2, 25, 40), dtype=torch.float32, contiguous=False, is_causal=False, magnitude=8.0,
         mask="additive", dropout_p=0.6, seed=337, softcap=0.0, window=None)
# fp16 results in the subnormal range (see subnormal_sizes): dq 0.26 against PyTorch's 0.09
@example(shape=(2, 2, 2, 89, 64), dtype=torch.float16, contiguous=True, is_causal=False, magnitude=8.0,
         mask="additive", dropout_p=0.6, seed=172, softcap=0.0, window=None)
def test_attention_property(shape, dtype, contiguous, is_causal, magnitude, mask, dropout_p, seed, softcap, window):
    B, H, Tq, Tk, D = shape
    gen = torch.Generator().manual_seed(seed)  # inputs, masks, dropout and grad_out: one example, one draw
    masks = random_masks(B, H, Tq, Tk, mask, gen) if mask else {}
    q, k, v = qkv(B, H, Tq, Tk, D, dtype, contiguous, magnitude, gen)
    check_attention(q, k, v, random_tensor(q.shape, dtype, generator=gen), is_causal=is_causal,
                    dropout_p=dropout_p, seed=seed if dropout_p else None, softcap=softcap,
                    window=window if is_causal else None, **masks)


def test_sm90_codegen_pipelines_loads_without_spills():
    """The first forward candidate, compiled for sm_90 on this machine (no GPU needed): its key/value loads
    become asynchronous copies (software pipelining), its matmuls warpgroup MMAs, and nothing spills."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]  # `python -m benchmarks.attention_sm90` runs from the repository root
    proc = subprocess.run([sys.executable, "-m", "benchmarks.attention_sm90", "--first"], cwd=root, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = proc.stdout.strip().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "fwd", row
    regs, stack, smem, cp_async, wgmma = map(int, cells[4:9])
    assert stack == 0 and cp_async > 0 and wgmma > 0, row


# --- grouped-query attention: k/v with H_kv heads, read by query head h as kv head h // (H / H_kv) ---

def check_gqa(B, H, H_kv, Tq, Tk, D, dtype=torch.float32, contiguous=True, **kwargs):
    q = random_tensor((B, H, Tq, D), dtype, contiguous=contiguous)
    k = random_tensor((B, H_kv, Tk, D), dtype, contiguous=contiguous)
    v = random_tensor((B, H_kv, Tk, D), dtype, contiguous=contiguous)
    grad_out = random_tensor((B, H, Tq, D), dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert grads[1].shape == k.shape and grads[2].shape == v.shape

    def reference(dt):
        ins = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        ref = attention_reference(*ins, **kwargs)
        return (ref, *torch.autograd.grad(ref, ins, grad_out.to(dt)))

    refs, peers = reference(torch.float64), reference(dtype)
    # the same kernel on copied heads (dK/dV of the copies summed per group) agrees too
    group = H // H_kv
    rep = [t.detach().repeat_interleave(group, dim=1).requires_grad_() for t in (k, v)]
    out_rep = attention(q, *rep, **kwargs)
    d_rep = torch.autograd.grad(out_rep, rep, grad_out)
    d_rep = [d.reshape(B, H_kv, group, Tk, D).sum(2) for d in d_rep]
    rtol = 2 * FP32_RTOL if dtype == torch.float32 else None
    for name, ours, ref, peer in zip(("out", "dq", "dk", "dv"), (out, *grads), refs, peers):
        assert ours.dtype == dtype
        assert_close(name, ours, ref, peer, rtol=rtol)
    assert_close("out vs copied heads", out, out_rep.double(), out_rep, rtol=rtol)
    for name, ours, theirs in zip(("dk", "dv"), grads[1:], d_rep):
        assert_close(f"{name} vs copied heads", ours, theirs.double(), theirs, rtol=rtol)


@pytest.mark.parametrize("B,H,H_kv,Tq,Tk", [(2, 6, 2, 37, 37), (1, 4, 1, 70, 45), (3, 4, 2, 5, 5), (2, 6, 3, 9, 13)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_gqa_matches_reference(B, H, H_kv, Tq, Tk, is_causal):
    check_gqa(B, H, H_kv, Tq, Tk, 24, is_causal=is_causal)


def test_gqa_fp16_non_contiguous():
    check_gqa(2, 4, 2, 33, 41, 40, torch.float16, contiguous=False, is_causal=True)


def test_gqa_per_head_mask_padding_and_dropout():
    B, H, H_kv, T = 2, 4, 2, 11
    mask = torch.rand(B, H, T, T, device=kernel_device()) > 0.3
    check_gqa(B, H, H_kv, T, T, 16, attn_mask=mask, is_causal=True)
    pad = torch.zeros(B, T, dtype=torch.bool, device=kernel_device())
    pad[0, -3:] = True
    check_gqa(B, H, H_kv, T, T, 16, key_padding_mask=pad)
    check_gqa(B, H, H_kv, 13, 13, 16, dropout_p=0.2, seed=7, is_causal=True)


def test_gqa_bad_group():
    q, k, v = qkv(1, 4, 8, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="H_kv dividing"):
        attention(q, k[:, :3], v[:, :3])


# --- logit soft-capping (Gemma-2): scores s = softcap * tanh(q k^T scale / softcap), before the masks ---
# Inputs of magnitude 3 give scaled scores of about 9 (up to ~40), so a cap of 4.5 saturates many of them: the tanh
# and its derivative 1 - tanh^2 are exercised over their whole range, not only where tanh(x) ~ x.

@pytest.mark.parametrize("Tq,Tk", [(67, 150), (130, 77), (9, 13)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_softcap_matches_reference(Tq, Tk, is_causal):
    q, k, v = qkv(2, 2, Tq, Tk, 32, torch.float32, scale=3.0)
    out = check_attention(q, k, v, is_causal=is_causal, softcap=4.5)
    # the cap changes the result (a test whose scores never reach the cap would pass without it)
    assert rel_error(out, attention_reference(q.double(), k.double(), v.double(), is_causal)) > 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_softcap_low_precision(dtype):
    check_attention(*qkv(1, 2, 70, 75, 64, dtype, scale=3.0), is_causal=True, softcap=4.5)


@pytest.mark.parametrize("kind", ["additive", "bool", "padding"])
def test_softcap_with_masks_and_dropout(kind):
    """Masks apply after the cap (an additive mask is added to the capped scores), and dropout's mask is the same."""
    B, H, Tq, Tk = 2, 2, 37, 70
    check_attention(*qkv(B, H, Tq, Tk, 16, torch.float32, scale=3.0), is_causal=kind == "bool", softcap=3.0,
                    **random_masks(B, H, Tq, Tk, kind))
    check_attention(*qkv(B, H, Tq, Tk, 16, torch.float32, scale=3.0), dropout_p=0.3, seed=5, softcap=3.0,
                    **random_masks(B, H, Tq, Tk, kind))


def test_softcap_order_matches_transformers_gemma2():
    """The same order as transformers' eager Gemma-2 attention: scale, cap, then the additive mask."""
    q, k, v = (t.double() for t in qkv(1, 2, 6, 9, 8, torch.float32, scale=3.0))
    mask = torch.randn(6, 9, dtype=torch.float64, device=q.device)
    cap, scale = 2.0, 0.3
    scores = torch.tanh(q @ k.transpose(-1, -2) * scale / cap) * cap + mask
    expected = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(attention_reference(q, k, v, scale=scale, attn_mask=mask, softcap=cap), expected)
    assert_close("out", attention(q.float(), k.float(), v.float(), scale=scale, attn_mask=mask.float(), softcap=cap),
                 expected)


@pytest.mark.parametrize("is_causal", [False, True])
def test_softcap_gqa(is_causal):
    B, H, H_kv, T = 2, 4, 2, 21
    mask = torch.rand(B, H, T, T, device=kernel_device()) > 0.3
    check_gqa(B, H, H_kv, T, T, 16, is_causal=is_causal, softcap=2.0, attn_mask=mask)
    check_gqa(1, 4, 1, 70, 45, 24, is_causal=is_causal, softcap=7.0)  # blocks on the interpreter too


def test_softcap_extreme_scores_stay_finite():
    """Scores of ~150 with a cap of 1: tanh saturates to exactly +-1 (its derivative to 0) without overflow."""
    check_attention(*qkv(1, 2, 80, 70, 32, torch.float32, scale=12.0), is_causal=True, softcap=1.0)


def test_softcap_zero_is_off():
    q, k, v = qkv(1, 2, 33, 40, 16, torch.float32)
    assert torch.equal(attention(q, k, v, softcap=0.0), attention(q, k, v))
    assert torch.equal(attention(q, k, v, softcap=0), attention(q, k, v))


@pytest.mark.parametrize("n_head,n_kv_head,T,scale,option", [
    (3, 3, 29, 3.0, dict(is_causal=True, softcap=2.5)), (4, 2, 29, 3.0, dict(dropout_p=0.2, softcap=2.5)),
    (3, 3, 37, 1.0, dict(is_causal=True, window=6)), (4, 2, 90, 1.0, dict(is_causal=True, window=20, dropout_p=0.2))])
def test_packed_with_softcap_or_window(n_head, n_kv_head, T, scale, option):
    """attention_packed with a soft-cap or a window, checked as without them (check_packed)."""
    qkv = (random_tensor((2, T, (n_head + 2 * n_kv_head) * 16), torch.float32) * scale).requires_grad_()
    check_packed(qkv, n_head, n_kv_head, dict(option, seed=3 if option.get("dropout_p") else None))


@pytest.mark.parametrize("option", [dict(softcap=2.0), dict(window=3), dict(window=2)])
def test_option_double_backward(option):
    """create_graph=True goes through attention_reference with the same soft-cap or window: gradients of
    gradients exact."""
    q, k, v = (random_tensor((1, 2, n, 8), torch.float32) * 3 for n in (6, 9, 9))
    qkv_ = random_tensor((1, 9, 3 * 2 * 8), torch.float32) * 3

    def penalty(fn, inputs, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
        grads = torch.autograd.grad(fn(*leaves).square().sum(), leaves, create_graph=True)
        assert all(g.requires_grad for g in grads)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)

    for fn, ref, inputs in [
        (lambda q, k, v: attention(q, k, v, True, **option),
         lambda q, k, v: attention_reference(q, k, v, True, **option), (q, k, v)),
        (lambda x: attention_packed(x, 2, is_causal=True, **option),
         lambda x: attention_packed_reference(x, 2, is_causal=True, **option), (qkv_,)),
    ]:
        for i, (ours, exact) in enumerate(zip(penalty(fn, inputs, torch.float32), penalty(ref, inputs, torch.float64))):
            assert_close(f"penalty gradient of input {i}", ours, exact, rtol=1e-4)


def test_softcap_bad_values_raise_before_launch(monkeypatch):
    for name in ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv"):
        monkeypatch.setattr(attention_module, name, NoLaunch())
    q, k, v = qkv(1, 2, 8, 8, 16, torch.float32)
    packed = random_tensor((1, 8, 3 * 2 * 16), torch.float32)
    for value, error in [(-0.5, ValueError), (float("inf"), ValueError), (float("-inf"), ValueError),
                         (float("nan"), ValueError), ("50", TypeError), (False, TypeError), (None, TypeError)]:
        for call in (lambda: attention(q, k, v, softcap=value), lambda: attention_packed(packed, 2, softcap=value),
                     lambda: attention_reference(q, k, v, softcap=value),
                     lambda: attention_packed_reference(packed, 2, softcap=value),
                     lambda: Attention(softcap=value)):
            with pytest.raises(error, match="softcap must be"):
                call()


# --- sliding window (Mistral's sliding_window): the query at aligned position a = i + Tk - Tq sees keys
# a - window < j <= a ---
# Interpreter blocks are 64 keys/queries (the fixture above): windows below, at and above the block size and the
# sequence, Tq != Tk both ways (Tq > Tk leaves rows empty), and packed short sequences (9, 13).

@pytest.mark.parametrize("Tq,Tk,window", [(100, 100, 7), (150, 150, 64), (100, 100, 100), (100, 100, 300),
                                          (67, 150, 20), (130, 77, 20), (9, 13, 3), (9, 13, 1)])
def test_window_matches_reference(Tq, Tk, window):
    check_attention(*qkv(2, 2, Tq, Tk, 24, torch.float32), is_causal=True, window=window)


def test_window_equals_dense_band_mask():
    """The window is the causal mask's band: the reference's window and a dense boolean band (True = attend) agree
    exactly, and the kernel with the window agrees with the kernel given that band as attn_mask."""
    Tq, Tk, window = 90, 140, 23
    q, k, v = qkv(1, 2, Tq, Tk, 16, torch.float32)
    a = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
    j = torch.arange(Tk, device=q.device)[None, :]
    band = (j <= a) & (j > a - window)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    expected = attention_reference(q64, k64, v64, attn_mask=band)
    assert torch.equal(attention_reference(q64, k64, v64, is_causal=True, window=window), expected)
    assert_close("out", attention(q, k, v, is_causal=True, window=window), expected, attention(q, k, v, attn_mask=band))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    windowed = torch.autograd.grad(attention(*leaves, is_causal=True, window=window).sum(), leaves)
    banded = torch.autograd.grad(attention(*leaves, attn_mask=band).sum(), leaves)
    for name, ours, theirs in zip(("dq", "dk", "dv"), windowed, banded):
        assert_close(name, ours, theirs.double(), theirs, rtol=2 * FP32_RTOL)


def test_window_one_is_the_diagonal():
    """window=1: each query sees its own aligned key only, so the output is that key's value (and Tq > Tk rows
    before the first key see nothing: 0)."""
    q, k, v = qkv(1, 2, 80, 70, 16, torch.float32)
    out = attention(q, k, v, is_causal=True, window=1)
    torch.testing.assert_close(out[:, :, 10:], v, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[:, :, :10], torch.zeros_like(out[:, :, :10]))
    check_attention(q, k, v, is_causal=True, window=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_window_low_precision(dtype):
    check_attention(*qkv(1, 2, 130, 100, 64, dtype), is_causal=True, window=33)


@pytest.mark.parametrize("B,H,H_kv,Tq,Tk,window", [(1, 4, 1, 70, 45, 9), (2, 6, 3, 9, 13, 4), (1, 4, 2, 150, 150, 30)])
def test_window_gqa(B, H, H_kv, Tq, Tk, window):
    check_gqa(B, H, H_kv, Tq, Tk, 16, is_causal=True, window=window)


@pytest.mark.parametrize("kind", ["additive", "bool", "padding"])
def test_window_with_masks(kind):
    B, H, Tq, Tk = 2, 2, 75, 101
    check_attention(*qkv(B, H, Tq, Tk, 16, torch.float32), is_causal=True, window=30,
                    **random_masks(B, H, Tq, Tk, kind))


@pytest.mark.parametrize("B,H,Tq,Tk", [(1, 2, 70, 100), (3, 3, 6, 7)])
def test_window_with_dropout_and_softcap(B, H, Tq, Tk):
    """Dropout's keep bits stay those of the full [Tq, Tk] index (the skipped blocks draw none), and the cap comes
    before the window's mask."""
    kpm = torch.rand(B, Tk, device=kernel_device()) > 0.8
    check_attention(*qkv(B, H, Tq, Tk, 16, torch.float32), is_causal=True, window=17, dropout_p=0.3, seed=99,
                    key_padding_mask=kpm)
    check_attention(*qkv(B, H, Tq, Tk, 16, torch.float32, scale=3.0), is_causal=True, window=17, softcap=4.5)
    check_attention(*qkv(B, H, Tq, Tk, 16, torch.float32, scale=3.0), is_causal=True, window=5, softcap=2.0,
                    dropout_p=0.2, seed=4)


@pytest.mark.skipif(kernel_device().type == "cuda", reason="interpreter tiles (64 rows and keys here)")
@pytest.mark.parametrize("H_kv", [2, 1])
def test_window_skips_blocks_outside_it(H_kv):
    """The kernels never load a block that lies wholly outside every window of the blocks it meets: NaN there
    would reach the results through P @ V (0 * NaN) if it were loaded, even masked. T = 200 in 64-row blocks,
    window 5. Keys 0-59 are seen by queries 0-63 only, so the forward and dQ of query blocks 2 and 3 (rows
    128-199) skip key block 0; queries 128-199 see keys from 124 on, so dK/dV of key block 0 (keys 0-63, last
    seen by query 67) skips query blocks 2 and 3."""
    T, window = 200, 5
    q, k, v = (random_tensor((1, h, T, 16), torch.float32) for h in (2, H_kv, H_kv))
    grad_out = random_tensor((1, 2, T, 16), torch.float32)
    ins = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*ins, is_causal=True, window=window)
    ref_grads = torch.autograd.grad(ref, ins, grad_out.double())

    def run(q, k, v):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, is_causal=True, window=window)
        return (out, *torch.autograd.grad(out, leaves, grad_out))

    poisoned = [k.clone(), v.clone()]
    for t in poisoned:
        t[:, :, :60] = float("nan")
    out, dq, _, _ = run(q, *poisoned)
    assert out[:, :, :64].isnan().any()  # the poison is there to be found
    assert_close("out", out[:, :, 128:], ref[:, :, 128:])
    assert_close("dq", dq[:, :, 128:], ref_grads[0][:, :, 128:])
    poisoned_q = q.clone()
    poisoned_q[:, :, 128:] = float("nan")
    _, _, dk, dv = run(poisoned_q, k, v)
    assert dk[:, :, 64:].isnan().any()
    assert_close("dk", dk[:, :, :64], ref_grads[1][:, :, :64])
    assert_close("dv", dv[:, :, :64], ref_grads[2][:, :, :64])


def test_window_module_and_function():
    q, k, v = qkv(1, 2, 70, 70, 16, torch.float32)
    layer = Attention(is_causal=True, window=9)
    assert "window=9" in repr(layer) and "window" not in repr(Attention(is_causal=True))
    expected = attention(q, k, v, is_causal=True, window=9)
    assert torch.equal(layer(q, k, v), expected)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    direct = AttentionFunction.apply(*leaves, True, 0.0, 0.25, None, None, None, 0.0, 9)  # pre-validated arguments
    assert direct.grad_fn.name() == "AttentionFunctionBackward"
    assert torch.equal(direct, expected)
    torch.autograd.grad(direct.sum(), leaves)  # eleven gradients for eleven arguments


def test_window_bad_values_raise_before_launch(monkeypatch):
    for name in ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv"):
        monkeypatch.setattr(attention_module, name, NoLaunch())
    q, k, v = qkv(1, 2, 8, 8, 16, torch.float32)
    packed = random_tensor((1, 8, 3 * 2 * 16), torch.float32)
    for value, is_causal, error, message in [
            (0, True, ValueError, "window must be None or an int >= 1"),
            (-3, True, ValueError, "window must be None or an int >= 1"),
            (2.0, True, TypeError, "window must be None or an int"), ("4", True, TypeError, "window must be"),
            (True, True, TypeError, "window must be None or an int"),
            (4, False, ValueError, "window=4 needs is_causal=True")]:
        for call in (lambda: attention(q, k, v, is_causal, window=value),
                     lambda: attention_packed(packed, 2, is_causal=is_causal, window=value),
                     lambda: attention_reference(q, k, v, is_causal, window=value),
                     lambda: attention_packed_reference(packed, 2, is_causal=is_causal, window=value),
                     lambda: Attention(is_causal=is_causal, window=value)):
            with pytest.raises(error, match=message):
                call()
