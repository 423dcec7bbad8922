"""torch.compile of whole triformer models: through aot_eager (AOT autograd's trace, no Inductor) on the kernel
device, and through Inductor on the CPU as far as it allows (the ops are opaque there, Inductor compiles
everything around them), and on a GPU with the kernels visible to Inductor, in every compile mode, within the
cold-compile budget."""
from __future__ import annotations

import time

import pytest
import torch
import torch._dynamo.utils
import torch._inductor.config

import triformer
from models import GPT, ViT, create_model
from tests.helpers import gpt, vit
from triformer.testing import assert_close, kernel_device

# Three blocks: torch 2.11's Inductor took exponential time in the depth when it formatted a fallback op's
# arguments (1 layer 12 s, 4 layers never finished); a depth of three would already show that growth.
TINY = dict(n_layer=3, n_embd=32, n_head=2, dropout=0.1)


def _tiny(name: str):
    if name.startswith("vit"):
        return create_model("vit-digits", n_layer=3, n_embd=32, n_head=2, dropout=0.1)
    return create_model(name, vocab_size=64, block_size=16, **TINY)


def _batch(name: str, device):
    g = torch.Generator().manual_seed(1)
    if name.startswith("vit"):
        return (torch.randn(4, 1, 8, 8, generator=g).to(device), torch.randint(0, 10, (4,), generator=g).to(device))
    return (torch.randint(0, 64, (2, 16), generator=g).to(device), torch.randint(0, 64, (2, 16), generator=g).to(device))


def _loss_and_grads(run, model, x, y, seed):
    """``run`` is the model or its compiled form, which shares the model's parameters."""
    torch.manual_seed(seed)  # the same dropout seeds in both runs
    model.zero_grad(set_to_none=True)
    _, loss = run(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.skipif(not triformer.INTERPRET, reason="the CPU path: opaque ops under the interpreter")
@pytest.mark.parametrize("name", ["gpt2-nano", "llama-nano", "vit-digits"])
def test_inductor_compiles_model_on_cpu_like_eager(name):
    """fullgraph=True through Inductor's lowering and C++ code generation; loss and every gradient equal eager's.
    Dropout's seeds are drawn inside the graph, with eager's generator (Inductor's own RNG is off, so both runs
    draw the same seeds). Two steps: the second reuses the compiled graph and must draw new seeds."""
    # config.patch, not monkeypatch: pytest >= 9.2's monkeypatch undoes a setattr on torch's config module with a
    # delattr, which hides the option from every later compile in the process
    with torch._inductor.config.patch(fallback_random=True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = _tiny(name)
        x, y = _batch(name, "cpu")
        compiled = torch.compile(model, fullgraph=True)
        losses = []
        for step in range(2):
            loss_c, grads_c = _loss_and_grads(compiled, model, x, y, seed=10 + step)
            loss_e, grads_e = _loss_and_grads(model, model, x, y, seed=10 + step)
            losses.append(loss_c)
            torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
            assert grads_c.keys() == grads_e.keys() and grads_e
            for n in grads_e:
                torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-4, atol=1e-6, msg=n)
        assert losses[0] != losses[1]  # a fresh dropout seed each step, not one baked into the graph


def test_activation_checkpointing_traces_in_one_graph_like_eager():
    """Checkpointed blocks (trainer.activation_checkpointing) inside torch.compile(fullgraph=True): Dynamo turns
    each into its checkpoint operator; the recomputed dropout masks must still match eager's."""
    from models.layers import set_activation_checkpointing

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _tiny("gpt2-nano")
    set_activation_checkpointing(model, True)
    x, y = _batch("gpt2-nano", kernel_device())
    model.to(kernel_device())
    loss_e, grads_e = _loss_and_grads(model, model, x, y, seed=5)
    loss_c, grads_c = _loss_and_grads(torch.compile(model, backend="aot_eager", fullgraph=True), model, x, y, seed=5)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_cross_entropy_traced_backward_matches_eager(reduction, inplace_backward):
    """Traced, the forward stores row statistics and the backward computes the gradient times the upstream factor
    (nothing in place: an in-place write of a backward-graph input keeps Inductor from capturing that graph in a
    CUDA graph); the result must equal eager's in-place scale of the gradient stored in the forward."""
    device = kernel_device()
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 5, 37, generator=g).to(device)
    targets = torch.randint(0, 37, (3, 5), generator=g).to(device)
    targets[0, 1] = -100
    upstream = torch.rand(3, 5, generator=g).to(device) if reduction == "none" else torch.tensor(0.7).to(device)

    def run(logits_leaf):
        logits = logits_leaf * 1.0  # an intermediate, as the LM head's output is: inplace_backward may consume it
        return triformer.cross_entropy(logits, targets, reduction=reduction, inplace_backward=inplace_backward)

    grads = []
    for fn in (run, torch.compile(run, backend="aot_eager", fullgraph=True)):
        leaf = base.clone().requires_grad_()
        (fn(leaf) * upstream).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "softmax"])
