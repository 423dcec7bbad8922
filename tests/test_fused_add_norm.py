"""Fused residual add + LayerNorm / RMSNorm against the float64 reference, with and without dropout on x.
Gradients reach x and residual from both outputs."""
import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers.norms import BF16, F16, F32, LOOP_BLOCK, SHAPE, column_loop, torch_layer_norm, torch_rms_norm
from tests.helpers.ops import NoLaunch, check_op
from triformer import dropout, dropout_reference
from triformer.fused_add_norm import (AddLayerNorm, AddLayerNormFunction, AddRMSNorm, AddRMSNormFunction,
                                      add_layer_norm, add_layer_norm_reference, add_rms_norm, add_rms_norm_reference)
from triformer.layernorm import LayerNorm
from triformer.rmsnorm import RMSNorm
from triformer.testing import kernel_device, poisoned_empty, random_tensor


def torch_add_layer_norm(x, r, w, b, eps=1e-5, dropout_p=0.0, seed=None):
    s = dropout_reference(x, dropout_p, seed=seed) + r
    return s, torch_layer_norm(s, w, b, eps)


def torch_add_rms_norm(x, r, w, eps=1e-6, dropout_p=0.0, seed=None):
    s = dropout_reference(x, dropout_p, seed=seed) + r
    return s, torch_rms_norm(s, w, eps)


# (triformer op, float64 reference, PyTorch peer, number of parameters, default eps)
OPS = {
    "layer": (add_layer_norm, add_layer_norm_reference, torch_add_layer_norm, 2, 1e-5),
    "rms": (add_rms_norm, add_rms_norm_reference, torch_add_rms_norm, 1, 1e-6),
}


def add_norm_inputs(kind, shape, dtype, param_dtype, contiguous, params=True, scale=1.0):
    x = random_tensor(shape, dtype, contiguous=contiguous, scale=scale)
    # The residual stream is typically larger than the branch output added to it, and laid out differently.
    r = random_tensor(shape, dtype, contiguous=not contiguous or shape[-1] == 1, scale=4 * scale)
    return [x, r] + [random_tensor(shape[-1:], param_dtype) if params else None for _ in range(OPS[kind][3])]


def check_add_norm(kind, inputs, contiguous, **drop):
    """``drop``: dropout_p and seed, passed alike to the op, the float64 reference and the peer."""
    op, ref, peer, _, eps = OPS[kind]
    returned = []

    def ours(*args):
        returned[:] = op(*args, eps=eps, **drop)
        return tuple(returned)

    def ref_of_returned_sum(x, r, *params):
        # The op normalizes the sum it returns, i.e. rounded to the inputs' dtype (checked against the exact
        # sum as output 0). Shifting the float64 residual onto that value, invisibly to autograd, makes the
        # reference normalize the same numbers.
        s = ref(x, r, *params, eps=eps, **drop)[0]
        return ref(x, r + (returned[0].double() - s).detach(), *params, eps=eps, **drop)

    check_op(f"add_{kind}_norm", ours, ref_of_returned_sum, lambda *a: peer(*a, eps=eps, **drop), inputs, contiguous)


