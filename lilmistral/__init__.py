"""lilmistral: run Mistral-family models locally with int4/int8 weights."""
import importlib
from typing import Any

from .errors import ContextLengthError, LilmistralError, ModelFormatError

_MODULE_OF = {"LLM": "llm", "load": "loader", "SamplingParams": "generate"}


def __getattr__(name: str) -> Any:  # these import torch: loaded on first use, as in lilmistral.quant
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)


__all__ = ["LLM", "load", "SamplingParams", "LilmistralError", "ModelFormatError", "ContextLengthError"]
__version__ = "0.1.0"
