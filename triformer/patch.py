"""Patch an existing model in place with triformer kernels: ``report = triformer.patch(model)``.

Tested for logits, loss and every gradient against the unpatched model (fp32, 1e-5, padded batches) on
``transformers``' Llama, Mistral, Mixtral, Qwen2/3/3-MoE, Gemma 1/2/3, Phi3, OLMo2, Granite, SmolLM3, GLM4,
Llama 4 (text), GPT-2, GPT-NeoX and ViT, and timm's VisionTransformer (``tests/test_patch.py``). Other models
get what applies, and the report lists every candidate left alone with the reason.

How. Nothing process-wide changes: no module global, no context variable, no class is modified. A patched
module changes its own class, to a triformer class (norms, activations, MLPs, the LM head) or to a subclass
of its own class (attention with RoPE, MoE experts, the causal LM) that keeps the original ``forward``'s signature, so
every library that inspects it (Trainer's column filter, ``generate``, PEFT) sees the same model. Parameters
are never replaced (same ``nn.Parameter`` objects, same state-dict keys, tied weights stay tied, optimizers
built before the patch keep working), ``isinstance`` against the original class still holds for the
subclasses, and a patched model pickles, deep-copies and compiles with ``torch.compile(fullgraph=True)``;
loading the pickle in a fresh process re-creates the patched classes. Another instance of the same class,
or a model sharing the config object, stays as it was (the patched model gets its own copy of its config).

What is recognised is decided by structure, each candidate checked numerically on a small probe input
(plain PyTorch, no kernel) before it is swapped:

* ``norm``: ``nn.LayerNorm`` over the last dim (and subclasses that compute the same), and any weight-only
  RMSNorm (one 1-D ``weight``, an ``eps``/``variance_epsilon``, ``x * rsqrt(mean(x^2) + eps) * w``), also
  Gemma's ``* (1 + w)`` and weightless ones: ``triformer.layer_norm`` / ``triformer.rms_norm`` on the
  module's own parameters.
* ``attention``: transformers models that dispatch through ``AttentionInterface`` get
  ``config._attn_implementation = "triformer"`` (registered when transformers loads, see
  ``register_attention``; the mask, padding and sliding windows reach the kernel as SDPA's boolean mask).
  Grouped-query attention goes to the kernel as is, and so does attention logit soft-capping: the ``softcap``
  an attention module passes (Gemma-2's ``attn_logit_softcapping``) becomes the kernel's (Gemma-3's module, in
  transformers 5.25, passes none even when its config sets one, and neither applies it, patched or not).
  Attention sinks (gpt-oss) and head dims above 128 are refused when patching (left alone, listed). timm's
  ``Attention`` calls ``triformer.attention``.
* ``mlp``: GELU activations (exact or tanh) call ``triformer.gelu``; gated MLPs
  ``down(act(gate(x)) * up(x))`` (separate or packed ``gate_up_proj``) with a SiLU or GELU gate call
  ``triformer.swiglu`` / ``triformer.geglu`` (the projections stay the module's own, LoRA-wrapped or not), fused
  with ``down_proj`` as ``triformer.glu_linear`` (their product is not kept for backward) while ``down_proj`` is a
  plain ``nn.Linear``;
  MoE experts with transformers' 3-D expert weights run it in their ``_apply_gate`` (batched or grouped
  experts implementation; the eager loop is left alone).
* ``rope``: an attention module whose forward calls its modeling module's ``apply_rotary_pos_emb`` (checked
  to be the rotate-half RoPE, full head dim) runs ``triformer.apply_rope`` instead: its subclass's forward
  is the original code with that one name bound to triformer's. HF's cos/sin ``[B, T, D]`` tables hold each
  frequency twice, so the kernel takes their first half; any RoPE scaling works since the tables come from
  the model. A call it cannot take (partial rotary dims, another layout) runs the original function.
* ``loss``: causal LMs whose forward computes ``self.lm_head(hidden)`` and then ``self.loss_function(...)``
  with an ``nn.Linear`` head and no final logit soft-capping: a training-mode call with ``labels`` computes
  ``triformer.linear_cross_entropy`` on the hidden states (the logits are never materialized; MoE auxiliary
  losses are added by the model as usual) with HF's causal-LM semantics (labels shifted left,
  ``ignore_index``, ``shift_labels``, ``num_items_in_batch``). That output's ``logits`` is None (with
  ``return_dict=False``, a None in the logits slot), as with Liger-Kernel; eval mode, or no labels, returns
  the logits as before.

Wrappers: ``patch`` unwraps a ``PeftModel`` to its base model (and torch.compile's and DDP's wrappers to their
module); a patched model can be wrapped afterwards.
Unpatch: not supported; patch a fresh copy (``copy.deepcopy(model)`` before patching) to keep both.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import inspect
import sys
import types
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from triformer.attention import MAX_HEAD_DIM
from triformer.attention import attention as _attention
from triformer.gelu import gelu
from triformer.glu_linear import glu_linear
from triformer.layernorm import layer_norm
from triformer.linear_cross_entropy import linear_cross_entropy
from triformer.rmsnorm import rms_norm
from triformer.rope import apply_rope
from triformer.swiglu import geglu, swiglu

__all__ = ["PatchReport", "patch"]

ATTN_IMPLEMENTATION = "triformer"


@dataclass
class PatchReport:
    """What ``patch`` did: ``swapped`` and ``left_alone`` are lists of (module name, description)."""
    swapped: list = field(default_factory=list)
    left_alone: list = field(default_factory=list)

    def parts(self) -> dict:
        """{part: number of modules swapped}."""
        out: dict = {}
        for _, what in self.swapped:
            part = what.split(":", 1)[0]
            out[part] = out.get(part, 0) + 1
        return out

    def names(self, part: str) -> list:
        return [name for name, what in self.swapped if what.split(":", 1)[0] == part]

    def __str__(self) -> str:
        lines = [f"triformer.patch: {len(self.swapped)} swapped, {len(self.left_alone)} left alone"]
        lines += [f"  swapped     {name or '<model>'}: {what}" for name, what in self.swapped]
        lines += [f"  left alone  {name or '<model>'}: {why}" for name, why in self.left_alone]
        return "\n".join(lines)


def _cls(module) -> str:
    return type(module).__name__


def _from(module, prefix: str) -> bool:
    return type(module).__module__.startswith(prefix)


def _swap_class(module: nn.Module, cls: type, **attributes) -> None:
    """Make ``module`` an instance of ``cls`` (same __dict__: parameters, buffers, hooks, children)."""
    module.__dict__.setdefault("triformer_original", type(module))
    module.__dict__.update(attributes)
    module.__class__ = cls
    if "_old_forward" in module.__dict__:  # accelerate's hooks (device_map) call the forward they captured
        module._old_forward = types.MethodType(cls.forward, module)


def _is_patched(module) -> bool:
    return "triformer_original" in module.__dict__


def _mark_patched(module: nn.Module) -> None:
    """Marks a module that keeps its class as done, so that another patch call passes it by: a gated MLP's
    activation (its swapped parent no longer calls it), an attention module running through AttentionInterface."""
    module.__dict__.setdefault("triformer_original", type(module))


# ------------------------------------------------------------------------------------------------------
# Probes: a candidate is swapped only if it computes, on a random input, what its replacement computes
# ------------------------------------------------------------------------------------------------------

class _CannotProbe(Exception):
    """The module's weights hold no values (meta device): nothing to compare."""


