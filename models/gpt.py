"""GPT-2 and llama-style decoders built from triformer layers.

One class covers both families; the config picks the pieces:
* GPT-2: LayerNorm, learned position embedding, GELU (tanh) MLP, biases;
* llama-style: RMSNorm, rotary position embedding (RoPE), SwiGLU MLP, no biases, optional grouped-query
  attention (``n_kv_head < n_head``).
The token embedding doubles as the LM head (tied) unless ``tie_embeddings=False`` (Llama 3 and most real Llama
checkpoints), which adds an ``lm_head`` Linear. Rows of both are padded to a multiple of 64 for fast matmuls;
the padded rows are sliced off the logits, so they never reach the loss or the sampler.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import (Block, KVCache, Norm, StateReader, TransformerConfig, at_least_fp32, dropout,
                           init_weights, load_converted, to_stream_dtype)
from models.ops import get_ops
from triformer.rope import rope_inv_freq

LOSSES = ("ce", "fused")
POSITIONS = ("learned", "rope")


@dataclasses.dataclass
class GPTConfig(TransformerConfig):
    block_size: int = 1024
    vocab_size: int = 50257
    vocab_multiple: int = 64           # the embedding / LM head rows are padded up to a multiple of this
    position: str = "learned"
    rope_base: float = 10000.0
    rope_scaling: dict | None = None   # Hugging Face's rope_parameters minus rope_theta: linear or llama3 scaling
    tie_embeddings: bool = True        # False: a separate lm_head (padded like wte) instead of wte's weight
    loss: str = "ce"                   # "ce": logits then cross_entropy; "fused": linear_cross_entropy, no logits
    ce_chunks: int = 1                 # n_chunks of the "ce" loss: kernel launches over row blocks; same peak memory
    label_smoothing: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        for name in ("block_size", "vocab_size", "vocab_multiple", "ce_chunks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head dim, got n_embd / n_head = {self.head_dim}")
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            rope_inv_freq(self.head_dim, self.rope_base, self.rope_scaling)  # ValueError for what we do not model
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab_multiple * math.ceil(self.vocab_size / self.vocab_multiple)


# The config fields that turn the GPT-2 layout into a llama-style decoder.
LLAMA_STYLE = dict(norm="rmsnorm", activation="swiglu", bias=False, position="rope")


class GPT(nn.Module):
    task = "lm"  # models.contract.TrainableModel: task, config, num_params, flops_per_example, forward

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.ops = ops = get_ops(config.kernels)
        C = config.n_embd
        self.wte = nn.Embedding(config.padded_vocab_size, C)
        self.wpe = nn.Embedding(config.block_size, C) if config.position == "learned" else None
        self.blocks = nn.ModuleList(Block(config, ops, causal=True) for _ in range(config.n_layer))
        self.ln_f = Norm(C, config.norm, config.norm_eps, config.bias, ops)
        self.lm_head = None if config.tie_embeddings else nn.Linear(C, config.padded_vocab_size, bias=False)
        if config.position == "rope":
            # cos/sin of every position, built once (a per-step host-to-device copy would stall the GPU); fp32 under
            # autocast. Not saved in checkpoints: they follow from the config.
            cos, sin = ops.rope_cos_sin(config.block_size, config.head_dim, config.rope_base,
                                        scaling=config.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self, config.n_layer)

    # ----------------------------------------------------------------------------------------------------
    # the contract the training framework relies on: models.contract.TrainableModel (task, config and these)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; ``non_embedding`` leaves out the position embedding (the token embedding stays:
        it is also the LM head's weight)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def flops_per_example(self, seq_len: int | None = None) -> float:
        """Forward + backward FLOPs of one sequence: 6 per parameter per token, plus the attention scores
        and their weighted sum (12 * n_layer * n_embd * T per token, as in the PaLM paper's count)."""
        cfg = self.config
        T = cfg.block_size if seq_len is None else seq_len
        return float(6 * self.num_params() * T + 12 * cfg.n_layer * cfg.n_embd * T * T)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = False,
                last_only: bool = False):
        """``(logits, loss)``. With ``targets`` (same shape as ``idx``, -100 = ignored) the loss is their mean
        cross entropy and logits are returned only if ``return_logits``. Without targets, the logits of
        every position, or of the last one only if ``last_only`` (generation)."""
        self._check_idx("idx", idx)
        if targets is not None:
            self._check_idx("targets", targets)
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        h = self._hidden(idx)
        if targets is None:
            return self._logits(h[:, -1:] if last_only else h), None
        cfg, V = self.config, self.config.vocab_size
        if cfg.loss == "fused":
            loss = self.ops.linear_cross_entropy(h.reshape(-1, cfg.n_embd), self.head_weight[:V], targets.reshape(-1),
                                                 label_smoothing=cfg.label_smoothing)
            return (self._logits(h) if return_logits else None), at_least_fp32(loss)
        logits = self._logits(h)
        # without returned logits nothing else reads them, so their backward may overwrite them in place
        loss = self.ops.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), label_smoothing=cfg.label_smoothing,
                                      n_chunks=cfg.ce_chunks, inplace_backward=not return_logits)
        return (logits if return_logits else None), at_least_fp32(loss)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 eos_token_id: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append up to ``max_new_tokens`` sampled tokens to ``idx`` [B, T]. ``temperature`` 0 is greedy.
        Rows that emitted ``eos_token_id`` continue with it; generation stops once all rows have.
        The model's train/eval mode is left as it is (call ``eval()`` for dropout-free sampling)."""
        self._check_idx("idx", idx)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if idx.shape[1] + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt length {idx.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                             f"block_size {self.config.block_size}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a number >= 0, got {type(temperature).__name__}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        caches = None
        if use_cache:
            caches = [KVCache(idx.shape[1] + max_new_tokens) for _ in self.blocks]
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        out, fresh = idx, idx
        for _ in range(max_new_tokens):
            h = self._hidden(fresh if use_cache else out, caches)
            nxt = _sample(self._logits(h[:, -1]), temperature, top_k, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out = torch.cat([out, nxt[:, None]], dim=1)
            fresh = nxt[:, None]
            if eos_token_id is not None and bool(done.all()):
                break
        return out

    # ----------------------------------------------------------------------------------------------------

    def _check_idx(self, name: str, idx) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an int64/int32 tensor of token ids, got "
                            f"{getattr(idx, 'dtype', type(idx).__name__)}")
        if idx.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, seq], got shape {tuple(idx.shape)}")
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds block_size {self.config.block_size}")
        if idx.shape[1] == 0:
            raise ValueError(f"{name} must hold at least one position, got shape {tuple(idx.shape)}")
        if name == "idx":  # targets may also hold the ignore index -100
            V = self.config.vocab_size
            in_range = ((idx >= 0) & (idx < V)).all()
            if idx.device.type == "cpu" and not torch.compiler.is_compiling():
                if not in_range:
                    raise ValueError(f"idx holds token ids outside [0, {V}): min {int(idx.min())}, max {int(idx.max())}")
            else:  # no host sync on the GPU (or in a compiled graph): an assert at the next synchronization
                torch._assert_async(in_range, f"idx holds token ids outside [0, {V})")

    def _hidden(self, idx: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, C] of ``idx``, which continues the cached positions if any."""
        cfg = self.config
        T = idx.shape[1]
        start = caches[0].length if caches else 0
        if start + T > cfg.block_size:
            raise ValueError(f"position {start + T} exceeds block_size {cfg.block_size}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        x = dropout(self.ops, to_stream_dtype(x), cfg.dropout, self.training)
        rope = (self.rope_cos, self.rope_sin, start) if cfg.position == "rope" else None
        pending = None
        for i, block in enumerate(self.blocks):
            x, pending = block(x, pending, rope, caches[i] if caches else None)
        return self.ln_f(x, pending)[1]

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's [padded vocab, n_embd] weight: the token embedding's when tied."""
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.head_weight)[..., :self.config.vocab_size]

    # ----------------------------------------------------------------------------------------------------
    # Hugging Face interchange: GPT2LMHeadModel and LlamaForCausalLM both ways (tied or untied, RoPE scaling
    # linear or llama3, grouped-query attention)

    @classmethod
    def from_huggingface(cls, source, kernels: str = "triton", dtype: torch.dtype | None = None,
                         **overrides) -> "GPT":
        """A model with the weights of ``source``: a ``transformers`` GPT2LMHeadModel or LlamaForCausalLM, a
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
        config = GPTConfig(**{**_config_from_hf(hf_config), "kernels": kernels, **overrides})
        with torch.device("meta"):
            model = cls(config)
        state = {k: v.detach().to(dtype=dtype or v.dtype, copy=True)
                 for k, v in model.convert_hf_state_dict(hf_state, source=name).items()}
        load_converted(model, state, name)
        if config.position == "rope":  # the tables were built on the meta device
            model.rope_cos, model.rope_sin = model.ops.rope_cos_sin(config.block_size, config.head_dim,
                                                                    config.rope_base, device=model.wte.weight.device,
                                                                    scaling=config.rope_scaling)
        return model

    def convert_hf_state_dict(self, hf_state: dict, source: str = "Hugging Face state dict") -> dict:
        """A Hugging Face state dict (or anything laid out like it, e.g. its gradients) in this model's names and
        layouts: GPT-2's Conv1D weights transposed, llama's q/k/v and gate/up projections stacked, the token
        embedding zero-padded to the padded vocab. Weights that disagree with this model's config are refused
        (``ValueError`` naming ``source``), never padded, truncated or dropped: an embedding with other than
        ``vocab_size`` rows, a missing tensor, or tensors the config has no place for (an extra layer)."""
        cfg = self.config
        sd = StateReader({k.removeprefix("transformer.").removeprefix("model."): v for k, v in hf_state.items()},
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
            self._require_gpt2_layout()
            out.update({ours: sd[theirs].t() if transposed else sd[theirs]
                        for ours, theirs, transposed in _gpt2_names(cfg.n_layer)})
        sd.check_all_read(_hf_unused)
        return out

    def to_huggingface(self):
        """This model as a ``transformers`` GPT2LMHeadModel or, for llama-style configs, LlamaForCausalLM (fp32
        copy of the weights, padding rows dropped); ``.save_pretrained(directory)`` then writes the checkpoint."""
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = self.config
        if cfg.position == "rope":
            return self._to_huggingface_llama()
        self._require_gpt2_layout()
        act = {v: k for k, v in _HF_ACTIVATIONS.items()}[cfg.activation]
        hf = GPT2LMHeadModel(GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                        n_positions=cfg.block_size, vocab_size=cfg.vocab_size,
                                        layer_norm_epsilon=cfg.norm_eps, activation_function=act,
                                        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout))
        sd = self.state_dict()
        theirs = {"transformer.wte.weight": sd["wte.weight"][:cfg.vocab_size]}
        theirs.update({"transformer." + name: sd[ours].t() if transposed else sd[ours]
                       for ours, name, transposed in _gpt2_names(cfg.n_layer)})
        missing, unexpected = hf.load_state_dict({k: v.detach().float().cpu() for k, v in theirs.items()},
                                                 strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # the LM head is tied to wte
            raise RuntimeError(f"GPT-2 export mismatch: missing {missing}, unexpected {unexpected}")
        hf.tie_weights()
        return hf

    def _to_huggingface_llama(self):
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = self.config
        if not (cfg.norm == "rmsnorm" and cfg.activation == "swiglu" and not cfg.bias):
            raise ValueError("only llama-style configs (rmsnorm, rope, swiglu, no biases) map to Hugging Face Llama")
        rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_base}
        hf = LlamaForCausalLM(LlamaConfig(
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
            hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, max_position_embeddings=cfg.block_size,
            vocab_size=cfg.vocab_size, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
            rope_parameters=rope, attention_dropout=cfg.dropout, head_dim=cfg.head_dim))
        sd, V = self.state_dict(), cfg.vocab_size
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

    def _require_gpt2_layout(self) -> None:
        cfg = self.config
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


def _config_from_hf(c) -> dict:
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


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """One token id per row of ``logits`` [B, V]."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def load_hf_directory(path) -> tuple:
    """(transformers config, state dict) of a local ``save_pretrained`` directory, read with the safetensors
    library: ``model.safetensors``, or the shards listed in ``model.safetensors.index.json``."""
    import json

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
