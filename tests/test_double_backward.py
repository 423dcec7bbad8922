"""Gradients of gradients (triformer._double_backward): every op either differentiates its gradient correctly
or raises a RuntimeError saying it cannot, never a gradient without its second-order terms.

Each case computes a gradient penalty ``loss + sum((g ** 2).sum())`` with ``g = autograd.grad(loss, inputs,
create_graph=True)`` and compares the gradients of the penalty with respect to every input (weights
included) against the same computation on the op's float64 reference. ``loss`` is quadratic in the outputs,
so the incoming gradient depends on the inputs as well.
"""
import contextlib
import importlib
import warnings

import pytest
import torch

from triformer import (attention, attention_reference, cross_entropy, cross_entropy_reference, dropout,
                       dropout_reference, gelu, gelu_linear, gelu_linear_reference, gelu_reference, geglu,
                       geglu_reference, glu_linear, glu_linear_reference, layer_norm, layer_norm_reference,
                       linear_cross_entropy, linear_cross_entropy_reference, rms_norm, rms_norm_reference,
                       softmax, softmax_reference, swiglu, swiglu_reference)
from triformer.fused_add_norm import add_layer_norm, add_layer_norm_reference, add_rms_norm, add_rms_norm_reference
from triformer.rope import apply_rope, apply_rope_reference, rope_cos_sin
from triformer.testing import assert_close, random_tensor

