"""What the LayerNorm, RMSNorm and fused add+norm tests share: dtypes and shapes, the forced column loop, and
PyTorch's norms as the peers that set the fp16/bf16 bar."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.ops import in_common_dtype
from triformer import layernorm

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# 633 rows: several row blocks per program, and a partial last block. 300 columns: not a power of two, and
# five 64-wide column blocks when the column loop is forced.
SHAPE = (3, 211, 300)
LOOP_BLOCK = 64


@contextlib.contextmanager
def column_loop(block_n):
    """Cap the column block at block_n (None: the default), which runs the wide-row loops on small inputs."""
    with pytest.MonkeyPatch.context() as mp:
        if block_n is not None:
            mp.setattr(layernorm, "FWD_MAX_BLOCK_N", block_n)
            mp.setattr(layernorm, "BWD_MAX_BLOCK_N", block_n)
        yield


def torch_layer_norm(x, w, b, eps=1e-5):
    return in_common_dtype(lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, eps), x, w, b)


def torch_rms_norm(x, w, eps=1e-6):
    return in_common_dtype(lambda x, w: F.rms_norm(x, x.shape[-1:], w, eps), x, w)
