"""CUDA kernels: Triton's fused dequantize + GEMV (`pip install lilmistral[gpu]`); without Triton, dequantize
on the fly and use cuBLAS (correct on any GPU, slower at decode)."""
from __future__ import annotations

import torch

from .cpu import DequantKernel
from .pack import QuantSpec


def make_kernel(parts: dict[str, torch.Tensor], spec: QuantSpec):
    try:
        from .triton_kernels import TritonKernel
    except ImportError:
        return DequantKernel(parts, spec)
    return TritonKernel(parts, spec)
