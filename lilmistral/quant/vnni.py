"""The CPU kernels of vnni.cpp (int4/int5/int6/int8 matmuls), attention.cpp, pointwise.cpp and gguf_blocks.cpp (GGUF's
blocks decoded at load), compiled on first use into operators under torch.ops.lilmistral (see isa()): a C++
compiler is needed once, and torch.utils.cpp_extension caches the build. Built for AVX-512 VNNI or, on CPUs
without it, for AVX-VNNI or AVX2 (lanes.cpp: the same results, bit for bit, bfloat16 attention scores aside);
on other CPUs callers use PyTorch's own kernels.
LILMISTRAL_CPU_KERNELS=torch turns them off; =avxvnni or =avx2 builds those on an AVX-512 CPU (tests,
benchmarks)."""
from __future__ import annotations

import functools
import inspect
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .pack import QuantSpec

# one unit: later ones use earlier ones' helpers
SOURCES = ("lanes.cpp", "vnni.cpp", "attention.cpp", "pointwise.cpp", "gguf_blocks.cpp", "sampling.cpp")
# pack_columns' fields: int4's inputs as Int4Gemv reads them; int6's high bits; int5's fifth bits
NIBBLES, INT6_HIGHS, INT5_HIGHS = 4, 2, 1
# Decode-sized batches: up to this many (token, expert) rows, expert-batched calls beat grouping the rows by
# expert (which reads each expert's weights once)
MAX_ROWS = 8
# Per instruction set, the best first: the CPU flags (/proc/cpuinfo) it needs, and the compiler's
ISAS = {
    "avx512": (("avx512f", "avx512bw", "avx512dq", "avx512_vnni"),
               ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c"]),
    "avxvnni": (("avx2", "fma", "f16c", "avx_vnni"), ["-mavx2", "-mfma", "-mf16c", "-mavxvnni"]),
    "avx2": (("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"]),
}
# The avxvnni build on an AVX-512 VNNI CPU without AVX-VNNI: the same code, in 256-bit registers, with the EVEX
# form of the same vpdpbusd
AVXVNNI_ON_AVX512 = ["-mavx2", "-mfma", "-mf16c", "-mavx512vnni", "-mavx512vl", "-mprefer-vector-width=256",
                     "-DLILMISTRAL_YMM"]
# -ffp-contract=off: a product and a sum written apart round apart, as PyTorch's operators round them
COMMON_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]


