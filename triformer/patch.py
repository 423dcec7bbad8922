"""Patch an existing model in place with triformer kernels: ``report = triformer.patch(model)``.

Supported (tested for logits, loss and every gradient against the unpatched model, fp32, 1e-5):
``transformers``' GPT2LMHeadModel, LlamaForCausalLM (MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM
share its layout), ViTForImageClassification, and timm's VisionTransformer. Other models get what applies
(norms, activations, attention through transformers' hook) and a report of what was left alone.

What is swapped, and how. Everything is per instance: another model of the same class in the same process
keeps running its own code, parameters are never replaced (the same ``nn.Parameter`` objects, the same
state-dict keys, optimizers built before the patch keep working), and ``save_pretrained`` is unchanged.

* ``norm``: ``nn.LayerNorm`` (and timm's ``LayerNorm``), ``nn.RMSNorm`` and the Llama-family RMSNorms
  (``LlamaRMSNorm``, ``MistralRMSNorm``, ``Qwen2RMSNorm``, ``Qwen3RMSNorm``): the module's ``forward`` becomes
  ``triformer.layer_norm`` / ``triformer.rms_norm`` on its own weight, bias and eps. Other norm classes
  (Gemma's ``1 + weight`` RMSNorm, multi-dim LayerNorms, ...) are left alone and listed.
* ``attention``: transformers models that support attention backends get a ``"triformer"`` entry in
  ``AttentionInterface`` (and the SDPA mask function in ``AttentionMaskInterface``: the mask, padding and any
  sliding window, reaches the kernel as SDPA's boolean mask, or as ``is_causal`` when HF skips it), and
  ``config._attn_implementation = "triformer"``. Grouped-query attention goes to the kernel as is (key/value
  heads are indexed by the query head, never copied). Soft-capping, attention sinks and head dims above 128
  are refused when patching (left alone, listed) and, should they reach the kernel anyway, raise. timm's
  ``Attention`` gets a ``forward`` calling ``triformer.attention``.
* ``mlp``: GELU activation modules (``nn.GELU``, transformers' ``GELUActivation``, ``NewGELUActivation``,
  ``GELUTanh``/``PytorchGELUTanh``) call ``triformer.gelu``; Llama-family MLPs with a SiLU activation compute
  ``down_proj(triformer.swiglu(gate_proj(x), up_proj(x)))``.
* ``rope``: as Liger-Kernel does, the modeling module's ``apply_rotary_pos_emb`` global is replaced, but by a
  dispatcher: it runs ``triformer.apply_rope`` only inside the forward of an attention module that this
  function patched (a context variable says so) and the original function everywhere else. HF's cos/sin
  ``[B, T, D]`` tables hold each frequency twice (``cat(freqs, freqs)``), so the kernel takes their first
  half; any RoPE type (default, linear, dynamic, llama3, yarn, ...) works since the tables come from the model.
  Calls it cannot take (another ``unsqueeze_dim``, partial rotary dims) run the original function.
* ``loss``: on causal LMs with an ``nn.Linear`` LM head, a call in training mode with ``labels`` computes
  ``triformer.linear_cross_entropy`` on the final hidden states (the logits are never materialized) with HF's
  causal-LM loss semantics (labels shifted left, ``ignore_index=-100``, ``shift_labels``,
  ``num_items_in_batch``). That output's ``logits`` is None, as with Liger-Kernel; eval mode, or no labels,
  returns the logits as before.

Unpatch: not supported; patch a fresh copy (``copy.deepcopy(model)`` before patching) to keep both.
"""
from __future__ import annotations

import contextvars
import functools
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
from triformer.layernorm import layer_norm
from triformer.linear_cross_entropy import linear_cross_entropy
from triformer.rmsnorm import rms_norm
from triformer.rope import apply_rope
from triformer.swiglu import swiglu

__all__ = ["PatchReport", "patch"]

ATTN_IMPLEMENTATION = "triformer"
LLAMA_FAMILY = ("Llama", "Mistral", "Qwen2", "Qwen3")
RMS_NORMS = tuple(f"{p}RMSNorm" for p in LLAMA_FAMILY)
SWIGLU_MLPS = tuple(f"{p}MLP" for p in LLAMA_FAMILY)
CAUSAL_LMS = ("GPT2LMHeadModel",) + tuple(f"{p}ForCausalLM" for p in LLAMA_FAMILY)
ROPE_ATTENTIONS = tuple(f"{p}Attention" for p in LLAMA_FAMILY)
GELU_TANH = ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "GELUPytorchTanh")
PARTS = ("norm", "attention", "mlp", "rope", "loss")

