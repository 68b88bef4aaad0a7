"""GPU decode benchmark: the Triton GEMV kernels and a Mistral-7B-shape model, against the memory bandwidth.

    python -m benchmarks.gpu_bench [--layers 32] [--tokens 64] [--schemes int4 int8 bf16 (int5 int6)] [--compile]
                                   [--tiles int4=256,128,1] [--variants no-pdl ...] [--no-kernels]

Prints JSON lines: the GPU's measured read bandwidth; for int4 / int8 / bf16 (and int5, int6, asked for), the GEMV
kernels' GB/s on Mistral-7B's layer shapes, each timed alone in a CUDA graph on weights cycled through more than
L2 holds (quantized: with int8 activations, and with the exact float product); what a kernel costs beyond its
bytes (an empty graph node, a small GEMV in one program and split along K); the decode attention against SDPA;
a Mistral-7B-shape model's (random weights, `--layers` layers, int8 head) prefill time and tokens/s at 16-, 128-
and 1024-token prompts, and its decode tokens/s with the weight bytes read per token and that as a fraction of the
read bandwidth, for each decode step: eager, CUDA graphs (the default on a GPU; for int4 also in each of
--variants: without programmatic dependent launch, with each step queued only after the host read the token
before, with the GEMVs' exact float product instead of int8 activations) and, with --compile, torch.compile; last,
the kernels an eager int4 step launches with 1 and 2 layers, and their GPU time.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.random_model import MISTRAL_7B, random_model
from lilmistral.bench import held_weights, measure_bandwidth, weight_bytes_per_token
from lilmistral.cache import RollingKVCache
from lilmistral.config import ModelArgs
from lilmistral.generate import DecodeStep, SamplingParams, generate_tokens, prefill
from lilmistral.quant import quantize, spec_for

SHAPES = ((4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336))  # wo; fused wqkv, w13; w2


def timed(fn, repeat: int = 50) -> float:
    """Seconds a call, on the GPU's clock."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat / 1e3


COLD_BYTES = 256e6  # over 4x an H200's L2: weights cycled through this many bytes are read from memory


def graphed_seconds(calls: list, repeat: int = 60) -> float:
    """Seconds a call of a kernel alone: `repeat` calls, cycling through `calls` (each on its own copy of the
    weights, so they come from memory, not L2), captured in one CUDA graph and replayed: no launch overhead
    from the host between them, as in a graphed decode step."""
    for call in calls:
        call()  # Triton builds
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(repeat):
            calls[i % len(calls)]()
    return timed(graph.replay, repeat=5) / repeat


