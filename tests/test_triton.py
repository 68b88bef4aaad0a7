"""The Triton kernels against the dequantized float reference: on the GPU when there is one, else on CPU
tensors under TRITON_INTERPRET=1 (small shapes: the interpreter is slow)."""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
triton = pytest.importorskip("triton", reason="Triton is an optional extra: pip install lilmistral[gpu]")

from lilmistral.quant import QuantLinear, cuda  # noqa: E402
from lilmistral.quant.pack import QuantSpec, dequantize, quantize  # noqa: E402
from lilmistral.quant.triton_kernels import ExpertsKernel, TritonKernel  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
SHAPES = [(40, 128), (100, 256), (64, 96), (33, 64)]  # odd N, K not a multiple of the block
SPECS = [QuantSpec("int8"), QuantSpec("int4", 32, False), QuantSpec("int4", 32, True), QuantSpec("int4", 64, False)]


# int4 K is always a multiple of the group size (the format guarantees it)
CASES = [(n, k, spec) for n, k in SHAPES for spec in SPECS if spec.scheme == "int8" or k % spec.group_size == 0]


@pytest.mark.parametrize("n,k,spec", CASES, ids=lambda v: str(v) if not isinstance(v, QuantSpec) else
                         f"{v.scheme}-g{v.group_size}-{'sym' if v.symmetric else 'min'}")
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_matches_dequantized_reference(n, k, spec, rows):
    g = torch.Generator().manual_seed(n * k + rows)
    w = torch.randn(n, k, generator=g)
    parts = {name: t.to(DEVICE) for name, t in quantize(w, spec).items()}
    x = torch.randn(rows, k, generator=g).to(DEVICE)
    kernel = TritonKernel(parts, spec, block_n=16, block_k=64)
    expected = x.double() @ dequantize(parts, spec).double().t()
    got = kernel.gemv(x)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert (got.double() - expected).abs().max().item() < 1e-3 * max(1.0, expected.abs().max().item())


def test_split_k_and_prefill_path():
    spec = QuantSpec("int4", 32, False)
    w = torch.randn(48, 512)
    parts = {name: t.to(DEVICE) for name, t in quantize(w, spec).items()}
    kernel = TritonKernel(parts, spec, block_n=16, block_k=64)
    assert kernel.split_k > 1  # several programs along K, summed with atomic adds
    reference = dequantize(parts, spec)
    for rows in (1, 12):  # GEMV, then the dequantize + matmul path
        x = torch.randn(rows, 512).to(DEVICE)
        assert torch.allclose(kernel(x), x @ reference.t(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("spec", SPECS[:3], ids=lambda v: f"{v.scheme}-{'sym' if v.symmetric else 'min'}")
@pytest.mark.parametrize("k", [128, 1024])  # 1024: split along K
def test_experts_kernel_reads_each_rows_expert(spec, k):
    """The fused MoE GEMV: rows routed to different experts (one twice, one not at all) in one launch, each
    against its expert's dequantized weight; the experts' QuantLinears keep working on views of the stack."""
    g = torch.Generator().manual_seed(k)
    linears = []
    for _ in range(4):
        linear = QuantLinear(k, 40, spec)
        for name, part in quantize(torch.randn(40, k, generator=g), spec).items():
            setattr(linear, name, part.to(DEVICE))
        linear.prepare()
        linears.append(linear)
    batched = cuda.expert_gemv(linears)
    assert isinstance(batched, ExpertsKernel) and (k == 128 or batched.split_k > 1)
    stack = batched.parts["qweight"]
    assert all(linear.qweight.data_ptr() == stack[i].data_ptr() for i, linear in enumerate(linears))
    x, expert = torch.randn(5, k, generator=g).to(DEVICE), torch.tensor([3, 0, 2, 3, 0], device=DEVICE)
    got = batched(x, expert)
    expected = torch.stack([x[r] @ dequantize(linears[e].parts(), spec).t() for r, e in enumerate(expert.tolist())])
    assert got.shape == (5, 40) and (got - expected).abs().max().item() < 1e-3 * max(1.0, expected.abs().max().item())
    assert torch.allclose(linears[2](x[2:3]), expected[2:3], atol=1e-3, rtol=1e-3)
