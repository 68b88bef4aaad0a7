"""The AVX-512 VNNI CPU kernel of vnni.cpp (int8 decode), compiled on first use: a C++ compiler is needed
once, and torch.utils.cpp_extension caches the build. `available()` is False where the CPU or the build
cannot have it, and callers use PyTorch's own kernel. LILMISTRAL_CPU_KERNELS=torch turns it off."""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-mfma"]


def cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return all(flag in flags for flag in ("avx512f", "avx512bw", "avx512dq", "avx512_vnni"))


@functools.cache
def _extension():
    if os.environ.get("LILMISTRAL_CPU_KERNELS") == "torch" or not cpu_has_vnni():
        return None
    from torch.utils.cpp_extension import load_inline

    try:
        return load_inline("lilmistral_vnni", cpp_sources=Path(__file__).with_name("vnni.cpp").read_text(),
                           functions=["int8_gemv"], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, no ninja, an old one: PyTorch's kernel still works
        warnings.warn(f"lilmistral: the AVX-512 VNNI kernel did not build ({type(e).__name__}: {e}); "
                      "using PyTorch's slower int8 kernel", stacklevel=2)
        return None


def available() -> bool:
    return _extension() is not None


# a registered op (not a bare extension call), so that torch.compile keeps the decode step in one graph
@torch.library.custom_op("lilmistral::int8_gemv", mutates_args=())
def int8_gemv(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x float32 [M <= 8, K], q int8 [N, K], scales float32 [N] -> float32 [M, N]; K a multiple of 64."""
    return _extension().int8_gemv(x.contiguous(), q, scales)


@int8_gemv.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], q.shape[0])
