"""CUDA kernels: Triton's fused dequantize + GEMV (`pip install lilmistral[gpu]`); without Triton, dequantize
on the fly and use cuBLAS (correct on any GPU, slower at decode)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from .cpu import DequantKernel
from .pack import QuantSpec


def make_kernel(parts: dict[str, torch.Tensor], spec: QuantSpec):
    try:
        from .triton_kernels import TritonKernel
    except ImportError:
        return DequantKernel(parts, spec)
    return TritonKernel(parts, spec)


def expert_gemv(linears: list) -> Callable | None:
    """One projection of every expert (their QuantLinears) as one launch: (x [R, K], expert [R]) -> [R, N] by
    an ExpertsKernel over their parts stacked [E, N, ...]. The QuantLinears' buffers become views of the
    stack (no second copy) and their own kernels are remade over them. None without Triton."""
    try:
        from .triton_kernels import ExpertsKernel
    except ImportError:
        return None
    stacked = {part: torch.stack([linear.parts()[part] for linear in linears]) for part in linears[0].parts()}
    for i, linear in enumerate(linears):
        for part, tensor in stacked.items():
            setattr(linear, part, tensor[i])
        linear.prepare()
    return ExpertsKernel(stacked, linears[0].spec)
