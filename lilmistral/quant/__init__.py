"""Quantization: which tensors are packed how, and the module swap that puts QuantLinear in place."""
from __future__ import annotations

from torch import nn

from ..model import Experts
from .linear import QuantExperts, QuantLinear, fuse_projections
from .pack import QuantSpec, dequantize, group_size_for, quantize

FLOAT_SCHEMES = ("f32", "bf16", "f16")
SCHEMES = ("int4", "int4-sym", "int8", *FLOAT_SCHEMES)  # int4: with a per-group min; int4-sym: without
DEFAULT_GROUP_SIZE = 32  # chosen by measurement: README, "Quantization quality"
QUANTIZED_SUFFIXES = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
                      ".w1.weight", ".w2.weight", ".w3.weight")


def spec_for(name: str, shape: tuple[int, ...], scheme: str, group_size: int = DEFAULT_GROUP_SIZE,
             tied: bool = False) -> QuantSpec | None:
    """How tensor `name` is stored under `scheme`; None: kept in floating point.

    Attention and FFN (and expert) projections take the scheme. An untied output head takes int8
    (it is read every token but is sensitive to 4-bit error). Embeddings, norms and router gates stay
    in floating point: they are small, or (embeddings) only one row is read per token.
    """
    if scheme in FLOAT_SCHEMES or len(shape) != 2:
        return None
    if name.endswith(QUANTIZED_SUFFIXES):
        if scheme == "int8":
            return QuantSpec("int8")
        return QuantSpec("int4", group_size_for(shape[1], group_size), symmetric=scheme == "int4-sym")
    if name == "output.weight" and not tied:
        return QuantSpec("int8")
    return None


def swap_in_quant_linears(model: nn.Module, specs: dict[str, QuantSpec]) -> None:
    """Replace each nn.Linear whose weight name is in `specs` with an (empty) QuantLinear, and the experts of
    each MoE layer so made with QuantExperts."""
    for weight_name, spec in specs.items():
        module_name = weight_name.removesuffix(".weight")
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        assert isinstance(linear, nn.Linear), weight_name
        setattr(parent, child, QuantLinear(linear.in_features, linear.out_features, spec))
    for name, module in list(model.named_modules()):
        quantized = isinstance(module, Experts) and isinstance(module[0].w1, QuantLinear)
        if quantized and not isinstance(module, QuantExperts):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, QuantExperts(module))


__all__ = ["QuantLinear", "QuantExperts", "fuse_projections", "QuantSpec", "quantize", "dequantize",
           "spec_for", "swap_in_quant_linears", "SCHEMES", "FLOAT_SCHEMES", "DEFAULT_GROUP_SIZE", "QUANTIZED_SUFFIXES"]
