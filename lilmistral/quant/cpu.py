"""CPU kernels. With AVX-512 VNNI or AVX2 (vnni.cpp): int4, int5, int6 and int8 at every row count by integer dot
products with int8 activations; attention (attention.cpp); RMSNorm, RoPE and silu(gate) * up (pointwise.cpp).
Without: PyTorch's own weight-only int4/int8 matmuls (int8 prefill by torch._int_mm; int5 and int6 requantized
to int8) and operators. The fast matmuls take bfloat16 activations; others (float32 for exact reference runs) and shapes
the kernels cannot take dequantize the packed weight on the fly instead.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..model import rms_norm, rope, silu_mul
from . import vnni
from .pack import QuantSpec, dequantize, plain_parts, unpack_int4


class DequantKernel:
    """Correct for every shape and dtype: dequantize per call (the weight stays packed in memory)."""

    def __init__(self, parts: dict[str, torch.Tensor], spec: QuantSpec) -> None:
        self.parts, self.spec = parts, spec

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.parts, self.spec, x.dtype))


def on_rows(matmul, x: torch.Tensor) -> torch.Tensor:
    """matmul ([M, K] -> [M, N]) over x [..., K] as one matrix of rows, shaped back as x."""
    if x.dim() == 2:
        return matmul(x)
    return matmul(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


Parts = dict[str, vnni.Rows]  # the canonical parts (pack.py): each a tensor, or a fused projection's blocks of rows


def stacked(parts: Parts) -> dict[str, torch.Tensor]:
    return {name: torch.cat(part) if not isinstance(part, torch.Tensor) else part for name, part in parts.items()}


class RowsKernel:
    """A matmul kernel on bfloat16 rows (`rows`: [M, K] -> [M, N]); other dtypes take its `fallback`, a
    dequantizing kernel."""

    repacked = False  # True: the kernel holds the weight in a layout of its own, and reads no canonical part

    def __init__(self, parts: Parts, spec: QuantSpec) -> None:
        self.spec = spec
        self.fallback = self.dequantized if self.repacked else DequantKernel(stacked(parts), spec)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fallback(x) if x.dtype != torch.bfloat16 else on_rows(self.rows, x)

    def dequantized(self, x: torch.Tensor) -> torch.Tensor:
        """A repacked kernel's fallback: the canonical parts unpacked from its own copy at each call (the loader
        lets go of the originals: float32 activations on a bfloat16 model are rare)."""
        return DequantKernel(vnni.unpack_vnni(self.parts, self.spec), self.spec)(x)


def aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """PyTorch's int8 kernel crashes (SIGSEGV, torch 2.13, M > 1) on a weight that is not 64-byte aligned,
    as a memory-mapped safetensors tensor may be: copy those."""
    return t if t.data_ptr() % alignment == 0 else t.clone()


class Int8Kernel(RowsKernel):
    """PyTorch's int8 kernels (CPUs without vnni.cpp's). Decode: the weight-only kernel. Prefill (more than
    W8A8_MIN_ROWS rows): the activations quantized per row to int8 too and multiplied with torch._int_mm,
    about 4x faster at 128 rows (4096x4096: 6.6 ms vs 28 ms here) for ~0.9% relative error. int5 and int6
    weights are requantized to int8 (plain_parts); float32 activations still get their exact product."""

    W8A8_MIN_ROWS = 17  # torch._int_mm wants more than 16 rows

    def __init__(self, parts: Parts, spec: QuantSpec) -> None:
        parts = stacked(parts)
        super().__init__(parts, spec)
        parts, spec = plain_parts(parts, spec)
        self.q = aligned(parts["qweight"].contiguous())  # int8 [N, K]
        self.scales = parts["scales"].to(torch.bfloat16)
        n, k = self.q.shape
        self.q_t = self.q.t() if n % 8 == 0 and k % 8 == 0 else None  # [K, N] view for torch._int_mm
        self.scales_f32 = parts["scales"].float()

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        # a traced step (generate.trace_step) is a one-row decode step: not reading the row count there keeps
        # the tracer from warning of a branch on it (and refusing the trace)
        if self.q_t is not None and not torch.jit.is_tracing() and x.shape[0] >= self.W8A8_MIN_ROWS:
            scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-8) / 127  # [M, 1]
            xq = torch.round(x.float() / scale).to(torch.int8)
            return (torch._int_mm(xq, self.q_t).float() * scale * self.scales_f32).to(x.dtype)
        return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scales)


class VnniInt8Kernel(RowsKernel):
    """vnni.cpp's int8 kernel, int8 activations in blocks of 32 (as llama.cpp's Q8_0 times Q8_0), at every
    row count: each row computed alike however many there are (as VnniInt4Kernel)."""

    repacked = True

    def __init__(self, parts: Parts, spec: QuantSpec) -> None:
        self.parts = vnni.pack_int8_vnni(parts["qweight"], parts["scales"])
        super().__init__(parts, spec)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        p = self.parts  # by position: keywords cost ~2 us a call
        return torch.ops.lilmistral.int8_gemv(x, p["q"], p["scales"], p["n"])


class VnniInt4Kernel(RowsKernel):
    """vnni.cpp's int4 kernel (int5 too), int8 activations in blocks of 32 (as llama.cpp's Q4_0 and Q4_1 times Q8_0):
    ~1.6x PyTorch's int4 kernel at decode on Mistral-7B's shapes, and at prefill faster than dequantizing
    tiles to bfloat16 for PyTorch's matmul. It computes each row alike however many there are, so a
    prompt's last token re-entered alone (a reused cache) gives the prefill's numbers."""

    repacked = True

    def __init__(self, parts: Parts, spec: QuantSpec) -> None:
        self.parts = vnni.pack_int4_vnni(parts)
        super().__init__(parts, spec)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        p = self.parts  # by position: keywords cost ~2 us a call, ~3% of a small model's token
        return torch.ops.lilmistral.int4_gemv(x, p["q"], p["scales"], p["mins"], p["n"], p["codes"], p["high"])


class VnniInt6Kernel(RowsKernel):
    """vnni.cpp's int6 kernel (GGUF's Q6_K), int8 activations in blocks of 32, as VnniInt4Kernel."""

    repacked = True

    def __init__(self, parts: Parts, spec: QuantSpec) -> None:
        self.parts = vnni.pack_int6_vnni(parts)
        super().__init__(parts, spec)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        p = self.parts
        return torch.ops.lilmistral.int6_gemv(x, p["q"], p["high"], p["scales"], p["codes"], p["n"])


class Int4Kernel(RowsKernel):
    """PyTorch's weight-only int4 kernel (CPUs without vnni.cpp's; super-blocked scales expanded per group)."""

    def __init__(self, parts: Parts, spec: QuantSpec) -> None:
        parts = stacked(parts)
        super().__init__(parts, spec)
        parts, spec = plain_parts(parts, spec)
        q = unpack_int4(parts["qweight"]).to(torch.int32)  # [N, K], 0..15
        self.w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # ISA-specific layout
        scales = parts["scales"].float()  # [N, K/G]
        # the kernel computes (q - 8) * scale + zero
        zeros = torch.zeros_like(scales) if spec.symmetric else parts["mins"].float() + 8 * scales
        self.scale_zero = torch.stack((scales.t(), zeros.t()), dim=-1).to(torch.bfloat16).contiguous()  # [K/G, N, 2]
        self.group_size = spec.group_size

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.w, self.group_size, self.scale_zero)


def kernel_type(n: int, k: int, spec: QuantSpec) -> type:
    """The kernel class for an [N, K] weight packed as spec."""
    if k % 64 == 0 and vnni.available():
        return VnniInt8Kernel if spec.scheme == "int8" else VnniInt6Kernel if spec.scheme == "int6" else VnniInt4Kernel
    if spec.scheme != "int4":  # int5 and int6 as int8 (plain_parts)
        return Int8Kernel
    return Int4Kernel if n % 16 == 0 else DequantKernel


def make_kernel(parts: Parts, spec: QuantSpec, dtype: torch.dtype = torch.bfloat16):
    """The kernel for a weight's parts and activations of `dtype` (the fast kernels take bfloat16; others
    only dequantize). A fused projection's parts come as blocks of rows, which VNNI kernels repack without
    concatenating them first."""
    q = parts["qweight"]
    n, k = vnni.row_count(q), vnni.row_blocks(q)[0].shape[1] * (1 if spec.scheme == "int8" else 2)
    kernel = kernel_type(n, k, spec) if dtype == torch.bfloat16 else DequantKernel
    return DequantKernel(stacked(parts), spec) if kernel is DequantKernel else kernel(parts, spec)


def expert_gemv(kernels: list):
    """(x [R, K], expert [R]) -> [R, N], row r times expert[r]'s weight, in one VNNI call over the experts'
    own kernels' parts; None where they are not all VNNI kernels of one layout."""
    if len({k.spec for k in kernels}) > 1:
        return None
    if all(isinstance(k, VnniInt4Kernel) for k in kernels):
        # mins (none: symmetric), codes (none: not super-blocked) and high (none: int4) as [] where absent
        q, scales, mins, codes, high = ([k.parts[name] for k in kernels if k.parts[name] is not None]
                                        for name in ("q", "scales", "mins", "codes", "high"))
        n = kernels[0].parts["n"]
        return lambda x, expert: torch.ops.lilmistral.int4_gemv_experts(x, q, scales, mins, n, expert, codes, high)
    if all(isinstance(k, VnniInt6Kernel) for k in kernels):
        q, high, scales, codes = ([k.parts[name] for k in kernels] for name in ("q", "high", "scales", "codes"))
        n = kernels[0].parts["n"]
        return lambda x, expert: torch.ops.lilmistral.int6_gemv_experts(x, q, high, scales, codes, n, expert)
    if all(isinstance(k, VnniInt8Kernel) for k in kernels):
        q, scales = [k.parts["q"] for k in kernels], [k.parts["scales"] for k in kernels]
        n = kernels[0].parts["n"]
        return lambda x, expert: torch.ops.lilmistral.int8_gemv_experts(x, q, scales, n, expert)
    return None