F32 = torch.float32
SECOND_ORDER_RTOL = 1e-4
IGNORE = -100


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def penalty_gradients(fn, inputs, dtype=None, create_graph=True):
    """(first-order gradients, gradients of the penalty) of ``fn`` at copies of ``inputs`` cast to ``dtype``."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = _gen(1)
    loss = 0
    for o in outs:
        c1, c2 = (torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for _ in range(2))
        loss = loss + (c1 * o + c2 * o * o).sum()
    grads = torch.autograd.grad(loss, leaves, create_graph=create_graph)
    if not create_graph:
        return grads, None
    penalty = loss + sum((g ** 2).sum() for g in grads)
    return grads, torch.autograd.grad(penalty, leaves)


def _norm_inputs(contiguous=True, residual=False, bias=True):
    gen = _gen()
    x = random_tensor((3, 5, 37), F32, contiguous=contiguous, generator=gen)
    out = [x]
    if residual:
        out.append(random_tensor((3, 5, 37), F32, contiguous=contiguous, generator=gen))
    out.append(random_tensor((37,), F32, generator=gen))
    if bias:
        out.append(random_tensor((37,), F32, generator=gen))
    return out


def _targets(n, vocab, gen):
    t = torch.randint(0, vocab, (n,), generator=gen)
    t[1] = IGNORE
    return t.to(random_tensor((1,), F32).device)


def _cases():
    """name -> (triformer fn, reference fn, make inputs); all inputs are differentiated."""
    gen = _gen(2)
    cos, sin = rope_cos_sin(12, 8)
    seq_cos, seq_sin = (t.expand(2, -1, -1).contiguous() for t in rope_cos_sin(9, 8, offset=3))
    lce_targets = _targets(6, 11, gen)
    float_mask = random_tensor((5, 7), F32, generator=gen)
    kpm = torch.zeros(1, 7, dtype=torch.bool, device=float_mask.device)
    kpm[0, 5:] = True
    cases = {
        "layer_norm": (layer_norm, layer_norm_reference, _norm_inputs),
        "layer_norm-strided": (layer_norm, layer_norm_reference, lambda: _norm_inputs(contiguous=False)),
        "layer_norm-no-affine": (layer_norm, layer_norm_reference, lambda: _norm_inputs()[:1]),
        "rms_norm": (rms_norm, rms_norm_reference, lambda: _norm_inputs(bias=False)),
        "add_layer_norm": (add_layer_norm, add_layer_norm_reference, lambda: _norm_inputs(residual=True)),
        "add_layer_norm-normed-only": (lambda *a: add_layer_norm(*a)[1], lambda *a: add_layer_norm_reference(*a)[1],
                                       lambda: _norm_inputs(residual=True)),
        "add_rms_norm": (add_rms_norm, add_rms_norm_reference, lambda: _norm_inputs(residual=True, bias=False)),
        # dropout on x: the reference regenerates the mask from the same seed
        "add_layer_norm-dropout": (lambda *a: add_layer_norm(*a, dropout_p=0.3, seed=11),
                                   lambda *a: add_layer_norm_reference(*a, dropout_p=0.3, seed=11),
                                   lambda: _norm_inputs(residual=True)),
        "add_rms_norm-dropout": (lambda *a: add_rms_norm(*a, dropout_p=0.3, seed=11),
                                 lambda *a: add_rms_norm_reference(*a, dropout_p=0.3, seed=11),
                                 lambda: _norm_inputs(residual=True, contiguous=False, bias=False)),
        "softmax": (lambda x: softmax(x, False, 0.7), lambda x: softmax_reference(x, False, 0.7),
                    lambda: [random_tensor((4, 37), F32, generator=_gen())]),
        # Tq > Tk: the first rows see no key at all (output and gradient 0)
        "softmax-causal": (lambda x: softmax(x, True), lambda x: softmax_reference(x, True),
                           lambda: [random_tensor((2, 9, 7), F32, generator=_gen())]),
        "dropout": (lambda x: dropout(x, 0.3, seed=7), lambda x: dropout_reference(x, 0.3, seed=7),
                    lambda: [random_tensor((5, 37), F32, generator=_gen())]),
        "gelu-tanh": (gelu, gelu_reference, lambda: [random_tensor((5, 37), F32, generator=_gen())]),
        "gelu-erf-bias": (lambda x, b: gelu(x, "none", b), lambda x, b: gelu_reference(x, "none", b),
                          lambda: _norm_inputs(bias=False)),
        "gelu_linear": (lambda x, w, b, gb: gelu_linear(x, w, b, "tanh", gb),
                        lambda x, w, b, gb: gelu_linear_reference(x, w, b, "tanh", gb),
                        lambda: [random_tensor((5, 37), F32, generator=_gen(0)),
                                 random_tensor((6, 37), F32, generator=_gen(1)),
                                 random_tensor((6,), F32, generator=_gen(2)),
                                 random_tensor((37,), F32, generator=_gen(3))]),
        "glu_linear": (lambda g, u, w, b: glu_linear(g, u, w, b, "silu"),
                       lambda g, u, w, b: glu_linear_reference(g, u, w, b, "silu"),
                       lambda: [random_tensor((5, 37), F32, generator=_gen(0)),
                                random_tensor((5, 37), F32, generator=_gen(1)),
                                random_tensor((6, 37), F32, generator=_gen(2)),
                                random_tensor((6,), F32, generator=_gen(3))]),
        "glu_linear-packed-gelu": (lambda gu, w: glu_linear(gu, None, w, None, "gelu"),
                                   lambda gu, w: glu_linear_reference(gu, None, w, None, "gelu"),
                                   lambda: [random_tensor((5, 38), F32, generator=_gen(0)),
                                            random_tensor((6, 19), F32, generator=_gen(1))]),
        "swiglu": (swiglu, swiglu_reference,
                   lambda: [random_tensor((5, 37), F32, generator=_gen(s)) for s in (0, 1)]),
        "swiglu-packed": (swiglu, swiglu_reference, lambda: [random_tensor((5, 38), F32, generator=_gen())]),
        "geglu-strided": (lambda g, u: geglu(g, u, "none"), lambda g, u: geglu_reference(g, u, "none"),
                          lambda: [random_tensor((3, 5, 37), F32, contiguous=False, generator=_gen(s))
                                   for s in (0, 1)]),
        "geglu-packed": (geglu, geglu_reference, lambda: [random_tensor((5, 38), F32, generator=_gen())]),
        "apply_rope": (lambda q, k: apply_rope(q, k, cos, sin, 2),
                       lambda q, k: apply_rope_reference(q, k, cos.to(q.dtype), sin.to(q.dtype), 2),
                       lambda: [random_tensor((2, 3, 5, 8), F32, generator=_gen()),
                                random_tensor((2, 1, 5, 8), F32, generator=_gen(1))]),
        "apply_rope-per-sequence": (lambda q, k: apply_rope(q, k, seq_cos, seq_sin, 1),
                                    lambda q, k: apply_rope_reference(q, k, seq_cos.to(q.dtype),
                                                                      seq_sin.to(q.dtype), 1),
                                    lambda: [random_tensor((2, 2, 6, 8), F32, contiguous=False, generator=_gen(s))
                                             for s in (0, 1)]),
        "attention": (attention, attention_reference,
                      lambda: [random_tensor(s, F32, generator=_gen(i))
                               for i, s in enumerate(((1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8)))]),
        "attention-causal-dropout": (lambda q, k, v: attention(q, k, v, True, 0.25, seed=11),
                                     lambda q, k, v: attention_reference(q, k, v, True, 0.25, seed=11),
                                     lambda: [random_tensor(s, F32, generator=_gen(i)) for i, s in
                                              enumerate(((1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8)))]),
        "attention-masks-scale": (
            lambda q, k, v: attention(q, k, v, scale=0.3, attn_mask=float_mask, key_padding_mask=kpm),
            lambda q, k, v: attention_reference(q, k, v, scale=0.3, attn_mask=float_mask, key_padding_mask=kpm),
            lambda: [random_tensor(s, F32, generator=_gen(i))
                     for i, s in enumerate(((1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8)))]),
        # logit soft-capping (Gemma-2) with grouped-query k/v: the reference caps the scores the same way
        "attention-softcap-gqa": (lambda q, k, v: attention(q, k, v, True, softcap=2.0),
                                  lambda q, k, v: attention_reference(q, k, v, True, softcap=2.0),
                                  lambda: [random_tensor(s, F32, generator=_gen(i)) * 3 for i, s in
                                           enumerate(((1, 4, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8)))]),
        # a sliding window (Mistral) with grouped-query k/v and Tq != Tk: the reference masks the same band
        "attention-window-gqa": (lambda q, k, v: attention(q, k, v, True, window=3),
                                 lambda q, k, v: attention_reference(q, k, v, True, window=3),
                                 lambda: [random_tensor(s, F32, generator=_gen(i)) for i, s in
                                          enumerate(((1, 4, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8)))]),
        # one tensor as q, k and v: each argument's partial gradient, summed once by autograd
        "attention-self": (lambda x: attention(x, x, x, True), lambda x: attention_reference(x, x, x, True),
                           lambda: [random_tensor((2, 1, 6, 8), F32, generator=_gen())]),
        "linear_cross_entropy-none": (
            lambda h, w, b: linear_cross_entropy(h, w, lce_targets.view(2, 3), b, reduction="none",
                                                 label_smoothing=0.1, z_loss=1e-2),
            lambda h, w, b: linear_cross_entropy_reference(h, w, lce_targets.view(2, 3), b, reduction="none",
                                                           label_smoothing=0.1, z_loss=1e-2),
            lambda: [random_tensor(s, F32, generator=_gen(i)) for i, s in enumerate(((2, 3, 8), (11, 8), (11,)))]),
    }
    return cases


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_penalty_matches_reference(name):
    fn, ref, make = CASES[name]
    inputs = make()
    grads, second = penalty_gradients(fn, inputs)
    # the defect: a gradient without a graph, whose penalty silently added nothing
    assert all(g.requires_grad for g in grads), f"{name}: a gradient computed with create_graph=True has no graph"
    grads64, second64 = penalty_gradients(ref, inputs, torch.float64)
    for i, (g, g64, s, s64) in enumerate(zip(grads, grads64, second, second64)):
        assert g.dtype == s.dtype == inputs[i].dtype
        assert_close(f"{name} gradient of input {i}", g, g64)
        assert_close(f"{name} penalty gradient of input {i}", s, s64, rtol=SECOND_ORDER_RTOL)


@pytest.mark.parametrize("name", ["layer_norm", "add_rms_norm", "add_layer_norm-dropout", "softmax-causal", "dropout",
                                  "gelu-erf-bias", "gelu_linear", "glu_linear",
                                  "glu_linear-packed-gelu", "swiglu-packed", "apply_rope",
                                  "attention-causal-dropout", "attention-softcap-gqa", "attention-window-gqa",
                                  "linear_cross_entropy-none"])
def test_gradgradcheck(name):
    """torch's own check of the second derivative against finite differences of the first. The kernels take
    no float64, so in fp32 with matching tolerances; small shapes keep the interpreter's launches few."""
    fn, _, make = CASES[name]
    inputs = [t[..., :4, :].detach() if t.dim() > 2 else t.detach() for t in make()]
    if name == "linear_cross_entropy-none":
        inputs = make()
    leaves = [t.clone().requires_grad_() for t in inputs]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*double precision.*")
        assert torch.autograd.gradgradcheck(fn, leaves, eps=1e-2, atol=2e-2, rtol=2e-2, nondet_tol=1e-5,
                                            fast_mode=True)


