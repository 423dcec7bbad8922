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
from triformer.dropout import Dropout, TritonDropout, dropout, dropout_reference  # noqa: E402
from triformer.softmax import Softmax, TritonSoftmax, softmax, softmax_reference  # noqa: E402

__version__ = "0.1.0"