def test_float_arguments_seen_with_several_values_stay_in_one_graph(op):
    """Dynamo makes a float argument symbolic once it has seen a second value; the ops' argument checks must then
    still trace (math.isfinite on a SymFloat broke fullgraph), and each value must still be honoured."""
    torch._dynamo.reset()
    device = kernel_device()
    x = torch.randn(3, 4, 8, device=device)
    w = torch.randn(8, device=device)
    calls = {"layer_norm": lambda value: triformer.layer_norm(x, w, None, value),
             "rms_norm": lambda value: triformer.rms_norm(x, w, value),
             "softmax": lambda value: triformer.softmax(x, scale=value)}[op]
    compiled = torch.compile(lambda value: calls(value), backend="aot_eager", fullgraph=True)
    for value in (1e-5, 1e-2, 0.5):
        torch.testing.assert_close(compiled(value), calls(value))


def _aot_eager_case(model_name: str):
    """(model, (inputs, targets)): the model tests' tiny models, one layer deep (the llama-style GPT with GQA)."""
    if model_name == "gpt":
        return GPT(gpt.tiny("llama", n_layer=1)).to(kernel_device()), gpt.batch(2, 7, seed=5)
    cfg = vit.tiny(n_layer=1)
    return ViT(cfg).to(kernel_device()), vit.images(cfg, 2)


@pytest.mark.parametrize("model_name", ["gpt", "vit"])
def test_aot_eager_fullgraph_matches_eager(model_name):
    """The loss through torch.compile(fullgraph=True, backend="aot_eager"), CPU and GPU alike: no graph break in
    the whole model, and the loss and every gradient equal eager's (fp32's relative 1e-5, against eager's
    result as the reference)."""
    torch._dynamo.reset()  # a fresh compile: no recompilation of what an earlier test compiled
    model, (x, y) = _aot_eager_case(model_name)

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn(x, y)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    def loss_fn(inputs, targets):
        return model(inputs, targets)[1]

    eager_loss, eager_grads = loss_and_grads(loss_fn)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(loss_fn, backend="aot_eager", fullgraph=True))
    assert_close("loss", compiled_loss, eager_loss.double())
    for name, g in eager_grads.items():
        assert_close(f"grad {name}", compiled_grads[name], g.double())


# ------------------------------------------------------------------------------------- changing sequence lengths
# Evaluation, generation and packing call a compiled model at several sequence lengths. The launch planners were
# lru_cache'd on sizes, and the second length (a symbolic one) failed with "unhashable type: non-nested SymInt";
# planning with symbolic sizes also pinned them to one value (mark_dynamic: a constraint error).
DYN_B, DYN_H, DYN_D, DYN_V = 2, 2, 8, 37


def _every_op(x, w, b, wv, cos, sin, targets):
    """Every op once on [B, T, C] activations, to one loss: T is the length that changes."""
    T = x.shape[1]
    y = triformer.layer_norm(x, w, b)
    _, y = triformer.add_rms_norm(y, x, w)
    y = triformer.swiglu(triformer.gelu(y, bias=b), x)
    q, k = triformer.apply_rope(*(y.view(DYN_B, T, DYN_H, DYN_D).transpose(1, 2) * s for s in (1.0, 0.5)), cos, sin)
    a = triformer.attention(q, k, q + k, is_causal=True)
    a = a + triformer.attention_packed(torch.cat([y, x, y * x], -1), DYN_H, is_causal=True)
    p = triformer.softmax(q @ k.transpose(-1, -2), is_causal=True)
    a = triformer.dropout(a + p @ q, 0.25, seed=3).transpose(1, 2).reshape(DYN_B * T, DYN_H * DYN_D)
    return (triformer.cross_entropy(a @ wv.t(), targets.flatten(), inplace_backward=True)
            + triformer.linear_cross_entropy(a, wv, targets.flatten()))


