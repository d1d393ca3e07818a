"""dsv3: DeepSeek-V3 in PyTorch — the model, its checkpoint format, training and inference.

Public API: `ModelConfig`, `DeepSeekV3`, `load_model`, `save_model`, `Tokenizer`, `generate`.
"""

from dsv3.checkpoint import load_model, save_model
from dsv3.config import ModelConfig
from dsv3.data.tokenizer import Tokenizer
from dsv3.infer import generate
from dsv3.model import DeepSeekV3

__all__ = ["DeepSeekV3", "ModelConfig", "Tokenizer", "generate", "load_model", "save_model"]