def cpu_isas() -> list[str]:
    """The instruction sets of ISAS this CPU has, the best first."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [isa for isa, (needs, _) in ISAS.items() if flags.issuperset(needs)]


@functools.cache
def isa() -> str | None:
    """The instruction set the operators were built for, one of ISAS (building them on the first call, the best
    that builds); None where there are none. torch.ops.lilmistral.int8_gemv(x [M, K], q, scales, n) with
    pack_int8_vnni's parts, int4_gemv(x, q, scales, mins, n, codes, high) with pack_int4_vnni's (int5 too),
    int6_gemv(x, q, high, scales, codes, n) with pack_int6_vnni's, and for mixtures of experts
    int8_gemv_experts(x, [q], [scales], n, expert [M]), int4_gemv_experts(x, [q], [scales], [mins] ([] where
    symmetric), n, expert, [codes] ([] unless super-blocked), [high] ([] unless int5)) and int6_gemv_experts(x,
    [q], [high], [scales], [codes], n, expert): row m of x times the weight of expert[m]; attention(q, keys,
    values, mask, scale) (attention.cpp); rms_norm(x, weight, eps), rope(x, cos, sin), silu_mul(gate, up)
    (pointwise.cpp); gguf_dequantize(raw, kind), gguf_int8(raw, kind), q4k_codes(blocks), q4_canonical(blocks,
    head, k_quants), q5k_highs(blocks) (gguf_blocks.cpp); sample(logits, recent, penalty, temperature, top_k,
    top_p, u) (sampling.cpp)."""
    wanted, have = os.environ.get("LILMISTRAL_CPU_KERNELS"), cpu_isas()
    if wanted == "torch" or not have:
        return None
    runnable = have + ["avxvnni"] if "avx512" in have and "avxvnni" not in have else have
    if wanted and wanted not in runnable:
        warnings.warn(f"lilmistral: LILMISTRAL_CPU_KERNELS={wanted} is not one of this CPU's "
                      f"({', '.join(runnable)}, torch); using {have[0]}", stacklevel=2)
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        warnings.warn(f"lilmistral: no C++ compiler ({compiler}) to build the CPU kernels; using PyTorch's slower "
                      "kernels (install g++, or set LILMISTRAL_CPU_KERNELS=torch)", stacklevel=2)
        return None
    failure = None
    for target in [wanted] if wanted in runnable else have:
        reason = _build(target, ISAS[target][1] if target in have else AVXVNNI_ON_AVX512)  # forced, on AVX-512
        if reason:  # an old compiler (-mavxvnni needs GCC 11), a broken one: the next, or PyTorch's kernels
            failure = failure or f"the {target} CPU kernels did not build ({reason})"
            continue
        if failure:
            warnings.warn(f"lilmistral: {failure}; using the {target} ones (LILMISTRAL_CPU_KERNELS={target} "
                          "skips the try)", stacklevel=2)
        for name, shape in FAKES.items():  # the output shapes, for torch.compile
            torch.library.register_fake(f"lilmistral::{name}")(shape)
        return target
    warnings.warn(f"lilmistral: {failure}; using PyTorch's slower kernels (LILMISTRAL_CPU_KERNELS=torch skips "
                  "the try)", stacklevel=2)
    return None


def _build(target: str, flags: list[str]) -> str | None:
    """Builds and loads the operators for `target`: None, or why they did not build (the compiler's first error).
    PyTorch's own log lines on the way (a CUDA build's "No CUDA runtime is found" on a machine with a CUDA toolkit
    and no GPU, its doubts about the compiler) are held back: these kernels are for the CPU, and a failure is
    said once, by the caller."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load_inline

        # lanes.cpp includes the headers the unit needs; where this PyTorch's load_inline can leave out its own
        # torch/extension.h, it does (halving the build)
        parameters = inspect.signature(load_inline).parameters
        light = {"no_implicit_headers": True} if "no_implicit_headers" in parameters else {}
        sources = [Path(__file__).with_name(name).read_text() for name in SOURCES]
        load_inline(f"lilmistral_{target}", cpp_sources=sources, extra_cflags=COMMON_FLAGS + flags,
                    extra_ldflags=["-fopenmp"], is_python_module=False, **light)
    except Exception as e:  # no ninja, a compiler that fails: PyTorch's kernels still work
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        return next((line for line in lines if "error:" in line), lines[0])[:300]
    finally:
        log.setLevel(level)
    return None


def available() -> bool:
    """Whether the operators exist (see isa())."""
    return isa() is not None


def _int8_shape(x: torch.Tensor, q, scales, n: int, *args) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


def _int4_shape(x: torch.Tensor, q, scales, mins, n: int, *args) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


def _like_first(x: torch.Tensor, *args) -> torch.Tensor:
    return x.new_empty(x.shape)


def _int6_shape(x: torch.Tensor, q, high, scales, codes, n: int, *args) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


FAKES = {"int8_gemv": _int8_shape, "int4_gemv": _int4_shape, "int6_gemv": _int6_shape,
         "int8_gemv_experts": _int8_shape, "int4_gemv_experts": _int4_shape, "int6_gemv_experts": _int6_shape,
         "attention": _like_first, "rms_norm": _like_first, "rope": _like_first, "silu_mul": _like_first}


Rows = torch.Tensor | Sequence[torch.Tensor]  # a matrix, or blocks of its rows (stacked in order)


def row_blocks(t: Rows) -> list[torch.Tensor]:
    return [t] if isinstance(t, torch.Tensor) else list(t)