def _compile_counter():
    """(backend, compiles): aot_eager, and the number of graphs Dynamo has compiled since."""
    torch._dynamo.utils.counters.clear()
    return "aot_eager", lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _check_lengths(fn, compiled, make_inputs, lengths, mark, compiles, expected):
    """At each length: the compiled loss and the gradients of the inputs ``make_inputs`` lists equal eager's
    (fp32's bar), and after it Dynamo has compiled ``expected[i]`` frames in all (none new where it stays put).
    ``mark``: (input, dim) pairs marked dynamic."""
    for length, n in zip(lengths, expected):
        inputs, with_grad = make_inputs(length)
        results = []
        for run in (fn, compiled):
            leaves = [t.clone().requires_grad_() if i in with_grad else t for i, t in enumerate(inputs)]
            for i, dim in mark:
                torch._dynamo.mark_dynamic(leaves[i], dim)
            loss = run(*leaves)
            results.append((loss, *torch.autograd.grad(loss, [leaves[i] for i in with_grad])))
        for i, (eager, comp) in enumerate(zip(*results)):
            assert_close(f"T={length} output/grad {i}", comp, eager.double())
        assert compiles() == n, f"T={length}: {compiles()} compiled graphs, expected {n}"


def _every_op_inputs(length, g=torch.Generator().manual_seed(0)):
    """(_every_op's inputs at sequence length ``length``, the indices of those that get gradients)."""
    C = DYN_H * DYN_D
    dev = kernel_device()
    cos, sin = triformer.rope_cos_sin(32, DYN_D, device=dev)
    return [torch.randn(DYN_B, length, C, generator=g).to(dev), torch.randn(C, generator=g).to(dev),
            torch.randn(C, generator=g).to(dev), (torch.randn(DYN_V, C, generator=g) * 0.3).to(dev), cos, sin,
            torch.randint(0, DYN_V, (DYN_B, length), generator=g).to(dev)], (0, 1, 2, 3)


# On a GPU the traced launch plans specialize the length (_runtime.plan_sizes): one graph per length there, which
# test_compile_each_op_on_gpu_for_changing_lengths checks instead.
CPU_ONLY = pytest.mark.skipif(not triformer.INTERPRET, reason="the CPU path: one graph for every length")


@CPU_ONLY
@pytest.mark.parametrize("dynamic", ["mark_dynamic", pytest.param(None, marks=pytest.mark.slow),
                                     pytest.param(True, marks=pytest.mark.slow)])
def test_every_op_compiles_once_for_changing_lengths(dynamic):
    """Each op under torch.compile(fullgraph=True) at several sequence lengths (with the kernel device's
    backend: aot_eager): mark_dynamic on the length compiles once (nothing pins it), the default dynamic=None
    once static and once dynamic, dynamic=True once; every result equals eager's."""
    torch._dynamo.reset()
    backend, compiles = _compile_counter()
    compiled = torch.compile(_every_op, backend=backend, fullgraph=True,
                             dynamic=dynamic if isinstance(dynamic, bool) else None)
    mark = [(0, 1), (6, 1)] if dynamic == "mark_dynamic" else []
    lengths, expected = {"mark_dynamic": ((7, 12), (1, 1)), None: ((7, 12, 17), (1, 2, 2)),
                         True: ((7, 12, 17), (1, 1, 1))}[dynamic]
    _check_lengths(_every_op, compiled, _every_op_inputs, lengths, mark, compiles, expected)


