"""Python references for kernels that round their activations to int8 (the CPU kernels; the GPU's GEMV)."""
from __future__ import annotations

import torch


def blockwise_int8(x: torch.Tensor) -> torch.Tensor:
    """x with each block of 32 along its last dimension rounded to int8 steps of its largest magnitude / 127
    (to nearest, ties to even), as the kernels round their activations."""
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    step = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inverse = torch.where(step > 0, 1 / step, torch.zeros(()))
    return (torch.round(blocks * inverse) * step).reshape(x.shape)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.float().cpu(), expected.float().cpu()
    return ((got - expected).norm() / expected.norm()).item()


def assert_within_bfloat16(got: torch.Tensor, cpu_got: torch.Tensor, expected: torch.Tensor) -> None:
    """got (a bfloat16 model's logits) within bfloat16's error of the float32 reference's: the CPU's own bfloat16
    path (cpu_got) is ~3% off (a random tiny model's; an MoE's more, where a token's experts change); a wrong
    kernel is tens of percent off."""
    error, cpu_error = relative_error(got, expected), relative_error(cpu_got, expected)
    assert error < max(0.04, 2 * cpu_error), f"{error:.4f} off, the CPU in bfloat16 {cpu_error:.4f}"


def assert_blockwise_product(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """got is x's blocks rounded to int8 times w (what the kernels compute) up to float32 sums: each entry
    within 1e-6 of the sum of its products' magnitudes (a cancelling dot product's relative error means
    nothing)."""
    xq = blockwise_int8(x).double()
    exact, magnitude = xq @ w.double().t(), xq.abs() @ w.double().abs().t()
    assert ((got.double() - exact).abs() <= 1e-6 * magnitude + 1e-12).all()


def quantize_q4_k(w: torch.Tensor) -> torch.Tensor:
    """float [..., K] (K a multiple of 256) -> GGUF Q4_K super-blocks uint8 [..., K/256 * 144], as llama.cpp lays them
    out (float16 d and dmin, 12 bytes of 6-bit scale and min codes, 4 chunks of 32 bytes: chunk c's low nibbles
    sub-block 2c, its high ones 2c + 1), with plain rounding where llama.cpp searches for the best codes: for
    tests that need valid Q4_K bytes (the gguf package cannot write them)."""
    *lead, k = w.shape
    sub = w.float().reshape(-1, k // 256, 8, 32)
    n = sub.shape[0]
    low = sub.amin(dim=-1).clamp(max=0)  # Q4_K's mins are subtracted: at most 0
    scale = (sub.amax(dim=-1) - low) / 15
    d, dmin = (scale.amax(dim=-1) / 63).half(), (-low.amin(dim=-1) / 63).half()  # [N, B]
    safe = lambda t: t.float().where(t.float() != 0, torch.ones(()))[..., None]  # noqa: E731
    scale_codes = torch.round(scale / safe(d)).clamp(0, 63).to(torch.uint8)  # [N, B, 8]
    min_codes = torch.round(-low / safe(dmin)).clamp(0, 63).to(torch.uint8)
    step = d.float()[..., None] * scale_codes.float()
    offset = (dmin.float()[..., None] * min_codes.float())[..., None]
    q = torch.round((sub + offset) / safe(step)).clamp(0, 15).to(torch.uint8)  # [N, B, 8, 32]
    high_bits = lambda codes: (codes[..., 4:] >> 4) << 6  # noqa: E731  bits 4-5 of codes 4..7
    header = torch.cat((d[..., None].view(torch.uint8), dmin[..., None].view(torch.uint8),
                        scale_codes[..., :4] | high_bits(scale_codes), min_codes[..., :4] | high_bits(min_codes),
                        (scale_codes[..., 4:] & 0x0F) | ((min_codes[..., 4:] & 0x0F) << 4)), dim=-1)  # [N, B, 16]
    quants = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).reshape(n, k // 256, 128)
    return torch.cat((header, quants), dim=-1).reshape(*lead, -1)


def quantize_q6_k(w: torch.Tensor) -> torch.Tensor:
    """float [..., K] (K a multiple of 256) -> GGUF Q6_K super-blocks uint8 [..., K/256 * 210], as llama.cpp lays them
    out (per half of 128 values: 64 bytes whose low nibbles hold values 0-31 then 32-63 and high nibbles 64-95 then
    96-127; 32 bytes of their high 2 bits, value l + 32i in bits 2i of byte l; then 16 int8 scales, one per 16
    values, and a float16 d), with plain rounding: each 16 values' scale maps its largest magnitude to -32, d maps
    the largest scale to -128 (llama.cpp searches for better ones). The gguf package cannot write Q6_K."""
    *lead, k = w.shape
    sub = w.float().reshape(-1, k // 256, 16, 16)
    n = sub.shape[0]
    safe = lambda t: t.where(t != 0, torch.ones(()))  # noqa: E731
    scale = sub.gather(-1, sub.abs().argmax(dim=-1, keepdim=True))[..., 0] / -32  # [N, B, 16]
    d = (scale.gather(-1, scale.abs().argmax(dim=-1, keepdim=True))[..., 0] / -128).half()  # [N, B]
    codes = torch.round(scale / safe(d.float())[..., None]).clamp(-128, 127)
    step = safe(d.float()[..., None] * codes)[..., None]
    q = (torch.round(sub / step) + 32).clamp(0, 63).to(torch.uint8).reshape(n, k // 256, 2, 4, 32)  # half, i, l
    low = (q[..., 0:2, :] & 0x0F) | ((q[..., 2:4, :] & 0x0F) << 4)  # [N, B, 2, 2, 32]: bytes l and l + 32
    high = q[..., 0, :] >> 4 | (q[..., 1, :] >> 4) << 2 | (q[..., 2, :] >> 4) << 4 | (q[..., 3, :] >> 4) << 6
    blocks = torch.cat((low.reshape(n, -1, 2, 64), high.reshape(n, -1, 2, 32)), dim=-1)  # [N, B, 2, 96]: a half's
    ql, qh = blocks[..., :64].reshape(n, -1, 128), blocks[..., 64:].reshape(n, -1, 64)
    tail = torch.cat((codes.to(torch.int8).view(torch.uint8), d[..., None].view(torch.uint8)), dim=-1)  # [N, B, 18]
    return torch.cat((ql, qh, tail), dim=-1).reshape(*lead, -1)
