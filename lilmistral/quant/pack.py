"""The canonical, backend-neutral packed layouts (see docs/format.md).

int8: q int8 [N, K], w = q * scale, scale float16 [N] (symmetric, per output channel).
int4: q uint8 [N, K/2], two 4-bit values q in 0..15 per byte along K, element 2j in the low
      nibble and 2j+1 in the high one; per group of G inputs a float16 scale [N, K/G] and:
      asymmetric: a float16 min [N, K/G],  w = q * scale + min   (GGUF Q4_1 when G = 32)
      symmetric:  no min,                  w = (q - 8) * scale   (GGUF Q4_0 when G = 32)
      super-blocked (asymmetric; GGUF Q4_K when G = 32, S = 256): each group's scale and min an 8-bit code
      uint8 [N, K/G] times a float16 factor per super-block of S inputs, super_scales and super_mins [N, K/S]:
      w = q * (super_scale * scale) + super_min * min   (4.625 bits a weight at G = 32, S = 256; 5.0 without)
int5: int4's layouts for q in 0..31: its low 4 bits as int4's qweight, its fifth bit in qhigh uint8 [N, K/8] (input
      8j+i in bit i of byte j); symmetric w = (q - 16) * scale (GGUF Q5_0); with mins Q5_1, super-blocked Q5_K
int6: q in 0..63 [N, K] as its low 4 bits, qweight uint8 [N, K/2] (as int4's), and its high 2 bits, qhigh uint8
      [N, K/4] (input 4j+i in bits 2i..2i+1 of byte j); per group of 16 inputs an int8 code scales [N, K/16] times
      a float16 factor per super-block of S inputs, super_scales [N, K/S]:
      w = (super_scale * scale) * (q - 32)   (GGUF Q6_K when S = 256: 6.5625 bits a weight)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ModelFormatError
from . import GROUP_SIZES

INT6_GROUP = 16


@dataclass(frozen=True)
class QuantSpec:
    scheme: str  # "int4", "int5", "int6" or "int8"
    group_size: int = 0  # int4 and int5 (int6: 16)
    symmetric: bool = True
    super_block: int = 0  # int4 with mins: 0, float16 scales and mins; else S, coded per super-block of S inputs

    def __post_init__(self) -> None:  # a manifest's layout is read from a file
        if self.scheme == "int8":
            known = self.group_size == 0 and self.super_block == 0
        elif self.scheme == "int6":  # the kernels take a factor per whole blocks of 32
            known = (self.group_size == INT6_GROUP and self.symmetric and self.super_block > 0
                     and self.super_block % 32 == 0)
        else:
            known = self.scheme in ("int4", "int5") and self.group_size in GROUP_SIZES and (
                self.super_block == 0 or not self.symmetric and self.super_block % self.group_size == 0)
        if not known:
            raise ValueError(f"unknown packed layout {self.to_dict()}")

    def to_dict(self) -> dict:
        d = {"scheme": self.scheme, "group_size": self.group_size, "symmetric": self.symmetric}
        return d | {"super_block": self.super_block} if self.super_block else d

    @property
    def levels(self) -> int:
        """The number of values q takes: int4's 16, int5's 32, int6's 64."""
        return {"int5": 32, "int6": 64}.get(self.scheme, 16)


def group_size_for(k: int, wanted: int) -> int:
    """The requested group size, or the largest smaller one that divides K (576 has no group of 128)."""
    for g in sorted((g for g in GROUP_SIZES if g <= wanted), reverse=True):
        if k % g == 0:
            return g
    raise ValueError(f"no int4 group size divides {k} input features")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, K] -> bytes [N, K/2]."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """bytes [N, K/2] -> uint8 values 0..15 [N, K]."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def pack_int6(q: torch.Tensor) -> dict[str, torch.Tensor]:
    """uint8 values 0..63 [N, K] -> int6's qweight (low 4 bits) and qhigh (high 2 bits, four a byte)."""
    q = q.to(torch.uint8)
    high = q >> 4
    return {"qweight": pack_int4(q & 0x0F),
            "qhigh": high[:, 0::4] | (high[:, 1::4] << 2) | (high[:, 2::4] << 4) | (high[:, 3::4] << 6)}


def pack_int5(q: torch.Tensor) -> dict[str, torch.Tensor]:
    """uint8 values 0..31 [N, K] -> int5's qweight (low 4 bits) and qhigh (fifth bits, eight a byte)."""
    q = q.to(torch.uint8)
    fifth = (q >> 4).reshape(q.shape[0], -1, 8) << torch.arange(8, dtype=torch.uint8, device=q.device)
    return {"qweight": pack_int4(q & 0x0F), "qhigh": fifth.sum(dim=-1, dtype=torch.uint8)}


