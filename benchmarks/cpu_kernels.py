"""lilmistral's CPU kernels against PyTorch's weight-only ones at batch-1 decode (or --rows M), on Mistral-7B's
layer shapes (and SmolLM2's), with cold weights: each call reads a different copy, ~200 MB in all; its attention
kernel against PyTorch's flash attention (bfloat16, decode and prompt shapes); and its RMSNorm, RoPE and
silu * up kernels against model.py's PyTorch versions (one decode token, bfloat16).

    python benchmarks/cpu_kernels.py [--threads 2] [--rows 1] [--only int6,int8,attention,pointwise]
    LILMISTRAL_CPU_KERNELS=avx2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/cpu_kernels.py   # as on an AVX2 CPU
    LILMISTRAL_CPU_KERNELS=avxvnni python benchmarks/cpu_kernels.py   # the AVX-VNNI build (EVEX form on AVX-512)
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import torch

from lilmistral.model import rms_norm, rope, silu_mul
from lilmistral.quant import vnni
from lilmistral.quant.pack import pack_int4

SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (1536, 576), (576, 1536))


def median_seconds(fn, weights: list, repeat: int = 15) -> float:
    for w in weights:
        fn(w)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for w in weights:
            fn(w)
        times.append((time.perf_counter() - start) / len(weights))
    return sorted(times)[len(times) // 2]


def int4_row(n: int, k: int, copies: int, rows: int, super_blocked: bool = False) -> dict:
    """int4 g32 with a min: float16 scales and mins (5.0 bits a weight), or super-blocked as GGUF's Q4_K (8-bit
    codes times float16 factors per 256 inputs, 4.625)."""
    torch_parts, vnni_parts = [], []
    for _ in range(copies):
        q = torch.randint(0, 16, (n, k), dtype=torch.int32)
        if super_blocked:
            codes = {name: torch.randint(0, 64, (n, k // 32), dtype=torch.uint8) for name in ("scales", "mins")}
            factors = {name: torch.rand(n, k // 256).half() / 1000 for name in ("super_scales", "super_mins")}
            parts = {"qweight": pack_int4(q), **codes, **factors}
        else:
            parts = {"qweight": pack_int4(q), "scales": torch.rand(n, k // 32).half() / 100,
                     "mins": torch.rand(n, k // 32).half() / 100}
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        torch_parts.append((packed, torch.randn(k // 32, n, 2).bfloat16()))
        vnni_parts.append(vnni.pack_int4_vnni(parts))
    x = torch.randn(rows, k).bfloat16()
    gemv = torch.ops.lilmistral.int4_gemv
    ours = median_seconds(lambda p: gemv(x, p["q"], p["scales"], p["mins"], p["n"], p["codes"]), vnni_parts)
    theirs = median_seconds(lambda w: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w[0], 32, w[1]), torch_parts)
    weight_bytes = n * k * (4.625 if super_blocked else 5.0) / 8
    return {"lilmistral_us": ours * 1e6, "pytorch_us": theirs * 1e6, "lilmistral_gbps": weight_bytes / ours / 1e9}


def int6_row(n: int, k: int, copies: int, rows: int) -> dict:
    """int6 (GGUF Q6_K's layout: 6.5625 bits a weight), against PyTorch's int8 kernel (which CPUs without
    lilmistral's kernels run int6 weights with, requantized)."""
    parts = [{"qweight": torch.randint(0, 256, (n, k // 2), dtype=torch.uint8),
              "qhigh": torch.randint(0, 256, (n, k // 4), dtype=torch.uint8),
              "scales": torch.randint(-128, 128, (n, k // 16), dtype=torch.int8),
              "super_scales": torch.rand(n, k // 256).half() / 1000} for _ in range(copies)]
    packed = [vnni.pack_int6_vnni(p) for p in parts]
    weights = [(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n).bfloat16()) for _ in range(copies)]
    x = torch.randn(rows, k).bfloat16()
    gemv = torch.ops.lilmistral.int6_gemv
    ours = median_seconds(lambda p: gemv(x, p["q"], p["high"], p["scales"], p["codes"], p["n"]), packed)
    theirs = median_seconds(lambda w: torch.ops.aten._weight_int8pack_mm(x, w[0], w[1]), weights)
    return {"lilmistral_us": ours * 1e6, "pytorch_us": theirs * 1e6, "lilmistral_gbps": n * k * 6.5625 / 8 / ours / 1e9}


def int8_row(n: int, k: int, copies: int, rows: int) -> dict:
    weights = [(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) / 100) for _ in range(copies)]
    packed = [vnni.pack_int8_vnni(q, scales) for q, scales in weights]
    x = torch.randn(rows, k).bfloat16()
    ours = median_seconds(lambda p: torch.ops.lilmistral.int8_gemv(x, p["q"], p["scales"], p["n"]), packed)
    theirs = median_seconds(lambda w: torch.ops.aten._weight_int8pack_mm(x, w[0], w[1].bfloat16()), weights)
    return {"lilmistral_us": ours * 1e6, "pytorch_us": theirs * 1e6, "lilmistral_gbps": n * k / ours / 1e9}


# (kv heads, query heads per kv head, query tokens, keys, head dim): SmolLM2's and Mistral-7B's heads
ATTENTION_SHAPES = ((3, 3, 1, 100, 64), (3, 3, 1, 1000, 64), (3, 3, 1, 4000, 64), (8, 4, 1, 100, 128),
                    (8, 4, 1, 1000, 128), (8, 4, 1, 4000, 128), (8, 4, 1, 16000, 128), (8, 4, 128, 128, 128),
                    (8, 4, 512, 1024, 128))


def attention_row(kv_heads: int, group: int, tokens: int, keys: int, head_dim: int) -> dict:
    """Decode (one token) reads a cold cache, as a decode step finds its layer's (each call a different copy,
    ~200 MB in all); a prompt's rows reuse one."""
    q = torch.randn(kv_heads, group * tokens, head_dim).bfloat16()
    copies = max(1, int(200e6 / (2 * kv_heads * keys * head_dim * 2))) if tokens == 1 else 1
    caches = [torch.randn(2, kv_heads, keys, head_dim).bfloat16() for _ in range(copies)]
    position = torch.arange(keys - tokens, keys)  # the prompt's last tokens, causal
    mask = (torch.arange(keys)[None] <= position[:, None]).repeat(group, 1)
    ours = median_seconds(lambda kv: torch.ops.lilmistral.attention(q, kv[0], kv[1], mask, head_dim ** -0.5), caches,
                          repeat=21)
    theirs = median_seconds(lambda kv: torch.nn.functional.scaled_dot_product_attention(
        q[None], kv[0][None], kv[1][None], attn_mask=mask), caches, repeat=21)
    return {"lilmistral_us": ours * 1e6, "pytorch_us": theirs * 1e6}


def pointwise_rows() -> dict:
    """Per call at decode, SmolLM2's and Mistral-7B's sizes: (lilmistral's kernel, PyTorch's operators)."""
    ops, rows = torch.ops.lilmistral, {}
    for dim, heads, head_dim, hidden in ((576, 9, 64, 1536), (4096, 32, 128, 14336)):
        x, weight = torch.randn(1, dim).bfloat16(), torch.randn(dim).bfloat16()
        q = torch.randn(1, heads, head_dim).bfloat16().transpose(0, 1)  # [H, 1, hd], as the model passes it
        cos, sin = torch.randn(2, 1, head_dim).bfloat16()
        gate, up = torch.randn(1, 2 * hidden).bfloat16().chunk(2, dim=-1)
        calls = {f"rms_norm {dim}": (ops.rms_norm, rms_norm, (x, weight, 1e-5)),
                 f"rope {heads}x{head_dim}": (ops.rope, rope, (q, cos, sin)),
                 f"silu_mul {hidden}": (ops.silu_mul, silu_mul, (gate, up))}
        for name, (ours, theirs, args) in calls.items():
            rows[name] = tuple(median_seconds(lambda _: f(*args), [None] * 200) for f in (ours, theirs))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1, help="activation rows per matmul (1: decode)")
    parser.add_argument("--only", help="what to run, of the matmul schemes, attention and pointwise, e.g. 'int6,int8'")
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    isa, only = vnni.isa(), ns.only and ns.only.split(",")
    assert isa, "no lilmistral CPU kernels on this CPU (or no C++ compiler)"
    for scheme, row, shapes in (("int4 g32", int4_row, SHAPES),
                                ("int4 g32 super-blocked", functools.partial(int4_row, super_blocked=True), SHAPES[:4]),
                                ("int6", int6_row, ((32000, 4096), *SHAPES[:4])),
                                ("int8", int8_row, ((32000, 4096), *SHAPES[:4]))):
        if only and scheme not in only:
            continue
        for n, k in shapes:
            result = row(n, k, copies=max(3, int(200e6 / (n * k * 0.6))), rows=ns.rows)
            print(json.dumps({"isa": isa, "scheme": scheme, "shape": f"{n}x{k}", "rows": ns.rows,
                              **{key: round(v, 1) for key, v in result.items()},
                              "speedup": round(result["pytorch_us"] / result["lilmistral_us"], 2)}), flush=True)
    for shape in ATTENTION_SHAPES if not only or "attention" in only else ():
        result = attention_row(*shape)
        print(json.dumps({"isa": isa, "kernel": "attention", "kv_heads,group,tokens,keys,head_dim": shape,
                          **{key: round(v, 1) for key, v in result.items()},
                          "speedup": round(result["pytorch_us"] / result["lilmistral_us"], 2)}), flush=True)
    for name, (ours, theirs) in pointwise_rows().items() if not only or "pointwise" in only else ():
        print(json.dumps({"isa": isa, "kernel": name, "lilmistral_us": round(ours * 1e6, 1),
                          "pytorch_us": round(theirs * 1e6, 1), "speedup": round(theirs / ours, 2)}), flush=True)


if __name__ == "__main__":
    main()