# True while a patched attention module's forward runs: the apply_rotary_pos_emb dispatcher reads it
_ROPE_ACTIVE = contextvars.ContextVar("triformer_rope_active", default=False)
# True while a patched causal LM computes its fused loss: its LM head then returns the hidden states
_HEAD_PASSTHROUGH = contextvars.ContextVar("triformer_head_passthrough", default=False)


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


def _bind(module: nn.Module, fn) -> None:
    """Replace this instance's forward (the class and every other instance keep theirs)."""
    module.forward = types.MethodType(fn, module)
    module._triformer_patched = True


def _cls(module) -> str:
    return type(module).__name__


def _from(module, prefix: str) -> bool:
    return type(module).__module__.startswith(prefix)


# ------------------------------------------------------------------------------------------------------
# Norms and activations
# ------------------------------------------------------------------------------------------------------

def _layer_norm_forward(self, x):
    return layer_norm(x, self.weight, self.bias, self.eps)


def _rms_norm_forward(self, x):
    eps = getattr(self, "variance_epsilon", None)
    if eps is None:
        eps = self.eps
    return rms_norm(x, self.weight, eps)


def _gelu_forward(approximate):
    def forward(self, x):
        return gelu(x, approximate)
    return forward


def _swiglu_mlp_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _is_plain_layer_norm(m) -> bool:
    if type(m) is nn.LayerNorm or (_cls(m) == "LayerNorm" and _from(m, "timm.")):
        return isinstance(m, nn.LayerNorm)
    return False


def _patch_norm(name, m, report) -> bool:
    if _is_plain_layer_norm(m):
        if len(m.normalized_shape) != 1:
            report.left_alone.append((name, f"norm: {_cls(m)} over {tuple(m.normalized_shape)} (only the last dim)"))
            return True
        _bind(m, _layer_norm_forward)
        report.swapped.append((name, f"norm: {_cls(m)} -> triformer.layer_norm"))
        return True
    if type(m) is getattr(nn, "RMSNorm", None) or (_cls(m) in RMS_NORMS and _from(m, "transformers.")):
        shape = getattr(m, "normalized_shape", None)
        weight = getattr(m, "weight", None)
        if (shape is not None and len(shape) != 1) or (weight is not None and weight.dim() != 1):
            report.left_alone.append((name, f"norm: {_cls(m)} over more than the last dim"))
            return True
        _bind(m, _rms_norm_forward)
        report.swapped.append((name, f"norm: {_cls(m)} -> triformer.rms_norm"))
        return True
    if "norm" in _cls(m).lower() and not isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
        report.left_alone.append((name, f"norm: {_cls(m)} is not a supported norm class"))
        return True
    return False


def _gelu_kind(m) -> Optional[str]:
    if type(m) is nn.GELU:
        return m.approximate
    if _from(m, "transformers.activations"):
        if _cls(m) == "GELUActivation" and getattr(m, "act", None) is F.gelu:
            return "none"
        if _cls(m) in GELU_TANH:
            return "tanh"
    return None


def _patch_activation(name, m, report) -> bool:
    kind = _gelu_kind(m)
    if kind is not None:
        _bind(m, _gelu_forward(kind))
        report.swapped.append((name, f"mlp: {_cls(m)} -> triformer.gelu(approximate={kind!r})"))
        return True
    if "gelu" in _cls(m).lower():
        report.left_alone.append((name, f"mlp: {_cls(m)} is not an exact or tanh GELU"))
        return True
    return False


