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