def eager_only(kernel, composite):
    """kernel, but PyTorch's operators (composite) when torch.compile traces it: inductor fuses those with
    their neighbours, where the kernel's call would cost ~10% of a small model's compiled token."""
    def run(*args):
        return composite(*args) if torch.compiler.is_compiling() else kernel(*args)
    return run


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """pointwise.cpp's add_rms_norm in PyTorch's operators."""
    h = residual + x
    return h, rms_norm(h, weight, eps)


def project_store(wqkv, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, write) -> torch.Tensor | None:
    """Attention.project_store: a decode step's fused wq, wk, wv product, then q and k rotated and k and v stored
    into the cache's slot (write: model.SlotWrite) in one call (pointwise.cpp's rope_store, where PyTorch's
    operators take ~10: splits, RoPE, two index_copy_); returns q. None when torch.compile traces (inductor
    fuses PyTorch's operators)."""
    if torch.compiler.is_compiling():
        return None
    return torch.ops.lilmistral.rope_store(wqkv(x), cos, sin, write.keys, write.values, write.slot)


@functools.cache
def layer_kernels(head_dim: int, dtype: torch.dtype) -> dict:
    """Kernels for model.py's slots, by slot name, where they apply: attention.cpp's for `attend` (2-3x faster
    than PyTorch's flash attention at decode), pointwise.cpp's for `normalize`, `rotate` and `activate` (a
    few microseconds where PyTorch's operators cost 10-40 each at decode: SmolLM2's eager token ~25% faster;
    compiled, PyTorch's), and for `add_normalize` and `project_store`, which take a decode layer's calls besides
    its matmuls and attention from ~10 to ~5 (SmolLM2's eager token ~1.18x faster, traced ~1.03x). Each
    computes a row alike however many there are."""
    if dtype not in (torch.float32, torch.bfloat16) or not vnni.available():
        return {}
    ops = torch.ops.lilmistral
    kernels = {"normalize": eager_only(ops.rms_norm, rms_norm), "rotate": eager_only(ops.rope, rope),
               "add_normalize": eager_only(ops.add_rms_norm, add_rms_norm), "project_store": project_store,
               "activate": eager_only(ops.silu_mul, silu_mul)}
    if head_dim in (16, 32, 64, 128):
        scale = head_dim ** -0.5  # a constant, not q.shape[-1] ** -0.5: a traced step would warn
        kernels["attend"] = lambda q, keys, values, mask: ops.attention(q, keys, values, mask, scale)
    return kernels
