"""Where triformer's kernels run, and the checks every public op makes before launching one.

The same Triton kernels either compile for a CUDA GPU or run through Triton's interpreter on CPU tensors.
The interpreter is chosen when the module-level decision below runs, which must happen before any
``@triton.jit`` kernel is defined (Triton reads ``TRITON_INTERPRET`` when the decorator runs). That is
why ``triformer/__init__.py`` imports this module first.

Override with ``TRIFORMER_INTERPRET=1`` (force the interpreter, e.g. to debug on a GPU machine) or
``TRIFORMER_INTERPRET=0`` (force compilation). A kernel never falls back to PyTorch: a tensor on a
device the chosen mode cannot run on is an error.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import sys
import threading

import torch
from torch._library.triton import is_wrap_triton_enabled, set_wrap_triton_enabled
from torch._subclasses.fake_tensor import is_fake


def _decide_interpret() -> bool:
    forced = os.environ.get("TRIFORMER_INTERPRET")
    if forced is not None:
        if forced.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if forced.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"TRIFORMER_INTERPRET must be 0 or 1, got {forced!r}")
    return not torch.cuda.is_available()


def _import_order_message(triton_interprets: bool) -> str:
    """Why ``import triformer`` failed after triton was imported in the other mode, and what works. Something
    else imported triton first (building a transformers or timm model, torch.compile); triton cannot switch modes
    afterwards. Without CUDA only the interpreter can run the kernels, so keeping triton's compiler mode
    (``TRIFORMER_INTERPRET=0``) would only move the error to the first kernel call: it is not offered there."""
    setting = os.environ.get("TRITON_INTERPRET", "unset")
    first = ("put `import triformer` before the import that loaded triton (transformers, timm, or anything "
             "that builds a model or compiles)")
    if INTERPRET and not torch.cuda.is_available():
        return (f"triton was imported before triformer in its compiler mode (TRITON_INTERPRET={setting!r}), but this "
                f"machine has no CUDA device, so triformer's kernels can run only through Triton's interpreter, which "
                f"triton fixes when it is first imported. Either {first}, or start Python with the interpreter on: "
                f"TRITON_INTERPRET=1 python your_script.py")
    if INTERPRET:
        return (f"triton was imported before triformer in its compiler mode (TRITON_INTERPRET={setting!r}), but "
                f"TRIFORMER_INTERPRET asks for the interpreter. Either {first}, or unset TRIFORMER_INTERPRET to "
                f"compile the kernels for CUDA")
    return (f"triton was imported before triformer with its interpreter on (TRITON_INTERPRET={setting!r}), but "
            f"triformer would compile its kernels for CUDA. Either {first}, or set "
            f"TRIFORMER_INTERPRET=1 to run the kernels through the interpreter")


INTERPRET: bool = _decide_interpret()
# What TRIFORMER_INTERPRET said when the mode was decided: a later change has no effect, which errors point out.
_FORCED_AT_IMPORT = os.environ.get("TRIFORMER_INTERPRET")
# Triton builds its own library functions (tl.sum, tl.sigmoid, ...) for one mode when it is first
# imported, so the variable must be set before that import, and a triton imported earlier in the other
# mode cannot be repaired.
if "triton" in sys.modules:
    _already = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
    if _already != INTERPRET:
        raise ImportError(_import_order_message(_already))
os.environ["TRITON_INTERPRET"] = "1" if INTERPRET else "0"

import triton  # noqa: E402  (after TRITON_INTERPRET is set: see above)


def _round_bf16_to_nearest_even() -> None:
    """Make the interpreter's fp32 -> bf16 cast round to nearest even, as CUDA's ``cvt.rn.bf16.f32`` does.

    Triton 3.9's interpreter drops the low 16 bits (round toward zero): twice the GPU's rounding error, all of
    it toward zero, so bf16 kernels were tested on CPU against bars set for rounded outputs (cross-entropy's
    gradient, rounded when stored and again when scaled by backward, reached 1.0e-2 relative error there; 4.7e-3
    with the GPU's rounding). torch's conversion rounds to nearest even and keeps NaN and inf. A Triton without
    this builder method is left alone: tests/test_cross_entropy.py checks the rounding itself.
    """
    import numpy as np
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    cast = getattr(builder, "cast_impl", None)
    if cast is None:
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == triton.language.float32 and dst_type.scalar == triton.language.bfloat16:
            bits = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16).view(torch.int16)
            return interpreter.TensorHandle(bits.numpy().view(np.uint16), dst_type.scalar)
        return cast(self, src, dst_type)

    builder.cast_impl = cast_impl


def _dot_bf16_as_fp32() -> None:
    """Make the interpreter's ``tl.dot`` multiply bf16 operands as the numbers they encode.

    Triton 3.9's interpreter holds bf16 as raw uint16 bits and hands them to ``np.matmul`` as integers: attention
    in bf16 returned values near 1e9. A bf16 value widened to fp32 is exact (its bits shifted into the high half),
    and the GPU's bf16 MMA forms exact products and accumulates them in fp32, so the product is the GPU's up to
    the summation order. Only the interpreter's builder is patched: compiled kernels are untouched. A Triton
    without this builder method is left alone: tests/test_attention.py checks bf16 attention on the CPU.
    """
    import numpy as np
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    dot = getattr(builder, "create_dot", None)
    if dot is None:
        return

    def widen(operand):
        if operand.dtype.scalar != triton.language.bfloat16:
            return operand
        bits = np.asarray(operand.data, dtype=np.uint16).astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), triton.language.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
def _single_threaded_numpy_blas():
    """A context manager factory: numpy's BLAS on one thread while an interpreted kernel runs.

    The interpreter does each ``tl.dot`` as a numpy matmul of a tile (e.g. 64 x 128 by 128 x 64). OpenBLAS splits
    even such small products over its threads, whose hand-offs and spinning cost more than the product, most of
    all on cores shared with other processes (benchmarks/results/cpu/default_run.md). Limited only during
    launches (threadpoolctl, tens of microseconds a launch), so the
    rest of the process keeps its BLAS threads; without threadpoolctl (it comes with scikit-learn, in the
    ``train`` extra) nothing changes."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return contextlib.nullcontext
    controller = None

    def limit():
        nonlocal controller
        if controller is None:  # at the first launch: the scan of loaded libraries takes ~30 ms
            controller = ThreadpoolController().select(user_api="blas")
        return controller.limit(limits=1) if controller.lib_controllers else contextlib.nullcontext()

    return limit


def _patch_language_once_per_launch() -> None:
    """Stop the interpreter from re-patching ``triton.language`` at every ``@triton.jit`` helper call inside a
    kernel.

    Triton 3.9's interpreter patches the language modules (``tl``, ``tl.core``, ``tl.tensor``, ``tl.math``) for
    the launched kernel and restores them when it returns (``GridExecutor.__call__``); a helper called from the
    kernel (``InterpretedFunction.__call__``) patches them again, each time walking every module member with
    ``inspect.getmembers``: a large share of an attention forward+backward on the interpreter, whose kernels call
    helpers, and ``tl.sum``/``tl.max`` (themselves helpers), inside their key loops. Nothing is
    restored before the launch returns, so once the launch, or a helper called in it, has patched the language
    modules a helper sees, a later helper call that sees no others runs its rewritten function directly; any
    other call (or a Triton without these internals) keeps the original path.
    """
    from triton.runtime import interpreter

    executor = getattr(interpreter, "GridExecutor", None)
    helper = getattr(interpreter, "InterpretedFunction", None)
    if executor is None or helper is None or not hasattr(helper, "rewrite") or not hasattr(interpreter, "_patch_lang"):
        return
    lang_modules = (triton.language, triton.language.core)
    patched: list[set] = []  # per running launch (innermost last): the language modules patched so far

    @functools.lru_cache(maxsize=None)
    def langs_of(fn) -> frozenset:
        return frozenset(id(v) for v in fn.__globals__.values() if any(v is m for m in lang_modules))

    run_kernel = executor.__call__
    single_threaded_blas = _single_threaded_numpy_blas()

    def run_kernel_tracked(self, *args, **kwargs):
        patched.append(set(langs_of(self.fn)))
        try:
            with single_threaded_blas():
                return run_kernel(self, *args, **kwargs)
        finally:
            patched.pop()

    call_helper = helper.__call__

    def call_helper_patched_once(self, *args, **kwargs):
        langs = langs_of(self.fn)
        if not patched or not langs <= patched[-1]:
            if patched:
                patched[-1] |= langs  # the original path patches them now, for the rest of the launch
            return call_helper(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    executor.__call__ = run_kernel_tracked
    helper.__call__ = call_helper_patched_once


if INTERPRET:
    _round_bf16_to_nearest_even()
    _dot_bf16_as_fp32()
    _patch_language_once_per_launch()

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_op(name: str, mutates_args: tuple[str, ...], opaque: bool = False):
    """Register ``fn`` (whose kernels launch through ``launch``) as the operator ``name`` for torch.compile,
    without the dispatcher's cost in eager mode.

    On a GPU the operator is a ``torch.library.triton_op``: while torch.compile traces, AOTAutograd traces *into*
    ``fn``, so Inductor sees each Triton kernel (``launch`` wraps it with ``wrap_triton``), schedules it with
    the generated code around it, fuses the pointwise glue on either side and captures it in its CUDA graphs
    (``mode="reduce-overhead"``). The same traced body is the operator's fake (shape) rule, so ``fn`` must stay
    traceable: shapes and strides only, never a tensor's values or address.

    Under the interpreter (CPU tensors) the operator is an opaque ``torch.library.custom_op``, since Inductor
    can launch Triton kernels only on a GPU; ``fn`` is its fake rule too, with the launches skipped and
    ``shapes_only()`` true (``_shape_rule``). ``opaque``
    keeps an op opaque on the GPU as well: for a body whose point is its in-place memory plan (functionalization
    would turn each in-place buffer into a copy).

    Outside tracing, the dispatcher's Python layers cost far more host time than many of the kernels behind
    them take on the GPU (docs/performance_history.md, host-time table), so eager calls run ``fn``
    directly and only bump the version counters of the arguments it writes, as the registered op would, so
    autograd still catches a mutated tensor that an earlier op saved for its backward.
    """
    def register(fn):
        if INTERPRET or opaque:
            @functools.wraps(fn)
            def run_directly(*args, **kwargs):
                with _direct_launches():
                    return fn(*args, **kwargs)
            op = torch.library.custom_op(name, run_directly, mutates_args=mutates_args,
                                         schema=torch.library.infer_schema(fn, mutates_args=mutates_args))
            op.register_fake(_shape_rule(fn))
        else:
            op = torch.library.triton_op(name, fn, mutates_args=mutates_args)
        _inductor_fallbacks.append(name)
        params = list(inspect.signature(fn).parameters)
        mutated = [(params.index(a), a) for a in mutates_args]  # (position, name), looked up once

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling():
                _register_inductor_fallbacks()
                return op(*args, **kwargs)
            if INTERPRET:
                result = fn(*args, **kwargs)
            else:
                with _direct_launches():
                    result = fn(*args, **kwargs)
            if mutated:
                written = [args[i] if i < len(args) else kwargs.get(a) for i, a in mutated]
                torch.autograd.graph.increment_version([t for t in written if t is not None])
            return result

        call.op = op
        return call
    return register


# Ops that Inductor calls as opaque fallbacks (all of them under the interpreter). torch 2.11's Inductor formats
# an implicit fallback's arguments into an INFO log message even when nobody logs (torch/_inductor/graph.py), and
# an argument that is a deep unrealized expression (the residual stream after a few blocks) prints in time
# exponential in its depth: a 4-layer GPT never finished compiling. Ops named in FALLBACK_ALLOW_LIST skip
# that message. They are added when Dynamo first traces a kernel_op call: importing Inductor at import time
# would cost seconds.
_inductor_fallbacks: list[str] = []


def _register_inductor_fallbacks() -> bool:
    if _inductor_fallbacks:
        from torch._inductor import lowering

        allow = getattr(lowering, "FALLBACK_ALLOW_LIST", None)
        if allow is not None:
            for name in _inductor_fallbacks:
                allow.add(name)
        _inductor_fallbacks.clear()
    return True


# Dynamo runs a function marked so at trace time and keeps its result as a constant, so the registration above
# happens before Inductor lowers the graph instead of being recorded as a side effect to replay afterwards (what
# torch._dynamo.assume_constant_result sets, without importing Dynamo here).
_register_inductor_fallbacks._dynamo_marked_constant = True


_in_shape_rule = threading.local()


def _shape_rule(fn):
    """``fn`` as an opaque op's fake (shape) rule: on fake tensors, launches skipped, and ``shapes_only()`` true,
    so launch plans take torch.compile's symbolic sizes at their example values (``plan_sizes``)."""
    @functools.wraps(fn)
    def rule(*args, **kwargs):
        outer = shapes_only()  # (restored after: a body may call another op, whose rule nests in this one)
        _in_shape_rule.on = True
        try:
            with _direct_launches():
                return fn(*args, **kwargs)
        finally:
            _in_shape_rule.on = outer
    return rule


def shapes_only() -> bool:
    """Whether an op body now runs as an opaque op's shape rule (see ``kernel_op``): only its outputs' shapes
    count, nothing it plans or launches does (the real call plans again from its real sizes)."""
    return getattr(_in_shape_rule, "on", False)


def _direct_launches():
    """Launch kernels straight away: eager tensors need no graph node (``wrap_triton`` costs ~1 ms per launch
    through its dispatcher when it is enabled outside tracing)."""
    return set_wrap_triton_enabled(False)


def _skip_launch(*args, **kwargs) -> None:
    return None


def traced_launches() -> bool:
    """Whether ``launch`` now records kernels for torch.compile (a ``kernel_op`` body traced on a GPU)."""
    return not INTERPRET and is_wrap_triton_enabled()


def _late_env_note() -> str:
    """A sentence for errors about the mode: that TRIFORMER_INTERPRET changed after import, if it did."""
    now = os.environ.get("TRIFORMER_INTERPRET")
    if now == _FORCED_AT_IMPORT:
        return ""
    return (f" (TRIFORMER_INTERPRET is {now!r} now but was {_FORCED_AT_IMPORT!r} when triformer was imported: it is "
            "read once, at import; set it before the first `import triformer`, in a fresh process)")


def _mode_changed_error() -> RuntimeError:
    now = os.environ.get("TRITON_INTERPRET", "unset")
    return RuntimeError(
        f"Triton's interpreter was switched {'off' if INTERPRET else 'on'} after triformer was imported "
        f"(TRITON_INTERPRET is {now!r} now; triformer set it to {'1' if INTERPRET else '0'} and defined its kernels "
        f"for the {'interpreter' if INTERPRET else 'compiler'}), and Triton cannot change modes within a process. "
        f"Restore os.environ['TRITON_INTERPRET'] = '{'1' if INTERPRET else '0'}', or start a fresh process with "
        "TRIFORMER_INTERPRET=0 or 1 set before `import triformer`" + _late_env_note())


def check_mode() -> None:
    """Raise RuntimeError, saying what to do, if Triton's interpreter setting no longer matches the mode the
    kernels were defined for. Triton reads TRITON_INTERPRET again at each launch (``triton.knobs``), so one
    changed after import made a kernel of one mode run in the other: a bare AssertionError from inside Triton.
    Read through the same knob (a C ``getenv``, a fraction of a microsecond). ``launch`` calls it; so does any
    launch that bypasses ``launch`` (attention's autotuned kernels)."""
    if triton.knobs.runtime.interpret != INTERPRET:
        raise _mode_changed_error()


def launch(kernel, grid):
    """``kernel[grid]``, as torch.compile must see it: a ``wrap_triton`` node while a ``kernel_op`` body is
    traced on a GPU (``kernel_op``'s eager calls and opaque op bodies switch that off); nothing while an opaque
    op's body runs on fake tensors as its shape rule; the kernel itself otherwise. ``check_mode`` first."""
    check_mode()
    if not INTERPRET and is_wrap_triton_enabled():
        return torch.library.wrap_triton(kernel)[grid]
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return _skip_launch
    return kernel[grid]


def is_finite(value) -> bool:
    """``math.isfinite`` for a scalar argument that torch.compile may hand over as a SymFloat (Dynamo makes a float
    argument symbolic once it has seen two values): comparisons trace as guards, ``math.isfinite`` breaks the graph."""
    return value == value and value != math.inf and value != -math.inf


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise TypeError unless ``t`` is a tensor of a dtype the kernels compute in."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors share one device that the current mode can run kernels on; returns it."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    device = named[0][1].device
    for name, t in named[1:]:
        if t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but {named[0][0]} is on {device}; all inputs must share a device"
            )
    if not INTERPRET and device.type != "cuda":
        raise ValueError(
            f"{named[0][0]} is on {device}, but triformer compiled its kernels for CUDA; move the tensors to "
            "the GPU, or set TRIFORMER_INTERPRET=1 before importing triformer to run them on the CPU" + _late_env_note()
        )
    if INTERPRET and device.type != "cpu":
        raise ValueError(
            f"{named[0][0]} is on {device}, but triformer runs its kernels through Triton's interpreter "
            "(TRIFORMER_INTERPRET=1 or no CUDA device); pass CPU tensors or unset TRIFORMER_INTERPRET"
            + _late_env_note()
        )
    return device


_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


def _planned(value):
    if not isinstance(value, _SYMBOLIC):
        return value
    hint = value.node.hint  # the example size the trace started from (None: a data-dependent size)
    if shapes_only() and hint is not None:
        return hint
    from torch.fx.experimental.symbolic_shapes import guard_scalar
    return guard_scalar(value)


def plan_sizes(*values):
    """``values`` (sizes) as plain numbers for planning a launch: tile sizes, grids, loops over chunks. Under
    torch.compile with dynamic shapes a size is symbolic, and planning with it (``min``, ``range``, Triton's
    ``next_power_of_2``) adds guards that pin it to its example value one comparison at a time, through large
    symbolic expressions (minutes for one op). Instead: in an opaque op's shape rule (``shapes_only()``) the plan
    never reaches a kernel, so a size is taken at its example value, without a guard; where the plan is traced
    into the graph as a kernel's grid and constexprs (a GPU op under torch.compile) the size is specialized, one
    guard on its value, so the traced launch only ever runs at that size (a new size recompiles, and
    ``torch._dynamo.mark_dynamic`` on it raises torch's constraint error). Plain ints pass through."""
    return values if all(type(v) is int for v in values) else tuple(_planned(v) for v in values)


def plan_cache(fn):
    """``functools.lru_cache(maxsize=256)`` for a function that plans launches from sizes (Triton's host helpers
    cost microseconds a call), that also accepts the symbolic sizes torch.compile passes with dynamic shapes
    (``dynamic=True``, ``mark_dynamic``, or a second input shape), which lru_cache cannot hash: they are
    turned into numbers by ``plan_sizes`` first."""
    cached = functools.lru_cache(maxsize=256)(fn)

    @functools.wraps(fn)
    def plan(*args):
        try:
            return cached(*args)
        except TypeError:  # unhashable: a symbolic size (checked, so a TypeError of fn itself still shows)
            if not any(isinstance(a, _SYMBOLIC) for a in args):
                raise
        return cached(*plan_sizes(*args))

    plan.cache_clear = cached.cache_clear  # the benchmarks' sweeps change launch constants between plans
    return plan


@functools.lru_cache(maxsize=None)
def multiprocessors(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index`` (a tensor's ``get_device()``)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def rows_per_program(n_rows: int, block_cols: int, gpu_rows: int = 1) -> int:
    """How many rows one program of a row-wise kernel handles (a power of two).

    The interpreter pays ~milliseconds per program regardless of its size, so it gets few programs
    with tiles of up to 64k elements; a GPU wants many programs to fill its multiprocessors, so it
    gets ``gpu_rows`` (the caller's tuned value).
    """
    if not INTERPRET:
        return gpu_rows
    n_rows, block_cols = plan_sizes(n_rows, block_cols)
    budget = max(1, (1 << 16) // block_cols)
    largest_fitting = 1 << (budget.bit_length() - 1)
    return min(triton.next_power_of_2(max(n_rows, 1)), largest_fitting, 256)
