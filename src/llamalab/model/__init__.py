"""The model core: config, RoPE, attention, the LLaMA decoder, the architecture and layer-type registries.

It knows no method: quantization, KV-cache methods, loaders and the engine depend on it, never the reverse.
"""

from llamalab.model.config import ModelConfig
from llamalab.model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer"]