def test_third_order_through_dropout_and_rope():
    """The linear ops' double backward applies the op again, so gradients of any order stay correct."""
    x = random_tensor((2, 2, 5, 8), F32, generator=_gen())
    cos, sin = rope_cos_sin(5, 8)

    def order3(f, t):
        t = t.detach().clone().requires_grad_()
        y = f(t)
        g1, = torch.autograd.grad((y ** 4).sum(), t, create_graph=True)
        g2, = torch.autograd.grad((g1 ** 2).sum(), t, create_graph=True)
        return torch.autograd.grad((g2 * g1).sum(), t)[0]

    ours = order3(lambda t: dropout(apply_rope(t, t, cos, sin)[0], 0.4, seed=3), x)
    ref = order3(lambda t: dropout_reference(apply_rope_reference(t, t, cos.double(), sin.double())[0], 0.4, seed=3),
                 x.double())
    assert_close("third-order gradient", ours, ref, rtol=SECOND_ORDER_RTOL)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_raises(inplace, reduction):
    """It keeps no logits (only their gradient, or that gradient written over them): no second order."""
    gen = _gen()
    targets = _targets(6, 11, gen)
    w = random_tensor((8, 11), F32, generator=gen).requires_grad_()
    h = random_tensor((6, 8), F32, generator=gen)
    loss = cross_entropy(h @ w, targets, reduction=reduction, inplace_backward=inplace).sum()
    with pytest.raises(RuntimeError, match=r"triformer\.cross_entropy: gradients of gradients .* not supported: "
                                           + ("with inplace_backward=True" if inplace else "it keeps only")
                                           + r".*cross_entropy_reference"):
        torch.autograd.grad(loss, w, create_graph=True)
    # the first order, on a fresh graph, as always
    g, = torch.autograd.grad(cross_entropy(h @ w, targets, reduction=reduction, inplace_backward=inplace).sum(), w)
    w64 = w.detach().double().requires_grad_()
    g64, = torch.autograd.grad(cross_entropy_reference(h.double() @ w64, targets, reduction=reduction).sum(), w64)
    assert_close("first-order gradient", g, g64)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_reduced_raises(reduction):
    gen = _gen()
    h = random_tensor((6, 8), F32, generator=gen).requires_grad_()
    w = random_tensor((11, 8), F32, generator=gen).requires_grad_()
    loss = linear_cross_entropy(h, w, _targets(6, 11, gen), reduction=reduction)
    with pytest.raises(RuntimeError, match=r"triformer\.linear_cross_entropy: gradients of gradients .* not "
                                           r"supported.*reduction='none'"):
        torch.autograd.grad(loss, (h, w), create_graph=True)


