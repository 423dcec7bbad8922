"""triformer's public names: each op's naming triple, the package's __all__, the seed-README compatibility names,
and the rule that op files share plumbing through triformer._shared rather than through each other's privates."""
import ast
import importlib
import inspect
from pathlib import Path

import pytest
import torch

import triformer

PACKAGE = Path(triformer.__file__).parent
OP_MODULES = ("attention", "cross_entropy", "dropout", "fused_add_norm", "gelu", "gelu_linear", "glu_linear",
              "layernorm",
              "linear_cross_entropy", "rmsnorm", "rope", "softmax", "swiglu")
# op module -> (autograd Function, nn.Module, functional form) of each op it defines
TRIPLES = {
    "attention": [("AttentionFunction", "Attention", "attention")],
    "cross_entropy": [("CrossEntropyFunction", "CrossEntropyLoss", "cross_entropy")],
    "dropout": [("DropoutFunction", "Dropout", "dropout")],
    "fused_add_norm": [("AddLayerNormFunction", "AddLayerNorm", "add_layer_norm"),
                       ("AddRMSNormFunction", "AddRMSNorm", "add_rms_norm")],
    "gelu": [("GELUFunction", "GELU", "gelu")],
    "gelu_linear": [("GELULinearFunction", "GELULinear", "gelu_linear")],
    "glu_linear": [("GLULinearFunction", "GLULinear", "glu_linear")],
    "layernorm": [("LayerNormFunction", "LayerNorm", "layer_norm")],
    "linear_cross_entropy": [("LinearCrossEntropyFunction", "LinearCrossEntropyLoss", "linear_cross_entropy")],
    "rmsnorm": [("RMSNormFunction", "RMSNorm", "rms_norm")],
    "rope": [("RopeFunction", "RotaryEmbedding", "rope")],
    "softmax": [("SoftmaxFunction", "Softmax", "softmax")],
    "swiglu": [("GLUFunction", "SwiGLU", "swiglu")],
}
SEED_NAMES = {"TritonCrossEntropyLoss", "TritonDropout", "TritonLayerNorm", "TritonSoftmax"}


def module(name):
    return importlib.import_module(f"triformer.{name}")  # (triformer.<op> itself is the function of that name)


@pytest.mark.parametrize("name", OP_MODULES)
def test_op_module_exports_its_triple_and_reference(name):
    mod = module(name)
    for function, nn_module, functional in TRIPLES[name]:
        assert issubclass(getattr(mod, function), torch.autograd.Function)
        assert issubclass(getattr(mod, nn_module), torch.nn.Module)
        assert inspect.isfunction(getattr(mod, functional))
        assert callable(getattr(mod, f"{functional}_reference"))
        assert {function, nn_module, functional, f"{functional}_reference"} <= set(mod.__all__)
    assert all(hasattr(mod, n) for n in mod.__all__)


def test_package_exports_every_op_module_all():
    exported = set()
    for name in (*OP_MODULES, "patch"):
        mod = module(name)
        exported |= set(mod.__all__)
        for n in mod.__all__:
            assert getattr(triformer, n) is getattr(mod, n), n
    assert set(triformer.__all__) == exported | {"INTERPRET"}
    assert len(triformer.__all__) == len(set(triformer.__all__))
    assert SEED_NAMES <= set(triformer.__all__)


def test_seed_names_are_the_documented_aliases():
    assert triformer.TritonLayerNorm is triformer.LayerNorm
    assert triformer.TritonSoftmax is triformer.Softmax
    assert triformer.TritonDropout is triformer.DropoutFunction
    assert issubclass(triformer.TritonCrossEntropyLoss, triformer.CrossEntropyLoss)
    assert inspect.signature(triformer.TritonCrossEntropyLoss).parameters["pad_token_id"].default == -100


def test_op_files_share_plumbing_only_through_shared_modules():
    """No op file imports another op file's private (underscore) names, and _shared imports no op file."""
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("triformer."):
                source = node.module.split(".")[1]
                if source in OP_MODULES:
                    assert path.stem != "_shared", f"_shared imports {node.module}"
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    assert not private, f"{path.name} imports {private} from {node.module}"