@CPU_ONLY
def test_model_compiles_once_for_changing_lengths():
    """A llama-style GPT (RoPE, RMSNorm, SwiGLU, GQA attention, fused loss) compiled once for any sequence length
    (mark_dynamic on it: nothing in the model or the ops pins it), at two lengths as evaluation calls it; the
    loss and every parameter gradient equal eager's."""
    torch._dynamo.reset()
    model = GPT(gpt.tiny("llama", n_layer=1, loss="fused")).to(kernel_device())
    params = [p for _, p in model.named_parameters()]

    def loss_and_grads(idx, targets):
        loss = model(idx, targets)[1]
        return loss, *torch.autograd.grad(loss, params)

    backend, compiles = _compile_counter()
    compiled = torch.compile(lambda idx, targets: model(idx, targets)[1], backend=backend, fullgraph=True)
    for length in (7, 12):
        idx, targets = gpt.batch(2, length, seed=length)
        torch._dynamo.mark_dynamic(idx, 1)
        torch._dynamo.mark_dynamic(targets, 1)
        eager = loss_and_grads(idx, targets)
        loss = compiled(idx, targets)
        for (name, _), ours, theirs in zip([("loss", None), *model.named_parameters()],
                                           (loss, *torch.autograd.grad(loss, params)), eager):
            assert_close(f"T={length} {name}", ours, theirs.double())
        assert compiles() == 1, f"T={length}: {compiles()} compiled graphs, expected 1"


def test_kernels_write_only_their_outputs_as_torch_compile_sees_them():
    """torch.compile decides from each kernel's Triton IR which arguments it writes (wrap_triton's analysis, which
    follows a called helper's result back to all its arguments). A kernel believed to write an input of its op is
    functionalized into a copy written back into that input; for the batch's targets that made Inductor skip
    reduce-overhead's CUDA graph ("mutated inputs"). tests/helpers/kernel_writes.py runs every op's body for sm_90
    without a GPU and lists such arguments: there must be none."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.kernel_writes"], cwd=root, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) >= 20 and all(r.get("launches") for r in rows), rows
    assert [r for r in rows if "error" in r or r["wrongly_written"]] == []


@pytest.mark.parametrize("loss", ["ce", "fused"])
def test_compiled_gpt_step_moves_no_buffer_behind_the_kernels(loss):
    """The whole GPT-2 step (forward and backward) as AOT autograd traces it for a GPU, printed by
    benchmarks/traced_graph.py without one: no scatter, clone or input copy_ around the kernels. Before the kernels
    were handed whole buffers its backward held 11 slice_scatter and 7 select_scatter nodes (gpt2-nano)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.traced_graph", "gpt2-nano", "--loss", loss], cwd=root,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    headers = [line for line in proc.stdout.splitlines() if line.startswith("## ")]
    assert len(headers) == 2 and all(int(h.split(", ")[1].split()[0]) > 0 for h in headers), proc.stdout
    assert "moves a whole buffer" not in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------------------------------- GPU
COLD_COMPILE_BUDGET_S = 90.0