OP_MODULES = tuple(importlib.import_module(f"triformer.{name}") for name in (
    "attention", "dropout", "fused_add_norm", "gelu", "gelu_linear", "glu_linear", "layernorm", "linear_cross_entropy",
    "rmsnorm", "rope", "softmax", "swiglu"))


@contextlib.contextmanager
def recorded_checks(monkeypatch):
    """Record every op's needs_graph answer; make the reference path fail if it is taken."""
    answers = []

    def boom(*args, **kwargs):
        raise AssertionError("the reference path ran during a first-order backward")

    for module in OP_MODULES:
        real = module.needs_graph

        def record(*tensors, _real=real):
            answers.append(_real(*tensors))
            return answers[-1]

        monkeypatch.setattr(module, "needs_graph", record)
        if hasattr(module, "reference_grads"):
            monkeypatch.setattr(module, "reference_grads", boom)
    yield answers


@pytest.mark.parametrize("name", list(CASES))
def test_first_order_backward_takes_the_kernel_path(name, monkeypatch):
    """An ordinary backward (no create_graph) answers the one check False and launches the Triton backward."""
    fn, ref, make = CASES[name]
    inputs = make()
    with recorded_checks(monkeypatch) as answers:
        grads, _ = penalty_gradients(fn, inputs, create_graph=False)
    # linear_cross_entropy tests torch.is_grad_enabled() itself (it raises or recomputes under create_graph)
    assert (answers or name.startswith("linear_cross_entropy")) and not any(answers)
    assert not any(g.requires_grad for g in grads)
    grads64, _ = penalty_gradients(ref, inputs, torch.float64, create_graph=False)
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        assert_close(f"{name} gradient of input {i}", g, g64)


