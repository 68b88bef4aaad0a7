"""The AVX-512 VNNI CPU kernels of vnni.cpp, compiled on first use into operators under torch.ops.lilmistral
(see available()): a C++ compiler is needed once, and torch.utils.cpp_extension caches the build.
`available()` is False where the CPU or the build cannot have them, and callers use PyTorch's own kernels.
LILMISTRAL_CPU_KERNELS=torch turns them off."""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

# Decode-sized batches: up to this many rows the int8 GEMV beats torch._int_mm, and expert-batched calls
# beat grouping the rows by expert (which reads each expert's weights once)
MAX_ROWS = 8
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c"]


def cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return all(flag in flags for flag in ("avx512f", "avx512bw", "avx512dq", "avx512_vnni"))


@functools.cache
def available() -> bool:
    """Whether the operators exist (building them on the first call): torch.ops.lilmistral.int8_gemv(x
    [M, K], q, scales), int4_gemv(x, **pack_int4_vnni(...)), and for mixtures of experts
    int8_gemv_experts(x, [q], [scales], expert [M]) and int4_gemv_experts(x, [q], [scales], [mins], slot_of,
    expert): row m of x times the weight of expert[m]."""
    if os.environ.get("LILMISTRAL_CPU_KERNELS") == "torch" or not cpu_has_vnni():
        return False
    from torch.utils.cpp_extension import load_inline

    try:
        load_inline("lilmistral_vnni", cpp_sources=Path(__file__).with_name("vnni.cpp").read_text(),
                    extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as e:  # no compiler, no ninja, an old one: PyTorch's kernel still works
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        warnings.warn(f"lilmistral: the AVX-512 VNNI kernels did not build ({reason}); using PyTorch's slower kernels",
                      stacklevel=2)
        return False
    torch.library.register_fake("lilmistral::int8_gemv")(_gemv_shape)
    torch.library.register_fake("lilmistral::int4_gemv")(_gemv_shape)
    torch.library.register_fake("lilmistral::int8_gemv_experts")(_experts_shape)
    torch.library.register_fake("lilmistral::int4_gemv_experts")(_experts_shape)
    return True


def _gemv_shape(x: torch.Tensor, q: torch.Tensor, *args) -> torch.Tensor:
    return x.new_empty(x.shape[0], q.shape[0])


def _experts_shape(x: torch.Tensor, q: list[torch.Tensor], *args) -> torch.Tensor:
    return x.new_empty(x.shape[0], q[0].shape[0])


def slot_order(k: int) -> torch.Tensor:
    """int32 [K/32]: where int4_gemv keeps each block of 32 inputs. Two runs of 64 inputs (blocks a, b, c, d)
    load as one register, low nibbles (a, c) and high nibbles (b, d): slots a, c, b, d. An odd last run of 64
    keeps its order."""
    blocks = torch.arange(k // 32, dtype=torch.int32)
    paired = (k // 128) * 4
    slot = blocks.clone()
    within = torch.tensor([0, 2, 1, 3], dtype=torch.int32).repeat(k // 128)
    slot[:paired] = blocks[:paired] - blocks[:paired] % 4 + within
    return slot


def pack_int4_vnni(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None
                   ) -> dict[str, torch.Tensor | None]:
    """Values 0..15 [N, K] and per-group float16 scales (and mins) [N, K/G] -> int4_gemv's parts: per 64
    inputs 32 bytes, byte j holding input j (low nibble) and input 32 + j (high nibble); scales and mins one
    per block of 32, by slot."""
    n, k = q.shape
    runs = q.to(torch.uint8).reshape(n, k // 64, 2, 32)
    packed = (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(n, k // 2)
    slot_of = slot_order(k)
    block_of_slot = torch.argsort(slot_of)

    def per_slot(t: torch.Tensor) -> torch.Tensor:
        per_block = t.repeat_interleave(k // 32 // t.shape[1], dim=1)
        return per_block[:, block_of_slot].to(torch.float16).contiguous()

    return {"q": packed.contiguous(), "scales": per_slot(scales), "mins": None if mins is None else per_slot(mins),
            "slot_of": slot_of}