def unpack_int5(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """int5's qweight and qhigh -> uint8 values 0..31 [N, K]."""
    high = parts["qhigh"]
    fifth = (high[..., None] >> torch.arange(8, dtype=torch.uint8, device=high.device)) & 1
    return unpack_int4(parts["qweight"]) | (fifth.reshape(high.shape[0], -1) << 4)


def unpack_int6(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """int6's qweight and qhigh -> uint8 values 0..63 [N, K]."""
    high = parts["qhigh"]
    high = torch.stack([(high >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1).reshape(high.shape[0], -1)
    return unpack_int4(parts["qweight"]) | (high << 4)


ROW_CHUNK_VALUES = 2**19  # quantized a chunk of rows at a time: 2 MB float32 temporaries stay in cache


def _by_rows(w: torch.Tensor, quantize_rows) -> dict[str, torch.Tensor]:
    """quantize_rows(float32 rows) over w a chunk of rows at a time, into parts allocated once. Temporaries of
    the whole matrix cost their fresh pages more than the arithmetic: int4 was 3-5x slower that way."""
    rows = max(1, ROW_CHUNK_VALUES // w.shape[1])
    parts: dict[str, torch.Tensor] = {}
    for start in range(0, w.shape[0], rows):
        for name, t in quantize_rows(w[start:start + rows].float()).items():
            if name not in parts:
                parts[name] = t.new_empty((w.shape[0], *t.shape[1:]))
            parts[name][start:start + rows] = t
    return parts


def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    def rows(chunk: torch.Tensor) -> dict[str, torch.Tensor]:
        scale = (chunk.abs().amax(dim=1) / 127).clamp(min=1e-10).half()
        q = torch.round(chunk / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return {"qweight": q, "scales": scale}

    return _by_rows(w, rows)


def nonzero(t: torch.Tensor) -> torch.Tensor:
    """t as float32 with its zeros made ones: a divisor (a zero scale's values are all its min)."""
    return t.float().where(t.float() != 0, 1.0)


def quantize_int4(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """int4 (or int5: spec.levels values) in groups of spec.group_size, symmetric, with mins or super-blocked."""
    top, group_size = spec.levels - 1, spec.group_size

    def rows(chunk: torch.Tensor) -> dict[str, torch.Tensor]:
        n, k = chunk.shape
        g = chunk.reshape(n, k // group_size, group_size)  # [n, K/G, G]
        if spec.symmetric:  # as Q4_0 (Q5_0): the value of largest magnitude maps to -8 (-16) exactly
            extreme = g.gather(-1, g.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
            scale = (extreme / -(spec.levels // 2)).half()
            q = torch.round(g / nonzero(scale)[..., None] + spec.levels // 2).clamp(0, top)
            return packed_values(q.reshape(n, k), spec) | {"scales": scale}
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        if spec.super_block:
            parts = super_blocked_codes(lo, hi, spec)
            scale, low = group_scales(parts, spec)
        else:
            scale, low = ((hi - lo) / top).half(), lo.half()
            parts = {"scales": scale, "mins": low}
        q = torch.round((g - low.float()[..., None]) / nonzero(scale)[..., None]).clamp(0, top)
        return packed_values(q.reshape(n, k), spec) | parts

    return _by_rows(w, rows)


def packed_values(q: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """int4's or int5's values [N, K] as their packed parts."""
    return pack_int5(q) if spec.scheme == "int5" else {"qweight": pack_int4(q)}


def super_blocked_codes(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Groups' lowest and highest values [n, K/G] -> their scales and mins as super-blocked parts, as GGUF's Q4_K
    (Q5_K) codes them but in 8 bits: each group's scale, and its min (at most 0: the group's range is widened to
    hold 0), an 8-bit code of the largest in its super-block."""
    lo = lo.clamp(max=0)
    n, per = lo.shape[0], spec.super_block // spec.group_size
    parts = {}
    for name, value in (("scales", (hi - lo) / (spec.levels - 1)), ("mins", -lo)):
        factor = (value.reshape(n, -1, per).amax(dim=-1) / 255).half()  # [n, K/S]
        parts[name] = torch.round(value / nonzero(factor).repeat_interleave(per, dim=1)).clamp(0, 255).to(torch.uint8)
        parts[f"super_{name}"] = factor if name == "scales" else -factor
    return parts


def quantize_int6(w: torch.Tensor, super_block: int) -> dict[str, torch.Tensor]:
    """As GGUF's Q6_K, with plain rounding: each group of 16's scale maps its value of largest magnitude to
    -32; the super-block's factor maps its scale of largest magnitude to code -128; the values are rounded with
    their group's coded scale."""
    def rows(chunk: torch.Tensor) -> dict[str, torch.Tensor]:
        n, k = chunk.shape
        g = chunk.reshape(n, k // INT6_GROUP, INT6_GROUP)
        scale = g.gather(-1, g.abs().argmax(dim=-1, keepdim=True)).squeeze(-1) / -32  # [n, K/16]
        per = super_block // INT6_GROUP
        s = scale.reshape(n, -1, per)
        factor = (s.gather(-1, s.abs().argmax(dim=-1, keepdim=True)).squeeze(-1) / -128).half()  # [n, K/S]
        codes = torch.round(s / nonzero(factor)[..., None]).clamp(-128, 127).reshape(n, -1)
        coded = codes * factor.float().repeat_interleave(per, dim=1)
        q = torch.round(g / nonzero(coded)[..., None] + 32).clamp(0, 63)
        return pack_int6(q.reshape(n, k)) | {"scales": codes.to(torch.int8), "super_scales": factor}

    return _by_rows(w, rows)


@torch.no_grad()  # w may be a parameter: no autograd graph to hang on the parts
def quantize(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    if spec.scheme == "int8":
        return quantize_int8(w)
    if spec.scheme == "int6":
        return quantize_int6(w, spec.super_block)
    return quantize_int4(w, spec)


def group_scales(parts: dict[str, torch.Tensor], spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """int4's (int5's) float32 scales and mins (None: symmetric) [N, K/G], super-blocked ones decoded (exactly: a
    float16 times an 8-bit code)."""
    scales, mins = parts["scales"].float(), parts.get("mins")
    if not spec.super_block:
        return scales, None if mins is None else mins.float()
    per = spec.super_block // spec.group_size
    return (scales * parts["super_scales"].float().repeat_interleave(per, dim=1),
            mins.float() * parts["super_mins"].float().repeat_interleave(per, dim=1))


def plain_parts(parts: dict, spec: QuantSpec) -> tuple[dict, QuantSpec]:
    """Parts (each a tensor or blocks of rows) in a layout every kernel takes, for kernels without a layout of
    their own for them: super-blocked int4 as plain int4 (scales and mins rounded to float16, ~2e-4 relative);
    int5 and int6 requantized to int8 per output channel (~0.9% relative error on Q6_K tensors); others as they
    are."""
    if spec.scheme in ("int5", "int6"):
        plain, convert = QuantSpec("int8"), _as_int8
    elif spec.super_block:
        plain, convert = QuantSpec("int4", spec.group_size, symmetric=False), _expanded
    else:
        return parts, spec
    if not isinstance(parts["qweight"], list):
        return convert(parts, spec), plain
    blocks = [convert({name: part[i] for name, part in parts.items()}, spec) for i in range(len(parts["qweight"]))]
    return {name: [block[name] for block in blocks] for name in blocks[0]}, plain


def _expanded(parts: dict[str, torch.Tensor], spec: QuantSpec) -> dict[str, torch.Tensor]:
    scales, mins = group_scales(parts, spec)
    return {"qweight": parts["qweight"], "scales": scales.half(), "mins": mins.half()}


def _as_int8(parts: dict[str, torch.Tensor], spec: QuantSpec) -> dict[str, torch.Tensor]:
    n, k = parts["qweight"].shape[0], parts["qweight"].shape[1] * 2
    step = max(1, ROW_CHUNK_VALUES // k)  # rows at a time: float32 temporaries stay small
    chunks = [quantize_int8(dequantize({name: t[i:i + step] for name, t in parts.items()}, spec))
              for i in range(0, n, step)]
    return {name: torch.cat([c[name] for c in chunks]) for name in ("qweight", "scales")}


def dequantize(parts: dict[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] that packed parts stand for (the reference every kernel is tested against)."""
    if spec.scheme == "int8":
        return (parts["qweight"].float() * parts["scales"].float()[:, None]).to(dtype)
    if spec.scheme == "int6":
        q = unpack_int6(parts).float() - 32
        n, k = q.shape
        scales = parts["scales"].float() * parts["super_scales"].float().repeat_interleave(
            spec.super_block // INT6_GROUP, dim=1)
        return (q.reshape(n, -1, INT6_GROUP) * scales[..., None]).reshape(n, k).to(dtype)
    scales, mins = group_scales(parts, spec)
    q = (unpack_int5(parts) if spec.scheme == "int5" else unpack_int4(parts["qweight"])).float()
    n, k = q.shape
    q = q.reshape(n, k // spec.group_size, spec.group_size)
    if spec.symmetric:
        w = (q - spec.levels // 2) * scales[..., None]
    else:
        w = q * scales[..., None] + mins[..., None]
    return w.reshape(n, k).to(dtype)


def packed_shapes(n: int, k: int, spec: QuantSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of the packed parts of an [N, K] weight, without computing them."""
    if spec.scheme != "int8" and (k % spec.group_size or k % max(spec.super_block, 1)):
        raise ModelFormatError(f"its {k} inputs are not whole groups of {spec.to_dict()}")  # a folder's manifest
    if spec.scheme == "int8":
        return {"qweight": ((n, k), torch.int8), "scales": ((n,), torch.float16)}
    if spec.scheme == "int6":
        return {"qweight": ((n, k // 2), torch.uint8), "qhigh": ((n, k // 4), torch.uint8),
                "scales": ((n, k // INT6_GROUP), torch.int8),
                "super_scales": ((n, k // spec.super_block), torch.float16)}
    groups, scale_type = k // spec.group_size, torch.uint8 if spec.super_block else torch.float16
    shapes = {"qweight": ((n, k // 2), torch.uint8), "scales": ((n, groups), scale_type)}
    if spec.scheme == "int5":
        shapes["qhigh"] = ((n, k // 8), torch.uint8)
    if not spec.symmetric:
        shapes["mins"] = ((n, groups), scale_type)
    if spec.super_block:
        shapes |= {name: ((n, k // spec.super_block), torch.float16) for name in ("super_scales", "super_mins")}
    return shapes
