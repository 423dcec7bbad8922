"""Per-op checking shared by the kernel tests: one float64-reference check of outputs and gradients, PyTorch's
own result as the fp16/bf16 peer, eager vs torch.compile, and a stand-in that fails if a kernel is launched."""
import torch

from triformer.testing import assert_close, poisoned_empty, random_tensor


def check_op(name, fn, ref_fn, peer_fn, inputs, contiguous=True):
    """Run fn (triformer) under poisoned allocation, ref_fn on float64 copies of the inputs, and peer_fn
    (PyTorch) on the inputs as they are. Compare every output, and the gradient of every input for fresh
    random output gradients, which are non-contiguous when ``contiguous`` is False. Entries of ``inputs``
    may be None."""
    def run(f, tensors, seeds=None):
        leaves = [None if t is None else t.detach().requires_grad_() for t in tensors]
        outs = f(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        if seeds is None:
            seeds = [random_tensor(o.shape, o.dtype, contiguous=contiguous) for o in outs]
        grads = torch.autograd.grad(outs, [t for t in leaves if t is not None],
                                    [s.to(o.dtype) for s, o in zip(seeds, outs)])
        return outs, grads, seeds

    with poisoned_empty():
        outs, grads, seeds = run(fn, inputs)
    outs64, grads64, _ = run(ref_fn, [None if t is None else t.to(torch.float64) for t in inputs], seeds)
    peer_outs, peer_grads, _ = run(peer_fn, inputs, seeds)
    for i, out in enumerate(outs):
        assert out.dtype == inputs[0].dtype and out.shape == inputs[0].shape
        assert_close(f"{name} output {i}", out, outs64[i], peer_outs[i])
    for i, (g, t) in enumerate(zip(grads, [t for t in inputs if t is not None])):
        assert g.dtype == t.dtype, f"{name}: gradient {i} is {g.dtype}, input is {t.dtype}"
        assert_close(f"{name} grad of input {i}", g, grads64[i], peer_grads[i])


def check_against_float64(fn, ref_fn, inputs, names):
    """``fn(*inputs)`` against ``ref_fn`` on float64 copies, output and every gradient for a random upstream
    gradient, for ops whose parameters may be of a wider dtype than the activations (``inputs[0]``; fp32 master
    weights under autocast): the output comes in the activations' dtype, each gradient in its own input's dtype and
    shape, held to the activations' tolerance (the matmuls run in that dtype). Entries of ``inputs`` may be None;
    ``names`` labels the gradients."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    y = fn(*leaves)
    refs = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    y_ref = ref_fn(*refs)
    dtype = inputs[0].dtype
    assert y.dtype == dtype and y.shape == y_ref.shape
    dy = random_tensor(y.shape, torch.float32).to(y.dtype)
    y.backward(dy)
    y_ref.backward(dy.double())
    assert_close("y", y, y_ref)
    for name, got, ref in zip(names, leaves, refs):
        if got is not None:
            assert got.grad.dtype == got.dtype and got.grad.shape == got.shape, name
            assert_close(name, got.grad.to(dtype), ref.grad)


def in_common_dtype(fn, x, *params):
    """PyTorch's fn(x, *params). With mixed dtypes (fp32 parameters of a bf16 x, as under autocast) it computes
    in fp32 and returns x's dtype, since PyTorch's kernels take only some mixes, and those differ by device."""
    if all(p is None or p.dtype == x.dtype for p in params):
        return fn(x, *params)
    return fn(x.float(), *(None if p is None else p.float() for p in params)).to(x.dtype)


def check_aot_eager_matches_eager(f, *inputs):
    """``f(*inputs)`` returns (loss, y). Under torch.compile(fullgraph=True, backend="aot_eager") (no graph break
    around the ops), y and the gradient of the loss for every input equal eager's, at fp32's tolerance."""
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (f, compiled):
        loss, y = fn(*inputs)
        results.append((y, *torch.autograd.grad(loss, inputs)))
    for eager, comp in zip(*results):
        assert_close("compiled", comp, eager.double())


class NoLaunch:
    """Stands in for a Triton kernel (``monkeypatch.setattr(module, "_kernel", NoLaunch())``): indexing it with a
    grid, as a launch does, fails the test. Bad-input tests use it to show an error is raised before any launch."""

    def __getitem__(self, grid):
        raise AssertionError("kernel launched despite bad input")
