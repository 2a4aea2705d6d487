"""llamalab: one engine for LLaMA-family models."""

from llamalab.api import LLM, load
from llamalab.generate.sampling import SamplingParams
from llamalab.version import __version__

__all__ = ["LLM", "SamplingParams", "load", "__version__"]