@contextlib.contextmanager
def _probing(module: nn.Module):
    """Eval mode (no dropout, LoRA dropout included) and no autograd, restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    for m, _ in modes:
        m.training = False
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _probe_like(tensor: torch.Tensor, *shape: int) -> torch.Tensor:
    if tensor.is_meta:
        raise _CannotProbe
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g).to(tensor.device, tensor.dtype)


def _same(got, want: torch.Tensor) -> bool:
    if not torch.is_tensor(got) or got.shape != want.shape:
        return False
    # fp32 must tell GELU's tanh approximation from the exact one (under 1e-4 apart, relative, on the probe);
    # half precision only tells structures apart (w from 1 + w, gelu from silu)
    tol = 2e-6 if want.dtype in (torch.float32, torch.float64) else 3e-2
    got, want = got.double(), want.double()
    return bool(((got - want).norm() <= tol * want.norm()).item())


# ------------------------------------------------------------------------------------------------------
# Norms and activations
# ------------------------------------------------------------------------------------------------------

class _LayerNorm(nn.LayerNorm):
    """An ``nn.LayerNorm`` running ``triformer.layer_norm``."""

    def forward(self, x):
        return layer_norm(x, self.weight, self.bias, self.eps)


class _RMSNorm(nn.Module):
    """A weight-only (or weightless) RMSNorm running ``triformer.rms_norm`` on ``weight + triformer_offset``
    (Gemma: 1)."""

    def forward(self, x):
        weight = getattr(self, "weight", None)
        if weight is not None and self.triformer_offset:
            weight = weight + self.triformer_offset
        return rms_norm(x, weight, self.triformer_eps)

    def extra_repr(self) -> str:
        return f"eps={self.triformer_eps}, offset={self.triformer_offset}"


class _GELU(nn.Module):
    """A GELU activation running ``triformer.gelu``."""

    def forward(self, x):
        return gelu(x, self.triformer_approximate)


def _eps(m) -> Optional[float]:
    for name in ("variance_epsilon", "eps"):
        value = m.__dict__.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _rms_norm_offset(m, eps: float) -> Optional[float]:
    """0 or 1 if ``m(x)`` is ``rms(x) * (w + offset)`` on a probe (w replaced by random values; a module without
    a weight must compute ``rms(x)``), else None."""
    w = m._parameters.get("weight")
    x = _probe_like(torch.empty(0) if w is None else w, 3, 24 if w is None else w.numel())
    normed = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
    with _probing(m):
        if w is None:
            return 0.0 if _same(m(x), normed.to(x.dtype)) else None
        w_probe = _probe_like(w, w.numel())
        got = torch.func.functional_call(m, {"weight": w_probe}, (x,))
    if not torch.is_tensor(got):
        return None
    for offset in (0.0, 1.0):
        if _same(got, (normed * (w_probe.double() + offset)).to(got.dtype)):
            return offset
    return None


def _norm_candidate(m) -> bool:
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        return True
    params = dict(m.named_parameters())
    weight_only = not params or (set(params) == {"weight"} and params["weight"].dim() == 1)
    return weight_only and next(m.children(), None) is None and _eps(m) is not None


def _patch_norm(name, m, report) -> bool:
    if not _norm_candidate(m):
        if "norm" in _cls(m).lower() and not isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            report.left_alone.append((name, f"norm: {_cls(m)} is not a LayerNorm or a weight-only RMSNorm"))
            return True
        return False
    if isinstance(m, nn.LayerNorm):
        if len(m.normalized_shape) != 1:
            report.left_alone.append((name, f"norm: {_cls(m)} over {tuple(m.normalized_shape)} (only the last dim)"))
            return True
        if type(m) is not nn.LayerNorm:
            x = _probe_like(next(m.parameters(), torch.empty(0)), 3, m.normalized_shape[0])
            with _probing(m):
                want = F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
                if not _same(m(x), want):
                    report.left_alone.append((name, f"norm: {_cls(m)} does not compute nn.LayerNorm's output"))
                    return True
        _swap_class(m, _LayerNorm)
        report.swapped.append((name, f"norm: {m.triformer_original.__name__} -> triformer.layer_norm"))
        return True
    if isinstance(m, nn.RMSNorm):
        if len(m.normalized_shape) != 1:
            report.left_alone.append((name, f"norm: {_cls(m)} over {tuple(m.normalized_shape)} (only the last dim)"))
            return True
        eps, offset = m.eps, 0.0
    else:
        eps = _eps(m)
        offset = _rms_norm_offset(m, eps)
        if offset is None:
            if "norm" in _cls(m).lower():
                report.left_alone.append((name, f"norm: {_cls(m)} does not compute a weight-only RMSNorm"))
                return True
            return False
    _swap_class(m, _RMSNorm, triformer_eps=eps, triformer_offset=offset)
    what = "triformer.rms_norm" + (" with weight 1 + w" if offset else "")
    report.swapped.append((name, f"norm: {m.triformer_original.__name__} -> {what}"))
    return True


def _gelu_kind(act, width: int = 37) -> Optional[str]:
    """"none" or "tanh" if ``act`` computes that GELU on a probe, "silu" for SiLU, else None."""
    if not isinstance(act, nn.Module) or next(act.parameters(), None) is not None:
        return None
    x = _probe_like(torch.empty(0), 3, width) * 3
    with _probing(act):
        got = act(x)
    for kind, want in (("none", F.gelu(x)), ("tanh", F.gelu(x, approximate="tanh")), ("silu", F.silu(x))):
        if _same(got, want):
            return kind
    return None


def _patch_activation(name, m, report) -> bool:
    if not (isinstance(m, nn.GELU) or "gelu" in _cls(m).lower()) or next(m.children(), None) is not None:
        return False
    kind = _gelu_kind(m)
    if kind in ("none", "tanh"):
        _swap_class(m, _GELU, triformer_approximate=kind)
        report.swapped.append((name, f"mlp: {m.triformer_original.__name__} -> triformer.gelu(approximate={kind!r})"))
    else:
        report.left_alone.append((name, f"mlp: {_cls(m)} is not an exact or tanh GELU"))
    return True


# ------------------------------------------------------------------------------------------------------
# Gated MLPs
# ------------------------------------------------------------------------------------------------------

def _glu(gate, up, act: str):
    """``act(gate) * up`` (``up=None``: ``gate`` packs gate and up halves) by triformer.swiglu / geglu; ``act`` is
    what ``_gelu_kind`` found."""
    if act == "silu":
        return swiglu(gate, up)
    return geglu(gate, up, act)


# _gelu_kind's answer -> triformer.glu_linear's activation
_GLU_LINEAR_ACTIVATION = {"silu": "silu", "tanh": "gelu_tanh", "none": "gelu"}


def _plain_linear(m) -> bool:
    """True when calling ``m`` is exactly ``F.linear(x, m.weight, m.bias)``: an ``nn.Linear`` itself (not a LoRA
    layer or a quantized subclass), with no hooks and no forward replaced on the instance (accelerate's)."""
    return (type(m) is nn.Linear and "forward" not in m.__dict__ and not (m._forward_hooks or m._forward_pre_hooks)
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks))


