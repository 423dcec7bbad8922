"""Dropout: the mask against a plain-PyTorch Philox, statistics, gradients, seeding, layouts, bad input."""
import importlib
import math

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers.ops import NoLaunch
from triformer import Dropout, TritonDropout, dropout, dropout_reference
from triformer.dropout import dropout_keep, dropout_keep_reference, philox4x32_reference
from triformer.testing import assert_close, kernel_device, poison_, random_tensor

# The module, not the function triformer.dropout that shadows it as a package attribute.
do = importlib.import_module("triformer.dropout")
DEV = kernel_device()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def kept_scale(p: float) -> float:
    return 1.0 / (1.0 - p)


def check_against_reference(x, p, seed):
    """Ours vs the reference: identical mask, values within the dtype's tolerance. Returns (y, kept)."""
    y = dropout(x, p, seed=seed)
    ref64 = dropout_reference(x.to(torch.float64), p, seed=seed)
    peer = dropout_reference(x, p, seed=seed)
    kept = dropout_reference(torch.ones(x.shape, dtype=torch.float64, device=x.device), p, seed=seed) != 0
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    assert torch.equal(y[~kept], torch.zeros_like(y[~kept]))
    assert_close("y", y, ref64, peer)
    return y, kept


def test_philox_reference_known_answers():
    """Random123's published Philox4x32-10 test vectors, so the reference is the standard generator."""
    def run(ctr, key):
        words = philox4x32_reference(*(torch.tensor([c]) for c in ctr), *key)
        return [int(w) for w in words]

    assert run((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert run((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert run((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_and_values_match_reference(dtype, p):
    x = random_tensor((37, 1031), dtype)  # not a multiple of 4 or of the block: ragged quads and tail
    y, kept = check_against_reference(x, p, seed=1234)
    # each kept element is x / (1 - p) computed in fp32 and rounded once: half an ulp in fp32, one in
    # fp16/bf16 (the interpreter truncates to bf16 where a GPU rounds to nearest)
    exact = x.double() * float(torch.tensor(kept_scale(p), dtype=torch.float32))
    ulps = (y.double() - exact).abs() / (exact.abs() * torch.finfo(dtype).eps)
    assert ulps[kept].max() <= (0.5 if dtype == torch.float32 else 1.0)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_is_binomial(p):
    """Kept count within 4.5 standard deviations of n (1 - p), overall and for each of the four Philox words
    (each word feeds every fourth element), and independent between two seeds."""
    n = 3 * (1 << 16) + 123
    x = torch.ones(n, device=DEV)
    kept = dropout(x, p, seed=99) != 0
    other = dropout(x, p, seed=100) != 0

    def assert_binomial(count, trials, prob):
        sigma = math.sqrt(trials * prob * (1 - prob))
        assert abs(count - trials * prob) <= 4.5 * sigma, (count, trials * prob, sigma)

    assert_binomial(int(kept.sum()), n, 1 - p)
    for lane in range(4):
        assert_binomial(int(kept[lane::4].sum()), len(kept[lane::4]), 1 - p)
    assert_binomial(int((kept & other).sum()), n, (1 - p) ** 2)
    assert_binomial(int((kept[1:] & kept[:-1]).sum()), n - 1, (1 - p) ** 2)  # neighbours independent


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [7, None])
def test_gradient_is_mask_times_scale_times_dy(dtype, seed):
    """The backward regenerates the mask; read the mask off the forward output (x has no zeros)."""
    p = 0.3
    x = random_tensor((45, 301), dtype).requires_grad_()
    y = dropout(x, p, seed=seed)
    dy = random_tensor(x.shape, dtype)
    y.backward(dy)
    mask = y.detach() != 0
    assert 0 < mask.float().mean() < 1
    expected64 = torch.where(mask, dy.double() * kept_scale(p), 0.0)
    peer = torch.where(mask, dy * kept_scale(p), torch.zeros((), dtype=dtype, device=DEV))
    assert x.grad.dtype == dtype
    assert_close("dx", x.grad, expected64, peer)
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter evaluates inf * 0 unused
@pytest.mark.parametrize("p", [0.0, 1.0])
def test_p_zero_is_identity_and_p_one_is_zero(p):
    x = random_tensor((13, 29), torch.float32)
    x[0, 0] = float("inf")
    x[0, 1] = float("nan")
    xg = x.clone().requires_grad_()
    dy = random_tensor(x.shape, torch.float32)
    y = dropout(xg, p)
    y.backward(dy)
    via_function = TritonDropout.apply(x, p, 5)  # the Function launches even for p == 0
    if p == 0.0:
        assert y is xg
        torch.testing.assert_close(xg.grad, dy, rtol=0, atol=0)
        torch.testing.assert_close(via_function, x, rtol=0, atol=0, equal_nan=True)
    else:
        assert torch.equal(y, torch.zeros_like(x))  # dropped inf/NaN are 0 too
        assert torch.equal(xg.grad, torch.zeros_like(x))
        assert torch.equal(via_function, torch.zeros_like(x))


def test_seeds_reproduce_and_differ():
    x = random_tensor((50, 77), torch.float32)
    a = dropout(x, 0.5, seed=42)
    assert torch.equal(a, dropout(x, 0.5, seed=42))
    assert torch.equal(a, dropout(x, 0.5, seed=torch.tensor(42)))
    assert torch.equal(a, dropout(x, 0.5, seed=torch.tensor(42, dtype=torch.int32)))
    different = (dropout(x, 0.5, seed=43) != 0) != (a != 0)
    assert 0.4 < different.float().mean() < 0.6  # independent masks disagree on half the elements
    # the seed's high 32 bits are part of the key
    assert not torch.equal(dropout(x, 0.5, seed=42 + 2**32), a)
    high = dropout(x, 0.5, seed=2**63 - 1)
    assert torch.equal(high != 0, dropout_reference(x, 0.5, seed=2**63 - 1) != 0)


def test_torch_manual_seed_reproduces_default_seeds():
    x = random_tensor((31, 40), torch.float32)
    torch.manual_seed(123)
    a = dropout(x, 0.5)
    b = dropout(x, 0.5)
    torch.manual_seed(123)
    assert torch.equal(dropout(x, 0.5), a)
    assert torch.equal(dropout(x, 0.5), b)
    assert not torch.equal(a, b)  # a fresh seed per call
    torch.manual_seed(123)
    assert torch.equal(dropout_reference(x, 0.5) != 0, a != 0)


@pytest.mark.parametrize("shape, kind", [((67, 45), "transposed"), ((5, 7, 33), "permuted"), ((9, 130), "sliced")])
def test_non_contiguous_input_gets_the_mask_of_its_contiguous_copy(shape, kind):
    if kind == "transposed":  # strided kernel path
        x = random_tensor(shape[::-1], torch.float32).t()
    elif kind == "permuted":  # leading dims cannot merge: copied first
        x = random_tensor(shape, torch.float32, contiguous=False)
    else:
        x = random_tensor(shape, torch.float32, contiguous=False)
    assert not x.is_contiguous()
    x = x.detach().requires_grad_()
    y = dropout(x, 0.4, seed=3)
    assert torch.equal(y, dropout(x.detach().contiguous(), 0.4, seed=3))
    dy = random_tensor(shape, torch.float32, contiguous=False)
    y.backward(dy)
    torch.testing.assert_close(x.grad, dropout(dy.contiguous(), 0.4, seed=3), rtol=0, atol=0)


def test_launcher_fills_poisoned_output():
    x = random_tensor((3, 1 << 15), torch.float32, contiguous=False)  # > one interpreter block, strided
    y = poison_(torch.empty(x.shape, device=DEV))
    do._launch(x, y, torch.tensor(11, device=x.device), 0.25)
    assert torch.equal(y, dropout_reference(x, 0.25, seed=11))


def test_zero_dim_and_empty():
    x = random_tensor((), torch.float32)
    assert torch.equal(dropout(x, 0.5, seed=1), dropout_reference(x, 0.5, seed=1))
    e = torch.randn(0, 5, device=DEV, requires_grad=True)
    y = dropout(e, 0.5)
    y.sum().backward()
    assert y.shape == (0, 5) and e.grad.shape == (0, 5)


def test_module_respects_train_and_eval():
    m = Dropout(0.5)
    x = random_tensor((20, 30), torch.float32)
    a, b = m(x), m(x)
    assert (a == 0).any() and not torch.equal(a, b)
    m.eval()
    assert m(x) is x
    assert dropout(x, 0.5, training=False) is x
    assert "p=0.5" in repr(m)
    with pytest.raises(ValueError, match="p must be in"):
        Dropout(1.5)


@triton.jit
def _keep_kernel(offsets_ptr, out_ptr, n, seed, p, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offsets = tl.load(offsets_ptr + i, mask=i < n)
    tl.store(out_ptr + i, dropout_keep(seed, offsets, p).to(tl.int8), mask=i < n)


@pytest.mark.parametrize("offset_dtype", [torch.int32, torch.int64])
def test_dropout_keep_helper_matches_reference_and_op(offset_dtype):
    """The in-kernel helper gives the op's mask at any (also > 2**32, for int64) logical index."""
    g = torch.Generator().manual_seed(0)
    high = 2**31 - 1 if offset_dtype == torch.int32 else 2**40
    offsets = torch.randint(0, high, (1000,), generator=g, dtype=torch.int64)
    offsets[:300] = torch.arange(300)
    offsets = offsets.to(device=DEV, dtype=offset_dtype)
    out = torch.empty(1000, dtype=torch.int8, device=DEV)
    seed, p = 2**35 + 17, 0.3
    _keep_kernel[(triton.cdiv(1000, 512),)](offsets, out, 1000, seed, p, BLOCK=512)
    assert torch.equal(out.bool().cpu(), dropout_keep_reference(offsets.cpu(), seed, p))
    x = random_tensor((300,), torch.float32)
    assert torch.equal(out[:300].bool(), dropout(x, p, seed=seed) != 0)


def test_torch_compile_fullgraph_matches_eager():
    def f(x, seed):
        return (dropout(x * 2, 0.25, seed=seed) ** 2).sum()

    x = random_tensor((17, 23), torch.float32).requires_grad_()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for seed in [7, None]:  # None: the seed is drawn inside the graph from torch's generator
        torch.manual_seed(5)
        out_c = compiled(x, seed)
        (g_c,) = torch.autograd.grad(out_c, x)
        torch.manual_seed(5)
        out_e = f(x, seed)
        (g_e,) = torch.autograd.grad(out_e, x)
        torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
        torch.testing.assert_close(g_c, g_e, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(x="x"), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.ones(3, dtype=torch.int64)), TypeError, "x must be float32"),
    (dict(p=-0.1), ValueError, "p must be in"),
    (dict(p=1.5), ValueError, "p must be in"),
    (dict(p=float("nan")), ValueError, "p must be in"),
    (dict(p="0.5"), TypeError, "p must be a real number"),
    (dict(p=True), TypeError, "p must be a real number"),
    (dict(training="yes"), TypeError, "training must be a bool"),
    (dict(seed=-1), ValueError, "seed must be in"),
    (dict(seed=2**63), ValueError, "seed must be in"),
    (dict(seed=1.5), TypeError, "seed must be None, an int"),
    (dict(seed=torch.tensor([1, 2])), TypeError, "0-dim integer tensor"),
    (dict(seed=torch.tensor(1.0)), TypeError, "0-dim integer tensor"),
    (dict(seed=torch.tensor(-3)), ValueError, "seed must be in"),
], ids=["str", "int", "p_neg", "p_big", "p_nan", "p_str", "p_bool", "training", "seed_neg", "seed_big",
        "seed_float", "seed_vector", "seed_float_tensor", "seed_neg_tensor"])
def test_bad_input_raises_before_launch(monkeypatch, kwargs, error, words):
    monkeypatch.setattr(do, "_dropout_kernel", NoLaunch())
    args = dict(x=random_tensor((4, 5), torch.float32), p=0.5, training=True, seed=None) | kwargs
    with pytest.raises(error, match=words):
        dropout(**args)
    if "training" not in kwargs:
        with pytest.raises(error, match=words):
            TritonDropout.apply(args["x"], args["p"], args["seed"])


@given(
    shape=st.lists(st.integers(1, 70), min_size=1, max_size=3).map(tuple),
    contiguous=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    p=st.sampled_from([0.0, 1e-6, 0.1, 0.5, 0.77, 0.999, 1.0]),
    seed=st.integers(0, 2**63 - 1),
    extremes=st.sampled_from(["none", "inf", "huge", "tiny"]),
)
def test_property_random_shapes_strides_dtypes_extremes(shape, contiguous, dtype, p, seed, extremes):
    g = torch.Generator().manual_seed(seed % 2**31)
    contiguous = contiguous or shape[-1] == 1  # a one-column view is contiguous anyway
    x = random_tensor(shape, dtype, contiguous=contiguous, generator=g).requires_grad_()
    with torch.no_grad():
        if extremes == "inf":
            x[torch.rand(shape, generator=g).to(DEV) < 0.1] = float("inf")
            x[torch.rand(shape, generator=g).to(DEV) < 0.1] = float("-inf")
        elif extremes == "huge":
            x.mul_(torch.finfo(dtype).max / 2**14)  # kept values (x / (1 - p) <= 1000 x) stay finite
        elif extremes == "tiny":  # the smallest normal numbers (subnormals are platform-dependent)
            x.copy_(x.sign() * x.abs().clamp(min=1) * torch.finfo(dtype).tiny)
    y = TritonDropout.apply(x, p, seed)
    check = x.detach()
    ref64 = dropout_reference(check.to(torch.float64), p, seed=seed)
    assert torch.equal(y != 0, ref64 != 0)
    assert_close("y", y, ref64, dropout_reference(check, p, seed=seed))
    dy = random_tensor(shape, dtype, contiguous=not contiguous or shape[-1] == 1, generator=g)
    y.backward(dy)
    kept = dropout_reference(torch.ones(shape, dtype=torch.float64, device=DEV), p, seed=seed) != 0
    assert_close("dx", x.grad, torch.where(kept, dy.double() * (kept_scale(p) if p < 1 else 0.0), 0.0),
                 dropout_reference(dy, p, seed=seed))