def row_count(t: Rows) -> int:
    return sum(block.shape[0] for block in row_blocks(t))


def pack_int8_vnni(q: Rows, scales: Rows) -> dict[str, torch.Tensor | int]:
    """int8 [N, K] and per-column scales [N] (each a tensor or blocks of its rows: a fused projection's parts)
    -> int8_gemv's arguments: columns in groups of 16 (the last padded with zeros), each group's weights in
    chunks of 4 inputs, 64 bytes: bytes 4c..4c+3 hold column c's 4 inputs; scales float32 [groups * 16]."""
    pack = torch.ops.lilmistral.pack_columns
    q, scales = row_blocks(q), row_blocks(scales)
    return {"q": pack(q, 4, 1, 0).view(torch.int8),  # [groups, K/4 * 16 * 4]
            "scales": pack([s.float()[:, None] for s in scales], 4, 1, 0).view(torch.float32).reshape(-1),
            "n": row_count(q)}


def pack_int4_vnni(parts: dict[str, Rows]) -> dict[str, torch.Tensor | int | None]:
    """The canonical int4 or int5 parts (pack.py; each a tensor or blocks of its rows) -> int4_gemv's arguments:
    columns in groups of 16 (the last padded with zeros), each group's weights in chunks of 8 inputs, 64 bytes:
    bytes 4c..4c+3 hold column c's inputs 0..3 in their low nibbles and 4..7 in their high ones; float16 scales
    (and mins) one per block of 32 inputs, [groups, K/32, 16]. Super-blocked, scales and mins are the
    super-blocks' factors [groups, K/S, 16], and codes uint8 [groups, K/32, 16, 2] each block's (scale, min)
    codes. int5: high uint8 [groups, K * 2], a block's fifth bits in 64 bytes, lane c's byte b holding column c's
    inputs 4s + b in bit s (else None). One pass in C++ (pack_columns): loading a model repacks all of its
    weights."""
    qweight, pack = row_blocks(parts["qweight"]), torch.ops.lilmistral.pack_columns
    k = qweight[0].shape[1] * 2

    def per_block(t: Rows) -> int:  # a group's word repeated for each of its blocks of 32 inputs
        return k // 32 // row_blocks(t)[0].shape[1]

    high = pack(row_blocks(parts["qhigh"]), 4, 1, INT5_HIGHS) if "qhigh" in parts else None
    packed = {"q": pack(qweight, 4, 1, NIBBLES), "n": row_count(qweight), "codes": None, "high": high}
    if "super_scales" not in parts:
        return packed | {"scales": column_halves(parts["scales"], per_block(parts["scales"])),
                         "mins": column_halves(parts["mins"], per_block(parts["mins"])) if "mins" in parts else None}
    pairs = [torch.stack(pair, dim=-1).flatten(1).view(torch.int16)
             for pair in zip(row_blocks(parts["scales"]), row_blocks(parts["mins"]))]
    return packed | {"scales": column_halves(parts["super_scales"]), "mins": column_halves(parts["super_mins"]),
                     "codes": column_words(pairs, per_block(pairs))}


def column_words(blocks: list[torch.Tensor], repeat: int = 1) -> torch.Tensor:
    """Rows of 2-byte words [n, J] (blocks of them) -> uint8 [groups, J * repeat, 16, 2], each word `repeat`
    times (pack_columns)."""
    groups = (row_count(blocks) + 15) // 16
    return torch.ops.lilmistral.pack_columns(blocks, 2, repeat, 0).view(groups, -1, 16, 2)


def column_halves(t: Rows, repeat: int = 1) -> torch.Tensor:
    """Rows [n, J] (or blocks of them) as float16 [groups, J * repeat, 16] (column_words)."""
    return column_words([block.half() for block in row_blocks(t)], repeat).view(torch.float16)[..., 0]