@pytest.mark.skipif(kernel_device().type != "cuda", reason="Inductor launches the Triton kernels on a GPU only")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune-no-cudagraphs"])
@pytest.mark.parametrize("name", ["gpt2-small", "gpt2-small:fused", "llama-small", "vit-base"])
def test_compile_full_model_on_gpu(name, mode, tmp_path, monkeypatch):
    """A full-size model compiles with fullgraph=True (no graph break) from a cold cache within the budget, and
    its compiled steps track eager ones (bf16 autocast). ``:fused`` selects the fused linear + cross-entropy loss
    (fp32 master weights under autocast: its fp32 weight gradient takes its own path)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    torch.manual_seed(0)
    name, _, loss = name.partition(":")
    model = create_model(name, dropout=0.0, **({"loss": loss} if loss else {})).cuda()
    if name.startswith("vit"):
        x, y = torch.randn(16, 3, 224, 224, device="cuda"), torch.randint(0, 1000, (16,), device="cuda")
    else:
        x = torch.randint(0, 50257, (4, 512), device="cuda")
        y = torch.roll(x, -1, 1)
    compiled = torch.compile(model, fullgraph=True, mode=None if mode == "default" else mode)

    def step(m):
        torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = m(x, y)
        loss.backward()
        return float(loss)

    torch._dynamo.utils.counters.clear()
    t0 = time.perf_counter()
    compiled_loss = step(compiled)
    elapsed = time.perf_counter() - t0
    # reduce-overhead silently runs without CUDA graphs when a graph mutates its inputs: count that as a failure
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"], "Inductor skipped a CUDA graph"
    model.zero_grad(set_to_none=True)
    assert abs(compiled_loss - step(model)) / abs(compiled_loss) < 2e-2
    if elapsed >= COLD_COMPILE_BUDGET_S and mode == "max-autotune-no-cudagraphs":
        # measured on an H200 (torch 2.11): over 160 s for the plain PyTorch GPT-2 too, Inductor benchmarking GEMM
        # templates for every matmul shape (benchmarks/results/h200/compile_check.md); a known gap, not a pass
        pytest.xfail(f"cold compile took {elapsed:.0f} s (budget {COLD_COMPILE_BUDGET_S:.0f} s)")
    assert elapsed < COLD_COMPILE_BUDGET_S, f"cold compile took {elapsed:.0f} s"


def _op_cases(T: int = 256):
    """(name, function of float inputs returning a tensor, input shapes) for every op, at GPU-sized shapes with
    sequence length T. The functions read sizes from their inputs, so one serves every length."""
    B, H, D, C = 2, 4, 64, 384
    dev = kernel_device()
    return [
        ("layer_norm", lambda x, w, b: triformer.layer_norm(x, w, b), [(B, T, C), (C,), (C,)]),
        ("rms_norm", lambda x, w: triformer.rms_norm(x, w), [(B, T, C), (C,)]),
        ("add_layer_norm", lambda x, r, w, b: torch.cat(triformer.add_layer_norm(x, r, w, b), -1),
         [(B, T, C), (B, T, C), (C,), (C,)]),
        ("add_layer_norm-dropout",
         lambda x, r, w, b: torch.cat(triformer.add_layer_norm(x, r, w, b, dropout_p=0.1, seed=3), -1),
         [(B, T, C), (B, T, C), (C,), (C,)]),
        ("add_rms_norm", lambda x, r, w: torch.cat(triformer.add_rms_norm(x, r, w), -1), [(B, T, C), (B, T, C), (C,)]),
        ("softmax", lambda x: triformer.softmax(x, is_causal=True), [(B, H, T, T)]),
        ("dropout", lambda x: triformer.dropout(x, 0.1, seed=3), [(B, T, C)]),
        ("gelu", lambda x, b: triformer.gelu(x, "tanh", b), [(B, T, C), (C,)]),
        ("swiglu", lambda g, u: triformer.swiglu(g, u), [(B, T, C), (B, T, C)]),
        ("glu_linear", lambda g, u, w: triformer.glu_linear(g, u, w), [(B, T, C), (B, T, C), (C // 2, C)]),
        # tables for 512 positions, of which the first T are used
        ("apply_rope", lambda q, k: torch.cat(triformer.apply_rope(q, k, *triformer.rope_cos_sin(512, D, device=dev)),
                                              -1), [(B, H, T, D), (B, H, T, D)]),
        ("attention", lambda q, k, v: triformer.attention(q, k, v, is_causal=True), [(B, H, T, D)] * 3),
        # grouped-query k/v, as llama-small's attention
        ("attention_gqa", lambda q, k, v: triformer.attention(q, k, v, is_causal=True),
         [(B, H, T, D), (B, H // 2, T, D), (B, H // 2, T, D)]),
        ("attention_dropout", lambda q, k, v: triformer.attention(q, k, v, is_causal=True, dropout_p=0.1, seed=5),
         [(B, H, T, D)] * 3),
        ("attention_packed", lambda qkv: triformer.attention_packed(qkv, H, is_causal=True), [(B, T, 3 * H * D)]),
        ("attention_softcap", lambda q, k, v: triformer.attention(q, k, v, is_causal=True, softcap=5.0),
         [(B, H, T, D)] * 3),
        ("attention_window", lambda q, k, v: triformer.attention(q, k, v, is_causal=True, window=T // 4),
         [(B, H, T, D)] * 3),
        ("cross_entropy", lambda x: triformer.cross_entropy(x, torch.arange(x.shape[0], device=dev) % 1000),
         [(B * T, 1000)]),
        ("linear_cross_entropy", lambda h, w: triformer.linear_cross_entropy(
            h, w, torch.arange(h.shape[0], device=dev) % 1000), [(B * T, C), (1000, C)]),
        # fp32 master weight with bf16 activations (autocast training): grad_W is summed in fp32 by cuBLAS
        ("linear_cross_entropy_fp32_weight", lambda h, w: triformer.linear_cross_entropy(
            h, w.float(), torch.arange(h.shape[0], device=dev) % 1000), [(B * T, C), (1000, C)]),
    ]


def _glued(fn):
    """The op between pointwise glue, summed: what Inductor fuses around the op's kernels."""
    def f(*xs):
        return (fn(*[x * 1.5 for x in xs]).float().sin()).sum()
    return f


