"""CUDA kernels. Until the Triton backend lands, dequantize on the fly (correct on any GPU)."""
from __future__ import annotations

import torch

from .cpu import DequantKernel
from .pack import QuantSpec


def make_kernel(parts: dict[str, torch.Tensor], spec: QuantSpec):
    return DequantKernel(parts, spec)