def _patch_mlp(name, m, report) -> bool:
    if _cls(m) not in SWIGLU_MLPS or not _from(m, "transformers."):
        return False
    act = getattr(m, "act_fn", None)
    if _cls(act) in ("SiLU", "SiLUActivation") and all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj")):
        _bind(m, _swiglu_mlp_forward)
        report.swapped.append((name, f"mlp: {_cls(m)} -> down_proj(triformer.swiglu(gate_proj(x), up_proj(x)))"))
    else:
        report.left_alone.append((name, f"mlp: {_cls(m)} with activation {_cls(act)} (only SiLU gates)"))
    return True


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
    (bool True = attend, or additive float) broadcastable to [B, H, Tq, Tk]. Returns ([B, Tq, H, D], None)."""
    for unsupported in ("softcap", "s_aux", "position_bias"):
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
    query, key, value = _same_dtype(query, key, value)
    out = _attention(query, key, value, is_causal=is_causal, dropout_p=float(dropout), scale=scaling,
                    attn_mask=attention_mask)
    return out.transpose(1, 2), None


def _register_hf_attention() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(ATTN_IMPLEMENTATION, triformer_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return True


def _hf_attention_problem(model, config) -> Optional[str]:
    if not getattr(type(model), "_supports_attention_backend", False):
        return f"{type(model).__name__} does not dispatch through transformers' AttentionInterface"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(text, attr, None):
            return f"{attr}={getattr(text, attr)} (soft-capping is not supported)"
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {MAX_HEAD_DIM}"
    return None


def _set_attn_implementation(model) -> None:
    configs = {id(model.config): model.config}
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_attn_implementation"):
            configs[id(c)] = c
    for c in configs.values():
        c._attn_implementation = ATTN_IMPLEMENTATION


def _timm_attention_forward(self, x, attn_mask=None, is_causal=False):
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

def _rope_dispatcher(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if _ROPE_ACTIVE.get():
            unsqueeze_dim = kwargs.get("unsqueeze_dim", args[-1] if len(args) == 1 and isinstance(args[0], int)
                                       else 1)
            D = q.shape[-1]
            if (unsqueeze_dim == 1 and len(args) <= 1 and set(kwargs) <= {"unsqueeze_dim"} and q.dim() == 4
                    and k.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape and cos.shape[-1] == D
                    and k.shape[-1] == D and D % 2 == 0 and cos.shape[1] == q.shape[2]):
                half = D // 2
                return apply_rope(q, k, cos[..., :half].detach(), sin[..., :half].detach())
            warnings.warn("triformer.patch: an apply_rotary_pos_emb call it cannot take (shapes "
                          f"q {tuple(q.shape)}, cos {tuple(cos.shape)}); running the model's own", stacklevel=2)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._triformer_original = original
    return apply_rotary_pos_emb


def _install_rope_dispatcher(module_name: str) -> bool:
    mod = sys.modules.get(module_name)
    fn = getattr(mod, "apply_rotary_pos_emb", None)
    if fn is None:
        return False
    if not hasattr(fn, "_triformer_original"):
        mod.apply_rotary_pos_emb = _rope_dispatcher(fn)
    return True


def _rope_forward(self, *args, **kwargs):
    token = _ROPE_ACTIVE.set(True)
    try:
        return self._triformer_inner_forward(*args, **kwargs)
    finally:
        _ROPE_ACTIVE.reset(token)


def _with_rope(module: nn.Module) -> None:
    # bound methods, not closures: copy.deepcopy of a patched model rebinds them to the copy's modules
    module._triformer_inner_forward = module.forward
    module.forward = types.MethodType(_rope_forward, module)
    module._triformer_rope = True


# ------------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------------

def _head_forward(self, x):
    if _HEAD_PASSTHROUGH.get():
        return x
    return F.linear(x, self.weight, self.bias)


_SIGNATURES: dict = {}


def _fused_loss_forward(self, *args, **kwargs):
    """A causal LM's forward: with labels in training mode, the loss from the hidden states and the LM head's
    weight by triformer.linear_cross_entropy (HF's causal-LM loss semantics), and ``logits=None``."""
    forward = self._triformer_inner_forward
    signature = _SIGNATURES.get(type(self))
    if signature is None:
        signature = _SIGNATURES[type(self)] = inspect.signature(forward)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return forward(*args, **kwargs)
    labels = bound.arguments.get("labels")
    if labels is None or not self.training:
        return forward(*args, **kwargs)
    arguments = dict(bound.arguments)
    extra = arguments.pop("kwargs", {}) if "kwargs" in signature.parameters else {}
    arguments.pop("labels")
    shift_labels = extra.pop("shift_labels", None)
    num_items = extra.pop("num_items_in_batch", None)
    ignore_index = extra.pop("ignore_index", -100)
    token = _HEAD_PASSTHROUGH.set(True)
    try:
        out = forward(**arguments, **extra)
    finally:
        _HEAD_PASSTHROUGH.reset(token)
    head = self.lm_head
    as_tuple = isinstance(out, tuple)
    hidden = out[0] if as_tuple else out.logits
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # the LM head's matmul would have run in this dtype
        hidden = hidden.to(torch.get_autocast_dtype(device_type))
    reduction = "mean" if num_items is None else "sum"
    loss = linear_cross_entropy(hidden, head.weight, shift_labels, head.bias, ignore_index, reduction)
    if num_items is not None:
        if torch.is_tensor(num_items):
            num_items = num_items.to(loss.device)
        loss = loss / num_items
    if as_tuple:
        return (loss,) + tuple(out[1:])
    out["logits"] = None
    out["loss"] = loss
    return out


def _patch_loss(model: nn.Module, report: PatchReport) -> None:
    name = _cls(model)
    head = getattr(model, "lm_head", None)
    if getattr(model, "_triformer_loss", False):
        return
    if name in CAUSAL_LMS and _from(model, "transformers.") and type(head) is nn.Linear:
        _bind(head, _head_forward)
        model._triformer_inner_forward = model.forward
        model.forward = types.MethodType(_fused_loss_forward, model)
        model._triformer_loss = True
        report.swapped.append(("", f"loss: {name} with labels in training mode -> triformer.linear_cross_entropy "
                                   "on the hidden states (no logits)"))
    elif name in CAUSAL_LMS:
        report.left_alone.append(("", f"loss: {name}'s lm_head is {_cls(head)}, not nn.Linear"))
    else:
        report.left_alone.append(("", f"loss: {name} is not a supported causal LM (nothing to fuse)"))


# ------------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------------

def patch(model: nn.Module, *, norm: bool = True, attention: bool = True, mlp: bool = True, rope: bool = True,
          loss: bool = True, verbose: bool = False) -> PatchReport:
    """Swap ``model``'s norms, attention, MLP activations, rotary embedding and causal-LM loss for triformer
    kernels, in place (see the module docstring for what each part does). Returns a ``PatchReport``: every
    module swapped, and every candidate left alone with the reason. Patching twice is a no-op for modules
    already patched. On CPU the kernels run through Triton's interpreter; on CUDA they compile."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for part, value in (("norm", norm), ("attention", attention), ("mlp", mlp), ("rope", rope), ("loss", loss),
                        ("verbose", verbose)):
        if not isinstance(value, bool):
            raise TypeError(f"{part} must be a bool, got {type(value).__name__}")
    report = PatchReport()
    config = getattr(model, "config", None)
    is_hf = config is not None and _from(model, "transformers.")

    hf_attention = False
    if attention and is_hf:
        problem = _hf_attention_problem(model, config)
        if problem is None and not _register_hf_attention():
            problem = "this transformers has no AttentionInterface"
        if problem is None:
            hf_attention = True
            _set_attn_implementation(model)
        else:
            report.left_alone.append(("", f"attention: {problem}"))
    timm_attention = sys.modules.get("timm.layers.attention")
    timm_attention = getattr(timm_attention, "Attention", None)

    for name, m in model.named_modules():
        if getattr(m, "_triformer_patched", False) or getattr(m, "_triformer_rope", False):
            continue
        if norm and _patch_norm(name, m, report):
            continue
        if mlp and (_patch_mlp(name, m, report) or _patch_activation(name, m, report)):
            continue
        cls = _cls(m)
        is_attention = cls.endswith("Attention") or cls.endswith("SelfAttention")
        if attention and is_attention:
            if timm_attention is not None and type(m) is timm_attention:
                problem = _timm_attention_problem(m)
                if problem is None:
                    _bind(m, _timm_attention_forward)
                    report.swapped.append((name, f"attention: timm {cls} -> triformer.attention"))
                else:
                    report.left_alone.append((name, f"attention: {problem}"))
            elif hf_attention and _from(m, "transformers.") and getattr(m, "config", None) is not None:
                report.swapped.append((name, f"attention: {cls} via AttentionInterface['{ATTN_IMPLEMENTATION}']"))
            elif not hf_attention and not (_from(m, "transformers.") and is_hf):
                report.left_alone.append((name, f"attention: {cls} is not a supported attention module"))
        if rope and is_attention and _from(m, "transformers."):
            if cls in ROPE_ATTENTIONS and _install_rope_dispatcher(type(m).__module__):
                _with_rope(m)
                report.swapped.append((name, f"rope: {type(m).__module__}.apply_rotary_pos_emb -> "
                                             "triformer.apply_rope inside this module"))
            elif hasattr(sys.modules.get(type(m).__module__), "apply_rotary_pos_emb"):
                report.left_alone.append((name, f"rope: {cls} is not a supported rotary attention"))
    if loss:
        _patch_loss(model, report)
    if verbose:
        print(report)
    return report