def copies(nbytes: int) -> int:
    """How many copies of nbytes of weights make COLD_BYTES."""
    return max(2, -(-int(COLD_BYTES) // nbytes))


def cold_kernels(parts: dict, spec, *tiles: int) -> tuple[list, int]:
    """Triton kernels on a weight's parts (at tiles BLOCK_N, BLOCK_K, num_warps, given them), each on its own
    repacked copy, `copies` of them; and the bytes one reads."""
    from lilmistral.quant.triton_kernels import TritonKernel

    first = TritonKernel(parts, spec, *tiles)
    nbytes = sum(t.nbytes for t in first.parts.values())
    return [first] + [TritonKernel(parts, spec, *tiles) for _ in range(copies(nbytes) - 1)], nbytes


def gemv_inputs(scheme: str, n: int, k: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A random weight's packed parts on the GPU, and one bfloat16 row of activations."""
    spec = spec_for("layers.0.attention.wq.weight", (n, k), scheme)
    parts = quantize(torch.randn(n, k, device="cuda") * k ** -0.5, spec)
    return parts, torch.randn(1, k, device="cuda", dtype=torch.bfloat16)


def kernel_table(bw: float, schemes: list[str]) -> list[dict]:
    """GEMV speeds (`graphed_seconds`): bfloat16 (cuBLAS); quantized with the activations rounded to int8 (the
    default) and, to compare, with the exact float product at the tiles it had (256, 32, 2)."""
    from lilmistral.quant import triton_kernels

    rows = []
    for scheme in schemes:
        for n, k in SHAPES:
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            if scheme == "bf16":
                ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16)]
                ws += [ws[0].clone() for _ in range(copies(ws[0].nbytes) - 1)]
                variants = [("bf16", graphed_seconds([lambda w=w: x @ w.t() for w in ws]), ws[0].nbytes)]
            else:
                spec = spec_for("layers.0.attention.wq.weight", (n, k), scheme)
                parts, _ = gemv_inputs(scheme, n, k)
                kernels, nbytes = cold_kernels(parts, spec)
                variants = [("int8", graphed_seconds([lambda c=c: c(x) for c in kernels]), nbytes)]
                floats, _ = cold_kernels(parts, spec, 256, 32, 2)
                exact, triton_kernels.int8_activations = triton_kernels.int8_activations, lambda x: False
                variants.append(("float", graphed_seconds([lambda c=c: c(x) for c in floats]), nbytes))
                triton_kernels.int8_activations = exact
                del kernels, floats
            for activations, seconds, nbytes in variants:
                rows.append({"scheme": scheme, "shape": f"{n}x{k}", "activations": activations,
                             "us": round(seconds * 1e6, 1), "gbps": round(nbytes / seconds / 1e9, 1),
                             "fraction": round(nbytes / seconds / 1e9 / bw, 3)})
    return rows


def latency_table() -> list[dict]:
    """What a kernel costs beyond its bytes (`graphed_seconds`, weights hot in L2): an empty node (a
    one-element fill), and a small int4 GEMV (512 columns, 256 inputs, one super-block) as one program reading
    every input, and split along K into 4 (the decode tiles) and 8 programs whose float32 sums the last one
    finishes. Leads for where each decode GEMV's ~4 us over its bytes go (docs/performance.md, session 37)."""
    from lilmistral.quant.triton_kernels import TritonKernel

    n, k = 512, 256
    spec = spec_for("layers.0.attention.wq.weight", (n, k), "int4")
    parts, x = gemv_inputs("int4", n, k)
    one = torch.zeros(1, device="cuda")
    calls = {"empty node": lambda: one.fill_(1.0)}
    for block_k in (256, 64, 32):
        kernel = TritonKernel(parts, spec, 512, block_k, 1)
        calls[f"int4 gemv {n}x{k} in {k // block_k} program(s)"] = lambda kernel=kernel: kernel(x)
    return [{"latency": name, "us": round(graphed_seconds([call], repeat=200) * 1e6, 2)} for name, call in calls.items()]


def attention_table(bw: float) -> list[dict]:
    """The decode attention (Triton) against PyTorch's SDPA, Mistral-7B's heads (8 kv heads of 4 query rows,
    hd 128) over n cached slots with a one-row mask: µs a call (`graphed_seconds`, over copies of the cache)
    and the keys' and values' GB/s."""
    from lilmistral.model import sdpa
    from lilmistral.quant.triton_kernels import DecodeAttention

    attention, rows = DecodeAttention(sdpa), []
    for n in (512, 4096, 32768):
        q = torch.randn(8, 4, 128, device="cuda", dtype=torch.bfloat16)
        mask = torch.rand(1, n, device="cuda") < 0.95
        nbytes = 2 * 8 * n * 128 * 2
        caches = [[torch.randn(8, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
                  for _ in range(copies(nbytes))]
        for name, fn in (("triton", attention), ("sdpa", sdpa)):
            seconds = graphed_seconds([lambda k=k, v=v: fn(q, k, v, mask) for k, v in caches])
            rows.append({"attention": name, "slots": n, "us": round(seconds * 1e6, 1),
                         "gbps": round(nbytes / seconds / 1e9, 1), "fraction": round(nbytes / seconds / 1e9 / bw, 3)})
        del caches
    return rows


def kernels_per_token(layers: int) -> dict:
    """The CUDA kernels an eager int4 decode step launches (what a CUDA graph replays): how many, the GPU's time
    in them against the step's, and the kernels taking the most time (by name, µs in all)."""
    args = ModelArgs(n_layers=layers, **MISTRAL_7B)
    model = random_model(args, "int4", "cuda")
    cache = RollingKVCache(args.n_layers, args.n_kv_heads, args.head_dim, 4096, None, torch.bfloat16, "cuda")
    step = DecodeStep(model, graphs=False)
    with torch.inference_mode():
        step(1, cache)  # Triton builds
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step(2, cache)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name[:60]] = by_name.get(e.name[:60], 0.0) + e.time_range.elapsed_us()
    span = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
    return {"layers": layers, "kernels_per_token": len(kernels), "kernel_us": round(sum(by_name.values()), 1),
            "first_to_last_us": round(span, 1),
            "top": sorted(((round(us, 1), name) for name, us in by_name.items()), reverse=True)[:12]}


def decode_seconds(model, args: ModelArgs, step: DecodeStep, tokens: int,
                   ahead: bool = True) -> tuple[float, float, float | None]:
    """(seconds to the first token after a 128-token prompt, seconds a decoded token, and for a graphed step the
    GPU's seconds a token: its graph replayed back to back, without the host's work between tokens). Greedy,
    each step queued ahead of the host's read of its token unless `ahead` is False."""
    cache = RollingKVCache(args.n_layers, args.n_kv_heads, args.head_dim, 4096, None, torch.bfloat16, "cuda")
    params = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=tokens)
    prompt = list(range(1, 129))
    with torch.inference_mode():
        list(generate_tokens(model, cache, prompt, params, [], step, ahead))  # warm-up: Triton builds, graphs
        cache.reset()
        torch.cuda.synchronize()
        start = time.perf_counter()
        stream = generate_tokens(model, cache, prompt, params, [], step, ahead)
        next(stream)
        first = time.perf_counter()
        n = 1 + sum(1 for _ in stream)
        torch.cuda.synchronize()
        end = time.perf_counter()
        replay = None
        if step.mode == "graphed":  # while the cache its graphs write into is alive
            graph, _ = next(iter(step._graphed.graphs.values()))
            replay = timed(graph.replay)
    return first - start, (end - first) / (n - 1), replay


def prefill_seconds(model, args: ModelArgs, tokens: int = 1024) -> float:
    """Seconds to prefill a `tokens`-token prompt (the weights dequantized for cuBLAS's matmuls, SDPA over the
    prompt), after one to warm up."""
    cache = RollingKVCache(args.n_layers, args.n_kv_heads, args.head_dim, 4096, None, torch.bfloat16, "cuda")
    prompt = list(range(1, tokens + 1))
    with torch.inference_mode():
        prefill(model, cache, prompt)  # Triton builds
        cache.reset()
        torch.cuda.synchronize()
        start = time.perf_counter()
        prefill(model, cache, prompt)
        torch.cuda.synchronize()
    return time.perf_counter() - start


VARIANTS = ("no-pdl", "not-ahead", "float-activations")
PREFILL_TOKENS = (16, 128, 1024)  # a follow-up's prompt, a short one, a document's


def decode_table(layers: int, tokens: int, bw: float, schemes: list[str], compile: bool,
                 variants: list[str]) -> list[dict]:
    """Decode eager and graphed; for int4 also graphed in each of `variants` (words of VARIANTS joined by +):
    without programmatic dependent launch (read as the graphs are captured), each step queued only once the
    host has read the token before (not ahead), the exact float product instead of int8 activations."""
    from lilmistral.quant import triton_kernels

    int8_x = triton_kernels.int8_activations
    args = ModelArgs(n_layers=layers, **MISTRAL_7B)
    rows = []
    for scheme in schemes:
        model = random_model(args, scheme, "cuda")
        nbytes = weight_bytes_per_token(model.args, held_weights(model))
        for prompt in PREFILL_TOKENS:
            seconds = prefill_seconds(model, args, prompt)
            print(json.dumps({"scheme": scheme, "layers": layers, "prefill_tokens": prompt,
                              "prefill_ms": round(seconds * 1e3, 2), "prefill_tps": round(prompt / seconds, 1)}),
                  flush=True)
        steps = [(DecodeStep(model, graphs=False), ""), (DecodeStep(model), "")]
        if scheme == "int4":
            steps += [(DecodeStep(model), variant) for variant in variants]
        if compile:
            steps.append((DecodeStep(model, compile=True), ""))
        for step, variant in steps:
            words = set(variant.split("+"))
            os.environ["LILMISTRAL_PDL"] = "0" if "no-pdl" in words else "1"
            triton_kernels.int8_activations = (lambda x: False) if "float-activations" in words else int8_x
            ttft, per_token, replay = decode_seconds(model, args, step, tokens, "not-ahead" not in words)
            os.environ.pop("LILMISTRAL_PDL")
            triton_kernels.int8_activations = int8_x
            row = {"scheme": scheme, "layers": layers, "step": f"{step.mode} {variant}".strip()}
            if replay is not None:
                row["replay_ms"] = round(replay * 1e3, 3)
            rows.append({**row, "decode_tps": round(1 / per_token, 1),
                         "ms_per_token": round(per_token * 1e3, 3), "ttft_s": round(ttft, 4),
                         "weight_mb_per_token": round(nbytes / 1e6, 1),
                         "achieved_gbps": round(nbytes / per_token / 1e9, 1),
                         "bandwidth_fraction": round(nbytes / per_token / 1e9 / bw, 3)})
            print(json.dumps(rows[-1]), flush=True)
        del model, steps
        torch.cuda.empty_cache()
    return rows


def use_tiles(choices: list[str]) -> dict[tuple[str, int, int], tuple[int, int, int]]:
    """--tiles: SCHEME=BN,BK,WARPS sets triton_kernels.TILES[SCHEME]; SCHEME@NxK=BN,BK,WARPS the tiles of that
    scheme's N x K weights alone (TritonKernel wrapped to pick them). Returns the tiles by shape."""
    from lilmistral.quant import triton_kernels

    shaped = {}
    for choice in choices:
        name, sizes = choice.split("=")
        scheme, _, shape = name.partition("@")
        tiles = tuple(int(v) for v in sizes.split(","))
        if shape:
            n, k = shape.split("x")
            shaped[scheme, int(n), int(k)] = tiles
        else:
            triton_kernels.TILES[scheme] = tiles
    if shaped:
        init = triton_kernels.TritonKernel.__init__

        def init_at_shape_tiles(self, parts, spec, block_n=None, block_k=None, num_warps=None, interleave=False):
            blocks = parts["qweight"] if isinstance(parts["qweight"], list) else [parts["qweight"]]
            n, k = sum(b.shape[0] for b in blocks), blocks[0].shape[1] * (1 if spec.scheme == "int8" else 2)
            if block_n is None and (spec.scheme, n, k) in shaped:
                block_n, block_k, num_warps = shaped[spec.scheme, n, k]
            init(self, parts, spec, block_n, block_k, num_warps, interleave)

        triton_kernels.TritonKernel.__init__ = init_at_shape_tiles
    return shaped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--schemes", nargs="+", choices=["int4", "int5", "int6", "int8", "bf16"],
                   default=["int4", "int8", "bf16"])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), help="int4's graphed variants (VARIANTS)")
    p.add_argument("--tiles", nargs="*", default=[], metavar="SCHEME[@NxK]=BN,BK,WARPS",
                   help="GEMV tiles instead of triton_kernels.TILES', for a scheme or only its weights of one "
                        "shape (as gemv_sweep prints them)")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="the GEMV and attention tables, and the kernels a step launches")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile decode step")
    ns = p.parse_args()
    from lilmistral.quant import triton_kernels

    shaped = use_tiles(ns.tiles)
    bw = measure_bandwidth(torch.device("cuda"))
    shape_tiles = {f"{scheme}@{n}x{k}": tiles for (scheme, n, k), tiles in shaped.items()}
    print(json.dumps({"device": torch.cuda.get_device_name(), "read_bandwidth_gbps": round(bw, 1),
                      "tiles": triton_kernels.TILES, "shape_tiles": shape_tiles}), flush=True)
    if ns.kernels:
        for row in kernel_table(bw, ns.schemes) + latency_table() + attention_table(bw):
            print(json.dumps(row), flush=True)
    decode_table(ns.layers, ns.tokens, bw, ns.schemes, ns.compile, ns.variants)
    if ns.kernels:
        for layers in (1, 2):  # the difference: a layer's kernels
            print(json.dumps(kernels_per_token(layers)), flush=True)


if __name__ == "__main__":
    main()
