"""The model core: config, RoPE, attention, the LLaMA decoder."""

from llamalab.model.config import ModelConfig
from llamalab.model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer"]
