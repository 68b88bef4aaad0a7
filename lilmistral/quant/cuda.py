"""CUDA kernels: Triton's int4/int5/int6/int8 matmuls (`pip install lilmistral[gpu]`); without Triton, dequantize on
the fly and use cuBLAS (correct on any GPU, slower at decode)."""
from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable

import torch

from ..model import rms_norm, rope, sdpa, silu_mul, store_kv
from .cpu import DequantKernel, Parts, eager_only, stacked
from .pack import QuantSpec


@functools.cache
def has_triton() -> bool:
    try:
        from . import triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def make_kernel(parts: Parts, spec: QuantSpec):
    """The kernel for a weight's parts (a fused projection's as blocks of rows), repacked for Triton's kernels."""
    if not has_triton():
        _say_triton_is_missing()
        return DequantKernel(stacked(parts), spec)
    from .triton_kernels import TritonKernel

    return TritonKernel(parts, spec)


@functools.cache
def _say_triton_is_missing() -> None:
    warnings.warn("lilmistral: Triton is not installed, so the GPU dequantizes every weight at every token, "
                  "many times slower than its kernels: pip install 'lilmistral[gpu]'", stacklevel=3)


def gated_kernel(parts: Parts, spec: QuantSpec):
    """A Triton kernel over w1's and w3's parts (blocks of rows) with their columns interleaved, whose `gated`
    call writes silu(w1 x) * w3 x. Needs Triton (`has_triton`)."""
    from .triton_kernels import TritonKernel

    return TritonKernel(parts, spec, interleave=True)


def expert_gemv(kernels: list) -> Callable | None:
    """One projection of every expert (their kernels) as one launch: (x [R, K], expert [R]) -> [R, N] by an
    ExpertsKernel over their repacked parts stacked [E, ...] (the experts' kernels become views of the stack).
    None unless they are all Triton kernels."""
    triton_kernels = sys.modules.get(f"{__package__}.triton_kernels")  # not imported: no Triton kernel was made
    if triton_kernels is None or not all(isinstance(k, triton_kernels.TritonKernel) for k in kernels):
        return None
    return triton_kernels.ExpertsKernel(kernels)


@functools.cache
def layer_kernels(head_dim: int, dtype: torch.dtype) -> dict:
    """Triton's kernels for model.py's slots (`normalize`, `rotate`, `activate`, `attend`, `store_kv`): one
    launch each where PyTorch's operators take several, in eager decoding (compiled, inductor fuses PyTorch's).
    None without Triton; RoPE, attention and the cache's write for head dimensions that are powers of two (16
    and up)."""
    if not has_triton():
        return {}
    from . import triton_kernels as tk

    kernels = {"normalize": eager_only(tk.rms_norm, rms_norm), "activate": eager_only(tk.silu_mul, silu_mul)}
    if head_dim & (head_dim - 1) == 0 and head_dim >= 16:
        kernels["rotate"] = eager_only(tk.rope, rope)
        kernels["attend"] = eager_only(tk.DecodeAttention(sdpa), sdpa)
        kernels["store_kv"] = eager_only(tk.store_kv, store_kv)
    return kernels