class _GatedMLP(nn.Module):
    """``down_proj(glu(gate, up))`` with the module's own projections: ``gate_proj``/``up_proj``, or one packed
    ``gate_up_proj`` (gate first), and triformer's SwiGLU or GeGLU. While ``down_proj`` is a plain ``nn.Linear``
    the gated unit and ``down_proj`` run as ``triformer.glu_linear``, which keeps gate and up for backward but not
    their product (a third of the MLP's activations); a wrapped ``down_proj`` (LoRA, hooks) is called as is. The
    check runs per call, since PEFT may wrap the projections after patching."""

    def forward(self, x):
        if self.triformer_packed:
            gate, up = self.gate_up_proj(x), None
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        down = self.down_proj
        if _plain_linear(down):
            return glu_linear(gate, up, down.weight, down.bias, _GLU_LINEAR_ACTIVATION[self.triformer_act])
        return down(_glu(gate, up, self.triformer_act))


_MLP_LAYOUTS = ((("gate_proj", "up_proj", "down_proj"), False), (("gate_up_proj", "down_proj"), True))


def _gated_mlp(m) -> Optional[tuple]:
    """(packed, activation attribute) if ``m`` looks like a gated MLP, else None."""
    children = dict(m.named_children())
    for names, packed in _MLP_LAYOUTS:
        if all(n in children for n in names):
            act = next((a for a in ("act_fn", "activation_fn", "act") if a in children), None)
            if act is not None and len(children) == len(names) + 1:
                return packed, act
    return None