def test_create_graph_without_second_order_dependence_keeps_the_kernel_path(monkeypatch):
    """create_graph=True where nothing the backward reads requires grad: dropout and RoPE depend only on the
    incoming gradient, which here is a constant, so their kernels run and return the plain gradient."""
    cos, sin = rope_cos_sin(5, 8)
    x = random_tensor((1, 2, 5, 8), F32, generator=_gen()).requires_grad_()
    with recorded_checks(monkeypatch) as answers:
        g, = torch.autograd.grad(dropout(apply_rope(x, x, cos, sin)[0], 0.5, seed=1).sum(), x, create_graph=True)
    assert answers == [False, False] and not g.requires_grad


@pytest.mark.parametrize("op", ["layer_norm", "gelu"])
def test_mixed_dtypes_under_autocast_rules(op):
    """bf16 activations with an fp32 parameter (autocast's layout): each gradient of the penalty comes back in
    its input's dtype and matches the reference run on the same inputs (the path is the reference)."""
    gen = _gen()
    x = random_tensor((3, 37), torch.bfloat16, generator=gen)
    w = random_tensor((37,), F32, generator=gen)
    fn, ref = {"layer_norm": (lambda x, w: layer_norm(x, w, w), lambda x, w: layer_norm_reference(x, w, w)),
               "gelu": (lambda x, b: gelu(x, "tanh", b), lambda x, b: gelu_reference(x, "tanh", b))}[op]

    def run(f):
        leaves = [x.detach().requires_grad_(), w.detach().requires_grad_()]
        y = f(*leaves)
        assert y.dtype == torch.bfloat16
        grads = torch.autograd.grad((y.float() ** 2).sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum((g.float() ** 2).sum() for g in grads), leaves)

    for ours, theirs, dtype in zip(run(fn), run(ref), (torch.bfloat16, F32)):
        assert ours.dtype == dtype
        assert_close("penalty gradient", ours, theirs.double(), rtol=2e-2)
