"""The Triton GEMV and decode attention compiled offline for a GPU (no GPU needed: Triton's own ptxas and
nvdisasm), and what the code does: the GEMV's machine instructions a weight, its weight loads' width and how
many come before it waits for the kernel before (programmatic dependent launch), a JSON line per scheme and
activations (rounded to int8, as a model's; float, the exact product); the
attention's tensor-core instructions and loads; that every other kernel compiles, and waits. For tuning the kernels on a
machine without a GPU, where their speed cannot be measured.

    python -m benchmarks.triton_codegen [--arch 90]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lilmistral.quant import triton_kernels
from lilmistral.quant.pack import QuantSpec

POINTERS = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*fp16", "m_ptr": "*fp16", "c_ptr": "*i16", "h_ptr": "*i32",
            "out_ptr": "*bf16", "res_ptr": "*bf16", "sums_ptr": "*fp32", "count_ptr": "*i32",
            "e_ptr": "*i64"}  # _gemv's, in order
GEMV_SIGNATURE = dict(POINTERS, N="i32", K="i32", magic="i32")
GEMV_ALIGNED = [*POINTERS, "N", "K"]


def compile_kernel(fn, signature: dict, constants: dict, aligned: list[str], warps: int, arch: int):
    """fn compiled for compute capability `arch`, specialised as Triton specialises a launch whose `aligned`
    pointers are 16-byte aligned and integers multiples of 16."""
    signature = dict(signature, **{name: "constexpr" for name in constants})
    names = list(signature)
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()},
                       attrs={(names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def gemv_constants(spec: QuantSpec, arch: int = 90, **variant: bool) -> dict:
    """The GEMV's constants at TILES' sizes for a matrix its tiles divide (as Mistral's); `variant`: experts,
    residual or gated."""
    block_n, block_k, _ = triton_kernels.TILES[spec.scheme]
    g = spec.group_size if spec.scheme != "int8" else 0
    return {**dict(BITS=4 if g else 8, G=g, HAS_MIN=g > 0 and not spec.symmetric,
                   ZERO=0 if g and not spec.symmetric else spec.levels // 2 if g else 128, SUPER=spec.super_block,
                   HIGH=triton_kernels.HIGH_BITS.get(spec.scheme, 0), STEP=32,
                   BLOCK_N=block_n,
                   BLOCK_K=block_k, SPLIT=4, EVEN=True, HAS_EXPERTS=False, HAS_RESIDUAL=False, GATED=False,
                   PDL=arch >= 90, INT8_X=True, PTX=True),
            **variant}


def compile_gemv(spec: QuantSpec, arch: int = 90, **variant: bool):
    constants = gemv_constants(spec, arch, **variant)
    warps = triton_kernels.TILES[spec.scheme][2]
    signature = dict(GEMV_SIGNATURE, c_ptr="*i8") if spec.scheme == "int6" else GEMV_SIGNATURE  # signed codes
    return compile_kernel(triton_kernels._gemv, signature, constants, GEMV_ALIGNED, warps, arch), constants


def compile_attention(arch: int = 90):
    """The decode attention for Mistral's heads (hd 128, 4 query rows a kv head padded to 16) over a masked cache."""
    pointers = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", mask_ptr="*u8", out_ptr="*bf16", part_ptr="*fp32",
                    stat_ptr="*fp32", count_ptr="*i32")
    strides = ["stride_kh", "stride_ks", "stride_vh", "stride_vs"]
    signature = dict(pointers, R="i32", S="i32", chunk="i32", **{name: "i32" for name in strides}, stride_mr="i32",
                     scale="fp32")
    constants = dict(HD=128, R_P=16, BLOCK_S=triton_kernels.ATTENTION_BLOCK, HAS_MASK=True, PDL=arch >= 90)
    return compile_kernel(triton_kernels._attention, signature, constants, [*pointers, "chunk", *strides], 4, arch)


