"""Quantization: the schemes, which tensors are packed how, and the module swap that puts QuantLinear in place.
The constants are here; the rest imports torch and loads on first use (`__getattr__`), so that the command's
light subcommands (list, rm, --help) start without it."""
from __future__ import annotations

import importlib
from typing import Any

FLOAT_SCHEMES = ("f32", "bf16", "f16")
# int4: with a per-group min; int4-sym: without; int5: int4's layouts with a fifth bit (GGUF Q5_K's, super-blocked);
# int6: GGUF Q6_K's layout
SCHEMES = ("int4", "int4-sym", "int5", "int6", "int8", *FLOAT_SCHEMES)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32  # chosen by measurement: README, "Quantization quality"
# int4 (int5) g32's super-blocks (pack.py), the first that divides K: GGUF Q4_K's 256; 192 for K = 576 (SmolLM2)
SUPER_BLOCKS = (256, 192)
QUANTIZED_SUFFIXES = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
                      ".w1.weight", ".w2.weight", ".w3.weight")

_MODULE_OF = {"QuantLinear": "linear", "QuantExperts": "linear", "fuse_projections": "linear",
              "spec_for": "linear", "swap_in_quant_linears": "linear",
              "QuantSpec": "pack", "quantize": "pack", "dequantize": "pack", "group_size_for": "pack"}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)


__all__ = [*_MODULE_OF, "SCHEMES", "FLOAT_SCHEMES", "GROUP_SIZES", "DEFAULT_GROUP_SIZE", "SUPER_BLOCKS",
           "QUANTIZED_SUFFIXES"]