def _width(proj) -> Optional[int]:
    width = getattr(proj, "in_features", None)
    return width if isinstance(width, int) else None


def _patch_mlp(name, m, report) -> bool:
    layout = _gated_mlp(m)
    if layout is None:
        return False
    packed, act_name = layout
    act = getattr(m, act_name)
    first = m.gate_up_proj if packed else m.gate_proj
    kind = _gelu_kind(act)
    width = _width(first)
    if kind is None or width is None:
        report.left_alone.append((name, f"mlp: {_cls(m)} with activation {_cls(act)} (only SiLU or GELU gates)"))
        return True
    x = _probe_like(next(m.parameters()), 3, width)
    with _probing(m):
        if packed:
            gate, up = m.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = m.gate_proj(x), m.up_proj(x)
        matches = _same(m(x), m.down_proj(act(gate) * up))
    if not matches:
        report.left_alone.append((name, f"mlp: {_cls(m)} does not compute down_proj(act(gate) * up)"))
        return True
    _swap_class(m, _GatedMLP, triformer_packed=packed, triformer_act=kind)
    _mark_patched(act)
    glu = "swiglu" if kind == "silu" else f"geglu(approximate={kind!r})"
    report.swapped.append((name, f"mlp: {m.triformer_original.__name__} -> down_proj(triformer.{glu}), as "
                                 f"triformer.glu_linear while down_proj is a plain nn.Linear"))
    return True


def _experts_problem(m) -> Optional[str]:
    """None if ``m`` is a transformers MoE experts module whose gating (``_apply_gate``, which its batched and
    grouped implementations call) computes ``act(gate) * up`` on packed halves; "" if it is no such module."""
    if not (callable(getattr(type(m), "_apply_gate", None)) and "gate_up_proj" in m._parameters
            and getattr(m, "has_gate", False)):
        return ""
    act = getattr(m, "act_fn", None)
    if act is None:
        return f"mlp: {_cls(m)} has its own gating (no act_fn)"
    if _gelu_kind(act) is None or not getattr(m, "is_concatenated", False):
        return f"mlp: {_cls(m)} gates with {_cls(act)} on interleaved halves, or with another activation"
    implementation = getattr(getattr(m, "config", None), "_experts_implementation", None)
    if implementation in (None, "eager"):
        return f"mlp: {_cls(m)} runs the eager experts loop (experts implementation {implementation!r})"
    z = _probe_like(m.gate_up_proj, 3, 16)
    with _probing(m):
        gate, up = z.chunk(2, dim=-1)
        if not _same(m._apply_gate(z), act(gate) * up):
            return f"mlp: {_cls(m)}._apply_gate does not compute act(gate) * up"
    return None