def compile_others(arch: int = 90) -> dict:
    """The other kernels a GPU runs, each in the variant it runs (bfloat16, Mistral's sizes), by name."""
    tk = triton_kernels
    dequantize = dict(q_ptr="*i32", s_ptr="*fp16", m_ptr="*fp16", c_ptr="*i16", h_ptr="*i32", out_ptr="*bf16",
                      N="i32", WIDTH="i32", K="i32", magic="i32")
    int4_constants = dict(BITS=4, G=32, HAS_MIN=True, ZERO=0, SUPER=256, HIGH=0, BLOCK_K=32, BLOCK_N=128)
    dequantize_aligned = [*dequantize][:6] + ["N", "WIDTH", "K"]
    int4, int8 = QuantSpec("int4", 32, False, super_block=256), QuantSpec("int8")  # the default int4, and int8
    kernels = {  # name: (kernel, signature, constants, aligned arguments, warps)
        "dequantize int4": (tk._dequantize, dequantize, int4_constants, dequantize_aligned, 4),
        "dequantize int5": (tk._dequantize, dequantize, dict(int4_constants, HIGH=1), dequantize_aligned, 4),
        "dequantize int6": (tk._dequantize, dict(dequantize, c_ptr="*i8"),
                            dict(int4_constants, G=16, HAS_MIN=False, ZERO=32, HIGH=2), dequantize_aligned, 4),
        "dequantize int8": (tk._dequantize, dequantize,
                            dict(int4_constants, BITS=8, G=0, HAS_MIN=False, ZERO=128, SUPER=0), dequantize_aligned, 4),
        "round_blocks": (tk._round_blocks, dict(x_ptr="*bf16", out_ptr="*bf16", K="i32"), dict(BLOCKS=16),
                         ["x_ptr", "out_ptr", "K"], 4),
        "gemv int8 experts residual": (tk._gemv, GEMV_SIGNATURE,
                                       gemv_constants(int8, arch, HAS_EXPERTS=True, HAS_RESIDUAL=True), GEMV_ALIGNED,
                                       tk.TILES["int8"][2]),
        "gemv int8 gated": (tk._gemv, GEMV_SIGNATURE, gemv_constants(int8, arch, GATED=True), GEMV_ALIGNED,
                            tk.TILES["int8"][2]),
        "gemv int4 residual": (tk._gemv, GEMV_SIGNATURE, gemv_constants(int4, arch, HAS_RESIDUAL=True), GEMV_ALIGNED,
                               tk.TILES["int4"][2]),
        "rms_norm": (tk._rms_norm, dict(x_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", D="i32", eps="fp32"),
                     dict(BLOCK=4096), ["x_ptr", "w_ptr", "out_ptr", "D"], 4),
        "rope": (tk._rope, dict(x_ptr="*bf16", cos_ptr="*bf16", sin_ptr="*bf16", out_ptr="*bf16", T="i32",
                                stride_n="i32", stride_t="i32"), dict(HALF=64), ["x_ptr", "cos_ptr", "sin_ptr"], 4),
        "silu_mul": (tk._silu_mul, dict(gate_ptr="*bf16", up_ptr="*bf16", out_ptr="*bf16", H="i32",
                                        stride_gate="i32", stride_up="i32"), dict(BLOCK=1024),
                     ["gate_ptr", "up_ptr", "out_ptr", "H"], 4),
        "store_kv": (tk._store_kv, dict(keys_ptr="*bf16", values_ptr="*bf16", slot_ptr="*i64", k_ptr="*bf16",
                                        v_ptr="*bf16", stride_cache_h="i32", stride_cache_s="i32", stride_kh="i32",
                                        stride_vh="i32"), dict(HD=128), ["keys_ptr", "values_ptr", "k_ptr"], 4),
    }
    return {name: compile_kernel(fn, sig, dict(constants, PDL=arch >= 90), aligned, warps, arch)
            for name, (fn, sig, constants, aligned, warps) in kernels.items()}


def cuda_tool(name: str, kernel, *options: str) -> str:
    """The output of one of Triton's CUDA tools (nvdisasm, cuobjdump) run on the kernel's machine code."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([tool, *options, f.name], capture_output=True, text=True, check=True).stdout


def registers(kernel) -> dict:
    """Registers a thread and bytes of local memory (spilled registers) a thread (cuobjdump -res-usage): a GEMV's
    registers bound how many of its programs an SM holds (65,536 registers an SM)."""
    usage = cuda_tool("cuobjdump", kernel, "-res-usage")
    return {"registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "local_bytes": int(re.search(r"LOCAL:(\d+)", usage).group(1))}


def sass_ops(kernel) -> list[str]:
    """The opcodes of the kernel's machine code (nvdisasm)."""
    text = cuda_tool("nvdisasm", kernel, "-c")
    return re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", text)


def attention_report(arch: int) -> dict:
    """The decode attention's tensor-core instructions (HGMMA, or HMMA as mma.sync) and its keys' and values'
    loads (16-byte asynchronous copies into shared memory, pipelined by Triton)."""
    kernel = compile_attention(arch)
    ops = collections.Counter(op.split(".")[0] for op in sass_ops(kernel))
    ptx = kernel.asm["ptx"]
    return {"kernel": "attention", "tensor_core_ops": ops["HGMMA"] + ops["HMMA"],
            "async_loads_16B": ptx.count("cp.async.cg.shared.global"), "top": ops.most_common(6)}


def report(spec: QuantSpec, arch: int, int8_x: bool = True) -> dict:
    """The GEMV's code for bfloat16 activations rounded to int8 (what a model runs) or, without int8_x, for
    the exact float product (float32 activations; what bfloat16 ones took before)."""
    block_k, g = triton_kernels.TILES[spec.scheme][1], spec.group_size if spec.scheme != "int8" else 0
    kernel, constants = compile_gemv(spec, arch, **({} if int8_x else dict(INT8_X=False, STEP=min(block_k, g or 64))))
    ops = sass_ops(kernel)
    weights_per_thread = constants["BLOCK_N"] * constants["BLOCK_K"] // (32 * kernel.metadata.num_warps)
    ptx = kernel.asm["ptx"]
    waits = ptx.find("griddepcontrol.wait")
    return {"kernel": "gemv", "weight_loads_before_wait": ptx[:waits].count("ld.global.v4.b32") if waits >= 0 else 0,
            "scheme": spec.scheme, "group_size": spec.group_size, "symmetric": spec.symmetric,
            "super_block": spec.super_block,
            "activations": "int8" if int8_x else "float",
            "instructions_per_weight": round(len(ops) / weights_per_thread, 2), **registers(kernel),
            "vector_loads_16B": ptx.count("ld.global.v4.b32"), "scalar_word_loads": ptx.count("ld.global.b32"),
            "top": collections.Counter(op.split(".")[0] for op in ops).most_common(6)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, 90 for Hopper")
    arch = p.parse_args().arch
    specs = [QuantSpec("int4", 32, False, super_block=256), QuantSpec("int4", 32, False), QuantSpec("int4", 32, True),
             QuantSpec("int4", 128, False), QuantSpec("int8")]
    wide = [QuantSpec("int5", 32, False, super_block=256), QuantSpec("int5", 32, True),
            QuantSpec("int6", 16, True, super_block=256)]
    for int8_x, schemes in ((True, specs + wide), (False, specs)):  # float activations: float32 models only
        for spec in schemes:
            print(json.dumps(report(spec, arch, int8_x)), flush=True)
    print(json.dumps(attention_report(arch)), flush=True)
    for name, kernel in compile_others(arch).items():
        ops = sass_ops(kernel)
        ptx = kernel.asm["ptx"]
        print(json.dumps({"kernel": name, "instructions": len(ops), "waits_for_previous": "griddepcontrol.wait" in ptx,
                          "vector_stores_16B": ptx.count("st.global.v4.b32")}), flush=True)


if __name__ == "__main__":
    main()
