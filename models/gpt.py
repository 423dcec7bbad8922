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

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import (Block, KVCache, Norm, TransformerConfig, at_least_fp32, dropout, init_weights,
                           to_stream_dtype)
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
    ce_chunks: int = 1                 # "ce" loss: a count of launches (n_chunks) over row blocks, not tokens each
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
            # the padded head whole (aligned matmuls, no slice of its gradient), the padding marked by num_classes
            loss = self.ops.linear_cross_entropy(h.reshape(-1, cfg.n_embd), self.head_weight, targets.reshape(-1),
                                                 label_smoothing=cfg.label_smoothing, num_classes=V)
            return (self._logits(h) if return_logits else None), at_least_fp32(loss)
        padded = F.linear(h, self.head_weight)  # [B, T, padded vocabulary]
        # The whole padded rows go in, the padding marked by num_classes: the gradient then comes back in the LM
        # head's layout, with no copy out of a [..., :V] slice. Without returned logits nothing else reads them,
        # so their backward may overwrite them in place.
        loss = self.ops.cross_entropy(padded.reshape(-1, padded.shape[-1]), targets.reshape(-1),
                                      label_smoothing=cfg.label_smoothing, n_chunks=cfg.ce_chunks,
                                      inplace_backward=not return_logits, num_classes=V)
        return (padded[..., :V] if return_logits else None), at_least_fp32(loss)

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
        return self.ln_f(x, pending, cfg.dropout if self.training else 0.0)[1]  # the last block's MLP dropout

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's [padded vocab, n_embd] weight: the token embedding's when tied."""
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.head_weight)[..., :self.config.vocab_size]

    # ----------------------------------------------------------------------------------------------------
    # Hugging Face interchange lives in models/interchange.py; these are its entry points on the class (each
    # imports it on call: interchange imports this module)

    @classmethod
    def from_huggingface(cls, source, kernels: str = "triton", dtype: torch.dtype | None = None,
                         **overrides) -> "GPT":
        """``models.interchange.gpt_from_huggingface``: a GPT with the weights of a ``transformers``
        GPT2LMHeadModel / LlamaForCausalLM, a local ``save_pretrained`` directory or a hub name."""
        from models import interchange
        return interchange.gpt_from_huggingface(source, kernels=kernels, dtype=dtype, **overrides)

    def convert_hf_state_dict(self, hf_state: dict, source: str = "Hugging Face state dict") -> dict:
        """``models.interchange.convert_hf_state_dict`` for this model's config."""
        from models import interchange
        return interchange.convert_hf_state_dict(self.config, hf_state, source)

    def to_huggingface(self):
        """``models.interchange.gpt_to_huggingface``: this model as a ``transformers`` model."""
        from models import interchange
        return interchange.gpt_to_huggingface(self)


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