def _patch_experts(name, m, report) -> bool:
    problem = _experts_problem(m)
    if problem == "":
        return False
    if problem is not None:
        report.left_alone.append((name, problem))
        return True
    kind = _gelu_kind(m.act_fn)
    _swap_class(m, _subclass(type(m), "experts"), triformer_act=kind)
    _mark_patched(m.act_fn)
    glu = "swiglu" if kind == "silu" else f"geglu(approximate={kind!r})"
    report.swapped.append((name, f"mlp: {_cls(m)}._apply_gate -> triformer.{glu} (every expert)"))
    return True


# ------------------------------------------------------------------------------------------------------
# Subclasses of the model's own classes (attention with RoPE, MoE experts, causal LMs)
# ------------------------------------------------------------------------------------------------------

class _Subclass:
    """First base of the subclasses ``_subclass`` makes: pickles and deep-copies them as (original class,
    kind), so the copy or the unpickled model, even in a fresh process, gets the same subclass."""

    def __reduce_ex__(self, protocol):
        reduced = super().__reduce_ex__(protocol)
        original = self.triformer_original
        return (_new_subclassed, (original, type(self).triformer_kind)) + tuple(reduced[2:])


def _new_subclassed(original: type, kind: str):
    cls = _subclass(original, kind)
    return cls.__new__(cls)


@functools.lru_cache(maxsize=None)
def _subclass(original: type, kind: str) -> type:
    """``original`` with the method that ``kind`` builds from the original one (a forward keeps its name and
    signature: ``inspect.signature`` follows the wrapper's ``__wrapped__``)."""
    method, build = _SUBCLASS_METHODS[kind]
    return type(original.__name__, (_Subclass, original),
                {method: build(getattr(original, method)), "triformer_kind": kind,
                 "__module__": original.__module__, "__qualname__": original.__qualname__})


def _rebind_globals(fn, **names):
    """A copy of ``fn`` whose code sees ``names`` instead of its module's globals of those names; decorators
    (functions wrapping it through a closure, with ``__wrapped__``) are rebuilt around the copy."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is not None:
        new_inner = _rebind_globals(inner, **names)
        cells = tuple(types.CellType(new_inner) if c.cell_contents is inner else c for c in fn.__closure__ or ())
        if new_inner is inner or cells == (fn.__closure__ or ()):
            raise ValueError(f"cannot rebuild the decorator around {fn.__qualname__}")
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)
        new.__wrapped__ = new_inner
    else:
        if not set(names) & set(fn.__code__.co_names):
            return fn
        # without __name__, torch.compile guards these globals in this dict, not in the original module
        scope = {k: v for k, v in fn.__globals__.items() if k != "__name__"}
        scope.update(names)
        new = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__, new.__doc__ = fn.__qualname__, fn.__doc__
    return new


def _raw_code_names(fn) -> set:
    return set(inspect.unwrap(fn).__code__.co_names)


# ------------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------------

def _same_dtype(q, k, v):
    """SDPA under autocast runs in the autocast dtype; triformer.attention wants one dtype for q, k, v."""
    if q.dtype == k.dtype == v.dtype:
        return q, k, v
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
    else:
        dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return q.to(dt), k.to(dt), v.to(dt)


def triformer_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """The ``"triformer"`` entry of transformers' ``AttentionInterface``, with SDPA's semantics:
    query [B, H, Tq, D], key/value [B, H_kv, Tk, D] (H_kv divides H), ``attention_mask`` None or SDPA's mask
    (bool True = attend, or additive float) broadcastable to [B, H, Tq, Tk]. Returns ([B, Tq, H, D], None).
    ``softcap`` (Gemma-2's ``attn_logit_softcapping``; None or 0 = off) soft-caps the scaled scores before the
    mask, as transformers' eager attention does; ``scaling`` (Gemma's ``query_pre_attn_scalar ** -0.5``) is the
    kernel's ``scale``. ``sliding_window`` (Mistral's, Qwen2's and Gemma's sliding layers) is in the mask
    transformers builds; on the causal path without a mask it becomes the kernel's ``window``, the same band
    (transformers' ``sliding_window_overlay``: key ``kv_idx > q_idx - sliding_window``)."""
    for unsupported in ("s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"triformer attention does not support {unsupported!r}; patch this model with "
                             f"attention=False (triformer.patch leaves such models' attention alone)")
    if kwargs.get("output_attentions", False):
        warnings.warn("triformer attention does not return attention weights (output_attentions=True)",
                      stacklevel=2)
    q_len = query.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_len:  # what HF's SDPA path does when the mask was skipped
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.shape[2]]
        if attention_mask.requires_grad:
            attention_mask = attention_mask.detach()
    softcap = kwargs.get("softcap")
    # transformers (5.25) skips the mask only where kv_length < sliding_window, where the window drops nothing:
    # passing it keeps a mask-less caller that relies on the window exact
    sliding_window = kwargs.get("sliding_window")
    window = sliding_window if is_causal and sliding_window else None
    query, key, value = _same_dtype(query, key, value)
    out = _attention(query, key, value, is_causal=is_causal, dropout_p=float(dropout), scale=scaling,
                    attn_mask=attention_mask, softcap=0.0 if softcap is None else softcap, window=window)
    return out.transpose(1, 2), None


