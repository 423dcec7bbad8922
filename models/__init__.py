"""GPT-2, llama-style and ViT models built from triformer layers (``create_model`` / ``list_models``)."""
from models.contract import TrainableModel
from models.gpt import GPT, GPTConfig
from models.ops import get_ops
from models.registry import create_model, list_models, model_config
from models.vit import ViT, ViTConfig

__all__ = ["GPT", "GPTConfig", "TrainableModel", "ViT", "ViTConfig", "create_model", "get_ops", "list_models",
           "model_config"]
