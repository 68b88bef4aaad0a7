"""Sweep the Triton GEMV tile sizes on a GPU (Mistral-7B layer shapes, batch 1): GB/s per configuration.

    python benchmarks/gemv_sweep.py
"""
from __future__ import annotations

import itertools

import torch

from benchmarks.gpu_bench import random_parts, timed
from lilmistral.quant import spec_for
from lilmistral.quant.triton_kernels import TritonKernel

SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))


def main() -> None:
    for scheme in ("int4", "int8"):
        inputs = []
        for n, k in SHAPES:
            spec = spec_for("layers.0.attention.wq.weight", (n, k), scheme)
            inputs.append((spec, random_parts(n, k, spec), torch.randn(1, k, device="cuda", dtype=torch.bfloat16)))
        results = []
        for bn, bk, warps, split in itertools.product((8, 16, 32), (256, 512, 1024), (2, 4, 8), (4, 16)):
            rates = []
            for spec, parts, x in inputs:
                kernel = TritonKernel(parts, spec, block_n=bn, block_k=bk, num_warps=warps, max_split=split)
                seconds = timed(lambda: kernel.gemv(x), repeat=30)
                rates.append(sum(t.nbytes for t in parts.values()) / seconds / 1e9)
            results.append((sum(rates), f"{scheme} bn={bn} bk={bk} warps={warps} split<={split}: "
                            + " ".join(f"{r:6.0f}" for r in rates) + " GB/s"))
        for _, line in sorted(results, reverse=True)[:6]:  # the best, by the sum over the shapes
            print(line, flush=True)


if __name__ == "__main__":
    main()