def pack_int6_vnni(parts: dict[str, Rows]) -> dict[str, torch.Tensor | int]:
    """The canonical int6 parts (pack.py; each a tensor or blocks of its rows) -> int6_gemv's arguments: columns
    in groups of 16 (the last padded with zeros); q their low 4 bits as pack_int4_vnni's; high their high 2 bits,
    64 bytes a half block of 16 inputs, lane c's byte b holding column c's inputs 4i + b of it in bits 2i; codes
    int8 [groups, K/32, 16, 2] each block's two groups' codes; scales float16 [groups, K/S, 16] the factors."""
    qweight, pack = row_blocks(parts["qweight"]), torch.ops.lilmistral.pack_columns
    pairs = [codes.view(torch.int16) for codes in row_blocks(parts["scales"])]  # a block's two codes: one word
    return {"q": pack(qweight, 4, 1, NIBBLES), "high": pack(row_blocks(parts["qhigh"]), 4, 1, INT6_HIGHS),
            "scales": column_halves(parts["super_scales"]), "codes": column_words(pairs).view(torch.int8),
            "n": row_count(qweight)}


def transpose_fields(t: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 4] words of 2-bit fields transposed (pack_columns' INT6_HIGHS; its own inverse): field i of
    byte b becomes field b of byte i."""
    fields = torch.stack([(t >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1).transpose(-1, -2)
    return fields[..., 0] | (fields[..., 1] << 2) | (fields[..., 2] << 4) | (fields[..., 3] << 6)


def fifth_bits(high: torch.Tensor) -> torch.Tensor:
    """pack_int4_vnni's int5 high, a row's words [..., 4] (byte b: inputs 4s + b in bit s) -> the canonical
    bytes [..., 4] (byte t: inputs 8t + i in bit i)."""
    bits = (high[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1  # [..., b, s]
    inputs = bits.transpose(-1, -2).reshape(*high.shape[:-1], 4, 8)  # input 4s + b = 8t + i
    return (inputs << torch.arange(8, dtype=torch.uint8)).sum(dim=-1, dtype=torch.uint8)


def unpack_vnni(parts: dict, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The canonical parts (pack.py) that pack_int8_vnni's, pack_int4_vnni's or pack_int6_vnni's parts were made
    from: a repacked weight dequantized (float32 activations, rarely) without the canonical copy kept in memory."""
    n, groups = parts["n"], parts["q"].shape[0]

    def rows(t: torch.Tensor) -> torch.Tensor:  # [groups, J, 16, ...] -> [N, J, ...]
        return t.transpose(1, 2).reshape(groups * 16, t.shape[1], *t.shape[3:])[:n]

    words = rows(parts["q"].view(groups, -1, 16, 4))  # int8: inputs 4j..4j+3; int4: byte b, inputs b and b + 4
    if spec.scheme == "int8":
        return {"qweight": words.reshape(n, -1), "scales": parts["scales"][:n].half()}
    values = torch.cat((words & 0x0F, words >> 4), dim=-1).reshape(n, -1)  # [N, K] in order
    canonical = {"qweight": values[:, 0::2] | (values[:, 1::2] << 4)}
    if spec.scheme == "int6":
        return canonical | {"qhigh": transpose_fields(rows(parts["high"].view(groups, -1, 16, 4))).reshape(n, -1),
                            "scales": rows(parts["codes"]).reshape(n, -1), "super_scales": rows(parts["scales"])}
    if spec.scheme == "int5":
        canonical["qhigh"] = fifth_bits(rows(parts["high"].view(groups, -1, 16, 4))).reshape(n, -1)
    every = spec.group_size // 32  # a group of G inputs is G/32 blocks alike
    if parts["codes"] is not None:
        codes = rows(parts["codes"])[:, ::every]  # [N, K/G, 2]
        return canonical | {"scales": codes[..., 0].contiguous(), "mins": codes[..., 1].contiguous(),
                            "super_scales": rows(parts["scales"]), "super_mins": rows(parts["mins"])}
    for name in ("scales", "mins"):
        if parts[name] is not None:
            canonical[name] = rows(parts[name])[:, ::every].contiguous()
    return canonical
