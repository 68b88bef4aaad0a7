"""Triton kernels for the GPU: fused dequantize + GEMV for decode, straight from the canonical layout.

Decode (a few rows of activations) is bound by reading the weights: each program reads a
[BLOCK_N, BLOCK_K] tile of packed weights once, dequantizes it in registers and reduces it against the
activations; the K dimension is split over SPLIT_K programs (atomic adds into a float32 output) so that
even a 4096-wide layer fills the GPU. Prefill (many rows) is compute-bound: the weight is dequantized to
the activation dtype and multiplied with cuBLAS.

Tested on the CPU under TRITON_INTERPRET=1 (tests/test_triton.py) and on an H100 (benchmarks/gpu_gemv.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pack import QuantSpec, dequantize

GEMV_MAX_ROWS = 8
# (BLOCK_N, BLOCK_K, num_warps) per scheme: the best of benchmarks/gemv_sweep.py on an H100, Mistral-7B shapes
TILES = {"int4": (8, 256, 2), "int8": (32, 512, 4)}


@triton.jit
def _int4_gemv(x_ptr, q_ptr, s_ptr, m_ptr, out_ptr, e_ptr, N, K, K_PER_SPLIT,
               G: tl.constexpr, HAS_MIN: tl.constexpr, SPLIT_K: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_EXPERTS: tl.constexpr):
    # a [BLOCK_N, BLOCK_K] tile is seen as [BLOCK_N, NG groups, G/2 bytes]: one scale (and min) per group
    NG: tl.constexpr = BLOCK_K // G
    pid_n, pid_k, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if HAS_EXPERTS:  # the row's expert's weight, the experts' parts stacked [E, N, ...]
        expert = tl.load(e_ptr + row).to(tl.int64)
        q_ptr += expert * N * (K // 2)
        s_ptr += expert * N * (K // G)
        m_ptr += expert * N * (K // G)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_j = tl.arange(0, BLOCK_K // 2)  # byte j holds inputs 2j (low nibble) and 2j+1 (high nibble)
    offs_g = tl.arange(0, NG)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    for k0 in range(k_begin, k_begin + K_PER_SPLIT, BLOCK_K):
        k_even = k0 + 2 * offs_j
        k_ok = k_even < K
        packed = tl.load(q_ptr + offs_n[:, None] * (K // 2) + (k_even // 2)[None, :],
                         mask=n_ok[:, None] & k_ok[None, :], other=0)
        groups = k0 // G + offs_g
        g_mask = n_ok[:, None] & (groups < K // G)[None, :]
        group_ptr = offs_n[:, None] * (K // G) + groups[None, :]
        scale = tl.load(s_ptr + group_ptr, mask=g_mask, other=0.0).to(tl.float32)[:, :, None]  # [BN, NG, 1]
        low = tl.reshape((packed & 0xF).to(tl.float32), (BLOCK_N, NG, G // 2))
        high = tl.reshape((packed >> 4).to(tl.float32), (BLOCK_N, NG, G // 2))
        if HAS_MIN:
            base = tl.load(m_ptr + group_ptr, mask=g_mask, other=0.0).to(tl.float32)[:, :, None]
            w_even, w_odd = low * scale + base, high * scale + base
        else:
            w_even, w_odd = (low - 8.0) * scale, (high - 8.0) * scale
        x_even = tl.reshape(tl.load(x_ptr + row * K + k_even, mask=k_ok, other=0.0).to(tl.float32), (NG, G // 2))
        x_odd = tl.reshape(tl.load(x_ptr + row * K + k_even + 1, mask=k_ok, other=0.0).to(tl.float32), (NG, G // 2))
        acc += tl.sum(tl.sum(w_even * x_even[None, :, :] + w_odd * x_odd[None, :, :], axis=2), axis=1)
    if SPLIT_K == 1:
        tl.store(out_ptr + row * N + offs_n, acc, mask=n_ok)
    else:
        tl.atomic_add(out_ptr + row * N + offs_n, acc, mask=n_ok)


@triton.jit
def _int8_gemv(x_ptr, q_ptr, s_ptr, out_ptr, e_ptr, N, K, K_PER_SPLIT,
               SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_EXPERTS: tl.constexpr):
    pid_n, pid_k, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if HAS_EXPERTS:  # as in _int4_gemv
        expert = tl.load(e_ptr + row).to(tl.int64)
        q_ptr += expert * N * K
        s_ptr += expert * N
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    for k0 in range(k_begin, k_begin + K_PER_SPLIT, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        q = tl.load(q_ptr + offs_n[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        x = tl.load(x_ptr + row * K + k, mask=k_ok, other=0.0).to(tl.float32)
        acc += tl.sum(q.to(tl.float32) * x[None, :], axis=1)
    scale = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(out_ptr + row * N + offs_n, acc * scale, mask=n_ok)
    else:
        tl.atomic_add(out_ptr + row * N + offs_n, acc * scale, mask=n_ok)


def _split_k(n: int, k: int, block_n: int, block_k: int, sms: int) -> int:
    """Enough K splits that the grid covers the GPU about twice, without splits shorter than a block."""
    tiles = triton.cdiv(n, block_n)
    return max(1, min(k // block_k, triton.cdiv(2 * sms, tiles), 16))


class TritonKernel:
    """QuantLinear's math on a CUDA device (or on CPU tensors under TRITON_INTERPRET=1)."""

    def __init__(self, parts: dict[str, torch.Tensor], spec: QuantSpec, block_n: int | None = None,
                 block_k: int | None = None, num_warps: int | None = None, max_split: int = 16) -> None:
        default_n, default_k, default_warps = TILES[spec.scheme]
        block_n, block_k, num_warps = block_n or default_n, block_k or default_k, num_warps or default_warps
        self.parts = {k: v.contiguous() for k, v in parts.items()}
        self.spec = spec
        self.n = parts["qweight"].shape[0]
        self.k = parts["qweight"].shape[1] * (2 if spec.scheme == "int4" else 1)
        if spec.scheme == "int4":
            block_k = max(block_k, spec.group_size)  # whole groups per tile
        self.block_n, self.block_k = block_n, block_k
        device = parts["qweight"].device
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        self.num_warps = num_warps
        self.split_k = min(_split_k(self.n, self.k, block_n, block_k, sms), max_split)
        per_split = triton.cdiv(triton.cdiv(self.k, self.split_k), block_k) * block_k
        self.split_k = triton.cdiv(self.k, per_split)
        self.k_per_split = per_split

    def gemv(self, x: torch.Tensor, expert: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] with M <= GEMV_MAX_ROWS -> float32 [M, N]. With expert [M] (the parts stacked [E, N, ...]:
        ExpertsKernel), row m times the weight of expert[m]."""
        m = x.shape[0]
        out = torch.zeros((m, self.n), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(self.n, self.block_n), self.split_k, m)
        p = self.parts
        e = expert if expert is not None else out  # unread without experts
        common = dict(SPLIT_K=self.split_k, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
                      HAS_EXPERTS=expert is not None, num_warps=self.num_warps)
        if self.spec.scheme == "int4":
            has_min = "mins" in p
            _int4_gemv[grid](x, p["qweight"], p["scales"], p["mins"] if has_min else p["scales"], out, e,
                             self.n, self.k, self.k_per_split, G=self.spec.group_size, HAS_MIN=has_min, **common)
        else:
            _int8_gemv[grid](x, p["qweight"], p["scales"], out, e, self.n, self.k, self.k_per_split, **common)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        if rows.shape[0] <= GEMV_MAX_ROWS:
            out = self.gemv(rows).to(x.dtype)
        else:
            out = rows @ dequantize(self.parts, self.spec, x.dtype).t()
        return out.reshape(*x.shape[:-1], self.n)


class ExpertsKernel(TritonKernel):
    """One projection of a mixture of experts, every expert's parts stacked [E, N, ...]: a decode step's
    (token, expert) rows in one launch, each program reading its row's expert (the fused MoE GEMV)."""

    def __init__(self, stacked: dict[str, torch.Tensor], spec: QuantSpec) -> None:
        super().__init__({name: t[0] for name, t in stacked.items()}, spec)  # tiles and splits from one expert
        self.parts = {name: t.contiguous() for name, t in stacked.items()}

    def __call__(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        return self.gemv(x.contiguous(), expert.contiguous()).to(x.dtype)
