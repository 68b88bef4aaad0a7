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
