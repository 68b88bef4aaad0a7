"""lilmistral: run Mistral-family models locally with int4/int8 weights."""
from .errors import ContextLengthError, LilmistralError, ModelFormatError
from .generate import SamplingParams
from .llm import LLM
from .loader import load

__all__ = ["LLM", "load", "SamplingParams", "LilmistralError", "ModelFormatError", "ContextLengthError"]
__version__ = "0.1.0"
