"""triformer: transformer layers as Triton kernels, each with forward and backward.

Importing triformer decides where the kernels run (compiled on CUDA, or Triton's interpreter on CPU:
see ``triformer._runtime``) before any kernel is defined, so it must be imported before any other
module that defines Triton kernels.

Every op exports one naming triple: ``<Op>Function``, its ``torch.autograd.Function``; the ``nn.Module``
(``LayerNorm``, ``CrossEntropyLoss``, ``RotaryEmbedding``, ...); and the functional form ``<op>`` (``layer_norm``,
``cross_entropy``, ``rope``, ...), which checks its arguments and calls ``<Op>Function.apply``. Beside them,
``<op>_reference`` is the same op in plain PyTorch. ``swiglu`` and ``geglu`` share ``GLUFunction``.
"""
from triformer import _runtime  # noqa: F401  (must run first: chooses compile vs interpret)
from triformer._runtime import INTERPRET

# --- op exports ---
# Each op module's __all__: its triple, its reference and the helpers that go with it. One import per op module,
# in alphabetical order.
from triformer.attention import (AttentionFunction, Attention, attention, attention_reference,  # noqa: E402
                                 attention_dropout_mask, PackedAttentionFunction, attention_packed,
                                 attention_packed_reference, split_qkv)
from triformer.cross_entropy import (CrossEntropyFunction, CrossEntropyLoss, cross_entropy,  # noqa: E402
                                     cross_entropy_reference)
from triformer.dropout import (DropoutFunction, Dropout, dropout, dropout_reference, dropout_keep,  # noqa: E402
                               dropout_keep_reference, philox4x32_reference)
from triformer.fused_add_norm import (AddLayerNormFunction, AddLayerNorm, add_layer_norm,  # noqa: E402
                                      add_layer_norm_reference, AddRMSNormFunction, AddRMSNorm, add_rms_norm,
                                      add_rms_norm_reference)
from triformer.gelu import GELUFunction, GELU, gelu, gelu_reference, BiasGELU  # noqa: E402
from triformer.gelu_linear import GELULinearFunction, GELULinear, gelu_linear, gelu_linear_reference  # noqa: E402
from triformer.glu_linear import GLULinearFunction, GLULinear, glu_linear, glu_linear_reference  # noqa: E402
from triformer.layernorm import LayerNormFunction, LayerNorm, layer_norm, layer_norm_reference  # noqa: E402
from triformer.linear_cross_entropy import (LinearCrossEntropyFunction, LinearCrossEntropyLoss,  # noqa: E402
                                            linear_cross_entropy, linear_cross_entropy_reference)
from triformer.rmsnorm import RMSNormFunction, RMSNorm, rms_norm, rms_norm_reference  # noqa: E402
from triformer.rope import (RopeFunction, RotaryEmbedding, rope, rope_reference, apply_rope,  # noqa: E402
                            apply_rope_reference, rope_cos_sin, rope_inv_freq)
from triformer.softmax import SoftmaxFunction, Softmax, softmax, softmax_reference  # noqa: E402
from triformer.swiglu import (GLUFunction, SwiGLU, swiglu, swiglu_reference, geglu, geglu_reference,  # noqa: E402
                              SwiGLUMLP)
from triformer.patch import PatchReport, patch  # noqa: E402

# --- seed-README compatibility names ---
# The first triformer (its README: https://github.com/dame-cell/Triformer) exported four ``Triton*`` classes;
# code written against it keeps running. They are not a fifth naming scheme, only old names of the triples above:
#   TritonLayerNorm        is LayerNorm (the module).
#   TritonSoftmax          is Softmax (the module; ``TritonSoftmax(is_causal=False)``).
#   TritonDropout          is DropoutFunction (the autograd Function: the seed called ``TritonDropout.apply(x, p,
#                          seed)``; the module is Dropout).
#   TritonCrossEntropyLoss is CrossEntropyLoss with the seed's constructor ``(pad_token_id=-100, reduction="mean",
#                          n_chunks=1, inplace_backward=False)``, pad_token_id being the ignored target; the seed
#                          always wrote the gradient over the logits, now opt-in (``inplace_backward=True``).
# Each is defined beside its op, so ``triformer.<op module>.Triton*`` works too.
from triformer.cross_entropy import TritonCrossEntropyLoss  # noqa: E402
from triformer.dropout import TritonDropout  # noqa: E402
from triformer.layernorm import TritonLayerNorm  # noqa: E402
from triformer.softmax import TritonSoftmax  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "INTERPRET",
    "AttentionFunction", "Attention", "attention", "attention_reference", "attention_dropout_mask",
    "PackedAttentionFunction", "attention_packed", "attention_packed_reference", "split_qkv",
    "CrossEntropyFunction", "CrossEntropyLoss", "cross_entropy", "cross_entropy_reference",
    "DropoutFunction", "Dropout", "dropout", "dropout_reference", "dropout_keep", "dropout_keep_reference",
    "philox4x32_reference",
    "AddLayerNormFunction", "AddLayerNorm", "add_layer_norm", "add_layer_norm_reference",
    "AddRMSNormFunction", "AddRMSNorm", "add_rms_norm", "add_rms_norm_reference",
    "GELUFunction", "GELU", "gelu", "gelu_reference", "BiasGELU",
    "GELULinearFunction", "GELULinear", "gelu_linear", "gelu_linear_reference",
    "GLULinearFunction", "GLULinear", "glu_linear", "glu_linear_reference",
    "LayerNormFunction", "LayerNorm", "layer_norm", "layer_norm_reference",
    "LinearCrossEntropyFunction", "LinearCrossEntropyLoss", "linear_cross_entropy", "linear_cross_entropy_reference",
    "RMSNormFunction", "RMSNorm", "rms_norm", "rms_norm_reference",
    "RopeFunction", "RotaryEmbedding", "rope", "rope_reference", "apply_rope", "apply_rope_reference",
    "rope_cos_sin", "rope_inv_freq",
    "SoftmaxFunction", "Softmax", "softmax", "softmax_reference",
    "GLUFunction", "SwiGLU", "swiglu", "swiglu_reference", "geglu", "geglu_reference", "SwiGLUMLP",
    "PatchReport", "patch",
    # seed-README compatibility names (above)
    "TritonCrossEntropyLoss", "TritonDropout", "TritonLayerNorm", "TritonSoftmax",
]
