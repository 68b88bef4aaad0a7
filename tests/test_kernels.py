"""The CPU kernels against the dequantized float reference, on random and odd shapes, decode and prefill rows."""
from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import warnings
import weakref
import zipfile
from pathlib import Path

import pytest
import torch

from lilmistral.bench import huge_page_bytes, huge_page_fraction
from lilmistral.convert.gguf import q4_canonical, q6k_canonical
from lilmistral.model import rms_norm, rope, silu_mul
from lilmistral.quant import QuantLinear, vnni
from lilmistral.quant.cpu import (DequantKernel, Int4Kernel, Int8Kernel, VnniInt4Kernel, VnniInt6Kernel, VnniInt8Kernel,
                                  make_kernel)
from lilmistral.quant.linear import FusedQuantLinear
from lilmistral.quant.pack import QuantSpec, dequantize, pack_int4, pack_int5, pack_int6, quantize

from conftest import make_hf_model
from reference import assert_blockwise_product

SPECS = [QuantSpec("int8"), QuantSpec("int4", 32, False), QuantSpec("int4", 64, True), QuantSpec("int4", 128, False)]
SUPER = QuantSpec("int4", 32, False, super_block=256)  # the default int4 (a GGUF's Q4_K too): super-blocked
INT6 = QuantSpec("int6", 16, True, super_block=256)  # a GGUF's Q6_K
INT5 = [QuantSpec("int5", 32, True), QuantSpec("int5", 32, False, super_block=256)]  # a GGUF's Q5_0, Q5_K
SHAPES = [(48, 256), (40, 128), (192, 576), (100, 384), (1024, 512)]  # 40 and 100: not multiples of 16


def spec_id(s: QuantSpec) -> str:
    return f"{s.scheme}-g{s.group_size}-{'sym' if s.symmetric else 'min'}" + (f"-s{s.super_block}" if s.super_block else "")


def cases(specs: list[QuantSpec], shapes: list[tuple[int, int]]) -> list:
    """(spec, n, k) for each spec and shape, super-blocked ones (int6 too) only where 256 divides K."""
    return [pytest.param(spec, n, k, id=f"{spec_id(spec)}-{n}x{k}") for spec in specs for n, k in shapes
            if k % (spec.super_block or 1) == 0]


def check_against_reference(kernel, parts: dict, spec: QuantSpec, rows: int, g: torch.Generator,
                            tolerance: float = 0.01) -> None:
    n, k = parts["qweight"].shape[0], parts["qweight"].shape[1] * (1 if spec.scheme == "int8" else 2)
    x = torch.randn(2, rows, k, generator=g)
    reference = x @ dequantize(parts, spec).t()
    exact = kernel(x)  # float32 activations: the exact dequantized path
    assert torch.allclose(exact, reference, atol=1e-4, rtol=1e-4)
    fast = kernel(x.bfloat16())  # bfloat16 activations: the fast kernels
    assert fast.shape == (2, rows, n) and fast.dtype == torch.bfloat16
    error = ((fast.float() - reference).norm() / reference.norm()).item()
    assert error < (0.02 if spec.scheme == "int8" and rows > 16 else tolerance), error


def random_parts(n: int, k: int, spec: QuantSpec, seed: int) -> tuple[dict, QuantSpec, torch.Generator]:
    if spec.group_size and k % spec.group_size:
        spec = QuantSpec(spec.scheme, 64, spec.symmetric)  # the converter's own fallback for such K
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(n, k, generator=g) * 0.05, spec), spec, g


@pytest.mark.parametrize("spec,n,k", cases(SPECS + [SUPER, INT6, *INT5], SHAPES))
@pytest.mark.parametrize("rows", [1, 5, 40])  # decode, small batch, prefill (PyTorch's int8: W8A8 above 16)
def test_kernel_matches_dequantized_reference(spec, n, k, rows):
    parts, spec, g = random_parts(n, k, spec, n + k + rows)
    kernel = make_kernel(parts, spec)
    int4_kind = VnniInt4Kernel if vnni.available() else Int4Kernel if n % 16 == 0 else DequantKernel
    int8_kind = VnniInt8Kernel if vnni.available() else Int8Kernel
    int6_kind = VnniInt6Kernel if vnni.available() else Int8Kernel
    int5_kind = VnniInt4Kernel if vnni.available() else Int8Kernel
    assert isinstance(kernel, {"int8": int8_kind, "int4": int4_kind, "int6": int6_kind, "int5": int5_kind}[spec.scheme])
    # int5 and int6 to int8 for PyTorch's kernel: ~0.9% more error
    requantized = spec.scheme in ("int5", "int6") and not vnni.available()
    check_against_reference(kernel, parts, spec, rows, g, tolerance=0.02 if requantized else 0.01)


@pytest.mark.parametrize("spec,n,k", cases(SPECS[1:] + [SUPER], [shape for shape in SHAPES if shape[0] % 16 == 0]))
@pytest.mark.parametrize("rows", [1, 40])
def test_pytorch_int4_kernel(spec, n, k, rows):
    """PyTorch's weight-only int4 kernel, which CPUs without lilmistral's kernels use (super-blocks expanded)."""
    parts, spec, g = random_parts(n, k, spec, n + k + rows)
    check_against_reference(Int4Kernel(parts, spec), parts, spec, rows, g)


@pytest.mark.parametrize("spec,n,k", cases([QuantSpec("int8"), INT6, INT5[1]],
                                            [shape for shape in SHAPES if shape[0] % 8 == 0]))
@pytest.mark.parametrize("rows", [1, 40])
def test_pytorch_int8_kernel(spec, n, k, rows):
    """PyTorch's weight-only int8 kernel (decode) and torch._int_mm (prefill), which CPUs without AVX-512
    VNNI use; int5 and int6 weights requantized to int8 for it (~0.9% more error), float32 activations still
    exact."""
    parts, spec, g = random_parts(n, k, spec, n + k + rows)
    check_against_reference(Int8Kernel(parts, spec), parts, spec, rows, g, tolerance=0.02)