def _value_and_grads(f, inputs):
    for x in inputs:
        x.grad = None
    out = f(*inputs)
    out.backward()
    return out.detach(), [x.grad.clone() for x in inputs]


@pytest.mark.skipif(kernel_device().type != "cuda", reason="Inductor launches the Triton kernels on a GPU only")
@pytest.mark.parametrize("case", _op_cases(), ids=lambda c: c[0])
def test_compile_each_op_on_gpu_matches_eager(case):
    """Each op inside torch.compile(fullgraph=True) with pointwise glue on both sides, bf16: the output and every
    input gradient equal eager's (the same kernels run, so to rounding of the glue Inductor fuses)."""
    name, fn, shapes = case
    torch._dynamo.reset()
    torch.manual_seed(0)
    inputs = [torch.randn(s, device="cuda", dtype=torch.bfloat16, requires_grad=True) for s in shapes]
    f = _glued(fn)
    compiled = torch.compile(f, fullgraph=True)
    (out_e, grads_e), (out_c, grads_c) = (_value_and_grads(run, inputs) for run in (f, compiled))
    torch.testing.assert_close(out_c, out_e, rtol=2e-2, atol=2e-2)
    for ge, gc in zip(grads_e, grads_c):
        torch.testing.assert_close(gc.float(), ge.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(kernel_device().type != "cuda", reason="Inductor launches the Triton kernels on a GPU only")
@pytest.mark.parametrize("dynamic", [None, True, pytest.param("mark_dynamic", marks=pytest.mark.xfail(
    reason="on a GPU the traced launch plans specialize the length (_runtime.plan_sizes): torch refuses "
           "mark_dynamic on it with a constraint error", strict=False))])
@pytest.mark.parametrize("case", _op_cases(), ids=lambda c: c[0])
def test_compile_each_op_on_gpu_for_changing_lengths(case, dynamic):
    """One torch.compile (Inductor) of each op called at three sequence lengths, as evaluation, generation and
    packing do (the second length failed: symbolic sizes reached lru_cache'd launch planners): dynamic=None
    (static, then dynamic), dynamic=True, and mark_dynamic on every dim that follows the length. Output and
    gradients equal eager's at each length."""
    name, fn = case[:2]
    torch._dynamo.reset()
    torch.manual_seed(0)
    f = _glued(fn)
    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic if isinstance(dynamic, bool) else None)
    lengths = (256, 200, 131)
    shapes_at = [dict((n, s) for n, _, s in _op_cases(T))[name] for T in lengths]
    for T, shapes in zip(lengths, shapes_at):
        inputs = [torch.randn(s, device="cuda", dtype=torch.bfloat16, requires_grad=True) for s in shapes]
        if dynamic == "mark_dynamic":  # the dims whose size follows T
            for x, s, other in zip(inputs, shapes, shapes_at[0] if T != lengths[0] else shapes_at[1]):
                for dim in [d for d in range(len(s)) if s[d] != other[d]]:
                    torch._dynamo.mark_dynamic(x, dim)
        (out_e, grads_e), (out_c, grads_c) = (_value_and_grads(run, inputs) for run in (f, compiled))
        torch.testing.assert_close(out_c, out_e, rtol=2e-2, atol=2e-2, msg=f"T={T}")
        for ge, gc in zip(grads_e, grads_c):
            torch.testing.assert_close(gc.float(), ge.float(), rtol=5e-2, atol=5e-2, msg=f"T={T}")