def register_attention() -> bool:
    """Register ``"triformer"`` in transformers' ``AttentionInterface`` (and SDPA's mask function under the same
    name in ``AttentionMaskInterface``), so ``from_pretrained(..., attn_implementation="triformer")`` and
    ``model.set_attn_implementation("triformer")`` work. ``import triformer`` calls it as soon as transformers'
    modeling code is loaded (see ``_RegisterWhenLoaded``); False if this transformers has no such interface."""
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(ATTN_IMPLEMENTATION, triformer_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return True


class _RegisterWhenLoaded:
    """A ``sys.meta_path`` finder that leaves every import to the other finders, except that once
    ``transformers.modeling_utils`` has executed it calls ``register_attention``: ``import triformer`` then
    costs nothing when transformers is not used, and never imports it."""
    target = "transformers.modeling_utils"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                register_attention()
            except Exception as exc:  # a transformers this code does not know must still import
                warnings.warn(f"triformer could not register its attention with transformers: {exc!r}",
                              stacklevel=2)
        spec.loader.exec_module = exec_then_register
        return spec


def _register_when_loaded() -> None:
    if _RegisterWhenLoaded.target in sys.modules:
        register_attention()
    elif not any(isinstance(f, _RegisterWhenLoaded) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenLoaded())


def _hf_attention_problem(model, config) -> Optional[str]:
    if not getattr(type(model), "_supports_attention_backend", False):
        return f"{type(model).__name__} does not dispatch through transformers' AttentionInterface"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any("sinks" in m._parameters for m in model.modules()):
        return "attention sinks (a 'sinks' parameter) are not supported"
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {MAX_HEAD_DIM}"
    return None


def _own_config(model) -> None:
    """Give ``model`` (and its modules) a copy of its config with the triformer attention, so that another model
    built from the same config object keeps its own attention."""
    old = model.config
    new = copy.deepcopy(old)
    mapping = {id(old): new}
    for key in getattr(old, "sub_configs", None) or {}:
        sub = getattr(old, key, None)
        if sub is not None:
            mapping[id(sub)] = getattr(new, key)
    for m in model.modules():
        c = m.__dict__.get("config")
        if c is not None and id(c) in mapping:
            m.config = mapping[id(c)]
    for c in mapping.values():
        if hasattr(c, "_attn_implementation"):
            c._attn_implementation = ATTN_IMPLEMENTATION


class _TimmAttention(nn.Module):
    """timm's ``Attention`` running ``triformer.attention``."""

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, _ = x.shape
        gate = getattr(self, "gate", None)
        gate = gate(x).sigmoid() if gate is not None else None
        head_dim = self.qkv.out_features // 3 // self.num_heads
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = _same_dtype(q, k, v)
        if attn_mask is not None and attn_mask.requires_grad:
            attn_mask = attn_mask.detach()
        x = _attention(q, k, v, is_causal=bool(is_causal), dropout_p=self.attn_drop.p if self.training else 0.0,
                       scale=self.scale, attn_mask=attn_mask)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * head_dim)
        norm = getattr(self, "norm", None)
        if norm is not None:
            x = norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def _timm_attention_problem(m) -> Optional[str]:
    needed = ("qkv", "num_heads", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop", "scale")
    if not all(hasattr(m, a) for a in needed):
        return "timm Attention without the expected qkv/q_norm/k_norm/proj layout"
    head_dim = m.qkv.out_features // 3 // m.num_heads
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {MAX_HEAD_DIM}"
    return None


# ------------------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------------------

def _hf_rope(original, q, k, cos, sin, *args, **kwargs):
    """``apply_rotary_pos_emb(q, k, cos, sin)`` as a patched attention module sees it: triformer's kernel on
    [B, H, T, D] heads with full-width [B, T, D] tables, the model's own function for any other call."""
    D = q.shape[-1]
    if (not args and set(kwargs) <= {"unsqueeze_dim"} and kwargs.get("unsqueeze_dim", 1) == 1 and q.dim() == 4
            and k.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape and cos.shape[-1] == D
            and k.shape[-1] == D and D % 2 == 0 and cos.shape[1] == q.shape[2]):
        half = D // 2
        return apply_rope(q, k, cos[..., :half].detach(), sin[..., :half].detach())
    return original(q, k, cos, sin, *args, **kwargs)


def _rope_forward(forward):
    original = inspect.unwrap(forward).__globals__["apply_rotary_pos_emb"]
    return _rebind_globals(forward, apply_rotary_pos_emb=functools.partial(_hf_rope, original))


def _rotate_half_rope(fn) -> bool:
    """Whether ``fn(q, k, cos, sin)`` is the rotate-half RoPE on [B, H, T, D] heads and [B, T, D] tables."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 1, 5, 8, generator=g)
    angles = torch.randn(2, 5, 4, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    try:
        got = fn(q, k, cos, sin)
    except Exception:  # another signature: not the function this patch replaces
        return False

    def rotated(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]
    return isinstance(got, tuple) and len(got) == 2 and _same(got[0], rotated(q)) and _same(got[1], rotated(k))


def _rope_problem(m, rotary_dims: set) -> Optional[str]:
    fn = sys.modules[type(m).__module__].__dict__.get("apply_rotary_pos_emb")
    if fn is None or "apply_rotary_pos_emb" not in _raw_code_names(type(m).forward):
        return ""  # no RoPE here: nothing to report
    head_dim = getattr(m, "head_dim", None) or getattr(m, "head_size", None)  # GPT-NeoX: head_size
    if head_dim is not None and rotary_dims and rotary_dims != {head_dim}:
        return f"rope: partial rotary dims {sorted(rotary_dims)} of head_dim {head_dim}"
    if not _rotate_half_rope(fn):
        return f"rope: {type(m).__module__}.apply_rotary_pos_emb is not the rotate-half RoPE"
    return None


def _rotary_dims(model) -> set:
    return {2 * b.numel() for m in model.modules() for n, b in m.named_buffers(recurse=False)
            if n == "inv_freq" and b.dim() == 1}


# ------------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------------

class _LMHead(nn.Linear):
    """A causal LM's ``nn.Linear`` head. While its model computes the fused loss (``triformer_fuse``), it
    returns the hidden states it gets, and the model's ``loss_function`` (this module's ``causal_lm_loss``)
    turns them into the loss; otherwise it is the linear layer it was."""

    def forward(self, x):
        if self.triformer_fuse:
            return x
        return F.linear(x, self.weight, self.bias)

    def causal_lm_loss(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index: int = -100,
                       shift_labels=None, **kwargs):
        if not self.triformer_fuse:
            return self.triformer_loss_function(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                                ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        hidden = logits
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shift_labels = shift_labels.to(hidden.device)
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):  # the head's matmul would have run in this dtype
            hidden = hidden.to(torch.get_autocast_dtype(device_type))
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = linear_cross_entropy(hidden, self.weight, shift_labels, self.bias, ignore_index, reduction)
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss


def _fused_loss_forward(forward):
    """The causal LM's forward: in training mode with labels, its head passes the hidden states through to the
    fused loss, and the output's logits slot is None."""
    labels_at = list(inspect.signature(forward).parameters).index("labels") - 1  # after self

    @functools.wraps(forward)
    def fused_loss_forward(self, *args, **kwargs):
        labels = kwargs.get("labels", args[labels_at] if len(args) > labels_at else None)
        if labels is None or not self.training:
            return forward(self, *args, **kwargs)
        head = self.lm_head
        head.triformer_fuse = True
        try:
            out = forward(self, *args, **kwargs)
        finally:
            head.triformer_fuse = False
        if isinstance(out, tuple):
            return out[:1] + (None,) + out[2:]
        out["logits"] = None
        return out
    return fused_loss_forward