def test_a_gpu_without_triton_dequantizes_and_says_how_to_get_its_kernels(monkeypatch):
    """Without Triton the GPU's backend dequantizes each weight at every call (correct, slow), and says once
    how to install the kernels."""
    from lilmistral.quant import cuda

    monkeypatch.setattr(cuda, "has_triton", lambda: False)
    cuda._say_triton_is_missing.cache_clear()
    parts, spec, g = random_parts(48, 64, QuantSpec("int4", 32, False), 0)
    with pytest.warns(UserWarning, match=r"Triton is not installed.*pip install 'lilmistral\[gpu\]'"):
        kernel = cuda.make_kernel(parts, spec)
    assert isinstance(kernel, DequantKernel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once a process
        cuda.make_kernel(parts, spec)
    check_against_reference(kernel, parts, spec, 3, g)


@pytest.mark.skipif(not vnni.available(), reason="no lilmistral CPU kernels (no AVX2, or no C++ compiler)")
@pytest.mark.parametrize("rows", [1, 3, 7])
@pytest.mark.parametrize("n,k", [(1, 64), (37, 576), (1000, 1024), (300, 4096)])  # N % 16: a padded last group
def test_vnni_int8_kernel(n, k, rows):
    """vnni.cpp's int8 kernel (int8 activations in blocks of 32) against the dequantized reference, with
    weights of -128, -127 and 127 and a row of zero activations; each row's result the same bits alone as
    among many."""
    g = torch.Generator().manual_seed(n * k + rows)
    parts = quantize(torch.randn(n, k, generator=g) * 0.05, QuantSpec("int8"))
    parts["qweight"][0, :7] = torch.tensor([-128, -127, 127, 0, -1, 1, -128], dtype=torch.int8)
    packed = vnni.pack_int8_vnni(parts["qweight"], parts["scales"])
    gemv = lambda x: torch.ops.lilmistral.int8_gemv(x, packed["q"], packed["scales"], packed["n"])  # noqa: E731
    x = torch.randn(rows + 1, k, generator=g)
    x[-1] = 0
    reference = x @ dequantize(parts, QuantSpec("int8")).t()
    got = gemv(x)
    assert got.shape == (rows + 1, n) and got.dtype == torch.float32 and torch.all(got[-1] == 0)
    assert ((got - reference).norm() / reference.norm()).item() < 0.01
    assert_blockwise_product(got, x, dequantize(parts, QuantSpec("int8")))
    many = torch.cat([x, torch.randn(20, k, generator=g)])  # 21+ rows: blocks of 8 and a remainder
    assert torch.equal(gemv(many)[:rows + 1], got)
    assert torch.equal(gemv(x[1:2])[0], got[1])
    xb = x.bfloat16()  # bfloat16 in and out: as float32 in, rounded out
    assert torch.equal(gemv(xb), gemv(xb.float()).bfloat16())
    assert torch.equal(VnniInt8Kernel(parts, QuantSpec("int8"))(xb), gemv(xb))
    odd = quantize(torch.randn(8, 96), QuantSpec("int8"))  # K % 64 != 0: PyTorch's kernels
    assert isinstance(make_kernel(odd, QuantSpec("int8")), Int8Kernel)


def test_the_wheel_ships_every_kernel_source(tmp_path):
    """`pip install .` (not editable) ships every C++ file vnni.py compiles: a missing one silently meant
    PyTorch's slower kernels."""
    root, source = Path(__file__).parents[1], tmp_path / "source"  # a copy: no stale build/ folder
    shutil.copytree(root / "lilmistral", source / "lilmistral", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True, cwd=tmp_path)
    [wheel] = tmp_path.glob("lilmistral-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"lilmistral/quant/{name}" for name in vnni.SOURCES} <= names


@pytest.mark.skipif(not vnni.available(), reason="no lilmistral CPU kernels (no AVX2, or no C++ compiler)")
def test_vnni_packing_follows_the_documented_layouts():
    """pack_int4_vnni and pack_int8_vnni (one pass in C++ each) put every weight, scale and min (super-blocked:
    code and factor; int5: fifth bit) where their docstrings say, the padded columns of the last group zero."""
    g = torch.Generator().manual_seed(0)
    n, k, group_size, groups = 37, 256, 64, 3

    def padded(t: torch.Tensor) -> torch.Tensor:  # [N, ...] -> [groups * 16, ...]
        return torch.cat([t, t.new_zeros(groups * 16 - n, *t.shape[1:])])

    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scales, mins = (torch.rand(n, k // group_size, generator=g).half() for _ in range(2))
    packed = vnni.pack_int4_vnni({"qweight": pack_int4(q), "scales": scales, "mins": mins})
    chunks = padded(q).reshape(groups, 16, k // 8, 2, 4)  # group, column c, chunk j, inputs 8j..8j+3 / 8j+4..8j+7
    expected = (chunks[:, :, :, 0] | chunks[:, :, :, 1] << 4).permute(0, 2, 1, 3)  # byte 4c + i: 8j + i, 8j + 4 + i
    assert torch.equal(packed["q"], expected.reshape(groups, k * 8)) and packed["n"] == n
    for name, t in (("scales", scales), ("mins", mins)):
        per_block = padded(t.repeat_interleave(group_size // 32, dim=1))  # [groups * 16, K/32]
        assert torch.equal(packed[name], per_block.reshape(groups, 16, k // 32).transpose(1, 2))
    codes = {name: torch.randint(0, 64, (n, k // 32), dtype=torch.uint8, generator=g) for name in ("scales", "mins")}
    factors = {name: torch.rand(n, k // 256, generator=g).half() for name in ("super_scales", "super_mins")}
    packed = vnni.pack_int4_vnni({"qweight": pack_int4(q), **codes, **factors})  # super-blocked: codes in pairs
    pairs = torch.stack((padded(codes["scales"]), padded(codes["mins"])), dim=-1)  # [groups * 16, K/32, 2]
    assert torch.equal(packed["codes"], pairs.reshape(groups, 16, k // 32, 2).transpose(1, 2))
    for name, factor in (("scales", factors["super_scales"]), ("mins", factors["super_mins"])):
        assert torch.equal(packed[name], padded(factor).reshape(groups, 16, k // 256).transpose(1, 2))
    q5 = torch.randint(0, 32, (n, k), dtype=torch.uint8, generator=g)  # int5: q as int4's, the fifth bits apart
    packed = vnni.pack_int4_vnni(pack_int5(q5) | {"scales": scales, "mins": mins})
    assert torch.equal(packed["q"], vnni.pack_int4_vnni({"qweight": pack_int4(q5 & 0x0F), "scales": scales})["q"])
    fifths = padded(q5 >> 4).reshape(groups, 16, k // 32, 8, 4)  # group, column c, block, s, byte b: input 4s + b
    shifts = torch.arange(8, dtype=torch.uint8).view(8, 1)
    expected = (fifths << shifts).sum(dim=3, dtype=torch.uint8)  # byte b: inputs 4s + b in bit s
    assert torch.equal(packed["high"], expected.permute(0, 2, 1, 3).reshape(groups, k * 2))
    q8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    packed = vnni.pack_int8_vnni(q8, scales[:, 0])
    expected = padded(q8).reshape(groups, 16, k // 4, 4).transpose(1, 2)  # chunk j, column c: inputs 4j..4j+3
    assert torch.equal(packed["q"], expected.reshape(groups, k * 16))
    assert torch.equal(packed["scales"], padded(scales[:, 0].float()))


@pytest.mark.skipif(not vnni.available(), reason="no lilmistral CPU kernels (no AVX2, or no C++ compiler)")
def test_vnni_packing_of_blocks_of_rows_is_the_packing_of_their_concatenation():
    """A fused projection's parts are packed as blocks of rows (not concatenated first): blocks whose sizes
    straddle the groups of 16 columns, a strided (non-contiguous) one among them, pack as their concatenation,
    super-blocked ones and int5's too."""
    g = torch.Generator().manual_seed(1)
    sizes, k = (5, 16, 11, 3), 256
    q = [torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g) for n in sizes]
    q[1] = torch.randint(0, 256, (k // 2, 16), dtype=torch.uint8, generator=g).t()
    assert not q[1].is_contiguous()
    scales, mins = ([torch.rand(n, k // 64, generator=g).half() for n in sizes] for _ in range(2))
    codes = {name: [torch.randint(0, 64, (n, k // 32), dtype=torch.uint8, generator=g) for n in sizes]
             for name in ("scales", "mins")}
    factors = {name: [torch.rand(n, 1, generator=g).half() for n in sizes] for name in ("super_scales", "super_mins")}
    fifths = [torch.randint(0, 256, (n, k // 8), dtype=torch.uint8, generator=g) for n in sizes]  # int5
    for blocks in ({"qweight": q, "scales": scales, "mins": mins}, {"qweight": q, **codes, **factors},
                   {"qweight": q, "qhigh": fifths, **codes, **factors}):
        whole = vnni.pack_int4_vnni({name: torch.cat(part) for name, part in blocks.items()})
        for name, value in vnni.pack_int4_vnni(blocks).items():
            assert torch.equal(value, whole[name]) if isinstance(value, torch.Tensor) else value == whole[name]
    q8 = [torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g) for n in sizes]
    for name, value in vnni.pack_int8_vnni(q8, [s[:, 0] for s in scales]).items():
        whole = vnni.pack_int8_vnni(torch.cat(q8), torch.cat(scales)[:, 0])[name]
        assert value == whole if name == "n" else torch.equal(value, whole)


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_page_bytes_at(address: int) -> int | None:
    """The bytes in transparent huge pages of the memory mapping holding address; None if none holds it."""
    return next((nbytes for (start, end), nbytes in huge_page_bytes().items() if start <= address < end), None)


@pytest.mark.skipif(not vnni.available(), reason="no lilmistral CPU kernels (no AVX2, or no C++ compiler)")
@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages")
def test_weights_in_huge_pages_are_the_same_weights(monkeypatch):
    """Weights of 2 MB and more are repacked into 2 MB pages (a mapping aligned to them, freed with the tensor)
    while those come fast; LILMISTRAL_HUGE_PAGES=1 always, =0 never. The same bytes and the same products
    whichever pages hold them; smaller weights in PyTorch's memory."""
    parts, spec, g = random_parts(4096, 1024, QuantSpec("int4", 32, False), 0)  # q 2 MB, scales and mins 256 KB
    x = torch.randn(3, 1024, generator=g).bfloat16()
    packed = {}
    for setting in ("0", "1", None):
        if setting is None:
            monkeypatch.delenv("LILMISTRAL_HUGE_PAGES")
        else:
            monkeypatch.setenv("LILMISTRAL_HUGE_PAGES", setting)
        packed[setting] = vnni.pack_int4_vnni(parts)
    address = packed["1"]["q"].data_ptr()
    assert address % (2 << 20) == 0 and huge_page_bytes_at(address) >= 2 << 20
    # smaller weights, and every weight with =0, not in mappings of their own (which of PyTorch's memory the
    # kernel backs with huge pages depends on what else the process did: a whole test run's process had some)
    assert huge_page_fraction([packed["1"]["q"]]) == 1 and huge_page_fraction([packed["0"]["q"]]) == 0
    assert huge_page_fraction([packed["1"]["scales"]]) == 0
    products = [torch.ops.lilmistral.int4_gemv(x, p["q"], p["scales"], p["mins"], p["n"], p["codes"])
                for p in packed.values()]
    for p, product in zip(packed.values(), products):
        assert all(torch.equal(value, packed["0"][name]) if isinstance(value, torch.Tensor)
                   else value == packed["0"][name] for name, value in p.items())
        assert torch.equal(product, products[0])
    del packed["1"]
    gc.collect()
    assert huge_page_bytes_at(address) is None


@pytest.mark.skipif(not vnni.available(), reason="no lilmistral CPU kernels (no AVX2, or no C++ compiler)")
@pytest.mark.parametrize("spec,n,k", cases(SPECS + [SUPER, INT6, *INT5], [(37, 576), (48, 256), (37, 512)]))  # 37: pads
def test_vnni_unpacking_gives_back_the_canonical_parts(spec, n, k):
    """What a repacked kernel's float32 fallback dequantizes once the canonical parts are gone: unpacking
    the kernel's layout gives them back, bit for bit."""
    parts, spec, _ = random_parts(n, k, spec, n + k)
    if spec.scheme == "int8":
        packed = vnni.pack_int8_vnni(parts["qweight"], parts["scales"])
    else:
        packed = (vnni.pack_int6_vnni if spec.scheme == "int6" else vnni.pack_int4_vnni)(parts)
    unpacked = vnni.unpack_vnni(packed, spec)
    assert unpacked.keys() == parts.keys()
    for name, part in parts.items():
        assert unpacked[name].dtype == part.dtype and torch.equal(unpacked[name], part), name


@pytest.mark.skipif(not vnni.available(), reason="no lilmistral CPU kernels (no AVX2, or no C++ compiler)")
@pytest.mark.parametrize("head,k_quants", [(2, False), (4, False), (16, True)], ids=["Q4_0", "Q4_1", "Q4_K"])
def test_gguf_q4_packing_in_cpp_is_pytorchs(head, k_quants, monkeypatch):
    """A .gguf's Q4_0 / Q4_1 / Q4_K quants re-laid as pack.py's bytes (convert/gguf.py) by vnni.cpp's operator:
    the PyTorch operators' bytes, on every byte value, rows of blocks read with a stride (as from the file)."""
    g = torch.Generator().manual_seed(head)
    size = head + (128 if k_quants else 16)
    raw = torch.randint(0, 256, (37, 5 * size + 7), dtype=torch.uint8, generator=g)
    blocks = raw[:, 7:].view(37, 5, size)  # rows of a wider matrix: a row stride of their own
    fast = q4_canonical(blocks, head, k_quants)
    monkeypatch.setattr(vnni, "available", lambda: False)
    assert torch.equal(fast, q4_canonical(blocks, head, k_quants))


@pytest.mark.parametrize("spec", SPECS[:2] + [SUPER, INT6, INT5[1]], ids=spec_id)
def test_released_parts_are_freed_and_float32_still_gets_the_exact_product(spec):
    """release_parts: where the kernel repacked the weight, the module lets go of its canonical parts and
    nothing else holds them (their memory is freed); float32 activations still get the dequantized product,
    bit for bit. Kernels that read the parts (PyTorch's) keep them."""
    parts, spec, g = random_parts(100, 512, spec, 0)
    linear = QuantLinear(512, 100, spec)
    for name, part in parts.items():
        setattr(linear, name, part.clone())
    linear.prepare()
    held = [weakref.ref(part) for part in linear.parts().values()]
    repacked = isinstance(linear.kernel, (VnniInt4Kernel, VnniInt6Kernel, VnniInt8Kernel))
    assert len(linear.release_parts()) == (len(parts) if repacked else 0)
    gc.collect()
    assert all((ref() is None) == repacked for ref in held)
    assert (linear.qweight is None and not linear.state_dict()) == repacked
    x = torch.randn(3, 512, generator=g)
    assert torch.equal(linear(x), torch.nn.functional.linear(x, dequantize(parts, spec)))


@pytest.mark.skipif(not vnni.available(), reason="no lilmistral CPU kernels (no AVX2, or no C++ compiler)")
@pytest.mark.parametrize("spec,n,k", cases(SPECS[1:] + [SUPER, *INT5], [(1, 128), (37, 576), (300, 4096), (24, 1408),
                                                                          (37, 512)]))  # N % 16: a padded last group
@pytest.mark.parametrize("rows", [1, 3, 7])
def test_vnni_int4_kernels(spec, n, k, rows):
    """vnni.cpp's int4 GEMV (int5's too) against the dequantized reference, with blocks of all-0 and all-15 (31)
    values (and of the largest and zero scale and min codes of super-blocks) and a row of zero activations; each
    row's result the same bits alone as among many, and in the expert-batched form (rows of two experts)."""
    if k % spec.group_size:
        spec = QuantSpec(spec.scheme, 64, spec.symmetric)
    g = torch.Generator().manual_seed(n * k + rows)
    parts = quantize(torch.randn(n, k, generator=g) * 0.05, spec)
    parts["qweight"][0, :16] = 0x00
    parts["qweight"][-1, -16:] = 0xFF
    if spec.scheme == "int5":
        parts["qhigh"][0, :4], parts["qhigh"][-1, -4:] = 0x00, 0xFF
    if spec.super_block:
        parts["scales"][0, 0], parts["mins"][0, 0], parts["scales"][-1, -1], parts["mins"][-1, -1] = 255, 0, 0, 255
    packed = vnni.pack_int4_vnni(parts)
    x = torch.randn(rows + 1, k, generator=g)
    x[-1] = 0
    reference = x @ dequantize(parts, spec).t()
    got = torch.ops.lilmistral.int4_gemv(x, **packed)
    assert got.shape == (rows + 1, n) and got.dtype == torch.float32 and torch.all(got[-1] == 0)
    if n > 1:  # one dot product can cancel to near zero, where a relative error means little
        assert ((got - reference).norm() / reference.norm()).item() < 0.02
    assert_blockwise_product(got, x, dequantize(parts, spec))
    many = torch.cat([x, torch.randn(20, k, generator=g)])  # 21+ rows: blocks of 8 and a remainder
    assert torch.equal(torch.ops.lilmistral.int4_gemv(many, **packed)[:rows + 1], got)
    assert torch.equal(torch.ops.lilmistral.int4_gemv(x[1:2], **packed)[0], got[1])
    xb = x.bfloat16()  # bfloat16 in and out: as float32 in, rounded out
    assert torch.equal(torch.ops.lilmistral.int4_gemv(xb, **packed), torch.ops.lilmistral.int4_gemv(xb.float(), **packed).bfloat16())
    experts = [packed, vnni.pack_int4_vnni(quantize(torch.randn(n, k, generator=g) * 0.05, spec))]
    chosen = torch.arange(rows + 1) % 2  # row r times expert r % 2's weight, each row as alone

    def of_experts(name: str) -> list:
        return [] if experts[0][name] is None else [e[name] for e in experts]

    batched = torch.ops.lilmistral.int4_gemv_experts(x, *map(of_experts, ("q", "scales", "mins")), n, chosen,
                                                     of_experts("codes"), of_experts("high"))
    for r, e in enumerate(chosen.tolist()):
        assert torch.equal(batched[r], torch.ops.lilmistral.int4_gemv(x[r:r + 1], **experts[e])[0])


@pytest.mark.skipif(not vnni.available(), reason="no lilmistral CPU kernels (no AVX2, or no C++ compiler)")
@pytest.mark.parametrize("n,k,super_block", [(1, 256, 256), (37, 512, 256), (300, 4096, 256), (24, 1536, 192),
                                             (37, 576, 192)])  # N % 16: a padded last group
@pytest.mark.parametrize("rows", [1, 3, 7])
def test_vnni_int6_kernel(n, k, super_block, rows):
    """vnni.cpp's int6 GEMV (GGUF's Q6_K layout) against the dequantized reference, with groups of all-0 and all-63
    values, codes -128, 127 and 0, and a row of zero activations; each row's result the same bits alone as among
    many."""
    spec = QuantSpec("int6", 16, True, super_block)
    g = torch.Generator().manual_seed(n * k + rows)
    parts = quantize(torch.randn(n, k, generator=g) * 0.05, spec)
    values = torch.randint(0, 64, (n, k), dtype=torch.uint8, generator=g)
    values[0, :16], values[-1, -16:] = 0, 63
    parts |= pack_int6(values)
    parts["scales"][0, :3] = torch.tensor([-128, 127, 0], dtype=torch.int8)
    packed = vnni.pack_int6_vnni(parts)
    gemv = lambda x: torch.ops.lilmistral.int6_gemv(x, packed["q"], packed["high"], packed["scales"],  # noqa: E731
                                                    packed["codes"], packed["n"])
    x = torch.randn(rows + 1, k, generator=g)
    x[-1] = 0
    reference = x @ dequantize(parts, spec).t()
    got = gemv(x)
    assert got.shape == (rows + 1, n) and got.dtype == torch.float32 and torch.all(got[-1] == 0)
    if n > 1:
        assert ((got - reference).norm() / reference.norm()).item() < 0.02
    assert_blockwise_product(got, x, dequantize(parts, spec))
    many = torch.cat([x, torch.randn(20, k, generator=g)])  # 21+ rows: blocks of 8 and a remainder
    assert torch.equal(gemv(many)[:rows + 1], got)
    assert torch.equal(gemv(x[1:2])[0], got[1])
    xb = x.bfloat16()  # bfloat16 in and out: as float32 in, rounded out
    assert torch.equal(gemv(xb), gemv(xb.float()).bfloat16())


@pytest.mark.skipif(not vnni.available(), reason="no lilmistral CPU kernels (no AVX2, or no C++ compiler)")
def test_vnni_int6_packing_follows_the_documented_layout_and_packs_blocks_of_rows_as_one():
    """pack_int6_vnni puts every value's low 4 bits as int4's, its high 2 bits, each group's code and each
    super-block's factor where its docstring says (the padded columns zero); blocks of rows (one strided) pack as
    their concatenation."""
    g = torch.Generator().manual_seed(0)
    n, k, groups = 37, 512, 3

    def padded(t: torch.Tensor) -> torch.Tensor:  # [N, ...] -> [groups * 16, ...]
        return torch.cat([t, t.new_zeros(groups * 16 - n, *t.shape[1:])])

    values = torch.randint(0, 64, (n, k), dtype=torch.uint8, generator=g)
    parts = pack_int6(values) | {"scales": torch.randint(-128, 128, (n, k // 16), dtype=torch.int8, generator=g),
                                 "super_scales": torch.rand(n, k // 256, generator=g).half()}
    packed = vnni.pack_int6_vnni(parts)
    low = vnni.pack_int4_vnni({"qweight": pack_int4(values & 0x0F), "scales": parts["super_scales"]})["q"]
    assert torch.equal(packed["q"], low) and packed["n"] == n
    halves = padded(values >> 4).reshape(groups, 16, k // 16, 4, 4)  # group, column c, half block, i, byte b
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)
    expected = (halves << shifts).sum(dim=3, dtype=torch.uint8)  # byte b: inputs 4i + b in bits 2i
    assert torch.equal(packed["high"], expected.permute(0, 2, 1, 3).reshape(groups, k * 4))
    codes = padded(parts["scales"]).reshape(groups, 16, k // 32, 2).transpose(1, 2)
    assert torch.equal(packed["codes"], codes)
    assert torch.equal(packed["scales"], padded(parts["super_scales"]).reshape(groups, 16, k // 256).transpose(1, 2))
    sizes = (5, 16, 11, 5)
    blocks = {name: list(part.split(sizes)) for name, part in parts.items()}
    blocks["qhigh"][1] = blocks["qhigh"][1].t().contiguous().t()  # strided
    assert not blocks["qhigh"][1].is_contiguous()
    for name, value in vnni.pack_int6_vnni(blocks).items():
        assert torch.equal(value, packed[name]) if isinstance(value, torch.Tensor) else value == packed[name]


@pytest.mark.skipif(not vnni.available(), reason="no lilmistral CPU kernels (no AVX2, or no C++ compiler)")
def test_gguf_q6_k_quants_in_cpp_are_pytorchs(monkeypatch):
    """A .gguf's Q6_K quants re-laid as int6's qweight and qhigh by gguf_blocks.cpp's operator: the PyTorch
    operators' bytes, on every byte value, rows of blocks read with a stride (as from the file)."""
    g = torch.Generator().manual_seed(6)
    raw = torch.randint(0, 256, (37, 3 * 210 + 7), dtype=torch.uint8, generator=g)
    blocks = raw[:, 7:].view(37, 3, 210)
    fast = torch.ops.lilmistral.q6k_canonical(blocks)
    slow = q6k_canonical(blocks)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))


def attention_reference(q, keys, values, mask):
    """Attention in float64 by its definition."""
    scores = q.double() @ keys.double().transpose(1, 2) / q.shape[-1] ** 0.5  # [K, R, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ values.double()


@pytest.mark.skipif(not vnni.available(), reason="no lilmistral CPU kernels (no AVX2, or no C++ compiler)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads,rows,slots,head_dim", [(1, 1, 1, 16), (2, 5, 33, 32), (3, 3, 100, 64),
                                                          (8, 4, 200, 128), (2, 24, 130, 64)])
def test_attention_kernel(dtype, kv_heads, rows, slots, head_dim):
    """attention.cpp against the definition, for no mask, one mask row for all (decode) and one per row (a
    prompt's causal and sliding-window mask), keys and values read out of a larger cache; each row the same
    bits alone as among others, and at any number of slots past the last it may attend to."""
    g = torch.Generator().manual_seed(kv_heads * rows * slots)
    q = torch.randn(kv_heads, rows, head_dim, generator=g).to(dtype)
    cache = torch.randn(2, kv_heads, slots + 70, head_dim, generator=g).to(dtype)
    keys, values = cache[0, :, :slots], cache[1, :, :slots]
    position = (slots - 1 - torch.arange(rows) % 7).clamp(min=0)  # a prompt's rows: near the last slot, window 40
    causal = (torch.arange(slots)[None] <= position[:, None]) & (position[:, None] - torch.arange(slots)[None] < 40)
    decode = torch.rand(1, slots, generator=g) < 0.8
    decode[0, 0] = True
    attend = lambda *a: torch.ops.lilmistral.attention(*a, head_dim ** -0.5)  # noqa: E731
    for mask in (None, decode, causal):
        got = attend(q, keys, values, mask)
        assert got.dtype == dtype and got.shape == q.shape
        expected = attention_reference(q, keys, values, mask)
        assert (got.double() - expected).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)
        r = rows // 2
        alone = attend(q[:, r:r + 1], keys, values, None if mask is None else mask[r:r + 1] if len(mask) > 1 else mask)
        assert torch.equal(alone, got[:, r:r + 1])
    longer = torch.cat([causal, torch.zeros(rows, 70, dtype=torch.bool)], dim=1)  # slots no row attends to
    assert torch.equal(attend(q, cache[0], cache[1], longer), attend(q, keys, values, causal))


@pytest.mark.skipif(not vnni.available(), reason="no lilmistral CPU kernels (no AVX2, or no C++ compiler)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_attention_kernel_over_segments_split_into_tasks_or_not(dtype, head_dim):
    """Over more slots than a segment (512), a token decoded alone (one task a kv head: too few for the threads)
    runs each segment as a task, merged after; the same rows among a prompt's run each task over every segment.
    Both give the definition's values and each other's bits, at one thread or two: a sliding window that leaves
    whole segments out of a row, a row with no slot to attend to (zeros)."""
    g = torch.Generator().manual_seed(head_dim)
    kv_heads, group, tokens, slots, window = 2, 4, 10, 1300, 700
    q = torch.randn(kv_heads, group * tokens, head_dim, generator=g).to(dtype)  # rows: group-major, as model.py's
    keys, values = torch.randn(2, kv_heads, slots, head_dim, generator=g).to(dtype)
    position = torch.tensor([3, 200, 511, 512, 600, 1023, 1100, 1250, 1299, 1299])
    causal = (torch.arange(slots)[None] <= position[:, None]) & (position[:, None] - torch.arange(slots)[None] < window)
    causal[-1] = False  # the last token: no slot at all
    mask = causal.repeat(group, 1)
    attend = lambda *a: torch.ops.lilmistral.attention(*a, head_dim ** -0.5)  # noqa: E731
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            prompt = attend(q, keys, values, mask)
            expected = attention_reference(q, keys, values, mask).nan_to_num(0.0)  # no slot: the kernel's zeros
            assert (prompt.double() - expected).abs().max() < (
                1e-5 if dtype == torch.float32 else 2e-2)
            for t in range(tokens):
                rows = torch.arange(group) * tokens + t
                alone = attend(q[:, rows], keys, values, causal[t:t + 1])
                assert torch.equal(alone, prompt[:, rows]), (n, t)
            assert not prompt.view(kv_heads, group, tokens, head_dim)[:, :, -1].any()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not vnni.available(), reason="no lilmistral CPU kernels (no AVX2, or no C++ compiler)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim,head_dim", [(576, 64), (4096, 128), (100, 20), (7, 2)])  # 100, 20, 7: masked tails
def test_pointwise_kernels(dtype, dim, head_dim):
    """pointwise.cpp against model.py's PyTorch versions: RoPE the same bits; RMSNorm (a differently ordered
    sum) and silu (another exp) within float32's rounding, so in bfloat16 the same bits but for rare ties;
    each row alike alone; strided inputs as the model passes them."""
    g = torch.Generator().manual_seed(dim)
    ops = torch.ops.lilmistral

    def assert_matches(got: torch.Tensor, expected: torch.Tensor) -> None:
        assert got.dtype == expected.dtype and torch.allclose(got.float(), expected.float(), atol=1e-5, rtol=1e-5)
        assert dtype == torch.float32 or (got != expected).float().mean() < 0.01

    x, weight = (torch.randn(5, dim, generator=g) * 3).to(dtype), torch.randn(dim, generator=g).to(dtype)
    normed = ops.rms_norm(x, weight, 1e-5)
    assert_matches(normed, rms_norm(x, weight, 1e-5))
    assert torch.equal(ops.rms_norm(x[2:3], weight, 1e-5), normed[2:3])
    qkv = torch.randn(3, 6 * head_dim, generator=g).to(dtype)  # [T, (H + K) * hd] as a projection's output
    q = qkv.reshape(3, 6, head_dim).transpose(0, 1)  # [H, T, hd]: not contiguous
    cos, sin = torch.randn(2, 3, head_dim, generator=g).to(dtype)
    assert torch.equal(ops.rope(q, cos, sin), rope(q, cos, sin))
    assert torch.equal(ops.rope(q[:, 1:2], cos[1:2], sin[1:2]), rope(q, cos, sin)[:, 1:2])
    gate, up = (torch.randn(4, 2 * dim, generator=g) * 4).to(dtype).chunk(2, dim=-1)  # halves of one w13 output
    assert_matches(ops.silu_mul(gate, up), silu_mul(gate, up))
    extremes = torch.tensor([[-1e30, -200.0, -88.0, -1.0, 0.0, 1.0, 88.0, 200.0, 1e30]], dtype=dtype)
    assert_matches(ops.silu_mul(extremes, torch.ones_like(extremes)), silu_mul(extremes, torch.ones_like(extremes)))


@pytest.mark.skipif(not vnni.available(), reason="no lilmistral CPU kernels (no AVX2, or no C++ compiler)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim,head_dim", [(576, 64), (4096, 128), (100, 20), (7, 2)])
def test_decode_step_kernels_give_the_bits_of_the_operators_they_replace(dtype, dim, head_dim):
    """add_rms_norm: PyTorch's `residual + x` and rms_norm's bits; rope_store: q, and the keys and values that
    rope and index_copy_ write into the cache's slot (the slots around it untouched), rows rotated in order."""
    g = torch.Generator().manual_seed(dim)
    ops = torch.ops.lilmistral
    x, residual = (torch.randn(2, 3, dim, generator=g) * 3).to(dtype)
    weight = torch.randn(dim, generator=g).to(dtype)
    h, normed = ops.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(h, residual + x) and torch.equal(normed, ops.rms_norm(residual + x, weight, 1e-5))
    n_heads, n_kv_heads, slots, rows = 6, 2, 9, 2
    qkv = torch.randn(rows, (n_heads + 2 * n_kv_heads) * head_dim, generator=g).to(dtype)
    cos, sin = torch.randn(2, rows, head_dim, generator=g).to(dtype)
    keys, values = torch.randn(2, n_kv_heads, slots, head_dim, generator=g).to(dtype)
    slot = torch.tensor([5, 2])
    expected_keys, expected_values = keys.clone(), values.clone()
    heads = qkv.reshape(rows, -1, head_dim).transpose(0, 1)  # [H + 2K, T, hd]
    rotated = rope(heads, cos, sin)
    expected_keys.index_copy_(1, slot, rotated[n_heads:n_heads + n_kv_heads])
    expected_values.index_copy_(1, slot, heads[n_heads + n_kv_heads:])
    q = ops.rope_store(qkv, cos, sin, keys, values, slot)
    assert torch.equal(q, rotated[:n_heads].transpose(0, 1).reshape(rows, -1))
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.rope_store(qkv[:1], cos[:1], sin[:1], keys, values, torch.tensor([slots]))


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_quantizing_a_parameter_keeps_no_autograd_graph(spec):
    """A tied head is quantized from the embedding parameter at load: its parts must not hold the float
    temporaries alive through an autograd graph (~230 MB for SmolLM2's vocabulary)."""
    parts = quantize(torch.nn.Parameter(torch.randn(64, 256)), spec)
    assert not any(part.requires_grad or part.grad_fn for part in parts.values())


@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("int4", 32, False), QuantSpec("int4", 32, True), SUPER,
                                  INT6], ids=spec_id)
def test_fused_projections_give_each_projections_output(spec):
    """wq, wk, wv fused into one kernel: the same bits as each alone (bfloat16, lilmistral's kernels; float32,
    the dequantizing fallback), with the originals' parts released, and the originals still work (as columns
    of the fused kernel)."""
    g = torch.Generator().manual_seed(0)
    linears = []
    for n in (96, 40, 40):  # 40: a fused boundary inside a group of 16 columns
        linear = QuantLinear(256, n, spec)
        for name, part in quantize(torch.randn(n, 256, generator=g) * 0.05, spec).items():
            setattr(linear, name, part)
        linear.prepare()
        linears.append(linear)
    x = torch.randn(5, 256, generator=g)
    inputs = [rows.to(dtype) for rows in (x[:1], x) for dtype in (torch.bfloat16, torch.float32)]
    expected = [torch.cat([linear(rows) for linear in linears], dim=-1) for rows in inputs]
    fused = FusedQuantLinear(linears)
    for linear in linears:  # as the loader does: the fused kernel holds the weights
        linear.release_parts()
    assert not any(linear.parts() for linear in linears)
    for rows, out in zip(inputs, expected):
        if vnni.available() or rows.dtype == torch.float32:
            assert torch.equal(fused(rows), out)
        else:  # PyTorch's int4 kernel (CPUs without lilmistral's) rounds a column otherwise within a wider weight
            torch.testing.assert_close(fused(rows), out, atol=1e-2, rtol=1e-2)
    assert torch.allclose(linears[1](x), expected[-1][:, 96:136], atol=1e-5)


def kernel_outputs() -> list[torch.Tensor]:
    """Every CPU operator's results on fixed inputs: int4 (super-blocked too), int5, int6 and int8 matmuls at 1, 5 and
    19 rows; attention in float32, masked and not; RMSNorm (after a residual's sum too), silu * up (inputs far out in
    exp's range among them), RoPE (storing keys and values too) in float32 and bfloat16, with tails shorter than a
    vector; GGUF blocks decoded, to float32 and to int8."""
    g, ops, out = torch.Generator().manual_seed(0), torch.ops.lilmistral, []
    for (n, k), spec, rows in zip([(37, 576), (300, 4096), (1024, 1024)] * 2 + [(37, 512), (300, 4096)] * 4,
                                  SPECS[:3] * 2 + [SUPER] * 2 + [INT6] * 2 + INT5 * 2,
                                  (1, 5, 19, 19, 5, 1, 1, 19, 1, 19, 19, 1, 5, 19)):
        parts = quantize(torch.randn(n, k, generator=g) * 0.05, spec)
        if spec.scheme == "int8":
            gemv, packed = ops.int8_gemv, vnni.pack_int8_vnni(parts["qweight"], parts["scales"])
        elif spec.scheme == "int6":
            gemv, packed = ops.int6_gemv, vnni.pack_int6_vnni(parts)
        else:
            gemv, packed = ops.int4_gemv, vnni.pack_int4_vnni(parts)
        x = torch.randn(rows, k, generator=g) * 3
        out += [gemv(x, **packed), gemv(x.bfloat16(), **packed)]
    for kv_heads, rows, slots, head_dim in [(2, 5, 33, 32), (3, 3, 100, 64), (8, 4, 200, 128)]:
        q = torch.randn(kv_heads, rows, head_dim, generator=g)
        keys, values = torch.randn(2, kv_heads, slots, head_dim, generator=g)
        for mask in (None, torch.rand(rows, slots, generator=g) < 0.7):
            out.append(ops.attention(q, keys, values, mask, head_dim ** -0.5))
    for dtype in (torch.float32, torch.bfloat16):
        for dim in (576, 100, 7):
            x, weight = (torch.randn(5, dim, generator=g) * 3).to(dtype), torch.randn(dim, generator=g).to(dtype)
            gate, up = (torch.randn(2, 5, dim, generator=g) * 4).to(dtype)
            gate[0, :2] = torch.tensor([-100.0, 100.0])
            x_rope, cos, sin = torch.randn(6, 3, dim - dim % 2, generator=g).to(dtype).split([4, 1, 1])
            out += [ops.rms_norm(x, weight, 1e-5), ops.silu_mul(gate, up), ops.rope(x_rope, cos[0], sin[0]),
                    *ops.add_rms_norm(x, gate, weight, 1e-5)]
            keys, values = torch.zeros(2, 1, 3, x_rope.shape[-1], dtype=dtype)  # K = 1
            qkv = x_rope[:3, 0].reshape(1, -1)  # [1, (H + 2K) * hd], H = 1
            out += [ops.rope_store(qkv, cos[0, :1], sin[0, :1], keys, values, torch.tensor([1])), keys, values]
    for kind, values, block_bytes, scale_at in (("Q5_1", 32, 24, 2), ("Q4_K", 256, 144, 2), ("Q6_K", 256, 210, 208),
                                                ("Q5_K", 256, 176, 2)):
        blocks = torch.randint(0, 256, (6, 2, block_bytes), dtype=torch.uint8, generator=g)
        for at in {0, scale_at}:  # finite float16 scales (random bytes: NaNs)
            blocks[..., at:at + 2] = (torch.randn(6, 2, 1, generator=g) / 100).half().view(torch.uint8)
        out += [ops.gguf_dequantize(blocks.view(6, -1), kind), *ops.gguf_int8(blocks.view(6, -1), kind)]
        if kind in ("Q4_K", "Q5_K"):
            out += ops.q4k_codes(blocks)
        if kind == "Q5_K":
            out.append(ops.q5k_highs(blocks))
        if kind == "Q6_K":
            out += ops.q6k_canonical(blocks)
    return out


@pytest.mark.skipif(vnni.isa() != "avx512", reason="needs an AVX-512 VNNI CPU to compare the 256-bit builds with")
@pytest.mark.parametrize("target", ["avx2", "avxvnni"])
def test_the_256_bit_builds_pass_these_tests_with_the_avx512_bits(tmp_path, target):
    """The kernels built for AVX2 (as a CPU without AVX-512 gets them: lanes.cpp's two registers, vpmaddubsw for
    vpdpbusd) and for AVX-VNNI (two registers, vpdpbusd's EVEX form here) pass this file's kernel tests, and
    every operator gives the AVX-512 build's bits."""
    env = {**os.environ, "LILMISTRAL_CPU_KERNELS": target}
    chosen = "vnni_int or packing or attention or pointwise or decode_step_kernels or matches_dequantized or fused"
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", chosen],
                           env=env, capture_output=True, text=True)
    assert tests.returncode == 0 and " passed" in tests.stdout, tests.stdout[-3000:] + tests.stderr[-3000:]
    script = (f"import importlib.util, torch; spec = importlib.util.spec_from_file_location('t', {__file__!r}); "
              "t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t); "
              f"assert t.vnni.isa() == {target!r}; torch.save(t.kernel_outputs(), {str(tmp_path / 'out.pt')!r})")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])  # reference.py
    subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=tmp_path)
    built = torch.load(tmp_path / "out.pt", weights_only=True)
    avx512 = kernel_outputs()
    assert len(built) == len(avx512) and all(torch.equal(a, b) for a, b in zip(built, avx512))


@pytest.mark.skipif(not vnni.cpu_isas(), reason="no lilmistral CPU kernels on this CPU")
def test_the_avxvnni_build_compiles_as_avx_vnni_cpus_get_it(tmp_path):
    """The avxvnni build as an AVX-VNNI CPU gets it (-mavxvnni, no AVX-512 flags): it compiles and loads (the
    tests above run its code through the EVEX form, whose flags would let AVX-512 instructions in), and its dot
    products are VEX-encoded vpdpbusd on 256-bit registers, with no 512-bit ones."""
    # -O1 after the build's -O3: its flags and instructions are the point here, and it compiles in ~2/3 the time
    script = "from lilmistral.quant import vnni; print(vnni._build('avxvnni', vnni.ISAS['avxvnni'][1] + ['-O1']))"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    if "unrecognized" in run.stdout and "-mavxvnni" in run.stdout:  # GCC before 11
        pytest.skip(f"this compiler cannot build for AVX-VNNI: {run.stdout.strip()}")
    assert run.stdout.strip() == "None", run.stdout + run.stderr
    if shutil.which("objdump"):
        code = subprocess.run(["objdump", "-d", str(next(tmp_path.rglob("lilmistral_avxvnni*.so")))],
                              capture_output=True, text=True, check=True).stdout
        assert code.count("{vex} vpdpbusd") > 100 and "zmm" not in code


@pytest.mark.skipif(len(vnni.cpu_isas()) < 2, reason="needs a CPU with two of the kernels' instruction sets")
def test_a_build_that_fails_falls_back_to_the_next_instruction_set(tmp_path):
    """A compiler that cannot build the best instruction set (GCC before 11 has no -mavxvnni) gets the next one,
    with one warning; a compiler that builds nothing, or none, PyTorch's kernels, with one warning."""
    best, second = vnni.cpu_isas()[:2]
    flag = next(f for f in vnni.ISAS[best][1] if f not in vnni.ISAS[second][1])
    script = "import warnings; warnings.simplefilter('always'); from lilmistral.quant import vnni; print(vnni.isa())"
    env = {k: v for k, v in os.environ.items() if k != "LILMISTRAL_CPU_KERNELS"}

    def build_with(name: str, compiler: str) -> subprocess.CompletedProcess:
        path = tmp_path / name
        path.write_text(f"#!/bin/sh\n{compiler}\n")
        path.chmod(0o755)
        env.update(CXX=str(path), TORCH_EXTENSIONS_DIR=str(tmp_path / f"{name}-ext"))
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        assert "WARNING" not in run.stderr  # PyTorch's doubts about the compiler are held back
        return run

    # -O0 after the build's -O3: this test is about which build loads, and that halves its compile
    run = build_with("old-compiler", f'case "$*" in *"{flag}"*) exit 1;; esac\nexec c++ "$@" -O0')
    assert run.stdout.split() == [second]
    assert run.stderr.count("lilmistral:") == 1 and f"the {best} CPU kernels did not build" in run.stderr
    assert f"using the {second} ones" in run.stderr
    run = build_with("broken-compiler", "exit 1")
    assert run.stdout.split() == ["None"] and run.stderr.count("lilmistral:") == 1
    assert f"the {best} CPU kernels did not build" in run.stderr and "using PyTorch's slower kernels" in run.stderr
    env["CXX"] = str(tmp_path / "no-such-compiler")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["None"] and run.stderr.count("lilmistral:") == 1 and "no C++ compiler" in run.stderr
    make_hf_model(tmp_path / "tiny")  # the command says it in one line, and answers
    run = subprocess.run([sys.executable, "-m", "lilmistral", "run", str(tmp_path / "tiny"), "Hi", "--max-tokens", "2"],
                         env=env, capture_output=True, text=True, check=True)
    assert run.stderr.splitlines() == [f"Warning: no C++ compiler ({env['CXX']}) to build the CPU kernels; using "
                                       "PyTorch's slower kernels (install g++, or set LILMISTRAL_CPU_KERNELS=torch)"]
