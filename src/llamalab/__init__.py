"""llamalab: one engine for LLaMA-family models."""

from llamalab.api import LLM, load
from llamalab.generate.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "load", "__version__"]
