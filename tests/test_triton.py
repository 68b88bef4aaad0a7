"""The Triton kernels against the dequantized float reference: on the GPU when there is one, else on CPU
tensors under TRITON_INTERPRET=1 (small shapes: the interpreter is slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import assert_blockwise_product, assert_within_bfloat16, blockwise_int8, relative_error

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
triton = pytest.importorskip("triton", reason="Triton is an optional extra: pip install lilmistral[gpu]")

from lilmistral.quant import cuda  # noqa: E402
from lilmistral.quant.pack import (QuantSpec, dequantize, quantize, unpack_int4, unpack_int5,  # noqa: E402
                                   unpack_int6)
from lilmistral.quant.triton_kernels import ExpertsKernel, TritonKernel, repack  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
SHAPES = [(40, 128), (100, 256), (64, 96), (33, 64)]  # odd N, K not a multiple of the block
SUPER = QuantSpec("int4", 32, False, super_block=64)  # the default int4's layout (super-blocks of 256 or 192), smaller
SPECS = [QuantSpec("int8"), QuantSpec("int4", 32, False), QuantSpec("int4", 32, True), QuantSpec("int4", 64, False),
         SUPER]
# int5 (GGUF's Q5_0, Q5_1, Q5_K) and int6 (Q6_K): int4's words plus a plane of high bits
HIGH = [QuantSpec("int5", 32, True), QuantSpec("int5", 64, False), QuantSpec("int5", 32, False, super_block=64),
        QuantSpec("int6", 16, True, super_block=64)]


def spec_id(v: object) -> str:
    if not isinstance(v, QuantSpec):
        return str(v)
    name = f"{v.scheme}-g{v.group_size}-{'sym' if v.symmetric else 'min'}"
    return name + (f"-s{v.super_block}" if v.super_block else "")


# int4 K is always a multiple of the group size and super-block (the format guarantees it)
CASES = [(n, k, spec) for n, k in SHAPES for spec in SPECS + HIGH
         if (spec.scheme == "int8" or k % max(spec.group_size, spec.super_block) == 0)
         and (spec in SPECS or n * k < 20000)]  # the interpreter is slow


@pytest.mark.parametrize("n,k,spec", CASES, ids=spec_id)
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


@pytest.mark.parametrize("n,k,spec", [(40, 128, spec) for spec in SPECS + HIGH[2:]] + [(33, 130, SPECS[0])],
                         ids=spec_id)
def test_int8_activations_give_the_blockwise_rounded_product(n, k, spec, monkeypatch):
    """bfloat16 x (a model's) rounds its blocks of 32 to int8, as the CPU kernels do, and multiplies them by
    integer dot products in the GEMV (decode), and prefill's matmul rounds them alike: in float32
    (the rounding forced on float32 x), the exact product of the rounded x up to float32 sums, for extreme
    codes (all 0, all 15 (int5: 31, int6: 63); int8's -128 and 127), a zero row and a row of one value; and by default
    bfloat16 x takes that path, float32 x the exact one."""
    from lilmistral.quant import triton_kernels

    g = torch.Generator().manual_seed(n * k)
    parts = quantize(torch.randn(n, k, generator=g), spec)
    extremes = [-128, 127] if spec.scheme == "int8" else [0x00, 0xFF]
    parts["qweight"][0, :8], parts["qweight"][-1, -8:] = extremes
    if "qhigh" in parts:  # int5's values 0 and 31, int6's 0 and 63
        parts["qhigh"][0, :2], parts["qhigh"][-1, -2:] = 0x00, 0xFF
    parts = {name: t.to(DEVICE) for name, t in parts.items()}
    x = torch.randn(12, k, generator=g)  # 3 rows: the GEMV; 12: prefill's matmul
    x[1], x[2] = 0, 0.75
    x = x.to(DEVICE)
    w = dequantize(parts, spec).cpu()
    kernel = TritonKernel(parts, spec, block_n=16, block_k=64)
    for rows in (3, 12):
        exact = kernel(x[:rows])
        assert ((exact.cpu() - x[:rows].cpu() @ w.t()).norm() / exact.norm()).item() < 1e-5
    monkeypatch.setattr(triton_kernels, "int8_activations", lambda x: True)
    pad = (0, -k % 32)  # int8: K need not be a multiple of 32
    for rows in (3, 12):
        got = kernel(x[:rows])
        assert got.dtype == torch.float32 and torch.all(got[1] == 0)
        assert_blockwise_product(got.cpu(), F.pad(x[:rows].cpu(), pad), F.pad(w, pad))
    rounded = kernel.gemv(x[:3].bfloat16().float())
    monkeypatch.undo()
    bf16 = kernel(x[:3].bfloat16())  # within a step of bfloat16 (the interpreter truncates, a GPU rounds)
    assert bf16.dtype == torch.bfloat16 and ((bf16.float() - rounded).abs() <= rounded.abs() / 128 + 1e-6).all()


@pytest.mark.parametrize("spec,n,k", [(SPECS[0], 48, 256), (SPECS[1], 48, 256), (SPECS[3], 48, 256),
                                      (SUPER, 40, 256), (SPECS[0], 40, 130)],  # 130: int8 words zero-padded
                         ids=["int8", "int4-g32", "int4-g64", "int4-super", "int8-k130"])
def test_split_k_and_prefill_path(spec, n, k):
    """Decode splits K over programs (atomic adds into a workspace the last one turns into the output); more than
    GEMV_MAX_ROWS rows take prefill's path, the weight dequantized to the activations' dtype (float32 under the
    interpreter, bfloat16 on a GPU) for PyTorch's matmul. Both add a residual, given one, the GEMV as it writes,
    split along K or not."""
    w = torch.randn(n, k)
    parts = {name: t.to(DEVICE) for name, t in quantize(w, spec).items()}
    kernel = TritonKernel(parts, spec, block_n=16, block_k=64)
    unsplit = TritonKernel(parts, spec, block_n=16, block_k=triton.next_power_of_2(k))
    assert kernel.gemv_constants["SPLIT"] > 1 and unsplit.gemv_constants["SPLIT"] == 1  # programs along K or not
    assert kernel.gemv_constants["EVEN"] == (n == 48)  # the tiles divide the matrix: no masks
    reference = dequantize(parts, spec)
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    for rows in (1, 40):  # the GEMV, then prefill's matmul
        x = torch.randn(rows, k).to(DEVICE, dtype)
        got = kernel(x)
        assert got.dtype == dtype
        expected = x.float() @ reference.t()
        assert ((got.float() - expected).norm() / expected.norm()).item() < (1e-2 if HAS_CUDA else 1e-5)
        residual = torch.randn(rows, n).to(DEVICE, dtype)
        for k_split in (kernel, unsplit):  # the residual added as the output is written
            same(k_split(x, residual), residual + k_split(x))
        sums, counts = kernel.workspace  # the last program of each tile (and row) left them zero for the next call
        assert not sums.any() and not counts.any()
    same(kernel(x[:3]), kernel(x[:3]))


@pytest.mark.parametrize("spec", [SUPER, SPECS[0]], ids=spec_id)
def test_prefill_dequantizes_the_weight_a_few_columns_at_a_time(spec, monkeypatch):
    """Prefill holds at most DEQUANTIZED_BYTES of a weight dequantized (here: tiles of 128 columns, the last
    narrower), each slice's product written to its columns, plus the residual's, or gated to its half."""
    from lilmistral.quant import triton_kernels

    monkeypatch.setattr(triton_kernels, "DEQUANTIZED_BYTES", 1)
    g = torch.Generator().manual_seed(7)
    parts = [{name: t.to(DEVICE) for name, t in quantize(torch.randn(150, 64, generator=g), spec).items()}
             for _ in range(2)]
    joined = {name: [p[name] for p in parts] for name in parts[0]}
    x, residual = torch.randn(12, 64, generator=g).to(DEVICE), torch.randn(12, 300, generator=g).to(DEVICE)
    gate, up = (x @ dequantize(p, spec).t() for p in parts)
    product = torch.cat([gate, up], dim=1)
    kernel = TritonKernel(joined, spec)
    torch.testing.assert_close(kernel(x), product, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kernel(x, residual), product + residual, atol=1e-4, rtol=1e-4)
    gated = TritonKernel(joined, spec, interleave=True).gated(x)
    torch.testing.assert_close(gated, F.silu(gate) * up, atol=1e-4, rtol=1e-4)


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal, but on a GPU within a step of bfloat16: atomic float adds from programs in any order round alike
    only mostly."""
    if HAS_CUDA:
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
    else:
        assert torch.equal(a, b)


def test_repack_layout_and_fused_projections():
    """The kernels' layout: the canonical bytes as little-endian int32 words, transposed; a fused projection's
    blocks of rows repacked into one kernel whose columns are each member's product."""
    spec = QuantSpec("int4", 32, False)
    ws = [torch.randn(n, 64) for n in (32, 16, 16)]
    parts = [quantize(w, spec) for w in ws]
    packed = repack(parts[0], spec)
    q = parts[0]["qweight"]
    assert packed["q"].shape == (8, 32) and packed["scales"].shape == (2, 32)
    word = int(packed["q"][1, 5]) & 0xFFFFFFFF  # inputs 8..15 of column 5
    assert [(word >> (4 * j)) & 0xF for j in range(8)] == [int(v) for v in unpack_int4(q)[5, 8:16]]
    # int5's and int6's high bits (b an input): a word per 32 / b inputs a column, input 8r + 2t + p at 8t + b(2r + p)
    for wide, unpack in ((QuantSpec("int5", 32, True), unpack_int5), (QuantSpec("int6", 16, True, 64), unpack_int6)):
        wide_parts, b = quantize(ws[0], wide), 1 if wide.scheme == "int5" else 2
        high = repack(wide_parts, wide)["high"]
        assert high.shape == (2 * b, 32) and high.dtype == torch.int32
        word = int(high[1, 5]) & 0xFFFFFFFF  # the second word's inputs of column 5
        span = 32 // b
        position = [8 * ((i % 8) // 2) + b * (2 * (i // 8) + i % 2) for i in range(span)]
        expected = [int(v) >> 4 for v in unpack(wide_parts)[5, span:2 * span]]
        assert [(word >> position[i]) & (2 ** b - 1) for i in range(span)] == expected
    blocks = {name: [p[name].to(DEVICE) for p in parts] for name in parts[0]}
    fused = cuda.make_kernel(blocks, spec)
    assert isinstance(fused, TritonKernel) and fused.n == 64
    x = torch.randn(1, 64).to(DEVICE)
    expected = torch.cat([x @ dequantize({k: v.to(DEVICE) for k, v in p.items()}, spec).t() for p in parts], dim=1)
    assert torch.allclose(fused(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", SPECS[:2] + [SUPER], ids=spec_id)
def test_gated_kernel_writes_silu_gate_times_up(spec):
    """w1 and w3 fused gated: their columns interleaved, the GEMV (split along K) and prefill's matmul write
    silu(w1 x) * w3 x as model.silu_mul computes it from the two products; each member alone is its columns."""
    from lilmistral import model
    from lilmistral.quant.linear import Columns

    g = torch.Generator().manual_seed(3)
    parts = [{name: t.to(DEVICE) for name, t in quantize(torch.randn(48, 256, generator=g), spec).items()}
             for _ in range(2)]
    kernel = TritonKernel({name: [p[name] for p in parts] for name in parts[0]}, spec, block_n=16, block_k=64,
                          interleave=True)  # as cuda.gated_kernel makes it, with several column tiles, split along K
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    for rows in (3, 40):  # GEMV, prefill
        x = torch.randn(rows, 256, generator=g).to(DEVICE, dtype)
        rounded = blockwise_int8(x.float()) if HAS_CUDA else x  # bfloat16 x: rounded to int8 as the kernels do
        gate, up = (rounded.float() @ dequantize(p, spec).t() for p in parts)
        expected = model.silu_mul(gate.to(dtype), up.to(dtype))
        got = kernel.gated(x)
        assert got.shape == (rows, 48)
        # the products' sums in another order: within bfloat16's step, or float32's relative to the products' size
        tolerance = dict(atol=2e-2, rtol=2e-2) if HAS_CUDA else dict(atol=1e-5 * expected.abs().max().item(), rtol=1e-4)
        torch.testing.assert_close(got, expected, **tolerance)
        torch.testing.assert_close(Columns(kernel, slice(1, None, 2))(x).float(), up, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("spec,k", [(spec, k) for spec in SPECS[:3] + [SUPER] for k in (128, 1024)]
                         + [(HIGH[2], 128), (HIGH[3], 128)], ids=spec_id)  # 1024: split along K into more programs
def test_experts_kernel_reads_each_rows_expert(spec, k):
    """The fused MoE GEMV: rows routed to different experts (one twice, one not at all) in one launch, each
    against its expert's dequantized weight; the experts' own kernels keep working on views of the stack."""
    g = torch.Generator().manual_seed(k)
    parts = [{name: t.to(DEVICE) for name, t in quantize(torch.randn(40, k, generator=g), spec).items()}
             for _ in range(4)]
    kernels = [cuda.make_kernel(p, spec) for p in parts]
    batched = cuda.expert_gemv(kernels)
    assert isinstance(batched, ExpertsKernel) and (batched.gemv_constants["SPLIT"] > 1) == (k > 64)
    stack = batched.parts["q"]
    assert all(kernel.parts["q"].data_ptr() == stack[i].data_ptr() for i, kernel in enumerate(kernels))
    x, expert = torch.randn(5, k, generator=g).to(DEVICE), torch.tensor([3, 0, 2, 3, 0], device=DEVICE)
    got = batched(x, expert)
    expected = torch.stack([x[r] @ dequantize(parts[e], spec).t() for r, e in enumerate(expert.tolist())])
    assert got.shape == (5, 40) and (got - expected).abs().max().item() < 1e-3 * max(1.0, expected.abs().max().item())
    assert torch.allclose(kernels[2](x[2:3]), expected[2:3], atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(HAS_CUDA, reason="tests/test_gpu.py runs the models on the GPU itself")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_a_model_on_triton_kernels_matches_the_dequantized_reference(moe, dtype, monkeypatch):
    """The GPU path's modules under the interpreter: every weight on a Triton kernel (as on a GPU: wq/wk/wv
    fused from their blocks of rows, w1/w3 fused gated, a MoE's experts on ExpertsKernels over views of their stacks)
    gives the float32 dequantized reference's logits, prompt and decoded tokens (forward and decode_step) and
    12 more tokens at once (prefill's path: the weights dequantized for PyTorch's matmul): in
    float32 with every GPU layer kernel (normalize, rotate, activate, attend, store_kv), to float32's rounding;
    in bfloat16 (wq/wk/wv fused, as on a GPU), within its rounding; wo's and w2's GEMVs add the residual as
    they write. The dense model in float32 is int5 (int4's layouts and its fifth bits: every
    path int4 takes, and more), the others int4."""
    from benchmarks.random_model import random_weights
    from lilmistral.cache import RollingKVCache
    from lilmistral.config import ModelArgs
    from lilmistral.generate import DecodeStep
    from lilmistral.loader import build_model
    from lilmistral.quant import QuantExperts, cpu, linear, triton_kernels
    from lilmistral.quant.triton_kernels import DecodeAttention

    # head_dim 32: heads x head_dim (128) is not dim (64), as in Mistral Nemo and Small 3
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=100, max_seq_len=256,
                     n_experts=4 if moe else 0, n_experts_per_tok=2 if moe else 0, head_dim=32)
    scheme = "int5" if dtype == torch.float32 and not moe else "int4"
    tensors, specs = random_weights(args, scheme)
    assert {spec.scheme for spec in specs.values()} == {scheme, "int8"}  # the projections', the head's
    reference = build_model(args, tensors, specs, "cpu", torch.float32)
    cpu_model = build_model(args, tensors, specs, "cpu", dtype)  # the CPU's own kernels: bfloat16's error
    monkeypatch.setattr(linear, "make_kernel", lambda parts, spec, dtype=None: cuda.make_kernel(parts, spec))
    monkeypatch.setattr(linear, "fusable", lambda *args: True)
    monkeypatch.setattr(linear, "gated_fusion", lambda device: True)
    gpu_kernels = cuda.layer_kernels(args.head_dim, dtype)
    if dtype == torch.bfloat16:  # the interpreter multiplies bfloat16 tiles wrongly, and truncates where a GPU rounds
        gpu_kernels = {}
        # so prefill's bfloat16 weights and activations are made in float32 and rounded to nearest by PyTorch, as
        # a GPU rounds them (truncated, every product leans one way: a MoE's 12-token logits 8% off, not 3%)
        dequantized, rounded = TritonKernel.dequantized, triton_kernels.round_to_int8_blocks
        monkeypatch.setattr(TritonKernel, "dequantized",
                            lambda self, first, cols, dt: dequantized(self, first, cols, torch.float32).to(dt))
        monkeypatch.setattr(triton_kernels, "round_to_int8_blocks", lambda x: rounded(x.float()).to(x.dtype))
    monkeypatch.setattr(cpu, "layer_kernels", lambda head_dim, dtype: gpu_kernels)
    model = build_model(args, tensors, specs, "cpu", dtype)
    fused = dtype == torch.bfloat16  # the loader fuses for a GPU or bfloat16 on the CPU
    attention, feed_forward = model.layers[0].attention, model.layers[0].feed_forward
    assert isinstance((attention.wqkv if fused else attention.wq).kernel, TritonKernel)
    if moe:
        assert all(isinstance(m.batched["w2"], ExpertsKernel) for m in model.modules() if isinstance(m, QuantExperts))
    else:
        assert isinstance((feed_forward.gated if fused else feed_forward.w1).kernel, TritonKernel)
    attended = []  # the decode attention kernel's calls
    kernel_call = DecodeAttention.__call__
    monkeypatch.setattr(DecodeAttention, "__call__", lambda self, *a: attended.append(1) or kernel_call(self, *a))
    gemvs, gemms = [], []  # the GEMVs' and prefill matmuls' options
    gemv, gemm = TritonKernel.gemv, TritonKernel.gemm
    monkeypatch.setattr(TritonKernel, "gemv", lambda self, x, *a, **kw: gemvs.append(kw) or gemv(self, x, *a, **kw))
    monkeypatch.setattr(TritonKernel, "gemm", lambda self, x, *a, **kw: gemms.append(kw) or gemm(self, x, *a, **kw))
    caches = [RollingKVCache(2, 2, args.head_dim, 64, None, t) for t in (dtype, dtype, torch.float32)]
    step, cpu_step = DecodeStep(model, trace=False), DecodeStep(cpu_model, trace=False)

    def check(got: torch.Tensor, cpu_got: torch.Tensor, expected: torch.Tensor) -> None:
        if dtype == torch.bfloat16:
            assert_within_bfloat16(got, cpu_got, expected)
        else:
            assert relative_error(got, expected) < 1e-4

    # a prompt (GEMV rows), decoded tokens one by one, then 12 more tokens (prefill's dequantized matmuls)
    for tokens in ([3, 14, 15, 92, 65], [35], [89], list(range(20, 32))):
        check(*(m(torch.tensor(tokens), cache) for m, cache in zip((model, cpu_model, reference), caches)))
    for token in (7, 41):
        check(step(token, caches[0]), cpu_step(token, caches[1]), reference(torch.tensor([token]), caches[2])[-1])
    # every call (the 12 tokens' 24 query rows a kv head go on to SDPA): the prompt's 2 x 5 rows are few enough
    # too (a causal mask a row)
    assert len(attended) == (6 * args.n_layers if dtype == torch.float32 else 0)
    # wo's GEMV adds the residual (3 forward calls, 2 decode steps), and w2's too (a MoE's experts: no); the 12
    # tokens' wo and w2 add it in prefill's path, where w1/w3 write silu(gate) * up
    assert sum(kw.get("residual") is not None for kw in gemvs) == args.n_layers * 5 * (1 if moe else 2)
    assert sum(kw.get("residual") is not None for kw in gemms) == args.n_layers * (1 if moe else 2)
    assert sum(bool(kw.get("gated")) for kw in gemms) == (args.n_layers if fused and not moe else 0)


def test_gemv_reads_the_weights_in_16_byte_loads():
    """The GEMV compiled offline for Hopper (Triton's own ptxas; no GPU needed), for int8 activations (a
    model's) and float ones: every scheme's weight words come in 16-byte vector loads, for int8 activations
    none one word at a time (the previous kernel's byte-wise loads read at 6-17% of an H100's bandwidth),
    with ~1.1-1.6 instructions a weight for int8 and int4 (~2-2.3 for int5 and int6, their high bits), some
    before it waits for the kernel before it (programmatic dependent launch). The decode attention compiles
    too, its dot products on tensor cores, and so does every other kernel, each waiting for the one before (a
    compile error would otherwise first show on a GPU), the weight's dequantization for prefill writing 16 bytes
    a store."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    out = subprocess.run([sys.executable, "-m", "benchmarks.triton_codegen"], env=env, cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    gemv = [r for r in rows if r["kernel"] == "gemv"]
    assert len(gemv) == 13 and all(r["vector_loads_16B"] > 0 for r in gemv), rows
    int8 = [r for r in gemv if r["activations"] == "int8"]  # dp4a (the float product: ~5, more than an H200 issues)
    assert all(r["scalar_word_loads"] == 0 and r["instructions_per_weight"] < 2.5 for r in int8), rows
    assert all(r["local_bytes"] == 0 for r in gemv), rows  # no register spilled to memory
    assert all(r["weight_loads_before_wait"] > 0 for r in gemv), rows  # read while the kernel before finishes
    attention, = (r for r in rows if r["kernel"] == "attention")  # on tensor cores, keys and values 16 bytes a copy
    assert attention["tensor_core_ops"] > 0 and attention["async_loads_16B"] > 0, attention
    others = {r["kernel"] for r in rows if "instructions" in r}  # and every other kernel compiles, and waits
    assert all(r["waits_for_previous"] for r in rows if "instructions" in r), rows
    dequantize = [r for r in rows if r["kernel"].startswith("dequantize ")]
    assert len(dequantize) == 4 and all(r["vector_stores_16B"] > 0 for r in dequantize), rows
    assert others == {"dequantize int4", "dequantize int5", "dequantize int6", "dequantize int8",
                      "gemv int8 experts residual", "gemv int8 gated",
                      "gemv int4 residual", "rms_norm", "rope", "round_blocks", "silu_mul", "store_kv"}, rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pointwise_kernels_round_as_pytorchs_operators(dtype):
    """RMSNorm, RoPE (on a transposed view, as Attention passes q), silu(gate) * up (on the two halves of a
    fused output) and the cache's write (heads strided) against model.py's PyTorch operators: float32 to
    rounding; bfloat16 within two of its steps (the interpreter truncates to bfloat16 where a GPU rounds;
    another order of sums, another exp)."""
    from lilmistral import model
    from lilmistral.quant import triton_kernels as tk

    tolerance = dict(atol=1e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 96, generator=g) * 3).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(96, generator=g)).to(DEVICE, dtype)
    torch.testing.assert_close(tk.rms_norm(x, weight, 1e-5), model.rms_norm(x, weight, 1e-5), **tolerance)
    q = torch.randn(5, 4, 64, generator=g).to(DEVICE, dtype).transpose(0, 1)  # [H=4, T=5, hd] with strides
    angles = torch.randn(5, 32, generator=g).repeat(1, 2)
    cos, sin = angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)
    torch.testing.assert_close(tk.rope(q, cos, sin), model.rope(q, cos, sin), **tolerance)
    gate, up = (torch.randn(2, 2 * 1100, generator=g) * 4).to(DEVICE, dtype).chunk(2, dim=-1)  # 1100: two blocks
    torch.testing.assert_close(tk.silu_mul(gate, up), model.silu_mul(gate, up), **tolerance)
    cache = torch.randn(2, 2, 10, 64, generator=g).to(DEVICE, dtype)  # keys and values [K=2, size=10, hd]
    caches = cache, cache.clone()
    heads = torch.randn(1, 8 * 64, generator=g).to(DEVICE, dtype).view(1, 8, 64).transpose(0, 1)  # q, k, v fused
    slot = torch.tensor([7], device=DEVICE)
    for write, (keys, values) in zip((tk.store_kv, model.store_kv), caches):
        write(keys, values, slot, heads[4:6], heads[6:])
    assert torch.equal(*caches) and torch.equal(caches[0][1, :, 7], heads[6:, 0])


@pytest.mark.parametrize("n_kv,rows,slots,mask_rows",
                         [(2, 4, 40, 1), (2, 4, 300, 1), (16, 12, 1100, 12), (2, 1, 130, 0)],
                         ids=["one-chunk", "split", "chunks-of-blocks-mask-per-row", "no-mask"])
def test_decode_attention_matches_sdpa(n_kv, rows, slots, mask_rows):
    """The decode attention kernel (a kv head's query rows over chunks of the cache's slots, combined by the
    head's last program) against model.sdpa, on keys and values that are views of a larger cache (strided
    slots): in one chunk, in chunks of one block and of several; with a mask of one row for every query, one
    per row, or none. A row with nothing to attend to gives zeros. The counters are left at zero."""
    from lilmistral import model
    from lilmistral.quant.triton_kernels import DecodeAttention, attention_chunks

    g = torch.Generator().manual_seed(slots)
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32  # the interpreter multiplies bfloat16 tiles wrongly
    hd = 64
    cache_k, cache_v = (torch.randn(n_kv, slots + 50, hd, generator=g).to(DEVICE, dtype) for _ in range(2))
    keys, values = cache_k[:, :slots], cache_v[:, :slots]
    q = (torch.randn(n_kv, rows, hd, generator=g) * 2).to(DEVICE, dtype)
    mask = None
    if mask_rows:
        mask = (torch.rand(mask_rows, slots, generator=g) < 0.7).to(DEVICE)
        mask[0, :] = False if mask_rows > 1 else mask[0, :]  # with a mask per row, row 0 attends to nothing
    attention = DecodeAttention(model.sdpa)
    for _ in range(2):
        got = attention(q, keys, values, mask)
        expected = model.sdpa(q.float(), keys.float(), values.float(), mask)
        if mask_rows > 1:
            assert not got[:, 0].any()
            got, expected = got[:, 1:], expected[:, 1:]
        torch.testing.assert_close(got.float(), expected, **(dict(atol=2e-2, rtol=2e-2) if HAS_CUDA else {}))
        parts, stats, counts = attention.workspaces[q.device][-1]
        assert not counts.any()
    splits, chunk = attention_chunks(slots, n_kv)
    assert (splits > 1) == (slots > 64) and (splits - 1) * chunk < slots <= splits * chunk
    assert (chunk > 64) == (n_kv == 16)  # several blocks a chunk: the online softmax within a program


@pytest.mark.parametrize("spec,bits", [(QuantSpec("int4", 32, False, super_block=256), 4.625),
                                       (QuantSpec("int5", 32, True), 5.5),
                                       (QuantSpec("int5", 32, False, super_block=256), 5.625),
                                       (QuantSpec("int6", 16, True, super_block=256), 6.5625)],
                         ids=["int4-s256", "int5-sym", "int5-s256", "int6-s256"])
def test_parts_run_as_they_are_stored(spec, bits):
    """Super-blocked int4 (the default int4; a GGUF's Q4_K) keeps its layout on the GPU: 8-bit codes a group and
    float16 factors a super-block (4.625 bits a weight, not the 5.0 of scales expanded per group), each group's
    scale and min computed exactly in the kernel; int5 (Q5_0's 5.5 bits, Q5_K's 5.625) its fifth bits, a word
    per 32 inputs a column; and int6 (Q6_K's 6.5625) its high 2 bits, a word per 16 inputs, and its groups of 16
    (two a block of activations) their signed codes. The kernel (and the gated one, over w1's and w3's blocks
    of rows) holds those bytes and computes the exact dequantized product, at decode (split along K) and
    prefill."""
    g = torch.Generator().manual_seed(0)
    w1, w3 = (quantize(torch.randn(40, 512, generator=g) * 0.05, spec) for _ in range(2))
    exact = [dequantize(w, spec).double() for w in (w1, w3)]
    kernel = cuda.make_kernel({name: t.to(DEVICE) for name, t in w1.items()}, spec)
    assert isinstance(kernel, TritonKernel) and kernel.spec == spec and kernel.gemv_constants["SPLIT"] > 1
    stored = sum(t.nbytes for t in w1.values())
    assert sum(t.nbytes for t in kernel.parts.values()) == stored == 40 * 512 * bits / 8
    gated = cuda.gated_kernel({name: [w1[name].to(DEVICE), w3[name].to(DEVICE)] for name in w1}, spec)
    for rows in (2, 12):  # GEMV, prefill
        x = torch.randn(rows, 512, generator=g).to(DEVICE)
        gate, up = (x.double().cpu() @ e.t() for e in exact)
        assert torch.allclose(kernel(x).double().cpu(), gate, rtol=1e-5, atol=1e-5)
        assert torch.allclose(gated.gated(x).double().cpu(), F.silu(gate) * up, rtol=1e-5, atol=1e-5)
