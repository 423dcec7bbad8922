"""Interchange with Hugging Face ``transformers`` and timm: their configs and state dicts in and out of
``models.GPT`` and ``models.ViT``.

The models know nothing of other libraries' layouts (as torchtitan's state-dict adapters and gpt-fast's
conversion script keep them outside the model): this module maps names, transposes GPT-2's Conv1D weights,
stacks llama's q/k/v and gate/up projections, and refuses weights that disagree with their config instead of
padding, truncating or dropping them. ``GPT.from_huggingface`` / ``convert_hf_state_dict`` / ``to_huggingface``
and ``ViT.from_huggingface`` / ``from_timm`` delegate here.

GPT: GPT2LMHeadModel and LlamaForCausalLM both ways (tied or untied, RoPE scaling linear or llama3,
grouped-query attention). ViT: timm's ``VisionTransformer`` (plain layout) and ``ViTForImageClassification``,
into triformer only.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from models.gpt import GPT, LLAMA_STYLE, GPTConfig
from models.vit import ViT, ViTConfig

__all__ = ["convert_hf_state_dict", "gpt_config_from_huggingface", "gpt_from_huggingface", "gpt_to_huggingface",
           "load_hf_directory", "vit_from_huggingface", "vit_from_timm"]


class _StateReader(dict):
    """A foreign state dict (Hugging Face, timm) that records which tensors a conversion read, so a loader can
    refuse weights that disagree with their config instead of reconciling them: a tensor the config needs and
    the weights lack, or tensors the config has no place for (a layer more than its layer count says), which
    would otherwise be dropped without a word."""

    def __init__(self, state: dict, source: str):
        super().__init__(state)
        self.source, self.read = source, set()

    def __getitem__(self, key):
        if key not in self:
            raise ValueError(f"{self.source}: its weights have no tensor {key!r}, which the architecture of its config "
                             "needs; the config and the weights disagree")
        self.read.add(key)
        return super().__getitem__(key)

    def check_all_read(self, ignorable=lambda key: False) -> None:
        """``ValueError`` naming the tensors no conversion read (but those ``ignorable(key)`` allows)."""
        unread = sorted(k for k in self if k not in self.read and not ignorable(k))
        if unread:
            shown = ", ".join(unread[:4]) + (f" and {len(unread) - 4} more" if len(unread) > 4 else "")
            raise ValueError(f"{self.source}: its weights hold {len(unread)} tensor(s) its config has no place for "
                             f"({shown}); the config and the weights disagree (e.g. more layers than the config's "
                             "layer count), refusing to drop them")


def _load_converted(model: nn.Module, state: dict, source: str) -> None:
    """``model.load_state_dict(state, assign=True)`` with a shape mismatch (a config that disagrees with its
    weights) as a ``ValueError`` naming ``source``."""
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{source}: the weights do not fit the architecture of its config: {e}") from None


def gpt_from_huggingface(source, kernels: str = "triton", dtype: torch.dtype | None = None, **overrides) -> GPT:
    """A GPT with the weights of ``source``: a ``transformers`` GPT2LMHeadModel or LlamaForCausalLM, a
    local directory written by ``save_pretrained`` (config.json plus ``model.safetensors`` or sharded
    ``model-0000i-of-0000n.safetensors`` with their index, read with the safetensors library: no HF model
    is built, so a checkpoint needs its own size in memory once), or a hub name (downloads; needs network
    access). ``dtype`` casts the weights (default: as stored, fp32 for an in-memory model)."""
    import transformers
    if isinstance(source, transformers.PreTrainedModel):
        hf_config, hf_state = source.config, source.state_dict()
        name = f"Hugging Face model {type(source).__name__}"
    elif os.path.isdir(os.fspath(source)):
        hf_config, hf_state = load_hf_directory(source)
        name = f"Hugging Face directory {os.fspath(source)}"
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(source))
        hf_config, hf_state = hf.config, hf.state_dict()
        name = f"Hugging Face model {os.fspath(source)}"
    config = GPTConfig(**{**gpt_config_from_huggingface(hf_config), "kernels": kernels, **overrides})
    with torch.device("meta"):
        model = GPT(config)
    state = {k: v.detach().to(dtype=dtype or v.dtype, copy=True)
             for k, v in convert_hf_state_dict(config, hf_state, source=name).items()}
    _load_converted(model, state, name)
    if config.position == "rope":  # the tables were built on the meta device
        model.rope_cos, model.rope_sin = model.ops.rope_cos_sin(config.block_size, config.head_dim,
                                                                config.rope_base, device=model.wte.weight.device,
                                                                scaling=config.rope_scaling)
    return model


def convert_hf_state_dict(cfg: GPTConfig, hf_state: dict, source: str = "Hugging Face state dict") -> dict:
    """A Hugging Face state dict (or anything laid out like it, e.g. its gradients) in the names and layouts of
    a GPT of config ``cfg``: GPT-2's Conv1D weights transposed, llama's q/k/v and gate/up projections stacked, the
    token embedding zero-padded to the padded vocab. Weights that disagree with ``cfg`` are refused
    (``ValueError`` naming ``source``), never padded, truncated or dropped: an embedding with other than
    ``vocab_size`` rows, a missing tensor, or tensors the config has no place for (an extra layer)."""
    sd = _StateReader({k.removeprefix("transformer.").removeprefix("model."): v for k, v in hf_state.items()},
                     source)
    heads = [("wte.weight", "wte.weight" if cfg.position == "learned" else "embed_tokens.weight")]
    if not cfg.tie_embeddings:
        heads.append(("lm_head.weight", "lm_head.weight"))
    out = {}
    for ours, theirs in heads:
        rows = sd[theirs].shape[0]
        if rows != cfg.vocab_size:
            raise ValueError(f"{source}: its config says vocab_size={cfg.vocab_size} but {theirs} has {rows} rows; "
                             "the config and the weights disagree")
        out[ours] = F.pad(sd[theirs], (0, 0, 0, cfg.padded_vocab_size - rows))
    if cfg.tie_embeddings and "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd[heads[0][1]]):
        raise ValueError(f"{source}: its config ties the LM head to the token embedding but lm_head.weight holds "
                         "other values; the config and the weights disagree")
    if cfg.position == "rope":
        out["ln_f.weight"] = sd["norm.weight"]
        for i in range(cfg.n_layer):
            theirs = {ours: torch.cat([sd[f"layers.{i}.{n}.weight"] for n in names])
                      for ours, names in _HF_LLAMA_BLOCK_NAMES}
            out.update({f"blocks.{i}.{ours}.weight": t for ours, t in theirs.items()})
    else:
        _require_gpt2_layout(cfg)
        out.update({ours: sd[theirs].t() if transposed else sd[theirs]
                    for ours, theirs, transposed in _gpt2_names(cfg.n_layer)})
    sd.check_all_read(_hf_unused)
    return out


def gpt_to_huggingface(model: GPT):
    """``model`` as a ``transformers`` GPT2LMHeadModel or, for llama-style configs, LlamaForCausalLM (fp32
    copy of the weights, padding rows dropped); ``.save_pretrained(directory)`` then writes the checkpoint."""
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = model.config
    if cfg.position == "rope":
        return _llama_to_huggingface(model)
    _require_gpt2_layout(cfg)
    act = {v: k for k, v in _HF_ACTIVATIONS.items()}[cfg.activation]
    hf = GPT2LMHeadModel(GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                    n_positions=cfg.block_size, vocab_size=cfg.vocab_size,
                                    layer_norm_epsilon=cfg.norm_eps, activation_function=act,
                                    resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout))
    sd = model.state_dict()
    theirs = {"transformer.wte.weight": sd["wte.weight"][:cfg.vocab_size]}
    theirs.update({"transformer." + name: sd[ours].t() if transposed else sd[ours]
                   for ours, name, transposed in _gpt2_names(cfg.n_layer)})
    missing, unexpected = hf.load_state_dict({k: v.detach().float().cpu() for k, v in theirs.items()},
                                             strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the LM head is tied to wte
        raise RuntimeError(f"GPT-2 export mismatch: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf


def _llama_to_huggingface(model: GPT):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = model.config
    if not (cfg.norm == "rmsnorm" and cfg.activation == "swiglu" and not cfg.bias):
        raise ValueError("only llama-style configs (rmsnorm, rope, swiglu, no biases) map to Hugging Face Llama")
    rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_base}
    hf = LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, max_position_embeddings=cfg.block_size,
        vocab_size=cfg.vocab_size, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=rope, attention_dropout=cfg.dropout, head_dim=cfg.head_dim))
    sd, V = model.state_dict(), cfg.vocab_size
    theirs = {"model.embed_tokens.weight": sd["wte.weight"][:V], "model.norm.weight": sd["ln_f.weight"]}
    if not cfg.tie_embeddings:
        theirs["lm_head.weight"] = sd["lm_head.weight"][:V]
    sizes = {"self_attn.q_proj": cfg.n_head * cfg.head_dim, "self_attn.k_proj": cfg.n_kv_head * cfg.head_dim,
             "self_attn.v_proj": cfg.n_kv_head * cfg.head_dim, "mlp.gate_proj": cfg.mlp_hidden,
             "mlp.up_proj": cfg.mlp_hidden}
    for i in range(cfg.n_layer):
        for ours, names in _HF_LLAMA_BLOCK_NAMES:
            parts = sd[f"blocks.{i}.{ours}.weight"].split([sizes.get(n, -1) for n in names]) if len(names) > 1 \
                else [sd[f"blocks.{i}.{ours}.weight"]]
            theirs.update({f"model.layers.{i}.{n}.weight": t for n, t in zip(names, parts)})
    missing, unexpected = hf.load_state_dict({k: v.detach().float().cpu() for k, v in theirs.items()},
                                             strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if cfg.tie_embeddings else set()):
        raise RuntimeError(f"Llama export mismatch: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    return hf


def _require_gpt2_layout(cfg: GPTConfig) -> None:
    if not (cfg.norm == "layernorm" and cfg.position == "learned" and cfg.bias and cfg.activation != "swiglu"
            and cfg.n_kv_head == cfg.n_head):
        raise ValueError("only GPT-2-style configs (layernorm, learned positions, biases, GELU, no GQA) map "
                         "to Hugging Face GPT-2")


# GPT-2's Hugging Face activation names; "gelu_new" is the tanh approximation GPT-2 was trained with
_HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# (our block submodule, theirs) for every Linear/LayerNorm of a GPT-2 block
_HF_GPT2_BLOCK_NAMES = (("ln_1", "ln_1"), ("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                        ("ln_2", "ln_2"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj"))


def _gpt2_names(n_layer: int):
    """(our tensor, HF GPT-2's without "transformer.", transposed?) for all but the token embedding. HF's
    Conv1D stores Linear weights as [in, out]: those are transposed."""
    yield "wpe.weight", "wpe.weight", False
    yield "ln_f.weight", "ln_f.weight", False
    yield "ln_f.bias", "ln_f.bias", False
    for i in range(n_layer):
        for ours, theirs in _HF_GPT2_BLOCK_NAMES:
            yield f"blocks.{i}.{ours}.weight", f"h.{i}.{theirs}.weight", not ours.startswith("ln")
            yield f"blocks.{i}.{ours}.bias", f"h.{i}.{theirs}.bias", False


def _hf_unused(key: str) -> bool:
    """Tensors of a Hugging Face state dict that hold no weights: GPT-2's causal-mask buffers and llama's RoPE
    frequencies (older transformers saved them), recomputed here."""
    return key.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))


# (our block weight, the llama weights stacked into it, in order)
_HF_LLAMA_BLOCK_NAMES = (
    ("ln_1", ("input_layernorm",)), ("ln_2", ("post_attention_layernorm",)),
    ("attn.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")), ("attn.proj", ("self_attn.o_proj",)),
    ("mlp.fc", ("mlp.gate_proj", "mlp.up_proj")), ("mlp.proj", ("mlp.down_proj",)))


def gpt_config_from_huggingface(c) -> dict:
    """GPTConfig fields for a Hugging Face GPT-2 or llama config; ValueError for variants we do not model."""
    def require(ok: bool, what: str):
        if not ok:
            raise ValueError(f"Hugging Face {c.model_type} config with {what} is not supported")

    if c.model_type == "gpt2":
        require(c.activation_function in _HF_ACTIVATIONS, f"activation_function={c.activation_function!r}")
        require(c.scale_attn_weights and not c.scale_attn_by_inverse_layer_idx and not c.add_cross_attention,
                "scale_attn_by_inverse_layer_idx / unscaled attention / cross attention")
        return dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions,
                    vocab_size=c.vocab_size, norm_eps=c.layer_norm_epsilon,
                    activation=_HF_ACTIVATIONS[c.activation_function], dropout=c.resid_pdrop)
    if c.model_type == "llama":
        rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", getattr(c, "rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        require(kind in ("default", "linear", "llama3"), f"rope scaling {rope}")
        scaling = None if kind == "default" else {k: v for k, v in rope.items() if k not in ("rope_theta", "type")}
        if scaling is not None:
            scaling["rope_type"] = kind
        require(c.hidden_act == "silu" and not c.attention_bias and not getattr(c, "mlp_bias", False),
                "biases or a non-SiLU activation")
        require(getattr(c, "head_dim", None) in (None, c.hidden_size // c.num_attention_heads),
                f"head_dim={c.head_dim}")
        return dict(n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_embd=c.hidden_size,
                    n_kv_head=c.num_key_value_heads, mlp_hidden=c.intermediate_size,
                    block_size=c.max_position_embeddings, vocab_size=c.vocab_size, norm_eps=c.rms_norm_eps,
                    rope_base=float(rope["rope_theta"]), rope_scaling=scaling,
                    tie_embeddings=bool(c.tie_word_embeddings), dropout=c.attention_dropout, **LLAMA_STYLE)
    raise ValueError(f"unsupported Hugging Face model_type {c.model_type!r}; expected 'gpt2' or 'llama'")


def load_hf_directory(path) -> tuple:
    """(transformers config, state dict) of a local ``save_pretrained`` directory, read with the safetensors
    library: ``model.safetensors``, or the shards listed in ``model.safetensors.index.json``."""
    import transformers
    from safetensors.torch import load_file

    path = os.fspath(path)
    config = transformers.AutoConfig.from_pretrained(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json "
                                "(save it with save_pretrained(..., safe_serialization=True))")
    state: dict = {}
    root = os.path.realpath(path)
    for name in files:
        # the index names shards relative to its directory: one outside it (../, an absolute path, a link out)
        # would load someone else's file as these weights
        shard = os.path.realpath(os.path.join(root, name))
        if os.path.isabs(name) or os.path.dirname(shard) != root:
            raise ValueError(f"{index} names the shard {name!r}, which is not a file in {path}; refusing to load "
                             "weights from outside the model's directory")
        state.update(load_file(shard))
    return config, state


def vit_from_timm(model, kernels: str = "triton", **overrides) -> ViT:
    """A ViT with the weights of a timm ``VisionTransformer`` of the plain layout (class token, learned
    position embedding over the class token too, no layer scale / register tokens / qk-norm)."""
    pool = {"token": "cls", "avg": "mean"}.get(model.global_pool)
    blk = model.blocks[0]
    unsupported = [why for why, bad in (
        (f"global_pool={model.global_pool!r}", pool is None),
        ("no class token", model.cls_token is None),
        ("register tokens", getattr(model, "reg_token", None) is not None),
        ("no_embed_class", getattr(model, "no_embed_class", False)),
        ("pre-norm of the patch embedding", not isinstance(model.norm_pre, nn.Identity)),
        ("layer scale / qk-norm", any(not isinstance(getattr(blk, n, nn.Identity()), nn.Identity)
                                      for n in ("ls1", "ls2"))
         or any(not isinstance(getattr(blk.attn, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm"))),
        ("qkv without bias", blk.attn.qkv.bias is None),
    ) if bad]
    if unsupported:
        raise ValueError(f"timm VisionTransformer with {', '.join(unsupported)} is not supported")
    norm = model.fc_norm if pool == "mean" else model.norm
    config = ViTConfig(**{**dict(
        n_layer=len(model.blocks), n_head=blk.attn.num_heads, n_embd=model.embed_dim,
        mlp_hidden=blk.mlp.fc1.out_features, norm_eps=norm.eps, image_size=model.patch_embed.img_size[0],
        patch_size=model.patch_embed.patch_size[0], in_channels=model.patch_embed.proj.in_channels,
        num_classes=model.num_classes, pool=pool, kernels=kernels), **overrides})
    sd = _StateReader(model.state_dict(), f"timm {type(model).__name__}")
    state = {"patch_embed.weight": sd["patch_embed.proj.weight"].flatten(1),
             "patch_embed.bias": sd["patch_embed.proj.bias"], "cls_token": sd["cls_token"],
             "pos_embed": sd["pos_embed"], "head.weight": sd["head.weight"], "head.bias": sd["head.bias"]}
    final = "fc_norm" if pool == "mean" else "norm"
    state.update({f"norm.{k}": sd[f"{final}.{k}"] for k in ("weight", "bias")})
    for i in range(config.n_layer):
        for ours, theirs in (("ln_1", "norm1"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"),
                             ("ln_2", "norm2"), ("mlp.fc", "mlp.fc1"), ("mlp.proj", "mlp.fc2")):
            for k in ("weight", "bias"):
                state[f"blocks.{i}.{ours}.{k}"] = sd[f"blocks.{i}.{theirs}.{k}"]
    return _vit_with_state(config, state, sd)


def vit_from_huggingface(model, kernels: str = "triton", **overrides) -> ViT:
    """A ViT with the weights of a ``transformers`` ViTForImageClassification (class-token pooling)."""
    c = model.config
    if c.hidden_act != "gelu":
        raise ValueError(f"unsupported ViT hidden_act {c.hidden_act!r}; expected 'gelu'")
    if not c.qkv_bias:
        raise ValueError("ViT configs with qkv_bias=False are not supported")
    config = ViTConfig(**{**dict(
        n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_embd=c.hidden_size,
        mlp_hidden=c.intermediate_size, norm_eps=c.layer_norm_eps, image_size=c.image_size,
        patch_size=c.patch_size, in_channels=c.num_channels, num_classes=c.num_labels, pool="cls",
        kernels=kernels), **overrides})
    sd = _StateReader(model.state_dict(), f"Hugging Face {type(model).__name__}")
    emb = "vit.embeddings."
    state = {"patch_embed.weight": sd[emb + "patch_embeddings.projection.weight"].flatten(1),
             "patch_embed.bias": sd[emb + "patch_embeddings.projection.bias"], "cls_token": sd[emb + "cls_token"],
             "pos_embed": sd[emb + "position_embeddings"], "norm.weight": sd["vit.layernorm.weight"],
             "norm.bias": sd["vit.layernorm.bias"], "head.weight": sd["classifier.weight"],
             "head.bias": sd["classifier.bias"]}
    for i in range(config.n_layer):
        layer = _hf_layer_names(sd, i)
        for k in ("weight", "bias"):
            state[f"blocks.{i}.attn.qkv.{k}"] = torch.cat([sd[layer[n] + k] for n in ("q", "k", "v")])
            for ours in ("ln_1", "attn.proj", "ln_2", "mlp.fc", "mlp.proj"):
                state[f"blocks.{i}.{ours}.{k}"] = sd[layer[ours] + k]
    return _vit_with_state(config, state, sd)


def _vit_with_state(config: ViTConfig, state: dict, source: _StateReader) -> ViT:
    """The model of ``config`` with ``state``, converted from ``source``: every tensor of the source must
    have been used and have its shape (a config that disagrees with its weights is refused)."""
    source.check_all_read()
    with torch.device("meta"):
        model = ViT(config)
    _load_converted(model, {k: v.detach().clone() for k, v in state.items()}, source.source)
    return model


def _hf_layer_names(sd: dict, i: int) -> dict:
    """Prefixes of layer ``i``'s tensors in a ViTForImageClassification state dict, in the naming of
    transformers >= 5 (``vit.layers.i.attention.q_proj``) or before it (``vit.encoder.layer.i...``)."""
    new = f"vit.layers.{i}."
    if new + "attention.q_proj.weight" in sd:
        return {"q": new + "attention.q_proj.", "k": new + "attention.k_proj.", "v": new + "attention.v_proj.",
                "attn.proj": new + "attention.o_proj.", "ln_1": new + "layernorm_before.",
                "ln_2": new + "layernorm_after.", "mlp.fc": new + "mlp.fc1.", "mlp.proj": new + "mlp.fc2."}
    old = f"vit.encoder.layer.{i}."
    return {"q": old + "attention.attention.query.", "k": old + "attention.attention.key.",
            "v": old + "attention.attention.value.", "attn.proj": old + "attention.output.dense.",
            "ln_1": old + "layernorm_before.", "ln_2": old + "layernorm_after.",
            "mlp.fc": old + "intermediate.dense.", "mlp.proj": old + "output.dense."}
