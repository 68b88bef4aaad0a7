"""Sweep the Triton GEMV tile sizes on a GPU (Mistral-7B layer shapes, batch 1): GB/s per configuration, the
best few by their sum over the shapes, to set triton_kernels.TILES.

    python -m benchmarks.gemv_sweep [--scheme int4|int5|int6|int8]
"""
from __future__ import annotations

import argparse
import itertools

from benchmarks.gpu_bench import SHAPES, gemv_inputs, timed
from lilmistral.quant import spec_for
from lilmistral.quant.triton_kernels import TritonKernel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scheme", choices=["int4", "int5", "int6", "int8"], nargs="*", default=["int4", "int8"])
    for scheme in p.parse_args().scheme:
        inputs = [(spec_for("layers.0.attention.wq.weight", (n, k), scheme), *gemv_inputs(scheme, n, k))
                  for n, k in SHAPES]
        results = []
        for bn, bk, warps in itertools.product((256, 512, 1024), (32, 64, 128), (1, 2, 4)):
            if not 128 <= bn * bk // (32 * warps) <= 1024:  # weights a thread: too few share x's rounding
                continue
            rates = []
            for spec, parts, x in inputs:
                kernel = TritonKernel(parts, spec, block_n=bn, block_k=bk, num_warps=warps)
                seconds = timed(lambda: kernel.gemv(x), repeat=30)
                rates.append(sum(t.nbytes for t in kernel.parts.values()) / seconds / 1e9)
            results.append((sum(rates), f"{scheme} TILES ({bn}, {bk}, {warps}): "
                            + " ".join(f"{r:6.0f}" for r in rates) + " GB/s"))
        for _, line in sorted(results, reverse=True)[:6]:
            print(line, flush=True)


if __name__ == "__main__":
    main()
