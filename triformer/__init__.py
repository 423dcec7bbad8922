"""triformer: transformer layers as Triton kernels, each with forward and backward.

Importing triformer decides where the kernels run (compiled on CUDA, or Triton's interpreter on CPU:
see ``triformer._runtime``) before any kernel is defined, so it must be imported before any other
module that defines Triton kernels.
"""
from triformer import _runtime  # noqa: F401  (must run first: chooses compile vs interpret)
from triformer._runtime import INTERPRET

# Each op module exports its functional form, autograd.Function, module class and reference.
# One line per op module, in alphabetical order.
# --- op exports ---
from triformer.attention import Attention, AttentionFunction, attention, attention_reference  # noqa: E402
from triformer.cross_entropy import CrossEntropyLoss, TritonCrossEntropyLoss, cross_entropy, cross_entropy_reference  # noqa: E402,E501
from triformer.linear_cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy, linear_cross_entropy_reference  # noqa: E402,E501
from triformer.dropout import Dropout, TritonDropout, dropout, dropout_reference  # noqa: E402
from triformer.softmax import Softmax, TritonSoftmax, softmax, softmax_reference  # noqa: E402
from triformer.gelu import GELU, BiasGELU, GELUFunction, gelu, gelu_reference  # noqa: E402
from triformer.rope import RopeFunction, RotaryEmbedding, apply_rope, apply_rope_reference, rope, rope_cos_sin, rope_reference  # noqa: E402,E501
from triformer.swiglu import GLUFunction, SwiGLU, SwiGLUMLP, geglu, geglu_reference, swiglu, swiglu_reference  # noqa: E402,E501
from triformer.fused_add_norm import AddLayerNormFunction, AddRMSNormFunction, add_layer_norm, add_layer_norm_reference, add_rms_norm, add_rms_norm_reference  # noqa: E402,E501
from triformer.layernorm import LayerNorm, LayerNormFunction, TritonLayerNorm, layer_norm, layer_norm_reference  # noqa: E402,E501
from triformer.rmsnorm import RMSNorm, RMSNormFunction, rms_norm, rms_norm_reference  # noqa: E402
from triformer.patch import PatchReport, patch  # noqa: E402

__version__ = "0.1.0"