@pytest.mark.parametrize("block_n", [None, LOOP_BLOCK], ids=["one_tile", "column_loop"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("dtype,param_dtype", [(F32, F32), (BF16, BF16), (F16, F32)],
                         ids=["fp32", "bf16", "fp16_fp32params"])
@pytest.mark.parametrize("kind", OPS)
def test_add_norm_matches_reference(kind, dtype, param_dtype, contiguous, block_n):
    with column_loop(block_n):
        check_add_norm(kind, add_norm_inputs(kind, SHAPE, dtype, param_dtype, contiguous), contiguous)


@pytest.mark.parametrize("kind", OPS)
def test_add_norm_without_parameters(kind):
    check_add_norm(kind, add_norm_inputs(kind, SHAPE, F32, F32, False, params=False), False)


@pytest.mark.parametrize("dropped", [False, True])
@pytest.mark.parametrize("used", ["sum", "normed"])
@pytest.mark.parametrize("kind", OPS)
def test_add_norm_gradient_from_one_output(kind, used, dropped):
    # The other output's gradient arrives as None; x and residual still each get their own gradient tensor.
    op, ref = OPS[kind][:2]
    drop = DROP if dropped else {}
    inputs = add_norm_inputs(kind, (45, 300), F32, F32, contiguous=False)
    seed = random_tensor((45, 300), F32, contiguous=False)
    pick = 0 if used == "sum" else 1
    leaves = [t.detach().requires_grad_() for t in inputs]
    with poisoned_empty():
        (op(*leaves, **drop)[pick] * seed).sum().backward()
    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    (ref(*leaves64, **drop)[pick] * seed.double()).sum().backward()
    for ours, expected in zip(leaves, leaves64):
        if expected.grad is None or not expected.grad.any():  # parameters get no gradient from the sum
            assert ours.grad is None or not ours.grad.any()
        else:
            torch.testing.assert_close(ours.grad, expected.grad.float(), rtol=1e-5, atol=1e-5 if dropped else 1e-6)
    x, r = leaves[:2]
    if not dropped:  # with dropout x's gradient is the residual's, masked
        assert torch.equal(x.grad, r.grad) and x.grad.data_ptr() != r.grad.data_ptr()


@pytest.mark.parametrize("kind", OPS)
def test_add_norm_wide_rows(kind):
    inputs = add_norm_inputs(kind, (3, 32773), BF16, F32, contiguous=False)
    with column_loop(4096):
        check_add_norm(kind, inputs, contiguous=False)


@pytest.mark.parametrize("kind", OPS)
def test_add_norm_modules(kind):
    """AddLayerNorm / AddRMSNorm: the norm module's constructor, parameters and state dict, with forward(x, residual)
    returning what the functional form does; RMSNorm's eps=None (the dtype's epsilon) reaches add_rms_norm too."""
    d = kernel_device()
    module, plain = (AddLayerNorm, LayerNorm) if kind == "layer" else (AddRMSNorm, RMSNorm)
    op, ref = OPS[kind][:2]
    ours, norm = module(300, eps=1e-4, device=d), plain(300, device=d)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(random_tensor(p.shape, F32))
    ours.load_state_dict(norm.state_dict())
    assert ours.state_dict().keys() == norm.state_dict().keys() and isinstance(ours, plain)
    x, r = (random_tensor((7, 300), F32) for _ in range(2))
    params = [p for p in (ours.weight, getattr(ours, "bias", None)) if p is not None]
    for got, expected in zip(ours(x, r), op(x, r, *params, 1e-4)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if kind == "rms":
        default = AddRMSNorm(300, eps=None, elementwise_affine=False, device=d)
        for got, expected in zip(default(x, r), ref(x.double(), r.double(), None, torch.finfo(F32).eps)):
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="last dimension to be 300"):
        ours(x[:, :299], r[:, :299])


def test_add_norm_rejects_bad_input():
    d = kernel_device()
    x, w = torch.randn(4, 8, device=d), torch.randn(8, device=d)
    with pytest.raises(ValueError, match=r"residual must have x's shape \(4, 8\)"):
        add_layer_norm(x, torch.randn(4, 9, device=d), w, w)
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        add_rms_norm(x, torch.randn(4, 8, device=d, dtype=torch.bfloat16), w)
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        add_rms_norm(x, None, w)
    with pytest.raises(ValueError, match="bias must have shape"):
        add_layer_norm(x, x, w, torch.randn(9, device=d))
    with pytest.raises(ValueError, match="share a device"):
        add_rms_norm(x, torch.randn(4, 8, device="meta"), w)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("kind", OPS)
def test_add_norm_compiles_without_graph_break(kind, dropout_p):
    """fullgraph through both outputs' gradients, as eager; with dropout a fixed seed makes the masks agree."""
    op = OPS[kind][0]
    inputs = add_norm_inputs(kind, (37, 300), F32, F32, contiguous=False)
    weights = [random_tensor((37, 300), F32) for _ in range(2)]
    drop = dict(dropout_p=dropout_p, seed=torch.tensor(77)) if dropout_p else {}

    def loss(*args):
        s, y = op(*args, **drop)
        return (s * weights[0]).sum() + (y * weights[1]).sum()

    results = []
    for f in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = f(*leaves)
        results.append([out, *torch.autograd.grad(out, leaves)])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)
    function = AddLayerNormFunction if kind == "layer" else AddRMSNormFunction
    got = op(*[t.requires_grad_() for t in inputs], dropout_p=dropout_p)[1].grad_fn
    assert type(got).__name__ == function.__name__ + "Backward"


@given(
    kind=st.sampled_from(list(OPS)),
    lead=st.sampled_from([(), (2,)]),
    rows=st.integers(1, 60),
    cols=st.integers(1, 200),
    dtypes=st.sampled_from([(F32, F32), (F16, F16), (BF16, BF16), (BF16, F32)]),
    contiguous=st.booleans(),
    params=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    block_n=st.sampled_from([None, 16]),
)
def test_add_norm_property(kind, lead, rows, cols, dtypes, contiguous, params, scale, block_n):
    contiguous = contiguous or cols == 1  # random_tensor cannot stride some one-column shapes, e.g. (3, 1, 1)
    inputs = add_norm_inputs(kind, lead + (rows, cols), *dtypes, contiguous, params, scale)
    with column_loop(block_n):
        check_add_norm(kind, inputs, contiguous)


# ------------------------------------------------------------------------------------------ dropout on x
DROP = dict(dropout_p=0.3, seed=1234)


@pytest.mark.parametrize("params", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", OPS)
def test_add_norm_dropout_matches_reference(kind, dtype, contiguous, params):
    """Forward and every gradient with dropout, against the float64 reference (the same mask from the same seed);
    odd rows and columns, three row tiles, strided inputs; x's gradient differs from the residual's here."""
    inputs = add_norm_inputs(kind, (3, 71, 131), dtype, dtype, contiguous, params)
    check_add_norm(kind, inputs, contiguous, **DROP)


@pytest.mark.parametrize("kind", OPS)
def test_add_norm_dropout_column_loop(kind):
    inputs = add_norm_inputs(kind, (5, 300), BF16, F32, contiguous=False)
    with column_loop(LOOP_BLOCK):
        check_add_norm(kind, inputs, False, **DROP)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("kind", OPS)
def test_add_norm_dropout_mask_is_dropouts(kind, contiguous):
    """The sum is exactly residual + triformer.dropout(x) with the same seed (mask, scale and rounding), and x's
    gradient is exactly dropout's backward of the residual's (the sum's) gradient."""
    op = OPS[kind][0]
    x, r, *params = add_norm_inputs(kind, (4, 33, 77), BF16, F32, contiguous)
    x = x.requires_grad_()
    r = r.requires_grad_()
    s, y = op(x, r, *params, **DROP)
    dropped = dropout(x.detach(), DROP["dropout_p"], seed=DROP["seed"])
    assert torch.equal(s, dropped + r.detach())
    assert 0.2 < (dropped == 0).float().mean() < 0.4
    gx, gr = torch.autograd.grad((s, y), (x, r), (random_tensor(s.shape, BF16), random_tensor(y.shape, BF16)))
    assert torch.equal(gx, dropout(gr, DROP["dropout_p"], seed=DROP["seed"]))
    # a seed tensor gives the same mask; another seed another one
    assert torch.equal(op(x, r, *params, dropout_p=0.3, seed=torch.tensor(1234))[0], s)
    assert not torch.equal(op(x, r, *params, dropout_p=0.3, seed=1235)[0], s)


@pytest.mark.parametrize("kind", OPS)
def test_add_norm_dropout_seed_none_draws_like_dropout(kind):
    """seed=None draws from torch's generator as triformer.dropout and the reference do; dropout_p=0 draws
    nothing and returns exactly the no-dropout result."""
    op, ref = OPS[kind][:2]
    x, r, *params = add_norm_inputs(kind, (6, 40), F32, F32, contiguous=True)
    torch.manual_seed(3)
    s = op(x, r, *params, dropout_p=0.5)[0]
    torch.manual_seed(3)
    assert torch.equal(s, dropout(x, 0.5) + r)
    torch.manual_seed(3)
    torch.testing.assert_close(ref(x, r, *params, dropout_p=0.5)[0], s)
    state = torch.get_rng_state()
    for got, expected in zip(op(x, r, *params, dropout_p=0.0), op(x, r, *params)):
        assert torch.equal(got, expected)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("kind", OPS)
def test_add_norm_dropout_module_drops_in_training_only(kind):
    d = kernel_device()
    module = (AddLayerNorm if kind == "layer" else AddRMSNorm)(40, device=d)
    x, r = (random_tensor((6, 40), F32) for _ in range(2))
    torch.manual_seed(5)
    trained = module(x, r, dropout_p=0.4)
    torch.manual_seed(5)
    expected = OPS[kind][0](x, r, *[p for p in module.parameters()], dropout_p=0.4)
    for got, want in zip(trained, expected):
        assert torch.equal(got, want)
    module.eval()
    for got, want in zip(module(x, r, dropout_p=0.4), module(x, r)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        module(x, r, dropout_p=1.5)


@pytest.mark.parametrize("kind", OPS)
def test_add_norm_dropout_rejects_bad_input(kind, monkeypatch):
    op, ref = OPS[kind][:2]
    d = kernel_device()
    x, w = torch.randn(4, 8, device=d), torch.randn(8, device=d)
    cases = [(dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
             (dict(dropout_p=-0.1), ValueError, "dropout_p must be in"),
             (dict(dropout_p=float("nan")), ValueError, "dropout_p must be in"),
             (dict(dropout_p="0.1"), TypeError, "dropout_p must be a float in \\[0, 1\\), got str"),
             (dict(dropout_p=True), TypeError, "dropout_p must be a float"),
             (dict(dropout_p=0.1, seed=-1), ValueError, "seed must be in"),
             (dict(dropout_p=0.1, seed=1.5), TypeError, "seed must be None, an int"),
             (dict(dropout_p=0.1, seed=torch.zeros(2, dtype=torch.int64)), TypeError, "seed tensor must be")]
    monkeypatch.setattr(importlib.import_module("triformer.layernorm"), "_norm_fwd_kernel", NoLaunch())
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            op(x, x, w, **kwargs)
        if "seed" not in kwargs:
            with pytest.raises(error, match=message):
                ref(x.double(), x.double(), w.double(), **kwargs)


@given(
    kind=st.sampled_from(list(OPS)),
    rows=st.integers(1, 40),
    cols=st.integers(1, 150),
    dtypes=st.sampled_from([(F32, F32), (BF16, BF16), (BF16, F32)]),
    contiguous=st.booleans(),
    params=st.booleans(),
    p=st.sampled_from([0.0, 0.1, 0.5, 0.9]),
    seed=st.integers(0, 2**63 - 1),
)
def test_add_norm_dropout_property(kind, rows, cols, dtypes, contiguous, params, p, seed):
    contiguous = contiguous or cols == 1
    inputs = add_norm_inputs(kind, (rows, cols), *dtypes, contiguous, params)
    check_add_norm(kind, inputs, contiguous, dropout_p=p, seed=seed)