def _experts_gate(_apply_gate):
    def triformer_apply_gate(self, gate_up_out):
        return _glu(gate_up_out, None, self.triformer_act)
    return triformer_apply_gate


# kind: (the method its subclass overrides, the function building it from the original method)
_SUBCLASS_METHODS = {"rope": ("forward", _rope_forward), "loss": ("forward", _fused_loss_forward),
                     "experts": ("_apply_gate", _experts_gate)}


def _loss_problem(model) -> Optional[str]:
    head = getattr(model, "lm_head", None)
    if head is None or not hasattr(model, "loss_function") or not _from(model, "transformers."):
        return f"{_cls(model)} is not a causal LM with an lm_head and a loss_function (nothing to fuse)"
    try:
        signature = inspect.signature(type(model).forward)
    except (TypeError, ValueError):
        signature = None
    if signature is None or "labels" not in signature.parameters:
        return f"{_cls(model)}.forward takes no labels"
    if not {"lm_head", "loss_function"} <= _raw_code_names(type(model).forward):
        return f"{_cls(model)}.forward does not compute self.loss_function(self.lm_head(...))"
    if type(head) is not nn.Linear:
        return f"{_cls(model)}'s lm_head is {_cls(head)}, not nn.Linear"
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(text, "final_logit_softcapping", None):
        return f"final_logit_softcapping={text.final_logit_softcapping} (the logits are soft-capped)"
    return None


