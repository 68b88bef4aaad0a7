"""The CPU kernels against the dequantized float reference, on random and odd shapes, decode and prefill rows."""
from __future__ import annotations

import pytest
import torch

from lilmistral.quant import vnni
from lilmistral.quant.cpu import DequantKernel, Int4Kernel, Int8Kernel, make_kernel
from lilmistral.quant.pack import QuantSpec, dequantize, quantize

SPECS = [QuantSpec("int8"), QuantSpec("int4", 32, False), QuantSpec("int4", 64, True), QuantSpec("int4", 128, False)]
SHAPES = [(48, 256), (40, 128), (192, 576), (100, 384), (1024, 512)]  # 40 and 100: not multiples of 16


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.scheme}-g{s.group_size}-{'sym' if s.symmetric else 'min'}")
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("rows", [1, 5, 40])  # decode, small batch, prefill (int8 switches to W8A8 above 16)
def test_kernel_matches_dequantized_reference(spec, n, k, rows):
    if spec.scheme == "int4" and k % spec.group_size:
        spec = QuantSpec("int4", 64, spec.symmetric)  # the converter's own fallback for such K
    g = torch.Generator().manual_seed(n + k + rows)
    parts = quantize(torch.randn(n, k, generator=g) * 0.05, spec)
    kernel = make_kernel(parts, spec)
    expected_kind = {"int8": Int8Kernel, "int4": Int4Kernel if n % 16 == 0 else DequantKernel}[spec.scheme]
    assert isinstance(kernel, expected_kind)
    x = torch.randn(2, rows, k, generator=g)
    reference = x @ dequantize(parts, spec).t()
    exact = kernel(x)  # float32 activations: the exact dequantized path
    assert torch.allclose(exact, reference, atol=1e-4, rtol=1e-4)
    fast = kernel(x.bfloat16())  # bfloat16 activations: PyTorch's packed kernels
    assert fast.shape == (2, rows, n) and fast.dtype == torch.bfloat16
    error = ((fast.float() - reference).norm() / reference.norm()).item()
    assert error < (0.02 if spec.scheme == "int8" and rows > 16 else 0.01), error


@pytest.mark.skipif(not vnni.available(), reason="no AVX-512 VNNI or no C++ compiler")
@pytest.mark.parametrize("rows", [1, 3, 7])
@pytest.mark.parametrize("n,k", [(1, 64), (37, 576), (1000, 1024), (300, 4096)])
def test_vnni_int8_decode_kernel(n, k, rows):
    """vnni.cpp's int8 kernel (int8 activations in blocks of 32) against the dequantized reference, including
    weights of -128 and -127 and rows of zeros; decode-sized batches take it, larger ones do not."""
    g = torch.Generator().manual_seed(n * k + rows)
    parts = quantize(torch.randn(n, k, generator=g) * 0.05, QuantSpec("int8"))
    parts["qweight"][0, :7] = torch.tensor([-128, -127, 127, 0, -1, 1, -128], dtype=torch.int8)
    x = torch.randn(rows + 1, k, generator=g)
    x[-1] = 0
    reference = x @ dequantize(parts, QuantSpec("int8")).t()
    got = vnni.int8_gemv(x, parts["qweight"], parts["scales"].float())
    assert got.shape == (rows + 1, n) and torch.all(got[-1] == 0)
    assert ((got - reference).norm() / reference.norm()).item() < 0.01
    kernel = Int8Kernel(parts, QuantSpec("int8"))
    assert kernel.vnni
    xb = x.bfloat16()
    assert torch.equal(kernel(xb), vnni.int8_gemv(xb.float(), parts["qweight"], parts["scales"].float()).bfloat16())
    assert not Int8Kernel(quantize(torch.randn(8, 96), QuantSpec("int8")), QuantSpec("int8")).vnni  # K % 64 != 0
