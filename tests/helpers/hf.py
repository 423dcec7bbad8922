"""Tiny random transformers models and padded token batches for the ``triformer.patch`` tests (no download):
``FAMILIES`` names each causal-LM family with its model class and a two-layer config of hidden 32."""
import collections
import copy
import importlib

import torch

from triformer.testing import kernel_device

VOCAB = 61
DEVICE = kernel_device()
_DECODER = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False,
                attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_GEMMA = dict(_DECODER, head_dim=8, hidden_activation="gelu_pytorch_tanh")
_MOE = dict(num_local_experts=4, num_experts_per_tok=2)

# family: (model class, config class, config fields)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", _DECODER),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(_DECODER, sliding_window=4)),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(_DECODER, **_MOE)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", _DECODER),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(_DECODER, head_dim=8)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                  dict(_DECODER, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", _GEMMA),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(_GEMMA, sliding_window=4)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(_GEMMA, sliding_window=4)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", _DECODER),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", _DECODER),
    "granite": ("GraniteForCausalLM", "GraniteConfig",
                dict(_DECODER, logits_scaling=2.0, residual_multiplier=0.5, embedding_multiplier=3.0)),
    "smollm3": ("SmolLM3ForCausalLM", "SmolLM3Config", _DECODER),
    "glm4": ("Glm4ForCausalLM", "Glm4Config", dict(_DECODER, head_dim=8)),
    "llama4": ("Llama4ForCausalLM", "Llama4TextConfig",
               dict(_DECODER, head_dim=8, intermediate_size_mlp=48, num_local_experts=2, num_experts_per_tok=1,
                    attention_chunk_size=4)),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config",
             dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig",
                 dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=2,
                      vocab_size=VOCAB, max_position_embeddings=64, rotary_pct=1.0, hidden_dropout=0.0,
                      attention_dropout=0.0, bos_token_id=1, eos_token_id=2)),
}


def build(family: str, seed: int = 0, **overrides):
    """A fresh fp32 model of ``family`` on the kernel device."""
    import transformers
    model_cls, config_cls, fields = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**fields, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).float().to(DEVICE)


def pair(family: str, **overrides):
    """(unpatched model, an identical deep copy) of ``family``."""
    ref = build(family, **overrides)
    return ref, copy.deepcopy(ref)


def lm_batch(vocab: int = VOCAB, B: int = 2, T: int = 9, padding: str = "right", seed: int = 0):
    """(input_ids, attention_mask, labels) [B, T] on the kernel device; row 1 has 3 pad tokens on ``padding``'s
    side ("right", "left" or "none"), labelled -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if padding == "right":
        mask[1, -3:] = 0
    elif padding == "left":
        mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


def count_patch_calls(monkeypatch, names) -> collections.Counter:
    """Counts the calls the patched modules make to each of ``names`` (kernels they look up in triformer.patch)."""
    module = importlib.import_module("triformer.patch")
    counts = collections.Counter()
    for name in names:
        fn = getattr(module, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            counts[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return counts
