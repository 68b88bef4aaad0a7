"""Sweep the Triton GEMV tile sizes on a GPU (Mistral-7B layer shapes, batch 1, each kernel timed alone in a
CUDA graph on weights cycled through more than L2 holds): GB/s per configuration as it goes, then the best
few by their time over the four shapes (a layer's GEMV time), the best for each shape, and on the last line
the best and each shape's best as gpu_bench's --tiles takes them (SCHEME=BN,BK,WARPS SCHEME@NxK=BN,BK,WARPS
...).

    python -m benchmarks.gemv_sweep [--scheme int4|int5|int6|int8 ...] [--warps 1 2 4]
"""
from __future__ import annotations

import argparse
import itertools
import time

from benchmarks.gpu_bench import SHAPES, cold_kernels, gemv_inputs, graphed_seconds
from lilmistral.quant import spec_for


def configurations(warps: list[int]) -> list[tuple[int, int, int]]:
    """(BLOCK_N, BLOCK_K, num_warps) with 128 to 1024 weights a thread (fewer share a thread's x rounding
    among too few columns, more spill registers), fewest warps first. By default 1 warp, 10 configurations
    (~2 minutes): on an H200 1 warp was fastest and 4 or 8 two to four times slower (int4, session 36)."""
    return [(bn, bk, w) for w, bn, bk in itertools.product(warps, (128, 256, 512, 1024), (32, 64, 128, 256, 512))
            if 128 <= bn * bk // (32 * w) <= 1024]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scheme", choices=["int4", "int5", "int6", "int8"], nargs="*", default=["int4", "int8"])
    p.add_argument("--warps", type=int, nargs="+", default=[1], help="warps a program to try")
    ns = p.parse_args()
    for scheme in ns.scheme:
        inputs = [(spec_for("layers.0.attention.wq.weight", (n, k), scheme), *gemv_inputs(scheme, n, k))
                  for n, k in SHAPES]
        results, start = [], time.perf_counter()
        for tiles in configurations(ns.warps):
            seconds, rates = [], []
            try:
                for spec, parts, x in inputs:
                    kernels, nbytes = cold_kernels(parts, spec, *tiles)
                    seconds.append(graphed_seconds([lambda c=c, x=x: c.gemv(x) for c in kernels], repeat=40))
                    rates.append(nbytes / seconds[-1] / 1e9)
            except Exception as e:  # a configuration the compiler cannot build (registers, shared memory)
                print(f"{scheme} {tiles}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            results.append((sum(seconds), tiles, seconds, rates))
            print(f"{scheme} TILES {tiles}: {sum(seconds) * 1e6:6.1f} us " + " ".join(f"{r:5.0f}" for r in rates)
                  + f" GB/s  ({time.perf_counter() - start:.0f} s)", flush=True)
        results.sort()
        print(f"best of {scheme} ({', '.join(f'{n}x{k}' for n, k in SHAPES)}):")
        for total, tiles, _, rates in results[:6]:
            print(f"  {tiles}: {total * 1e6:6.1f} us " + " ".join(f"{r:5.0f}" for r in rates) + " GB/s")
        best = [f"{scheme}={','.join(map(str, results[0][1]))}"]
        for i, (n, k) in enumerate(SHAPES):
            total, tiles, seconds, rates = min(results, key=lambda r: r[2][i])
            print(f"  best for {n}x{k}: {tiles} {seconds[i] * 1e6:.1f} us {rates[i]:.0f} GB/s")
            best.append(f"{scheme}@{n}x{k}={','.join(map(str, tiles))}")
        print(" ".join(best), flush=True)


if __name__ == "__main__":
    main()