def _patch_loss(model: nn.Module, report: PatchReport) -> None:
    if _is_patched(model):
        return
    problem = _loss_problem(model)
    if problem is not None:
        report.left_alone.append(("", f"loss: {problem}"))
        return
    head = model.lm_head
    _swap_class(head, _LMHead, triformer_fuse=False, triformer_loss_function=model.loss_function)
    model.loss_function = head.causal_lm_loss
    _swap_class(model, _subclass(type(model), "loss"))
    report.swapped.append(("", f"loss: {_cls(model)} with labels in training mode -> "
                               "triformer.linear_cross_entropy on the hidden states (no logits)"))


# ------------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside the wrappers around it: torch.compile's ``_orig_mod``, (Distributed)DataParallel's
    ``module``, a PEFT model's ``get_base_model()``."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            inner = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model.module
        else:
            get_base = getattr(model, "get_base_model", None)
            inner = get_base() if callable(get_base) else None
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner


def patch(model: nn.Module, *, norm: bool = True, attention: bool = True, mlp: bool = True, rope: bool = True,
          loss: bool = True, verbose: bool = False) -> PatchReport:
    """Swap ``model``'s norms, attention, MLP activations, rotary embedding and causal-LM loss for triformer
    kernels, in place (see the module docstring for what each part does). A PEFT model, torch.compile's
    wrapper and (Distributed)DataParallel are patched through to the model inside (patching before compiling
    saves a recompilation). Returns a ``PatchReport``: every module swapped, and every candidate left alone
    with the reason. Patching twice is a no-op for modules already patched. Patch before FSDP sharding: the
    probes read whole weights. On CPU the kernels run through Triton's interpreter; on CUDA they compile."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for part, value in (("norm", norm), ("attention", attention), ("mlp", mlp), ("rope", rope), ("loss", loss),
                        ("verbose", verbose)):
        if not isinstance(value, bool):
            raise TypeError(f"{part} must be a bool, got {type(value).__name__}")
    model = _unwrap(model)
    report = PatchReport()
    config = getattr(model, "config", None)
    is_hf = config is not None and _from(model, "transformers.")

    hf_attention = False
    if attention and is_hf:
        problem = _hf_attention_problem(model, config)
        if problem is None and not register_attention():
            problem = "this transformers has no AttentionInterface"
        if problem is None:
            hf_attention = True
            if getattr(config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
                _own_config(model)
        else:
            report.left_alone.append(("", f"attention: {problem}"))
    timm_attention = getattr(sys.modules.get("timm.layers.attention"), "Attention", None)
    rotary_dims = _rotary_dims(model) if rope else set()

    for name, m in list(model.named_modules()):
        if _is_patched(m):
            continue
        try:
            if norm and _patch_norm(name, m, report):
                continue
            if mlp and (_patch_mlp(name, m, report) or _patch_experts(name, m, report)
                        or _patch_activation(name, m, report)):
                continue
        except _CannotProbe:
            report.left_alone.append((name, f"{_cls(m)}: its weights are on the meta device (cannot verify it)"))
            continue
        cls = _cls(m)
        if not (cls.endswith("Attention") or cls.endswith("SelfAttention")):
            continue
        if attention and timm_attention is not None and type(m) is timm_attention:
            problem = _timm_attention_problem(m)
            if problem is None:
                _swap_class(m, _TimmAttention)
                report.swapped.append((name, f"attention: timm {cls} -> triformer.attention"))
            else:
                report.left_alone.append((name, f"attention: {problem}"))
            continue
        if not _from(m, "transformers."):
            if attention:
                report.left_alone.append((name, f"attention: {cls} is neither transformers' nor timm's"))
            continue
        if hf_attention and getattr(m, "config", None) is not None:
            report.swapped.append((name, f"attention: {cls} via AttentionInterface['{ATTN_IMPLEMENTATION}']"))
        if rope:
            problem = _rope_problem(m, rotary_dims)
            if problem is None:
                try:
                    subclass = _subclass(type(m), "rope")
                except ValueError as e:
                    problem = f"rope: {e}"
            if problem is None:
                _swap_class(m, subclass)
                report.swapped.append((name, f"rope: {type(m).__module__}.apply_rotary_pos_emb -> "
                                             "triformer.apply_rope in this module"))
            elif problem:
                report.left_alone.append((name, problem))
        if hf_attention:
            _mark_patched(m)
    if loss:
        _patch_loss(model, report)
    if verbose:
        print(report)
    return report


_register_when_loaded()
