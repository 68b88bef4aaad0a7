"""Triton kernels for the GPU: int4/int5/int6/int8 matmuls that read the packed weights once, dequantizing in
registers.

The canonical parts are repacked once at load into a layout of the kernels' own (`repack`): the weight
transposed to [K, N] and packed along K into int32 words (int4: 8 inputs a word, input 8i+j in bits 4j..4j+3
of word row i: the canonical bytes read as little-endian words; int8: 4 inputs a word), the group scales
(and mins) transposed to [K/G, N]; super-blocked int4 (the default int4, GGUF's Q4_K) as stored, 4.625 bits a
weight: its float16 factors [K/S, N] and a group's two 8-bit codes as one int16 [K/G, N], the group's scale
and min computed exactly in the kernel (`_group_scale`). int5 (GGUF's Q5_0, Q5_1, Q5_K) is int4's layouts
plus its fifth bits, an int32 word per 32 inputs a column [K/32, N]; int6 (Q6_K) int4's words plus its high
2 bits, a word per 16 inputs [K/16, N] (`_high_words`), its groups of 16 signed 8-bit codes [K/16, N] times
float16 factors [K/S, N]: each as stored, 5.5 to 6.5625 bits a weight. A warp then reads consecutive columns
of one word row: whole 128-byte lines, 16 bytes a thread.

Decode (`_gemv`, a few rows): every program takes BLOCK_N columns and only BLOCK_K inputs (one or a few
groups), so a 4096-wide layer is split into thousands of programs, which keep enough loads in flight to
read at the memory's speed; each adds its partial sums to a float32 workspace atomically, and the last of a
column tile writes the output. Its activations (bfloat16, a model's) are rounded to int8 in blocks of 32 as
the CPU kernels round theirs (and llama.cpp's), each program rounding its own inputs, and multiplied by the
weights' integers four at a time (PTX's dp4a): ~1.4 instructions a weight on sm_90, where dequantizing each
weight to float took ~5.4, more than an H200 can issue (132 SMs x 4 schedulers x 1.98 GHz, 32 threads
each, over its 4.8 TB/s of 5-bit weights: ~4.4 a weight). Float32 activations (the reference) take the
exact product: each value made float by OR-ing its bits into the mantissa of 2**23. The group scale
multiplies a whole group's sum, the min the group's sum of activations. The GEMV writes through `_write`, which
may add a residual (wo, w2) or, for w1/w3 repacked with their columns interleaved, write silu(gate) * up. Prefill
(more rows) dequantizes the weight to the activations' dtype (`_dequantize`: one pass over the weights, 2 bytes a
weight written) and multiplies by PyTorch's matmul (cuBLAS, on tensor cores, for any number of rows), its
activations first rounded to int8 as the GEMV rounds them (`round_to_int8_blocks`), so that a prompt's token and a
decoded one are computed alike. (Until session 37 a Triton GEMM of int8 tiles took prefill: a 128-token prompt's
first token after 73 ms on an H200, 32 layers, ~1% of its int8 tensor cores' peak. And the GEMV once also
RMS-normalized the sum it wrote, and rotated and cached a fused wq/wk/wv's output: on an H200, a 32-layer decode
step was ~7% faster with those as launches of their own.)

Besides: attention at decode (`DecodeAttention`, flash-decoding), and RMSNorm, RoPE, silu(gate) * up and the
cache's write as one launch each. On Hopper every kernel is launched with programmatic dependent launch
(`launch_options`).

Tested on the CPU under TRITON_INTERPRET=1 (tests/test_triton.py) and compiled offline for sm_90
(benchmarks/triton_codegen.py); speed on a GPU: benchmarks/gpu_bench.py.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .pack import QuantSpec, unpack_int5, unpack_int6

GEMV_MAX_ROWS = 8
DEQUANTIZED_BYTES = 128 << 20  # the most of a weight prefill holds dequantized at once (Mistral 7B's w1/w3: 235 MB)
# (BLOCK_N, BLOCK_K, num_warps) per scheme for the GEMV (benchmarks/gemv_sweep.py). On an H200, int4's 1 warp
# was fastest, 4 or 8 two to four times slower; (256, 128, 1) timed ~5% faster alone than (256, 64, 1), but a
# 32-layer decode step took the same time on it as on these, the fewest sm_90 instructions a weight (1.63
# against 1.84: each thread's x rounding shared by more columns). int5, int6, int8: not yet swept
TILES = {"int4": (512, 64, 1), "int5": (512, 64, 1), "int6": (512, 64, 1), "int8": (512, 64, 2)}
HIGH_BITS = {"int5": 1, "int6": 2}  # bits a weight above the low 4 (`_high_words`)
# float32 2**23: OR-ed into its low mantissa bits, a small integer reads as 2**23 + it. The kernels take it as an
# argument: in a register, the field's mask and this OR are one LOP3 instruction (two with both immediates)
MAGIC = 0x4B000000

@functools.cache
def _hopper(device: torch.device) -> bool:
    """Whether the device and this Triton launch kernels with programmatic dependent launch (sm_90+)."""
    from triton.backends.nvidia.compiler import CUDAOptions

    return torch.cuda.get_device_capability(device)[0] >= 9 and "launch_pdl" in CUDAOptions.__dataclass_fields__


def int8_activations(x: torch.Tensor) -> bool:
    """Whether the GEMV rounds x to int8 (`_int8_block_dot`): bfloat16 or float16 x. Float32 x (a float32
    model, the reference the kernels are tested against) takes the exact dequantized product."""
    return x.dtype != torch.float32


def _ptx(device: torch.device) -> bool:
    """Whether kernels on the device may use inline PTX (an NVIDIA GPU; not the interpreter's CPU tensors)."""
    return device.type == "cuda" and torch.version.hip is None


def launch_options(device: torch.device) -> dict:
    """Each kernel's PDL constant and launch options. On Hopper, a decode step's kernels are launched with
    programmatic dependent launch: a kernel's programs may start while the one before it runs (each lets the
    next start as it begins), read what no kernel writes (a GEMV's weights) and then wait for the one before
    to finish (`_wait_previous`): the small kernels between the GEMVs overlap the next GEMV's weight reads.
    LILMISTRAL_PDL=0 turns it off (to compare); so does torch.compile's tracing (inductor launches them)."""
    on = (device.type == "cuda" and os.environ.get("LILMISTRAL_PDL", "1") != "0" and _hopper(device)
          and not torch.compiler.is_compiling())
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def _let_next_start(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _wait_previous(PDL: tl.constexpr):
    """Every kernel launched with PDL waits here, in every program, before it reads what an earlier kernel
    wrote or writes what an earlier kernel reads: a kernel finishes only after the one before it."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def _unpack(words, shift, high, magic, BITS: tl.constexpr, ZERO: tl.constexpr):
    """The field at bit `shift` of each int32 word, with `high` OR-ed into it (int5's and int6's high bits from
    bit 4, or 0), as float32, exactly, less ZERO (the code that stands for 0: int4 8, int5 16, int6 32, or 0
    with a min; int8 128, its bytes read as offset binary)."""
    bits = ((words >> shift) & ((1 << BITS) - 1)) | high
    if BITS == 8:
        bits = bits ^ 0x80
    return (bits | magic).to(tl.float32, bitcast=True) - (8388608.0 + ZERO)


@triton.jit
def _load(pointer, mask, EVEN: tl.constexpr):
    """A masked load, unmasked where the tiles divide the matrix: no compare and predicate an element (20% of
    the GEMV's instructions)."""
    if EVEN:
        return tl.load(pointer)
    else:
        return tl.load(pointer, mask=mask, other=0)


@triton.jit
def _group_scale(s_ptr, c_ptr, k, offs_n, N, ok, G: tl.constexpr, SUPER: tl.constexpr, SHIFT: tl.constexpr,
                 EVEN: tl.constexpr):
    """float32 [BLOCK_N] (or k [R, 1]: [R, BLOCK_N]): the scale (or min) of the group holding input k, for
    columns offs_n: stored per group [K/G, N] or, SUPER-blocked, the super-block's float16 factor [K/SUPER, N]
    times the group's 8-bit code (bits SHIFT.. of c's int16 [K/G, N]: 0, the scale's; 8, the min's; int6's
    signed codes c int8 [K/G, N]), exactly."""
    if SUPER == 0:
        return _load(s_ptr + (k // G) * N + offs_n, ok, EVEN).to(tl.float32)
    factor = _load(s_ptr + (k // SUPER) * N + offs_n, ok, EVEN).to(tl.float32)
    code = _load(c_ptr + (k // G) * N + offs_n, ok, EVEN).to(tl.int32)
    if c_ptr.dtype.element_ty != tl.int8:
        code = (code >> SHIFT) & 0xFF
    return factor * code.to(tl.float32)


@triton.jit
def _high_position(i, HIGH: tl.constexpr):
    """The first bit of a high-bit word (`_high_words`: HIGH bits an input, 32 // HIGH inputs a word) that holds
    the word's input i: input 8r + 2t + p (word row r, its byte t of even (p = 0) or odd (p = 1) nibbles) at bit
    8t + HIGH * (2r + p), so that one shift and mask put a word row's even (or odd) high bits in its four bytes
    (`_with_high_bits`)."""
    return 8 * ((i % 8) // 2) + HIGH * (2 * (i // 8) + i % 2)


@triton.jit
def _with_high_bits(low, high, highs, r, HIGH: tl.constexpr):
    """A step's word rows r [ROWS, 1] of nibbles as bytes (low: even inputs, high: odd; `_int8_block_dot`) with
    their HIGH high bits (highs [ROWS, BLOCK_N]: each row's high-bit word) OR-ed in from bit 4: int5's or int6's
    values, a byte each."""
    at = _high_position((8 * r) % (32 // HIGH), HIGH)  # the row's even inputs' bits; its odd ones' HIGH further
    mask: tl.constexpr = ((1 << HIGH) - 1) * 0x01010101
    return low | (((highs >> at) & mask) << 4), high | (((highs >> (at + HIGH)) & mask) << 4)


@triton.jit
def _rotate(lo, hi, cos_ptr, sin_ptr, i, HALF: tl.constexpr):
    """Dimensions i and i + HALF of heads (lo, hi: [..., len(i)] in the activations' dtype) rotated by a
    position's cos, sin [2 * HALF], rounded where model.rope's operators round."""
    dt = lo.dtype
    c_lo, c_hi = tl.load(cos_ptr + i).to(tl.float32), tl.load(cos_ptr + HALF + i).to(tl.float32)
    s_lo, s_hi = tl.load(sin_ptr + i).to(tl.float32), tl.load(sin_ptr + HALF + i).to(tl.float32)
    lo_f, hi_f = lo.to(tl.float32), hi.to(tl.float32)
    out_lo = (lo_f * c_lo).to(dt).to(tl.float32) + (-hi_f * s_lo).to(dt).to(tl.float32)
    out_hi = (hi_f * c_hi).to(dt).to(tl.float32) + (lo_f * s_hi).to(dt).to(tl.float32)
    return out_lo.to(dt), out_hi.to(dt)


@triton.jit
def _silu_times(gate, up, dt):
    """silu(gate) * up from float32 values, rounded to dt where model.silu_mul's bfloat16 operators round."""
    g = gate.to(dt).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    return (silu * up.to(dt).to(tl.float32)).to(dt)


@triton.jit
def _write(out_ptr, res_ptr, row, col0, N, value, BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
           GATED: tl.constexpr):
    """value [BLOCK_N] (output row `row`, columns col0...) rounded to out's dtype and written, plus the residual
    there given one (rounded again: as PyTorch adds the product to it). GATED: value's columns are (gate, up)
    pairs, and silu(gate) * up goes to columns col0 / 2... of out [M, N / 2]."""
    dt = out_ptr.dtype.element_ty
    if GATED:
        gate, up = tl.split(tl.reshape(value, (BLOCK_N // 2, 2)))
        cols = col0 // 2 + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + row * (N // 2) + cols, _silu_times(gate, up, dt), mask=cols < N // 2)
    else:
        cols = col0 + tl.arange(0, BLOCK_N)
        ok = cols < N
        out = value.to(dt)
        if HAS_RESIDUAL:
            out = (out.to(tl.float32) + tl.load(res_ptr + row * N + cols, mask=ok, other=0.0).to(tl.float32)).to(dt)
        tl.store(out_ptr + row * N + cols, out, mask=ok)


@triton.jit
def _float_dot(x_row, words, highs, k, K, BITS: tl.constexpr, ZERO: tl.constexpr, HIGH: tl.constexpr,
               EVEN: tl.constexpr, magic):
    """The words' [ROWS, BLOCK_N] values times x_row's inputs from k: the [ROWS, BLOCK_N] float32 products
    summed over each word, exactly (the values made float by OR-ing them into 2**23's mantissa). HIGH (int5: 1,
    int6: 2): each word row's high bits in highs [ROWS, BLOCK_N] (its high-bit word)."""
    PER_WORD: tl.constexpr = 32 // BITS
    ROWS: tl.constexpr = words.shape[0]
    r = tl.arange(0, ROWS)
    if BITS == 8:
        words = words ^ -2139062144  # 0x80808080: each byte in offset binary
    high = words >> 16  # the upper fields, moved clear of the exponent's bits
    dot = tl.zeros(words.shape, dtype=tl.float32)
    for j in tl.static_range(PER_WORD):
        # field j masked in place, under 2**23's exponent: 2**23 + q * 2**(BITS * pos); x scaled to match
        if (j + 1) * BITS <= 20:
            src, pos = words, j
        else:
            src, pos = high, j - 16 // BITS
        field = src & (((1 << BITS) - 1) << (BITS * pos))
        if HIGH > 0:  # from bit 4 of the field, at most to bit 21: within the mantissa
            at = _high_position((k + r * PER_WORD + j) % (32 // HIGH), HIGH)
            field |= ((highs >> at[:, None]) & ((1 << HIGH) - 1)) << (BITS * pos + 4)
        value = (field | magic).to(tl.float32, bitcast=True) - (8388608.0 + ZERO * (1 << (BITS * pos)))
        kj = k + r * PER_WORD + j  # input j of each word row
        xj = _load(x_row + kj, kj < K, EVEN).to(tl.float32) / (1 << (BITS * pos))
        dot += value * xj[:, None]
    return dot


@triton.jit
def _int8_block_dot(x_row, words, highs, k, K, BITS: tl.constexpr, HIGH: tl.constexpr, EVEN: tl.constexpr,
                    PTX: tl.constexpr):
    """x_row's inputs [k, k + 32) rounded to int8 steps of their largest magnitude / 127, as the CPU kernels
    round activations, times the words' [ROWS = 32 // (32 // BITS), BLOCK_N] stored integers (int4: unsigned,
    its zero not taken off; int8: signed; HIGH > 0: int5's or int6's high bits OR-ed in, highs [ROWS, BLOCK_N]
    each row's high-bit word) by integer dot products: (each word row's sums [ROWS, BLOCK_N] int32, each word
    row's sum of int8s [ROWS], the step). Four products an instruction (`_dot4`)."""
    PER_WORD: tl.constexpr = 32 // BITS
    ROWS: tl.constexpr = words.shape[0]
    kk = k + tl.arange(0, ROWS)[:, None] * PER_WORD + tl.arange(0, PER_WORD)[None, :]  # [ROWS, PER_WORD]
    q, _, step = _round_int8(tl.reshape(_load(x_row + kk, kk < K, EVEN).to(tl.float32), [1, 32]))
    q = tl.reshape(q, [ROWS, PER_WORD])
    shifts = 8 * tl.arange(0, 4)[None, :]
    if BITS == 4:  # a word's nibbles 0, 2, 4, 6 (and 1, 3, 5, 7) as bytes; x's words of the same inputs
        low, high = words & 0x0F0F0F0F, (words >> 4) & 0x0F0F0F0F
        if HIGH > 0:
            low, high = _with_high_bits(low, high, highs, tl.arange(0, ROWS)[:, None], HIGH)
        even, odd = tl.split(tl.reshape(q & 0xFF, [ROWS, 4, 2]))
        dot = _dot4(low, tl.sum(even << shifts, axis=1)[:, None], tl.zeros_like(words), False, PTX)
        dot = _dot4(high, tl.sum(odd << shifts, axis=1)[:, None], dot, False, PTX)
    else:
        dot = _dot4(words, tl.sum((q & 0xFF) << shifts, axis=1)[:, None], tl.zeros_like(words), True, PTX)
    return dot, tl.sum(q, axis=1), tl.sum(step, axis=0)


@triton.jit
def _round_int8(x):
    """x float32 [R, 32] with each row rounded to int8 steps of its largest magnitude / 127, to
    nearest, ties to even, as the CPU kernels round activations: (the int8s as int32, their sums [R], the
    steps [R])."""
    step = tl.max(tl.abs(x), axis=1) / 127
    inverse = tl.where(step > 0, 1 / tl.where(step > 0, step, 1.0), 0.0)  # no division by 0
    # 1.5 * 2**23 + round(x / step): the integer in the low bits of its float's
    q = (x * inverse[:, None] + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
    return q, tl.sum(q, axis=1), step


@triton.jit
def _dot4(a, b, c, SIGNED: tl.constexpr, PTX: tl.constexpr):
    """c + the products of a's four bytes (signed with SIGNED, else unsigned) and b's (signed), summed: PTX's
    dp4a, one instruction; emulated where there is no PTX (the interpreter, other GPUs)."""
    if PTX:
        if SIGNED:
            c = tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                          is_pure=True, pack=1)
        else:
            c = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                          is_pure=True, pack=1)
    else:
        for i in tl.static_range(4):
            if SIGNED:
                byte = (a << (24 - 8 * i)) >> 24
            else:
                byte = (a >> (8 * i)) & 0xFF
            c += byte * ((b << (24 - 8 * i)) >> 24)
    return c


@triton.jit
def _gemv(x_ptr, q_ptr, s_ptr, m_ptr, c_ptr, h_ptr, out_ptr, res_ptr, sums_ptr, count_ptr, e_ptr, N, K, magic,
          BITS: tl.constexpr, G: tl.constexpr, HAS_MIN: tl.constexpr, ZERO: tl.constexpr, SUPER: tl.constexpr,
          HIGH: tl.constexpr, STEP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
          EVEN: tl.constexpr, HAS_EXPERTS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GATED: tl.constexpr,
          PDL: tl.constexpr, INT8_X: tl.constexpr, PTX: tl.constexpr):
    """out[row, n] = x[row, k] * w[k, n] (+ res[row, n]; or gated: `_write`), this program's part over BLOCK_K
    inputs in steps of STEP inputs (a group, or a part of one: G == 0 is int8's one scale a column; SUPER:
    super-blocked scales and mins, `_group_scale`; HIGH: int5's or int6's high bits, h [K / (32 / HIGH), N],
    `_high_words`; G 16: int6's two groups a block of activations). INT8_X:
    x's blocks of 32 rounded to int8 (as the CPU kernels' activations) and multiplied by integer dot products
    (`_int8_block_dot`, STEP 32); else (float32 x) the exact dequantized product (`_float_dot`). SPLIT
    programs along K add their parts to float32 sums (`_workspace`); the last of a column tile to finish, told
    by a counter, writes the output in its dtype and leaves sums and counter at zero for the next call: no
    zeroing, casting or adding launch a call. With PDL, the first step's weights are read before waiting for
    the kernel before."""
    _let_next_start(PDL)
    PER_WORD: tl.constexpr = 32 // BITS
    ROWS: tl.constexpr = STEP // PER_WORD  # word rows a step
    pid_n, pid_k, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    word_rows_k = tl.cdiv(K, PER_WORD)
    if HAS_EXPERTS:  # the row's expert's weight, the experts' parts stacked [E, ...]
        _wait_previous(PDL)  # the experts were chosen by an earlier kernel
        expert = tl.load(e_ptr + row).to(tl.int64)
        q_ptr += expert * word_rows_k * N
        if HIGH > 0:
            h_ptr += expert * (K // (32 // HIGH)) * N
        meta = expert * N  # int8: one scale a column
        if SUPER > 0:
            c_ptr += meta * (K // G)
            meta *= K // SUPER
        elif G > 0:
            meta *= K // G
        s_ptr += meta
        m_ptr += meta
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    r = tl.arange(0, ROWS)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_min = tl.zeros([BLOCK_N], dtype=tl.float32)
    for step in tl.static_range(0, BLOCK_K, STEP):
        k = pid_k * BLOCK_K + step  # the step's first input
        word_rows = k // PER_WORD + r
        w_ok = (word_rows < word_rows_k)[:, None] & n_ok[None, :]
        words = _load(q_ptr + word_rows[:, None] * N + offs_n[None, :], w_ok, EVEN)  # [ROWS, BLOCK_N]
        if step == 0 and not HAS_EXPERTS:
            _wait_previous(PDL)  # x, and the workspace an earlier GEMV may still be finishing with
        if G > 0:
            g_ok = n_ok & (k + 0 * offs_n < K)  # a tensor: the interpreter takes no scalar mask
            scale = _group_scale(s_ptr, c_ptr, k, offs_n, N, g_ok, G, SUPER, 0, EVEN)
        if INT8_X:  # STEP is 32: one block of activations
            highs = 0
            if HIGH == 1:  # int5: the block's one word of fifth bits, for every word row
                highs = _load(h_ptr + (k // 32) * N + offs_n, g_ok, EVEN)[None, :]
            elif HIGH == 2:  # int6: two words of high bits, word rows 0-1's and 2-3's
                first = _load(h_ptr + (k // 16) * N + offs_n, g_ok, EVEN)[None, :]
                highs = tl.where(r[:, None] < 2, first, _load(h_ptr + (k // 16 + 1) * N + offs_n, g_ok, EVEN)[None, :])
            dots, x_sums, x_step = _int8_block_dot(x_ptr + row * K, words, highs, k, K, BITS, HIGH, EVEN, PTX)
            dot, x_sum = tl.sum(dots, axis=0), tl.sum(x_sums, axis=0)
            if G == 0:
                acc += dot.to(tl.float32) * x_step
            elif G == 16:  # int6 (symmetric): the block's two groups, word rows 0-1 and 2-3, each its own scale
                first_dot = tl.sum(tl.where(r[:, None] < 2, dots, 0), axis=0)
                first_sum = tl.sum(tl.where(r < 2, x_sums, 0), axis=0)
                second = _group_scale(s_ptr, c_ptr, k + 16, offs_n, N, g_ok, G, SUPER, 0, EVEN)
                acc += ((first_dot - ZERO * first_sum).to(tl.float32) * scale
                        + (dot - first_dot - ZERO * (x_sum - first_sum)).to(tl.float32) * second) * x_step
            else:
                acc += (dot - ZERO * x_sum).to(tl.float32) * (scale * x_step)
                if HAS_MIN:
                    acc_min += _group_scale(m_ptr, c_ptr, k, offs_n, N, g_ok, G, SUPER, 8, EVEN) * (
                        x_sum.to(tl.float32) * x_step)
        else:
            highs = 0
            if HIGH > 0:  # each word row's high-bit word
                highs = _load(h_ptr + (word_rows // (4 // HIGH))[:, None] * N + offs_n[None, :], w_ok, EVEN)
            dot = _float_dot(x_ptr + row * K, words, highs, k, K, BITS, ZERO, HIGH, EVEN, magic)
            if G == 0:
                acc += tl.sum(dot, axis=0)
            else:
                acc += tl.sum(dot * scale[None, :], axis=0)
                if HAS_MIN:
                    ks = k + tl.arange(0, STEP)
                    x_sum = tl.sum(_load(x_ptr + row * K + ks, ks < K, EVEN).to(tl.float32), axis=0)
                    acc_min += _group_scale(m_ptr, c_ptr, k, offs_n, N, g_ok, G, SUPER, 8, EVEN) * x_sum
    out = acc + acc_min
    if G == 0:
        out *= tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if SPLIT == 1:
        _write(out_ptr, res_ptr, row, pid_n * BLOCK_N, N, out, BLOCK_N, HAS_RESIDUAL, GATED)
    else:
        tl.atomic_add(sums_ptr + row * N + offs_n, out, mask=n_ok, sem="relaxed")
        tl.debug_barrier()  # every thread's sums added before the counter's release (CUDA's threadFenceReduction)
        tile = count_ptr + row * tl.num_programs(0) + pid_n
        if tl.atomic_add(tile, 1, sem="acq_rel") == SPLIT - 1:  # the tile's last program: its sums are complete
            tl.debug_barrier()
            total = tl.load(sums_ptr + row * N + offs_n, mask=n_ok, other=0.0, cache_modifier=".cg")
            _write(out_ptr, res_ptr, row, pid_n * BLOCK_N, N, total, BLOCK_N, HAS_RESIDUAL, GATED)
            # every warp has read the sums before any zeroes them: a tile narrower than the program's threads
            # holds each column in several warps, and one zeroing early could leave another reading zeros
            tl.debug_barrier()
            tl.store(sums_ptr + row * N + offs_n, tl.zeros_like(total), mask=n_ok)
            tl.atomic_xchg(tile, 0)


@triton.jit
def _dequantize(q_ptr, s_ptr, m_ptr, c_ptr, h_ptr, out_ptr, N, WIDTH, K, magic, BITS: tl.constexpr,
                G: tl.constexpr, HAS_MIN: tl.constexpr, ZERO: tl.constexpr, SUPER: tl.constexpr, HIGH: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """WIDTH columns of the weight (the parts' pointers at the first; rows of N) as out [K, WIDTH] in out's
    dtype, each value (`_unpack`) times its group's scale plus its min (`_group_scale`; int8: times its
    column's scale): what prefill's matmul multiplies."""
    _let_next_start(PDL)
    PER_WORD: tl.constexpr = 32 // BITS
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)[:, None]
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    ok = (k < K) & (n < WIDTH)
    words = tl.load(q_ptr + (k // PER_WORD) * N + n, mask=ok, other=0)
    high = 0
    if HIGH > 0:  # int5's or int6's high bits (`_high_words`: a word a column every 32 // HIGH inputs) from bit 4
        highs = tl.load(h_ptr + (k // (32 // HIGH)) * N + n, mask=ok, other=0)
        high = ((highs >> _high_position(k % (32 // HIGH), HIGH)) & ((1 << HIGH) - 1)) << 4
    w = _unpack(words, (k % PER_WORD) * BITS, high, magic, BITS, ZERO)
    if G > 0:
        group, group_ok = k, ok
        if G >= BLOCK_K:  # the tile's rows in one group: a scale (and min) a column
            group, group_ok = tl.program_id(0) * BLOCK_K, n < WIDTH
        w = w * _group_scale(s_ptr, c_ptr, group, n, N, group_ok, G, SUPER, 0, False)
        if HAS_MIN:
            w += _group_scale(m_ptr, c_ptr, group, n, N, group_ok, G, SUPER, 8, False)
    else:
        w = w * tl.load(s_ptr + n, mask=n < WIDTH, other=0.0).to(tl.float32)
    _wait_previous(PDL)  # out may be memory that the kernel before still reads
    tl.store(out_ptr + k * WIDTH + n, w.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _round_blocks(x_ptr, out_ptr, K, BLOCKS: tl.constexpr, PDL: tl.constexpr):
    """A row's BLOCKS blocks of 32 inputs rounded to int8 as the GEMV rounds them (`_round_int8`), written as
    the int8s times their step in x's dtype."""
    _let_next_start(PDL)
    _wait_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCKS * 32 + tl.arange(0, BLOCKS)[:, None] * 32 + tl.arange(0, 32)[None, :]
    x = tl.load(x_ptr + row * K + k, mask=k < K, other=0.0).to(tl.float32)
    q, _, step = _round_int8(x)
    tl.store(out_ptr + row * K + k, (q.to(tl.float32) * step[:, None]).to(out_ptr.dtype.element_ty), mask=k < K)


def round_to_int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] with each row's blocks of 32 rounded to int8 steps of their largest magnitude / 127, to nearest,
    ties to even, as the GEMV rounds them, in x's dtype."""
    out = torch.empty_like(x)
    _round_blocks[(x.shape[0], triton.cdiv(x.shape[1], 512))](x, out, x.shape[1], BLOCKS=16,
                                                              **launch_options(x.device))
    return out


_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 sums and int32 counters for the GEMVs, at least `size` of each, zeros between calls: the newest
    pair on the device, shared by the kernels made while it is large enough (calls on one stream run one
    after another). Each kernel keeps the pair it got, so a CUDA graph's addresses stay valid."""
    sums, counts = _WORKSPACES.get(device, (None, None))
    if sums is None or sums.numel() < size:
        sums = torch.zeros(size, dtype=torch.float32, device=device)
        counts = torch.zeros(size, dtype=torch.int32, device=device)
        _WORKSPACES[device] = sums, counts
    return sums, counts


def _words(q: torch.Tensor) -> torch.Tensor:
    """Canonical bytes [N, bytes] -> int32 [words, N]: each row's bytes as little-endian words (zero-padded to
    whole words), transposed."""
    pad = -q.shape[1] % 4
    q = F.pad(q, (0, pad)) if pad else q.contiguous()
    if q.storage_offset() % 4:  # a view of int32 words must start on one
        q = q.clone()
    return q.view(torch.int32).t().contiguous()


def _high_words(parts: dict[str, torch.Tensor], high: int) -> torch.Tensor:
    """int5's (high = 1) or int6's (2) canonical parts -> their values' high bits as int32 [K / span, N]: a word
    per span = 32 / high inputs a column, input 8r + 2t + p of a word's span at bits 8t + high * (2r + p)..
    (`_high_position`)."""
    values = (unpack_int5(parts) if high == 1 else unpack_int6(parts)) >> 4  # uint8 [N, K]
    n, span = values.shape[0], 32 // high
    order = values.reshape(n, -1, 4 // high, 4, 2).transpose(2, 3).reshape(n, -1, span)  # (r, t, p) -> (t, r, p)
    words = torch.zeros(order.shape[:2], dtype=torch.int32, device=values.device)
    for i in range(span):  # bits 31 (and 30) wrap into the sign, as the kernel reads them
        words |= order[..., i].to(torch.int32) << (high * i)
    return words.t().contiguous()


def repack(parts: dict[str, torch.Tensor | list[torch.Tensor]], spec: QuantSpec,
           interleave: bool = False) -> dict[str, torch.Tensor]:
    """The kernels' layout (module docstring) of an [N, K] weight's canonical parts, each part a tensor or a
    fused projection's blocks of rows (their columns side by side; `interleave`: two blocks' columns
    alternating, for the gated kernel): q int32 [words, N], scales [K/G, N] (int8: [N]) and, with a min,
    mins [K/G, N]; super-blocked, scales and mins the factors [K/S, N] and codes int16 [K/G, N], a group's
    scale code in the low byte and min code in the high one (int6: its factors [K/S, N] and signed codes int8
    [K/16, N]); int5's and int6's high bits high int32 [K / (32 / bits), N] (`_high_words`)."""
    def join(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(tensors, dim=-1).flatten(-2) if interleave else torch.cat(tensors, dim=-1)

    blocks = {name: part if isinstance(part, list) else [part] for name, part in parts.items()}
    out = {"q": join([_words(b) for b in blocks["qweight"]])}
    if "qhigh" in blocks:
        high = HIGH_BITS[spec.scheme]
        out["high"] = join([_high_words({"qweight": q, "qhigh": h}, high)
                            for q, h in zip(blocks["qweight"], blocks["qhigh"])])
    if spec.scheme == "int6":
        out["codes"] = join([codes.t() for codes in blocks["scales"]]).contiguous()
        blocks = {"scales": blocks["super_scales"]}
    elif spec.super_block:
        pairs = [torch.stack(pair, dim=-1).view(torch.int16)[..., 0] for pair in zip(blocks["scales"], blocks["mins"])]
        out["codes"] = join([pair.t() for pair in pairs]).contiguous()
        blocks = {"scales": blocks["super_scales"], "mins": blocks["super_mins"]}
    transpose = spec.scheme != "int8"  # int8's scales are one a column already
    for name in ("scales", "mins"):
        if name in blocks:
            out[name] = join([b.t() if transpose else b for b in blocks[name]]).contiguous()
    return out


class TritonKernel:
    """QuantLinear's math on a CUDA device (or on CPU tensors under TRITON_INTERPRET=1), on its own copy of the
    weight in the kernels' layout (`repack`): the loader lets go of the canonical parts."""

    repacked = True

    def __init__(self, parts: dict, spec: QuantSpec, block_n: int | None = None, block_k: int | None = None,
                 num_warps: int | None = None, interleave: bool = False) -> None:
        self.parts, self.spec = repack(parts, spec, interleave), spec
        q = parts["qweight"]
        self.n = self.parts["q"].shape[1]
        grouped = spec.scheme != "int8"  # int4, int5 and int6: 4-bit words (and high bits), groups
        self.k = (q[0] if isinstance(q, list) else q).shape[1] * (2 if grouped else 1)
        default_n, default_k, default_warps = TILES[spec.scheme]
        self.block_n, self.block_k = block_n or default_n, block_k or default_k
        self.num_warps = num_warps or default_warps
        if self.block_k % 32:  # a GEMV step of int8 activations is one block of 32
            raise ValueError(f"block_k {self.block_k} is not a multiple of 32")
        g = spec.group_size if grouped else 0
        bits = 4 if grouped else 8
        zero = 128 if bits == 8 else 0 if "mins" in self.parts else spec.levels // 2  # int6: 32
        # a GEMV step of float activations is a group (or a part of one); int8's, at most 64 inputs: more would
        # cost registers. Of int8 activations, one block of 32
        self.float_step = min(self.block_k, g or 64)
        self.constants = dict(BITS=bits, G=g, HAS_MIN="mins" in self.parts, ZERO=zero, SUPER=spec.super_block,
                              HIGH=HIGH_BITS.get(spec.scheme, 0))
        self.workspace = _workspace(self.device, GEMV_MAX_ROWS * self.n)
        self.gemv_constants = dict(self.constants, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
                                   SPLIT=triton.cdiv(self.k, self.block_k), num_warps=self.num_warps,
                                   EVEN=self.k % self.block_k == 0 and self.n % self.block_n == 0)

    @property
    def device(self) -> torch.device:
        return self.parts["q"].device

    def _pointers(self) -> tuple[torch.Tensor, ...]:
        p = self.parts
        unread = p["scales"]  # where the layout has no such part
        return p["q"], p["scales"], p.get("mins", unread), p.get("codes", unread), p.get("high", unread)

    def gemv(self, x: torch.Tensor, expert: torch.Tensor | None = None, residual: torch.Tensor | None = None,
             gated: bool = False) -> torch.Tensor:
        """x [M, K] with M <= GEMV_MAX_ROWS -> [M, N] in x's dtype (plus residual [M, N], given one; gated:
        `gated`). With expert [M] (the parts stacked [E, ...]: ExpertsKernel), row m times expert[m]'s weight."""
        m = x.shape[0]
        out = torch.empty((m, self.n // 2 if gated else self.n), dtype=x.dtype, device=x.device)
        sums, counts = self.workspace
        grid = (triton.cdiv(self.n, self.block_n), triton.cdiv(self.k, self.block_k), m)
        e = expert if expert is not None else out  # unread without experts
        res = residual if residual is not None else out  # unread without a residual
        int8_x = int8_activations(x)
        _gemv[grid](x, *self._pointers(), out, res, sums, counts, e, self.n, self.k, MAGIC,
                    HAS_EXPERTS=expert is not None, HAS_RESIDUAL=residual is not None, GATED=gated,
                    INT8_X=int8_x, STEP=32 if int8_x else self.float_step, PTX=_ptx(x.device),
                    **self.gemv_constants, **launch_options(x.device))
        return out

    def gemm(self, x: torch.Tensor, residual: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
        """x [M, K] -> [M, N] in x's dtype (plus residual [M, N], given one; gated: `gated`), for any M
        (prefill): PyTorch's matmul (cuBLAS) of x and the weight dequantized to x's dtype, at most
        DEQUANTIZED_BYTES of it at a time, x's blocks of 32 first rounded to int8 as the GEMV rounds them
        (bfloat16 x): a prompt's token and a decoded one are computed alike, up to the dequantized weights'
        rounding to x's dtype."""
        x = round_to_int8_blocks(x) if int8_activations(x) else x
        width = max(128, DEQUANTIZED_BYTES // (self.k * x.element_size()) // 128 * 128)  # even: gated pairs
        products = []
        for first in range(0, self.n, width):
            product = x @ self.dequantized(first, min(width, self.n - first), x.dtype)
            products.append(F.silu(product[:, 0::2]) * product[:, 1::2] if gated else product)
        out = products[0] if len(products) == 1 else torch.cat(products, dim=1)
        return out.add_(residual) if residual is not None else out

    def dequantized(self, first: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """Columns first..first + cols of the weight, dequantized to dtype as [K, cols] (`_dequantize`)."""
        w = torch.empty((self.k, cols), dtype=dtype, device=self.device)
        _dequantize[(triton.cdiv(self.k, 32), triton.cdiv(cols, 128))](
            *(part[..., first:] for part in self._pointers()), w, self.n, cols, self.k, MAGIC, BLOCK_K=32,
            BLOCK_N=128, num_warps=4, **self.constants, **launch_options(self.device))
        return w

    adds_residual = True  # QuantLinear passes its residual: added as the output is written

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self._rows(x, residual=residual)

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up [..., N/2] where the weight's columns are (gate, up) pairs (repacked interleaved: w1's
        and w3's), computed as the output is written: FeedForward.gated."""
        return self._rows(x, gated=True)

    def _rows(self, x: torch.Tensor, **options) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        if options.get("residual") is not None:
            options["residual"] = options["residual"].reshape(-1, self.n).contiguous()
        out = (self.gemv if rows.shape[0] <= GEMV_MAX_ROWS else self.gemm)(rows, **options)
        return out.reshape(*x.shape[:-1], out.shape[-1])


class ExpertsKernel(TritonKernel):
    """One projection of a mixture of experts over every expert's repacked parts stacked [E, ...]: a decode
    step's (token, expert) rows in one launch, each program reading its row's expert (the fused MoE GEMV).
    The experts' own kernels become views of the stack (no second copy)."""

    def __init__(self, kernels: list[TritonKernel]) -> None:
        first = kernels[0]
        vars(self).update(vars(first))  # tiles, constants, n, k: the experts' shapes are alike
        self.parts = {name: torch.stack([kernel.parts[name] for kernel in kernels]) for name in first.parts}
        for i, kernel in enumerate(kernels):
            kernel.parts = {name: stack[i] for name, stack in self.parts.items()}

    def __call__(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        return self.gemv(x.contiguous(), expert.contiguous())


# Attention at decode: a few query rows a kv head against the cache (flash-decoding). Each program takes one kv
# head's rows over a chunk of the slots, with an online softmax; the chunks' partial results (running max,
# sum, unnormalised output) go to a float32 workspace, and the head's last program to finish (a counter, as
# the GEMV's) combines them: one launch where PyTorch's SDPA with a mask takes several, and every SM busy
# (SDPA parallelises over heads and query rows only: 8 programs for Mistral-7B's decode step).
ATTENTION_MAX_ROWS = 16  # query rows a kv head (H/K at decode); more (prefill): PyTorch's SDPA
ATTENTION_BLOCK = 64  # slots an iteration
ATTENTION_MAX_SPLITS = 64  # chunks a kv head
ATTENTION_PROGRAMS = 256  # the programs a call aims at (two per SM of an H100)


@triton.jit
def _attention(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_ptr, stat_ptr, count_ptr, R, S, chunk,
               stride_kh, stride_ks, stride_vh, stride_vs, stride_mr, scale,
               HD: tl.constexpr, R_P: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr,
               PDL: tl.constexpr):
    """out[h, r] = softmax(q[h, r] . keys[h, s] * scale over the slots s where mask[r, s]) . values[h, s], for
    q, out [K, R, hd] and keys, values [K, S, hd] (slots strided); scale in log2 units (exp2)."""
    _let_next_start(PDL)
    _wait_previous(PDL)
    h, split, splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    rows, d = tl.arange(0, R_P), tl.arange(0, HD)
    r_ok = rows < R
    q = tl.load(q_ptr + (h * R + rows[:, None]) * HD + d[None, :], mask=r_ok[:, None], other=0.0)
    m = tl.full([R_P], float("-inf"), tl.float32)
    l = tl.zeros([R_P], dtype=tl.float32)
    acc = tl.zeros([R_P, HD], dtype=tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, S)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < end
        keys = tl.load(k_ptr + h * stride_kh + s[:, None] * stride_ks + d[None, :], mask=s_ok[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(keys)) * scale  # [R_P, BLOCK_S]
        ok = r_ok[:, None] & s_ok[None, :]
        if HAS_MASK:
            ok &= tl.load(mask_ptr + rows[:, None] * stride_mr + s[None, :], mask=ok, other=0) != 0
        scores = tl.where(ok, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing to attend to yet: no NaN
        p = tl.exp2(scores - base[:, None])
        alpha = tl.exp2(m - base)
        values = tl.load(v_ptr + h * stride_vh + s[:, None] * stride_vs + d[None, :], mask=s_ok[:, None], other=0.0)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values)
        m = m_new
    out = out_ptr + (h * R + rows[:, None]) * HD + d[None, :]
    if splits == 1:
        tl.store(out, (acc / tl.where(l > 0, l, 1.0)[:, None]).to(out_ptr.dtype.element_ty), mask=r_ok[:, None])
    else:
        slot = (h * splits + split) * R_P + rows
        tl.store(part_ptr + slot[:, None] * HD + d[None, :], acc)
        tl.store(stat_ptr + 2 * slot, m)
        tl.store(stat_ptr + 2 * slot + 1, l)
        tl.debug_barrier()  # every thread's partials stored before the counter's release
        if tl.atomic_add(count_ptr + h, 1, sem="acq_rel") == splits - 1:  # the head's last program: combine
            tl.debug_barrier()
            m_all = tl.full([R_P], float("-inf"), tl.float32)
            l_all = tl.zeros([R_P], dtype=tl.float32)
            acc_all = tl.zeros([R_P, HD], dtype=tl.float32)
            for i in range(0, splits):
                slot = (h * splits + i) * R_P + rows
                m_i = tl.load(stat_ptr + 2 * slot, cache_modifier=".cg")
                l_i = tl.load(stat_ptr + 2 * slot + 1, cache_modifier=".cg")
                acc_i = tl.load(part_ptr + slot[:, None] * HD + d[None, :], cache_modifier=".cg")
                m_new = tl.maximum(m_all, m_i)
                base = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha, beta = tl.exp2(m_all - base), tl.exp2(m_i - base)
                l_all = l_all * alpha + l_i * beta
                acc_all = acc_all * alpha[:, None] + acc_i * beta[:, None]
                m_all = m_new
            tl.store(out, (acc_all / tl.where(l_all > 0, l_all, 1.0)[:, None]).to(out_ptr.dtype.element_ty),
                     mask=r_ok[:, None])
            tl.atomic_xchg(count_ptr + h, 0)


def attention_chunks(slots: int, n_kv: int) -> tuple[int, int]:
    """How many chunks the decode attention splits a kv head's slots into, and their size (whole blocks)."""
    splits = max(1, min(ATTENTION_MAX_SPLITS, ATTENTION_PROGRAMS // n_kv, triton.cdiv(slots, ATTENTION_BLOCK)))
    chunk = triton.cdiv(triton.cdiv(slots, splits), ATTENTION_BLOCK) * ATTENTION_BLOCK
    return triton.cdiv(slots, chunk), chunk


class DecodeAttention:
    """model.sdpa's slot on a GPU: the Triton kernel above for up to ATTENTION_MAX_ROWS query rows a kv head
    (decode), PyTorch's SDPA for more (prefill). A row with no slot to attend to gives zeros (as the CPU's
    attention.cpp). Its workspace grows with the calls' shapes; the ones it outgrew stay allocated, since a
    captured CUDA graph may still use them."""

    def __init__(self, composite) -> None:
        self.composite = composite
        self.workspaces: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def _workspace(self, device: torch.device, rows: int, hd: int):
        """Partial outputs, running maxima and sums, and counters for `rows` (kv heads x padded query rows)."""
        held = self.workspaces.setdefault(device, [])
        size = rows * ATTENTION_MAX_SPLITS
        if not held or held[-1][0].numel() < size * hd or held[-1][2].numel() < rows:
            held.append((torch.empty(size * hd, dtype=torch.float32, device=device),
                         torch.empty(size * 2, dtype=torch.float32, device=device),
                         torch.zeros(rows, dtype=torch.int32, device=device)))
        return held[-1]

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        n_kv, rows, hd = q.shape
        if rows > ATTENTION_MAX_ROWS:
            return self.composite(q, keys, values, mask)
        s = keys.shape[1]
        r_p = max(16, triton.next_power_of_2(rows))  # tl.dot's least tile
        splits, chunk = attention_chunks(s, n_kv)
        parts, stats, counts = self._workspace(q.device, n_kv * r_p, hd)
        q = q.contiguous()
        out = torch.empty_like(q)
        m = mask.contiguous().view(torch.uint8) if mask is not None else q  # unread without a mask
        stride_mr = m.stride(0) if mask is not None and mask.shape[0] > 1 else 0  # one row: every query's
        _attention[(n_kv, splits)](q, keys, values, m, out, parts, stats, counts, rows, s, chunk,
                                   keys.stride(0), keys.stride(1), values.stride(0), values.stride(1), stride_mr,
                                   hd ** -0.5 * 1.4426950408889634, HD=hd, R_P=r_p, BLOCK_S=ATTENTION_BLOCK,
                                   HAS_MASK=mask is not None, num_warps=4, **launch_options(q.device))
        return out


# RMSNorm, RoPE, silu(gate) * up and the cache's write for eager decoding on a GPU: one launch each where
# PyTorch's operators take two to six (a graphed step's nodes cost microseconds each). Each rounds to the
# activations' dtype where PyTorch's operators do (model.rms_norm, rope, silu_mul).

@triton.jit
def _rms_norm(x_ptr, w_ptr, out_ptr, D, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _let_next_start(PDL)
    _wait_previous(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=ok, other=0.0)
    xf = x.to(tl.float32)
    normed = (xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)).to(x.dtype)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + offs, (w * normed.to(tl.float32)).to(x.dtype), mask=ok)


@triton.jit
def _rope(x_ptr, cos_ptr, sin_ptr, out_ptr, T, stride_n, stride_t, HALF: tl.constexpr, PDL: tl.constexpr):
    """Row (n, t) of x [N, T, hd] rotated: dimensions i and i + hd/2 paired (model.rope)."""
    _let_next_start(PDL)
    _wait_previous(PDL)
    n, t = tl.program_id(0) // T, tl.program_id(0) % T
    i = tl.arange(0, HALF)
    src = x_ptr + n * stride_n + t * stride_t
    out_lo, out_hi = _rotate(tl.load(src + i), tl.load(src + HALF + i), cos_ptr + t * 2 * HALF, sin_ptr + t * 2 * HALF,
                             i, HALF)
    dst = out_ptr + tl.program_id(0) * 2 * HALF
    tl.store(dst + i, out_lo)
    tl.store(dst + HALF + i, out_hi)


@triton.jit
def _silu_mul(gate_ptr, up_ptr, out_ptr, H, stride_gate, stride_up, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _let_next_start(PDL)
    _wait_previous(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < H
    gate = tl.load(gate_ptr + row * stride_gate + offs, mask=ok, other=0.0)
    up = tl.load(up_ptr + row * stride_up + offs, mask=ok, other=0.0)
    tl.store(out_ptr + row * H + offs, _silu_times(gate.to(tl.float32), up.to(tl.float32), gate.dtype), mask=ok)


@triton.jit
def _store_kv(keys_ptr, values_ptr, slot_ptr, k_ptr, v_ptr, stride_cache_h, stride_cache_s, stride_kh, stride_vh,
              HD: tl.constexpr, PDL: tl.constexpr):
    """Head h's key and value into the slot: both in one launch (two index_copy_ calls)."""
    _let_next_start(PDL)
    _wait_previous(PDL)
    h, d = tl.program_id(0), tl.arange(0, HD)
    at = h * stride_cache_h + tl.load(slot_ptr) * stride_cache_s + d
    tl.store(keys_ptr + at, tl.load(k_ptr + h * stride_kh + d))
    tl.store(values_ptr + at, tl.load(v_ptr + h * stride_vh + d))


def store_kv(keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """model.store_kv: k, v [K, 1, hd] (heads strided) into slot [1] of keys, values [K, size, hd] (alike)."""
    n_kv, _, hd = k.shape
    _store_kv[(n_kv,)](keys, values, slot, k, v, keys.stride(0), keys.stride(1), k.stride(0), v.stride(0), HD=hd,
                       **launch_options(k.device))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty_like(rows)
    _rms_norm[(rows.shape[0],)](rows, weight, out, rows.shape[1], eps, BLOCK=triton.next_power_of_2(rows.shape[1]),
                                **launch_options(x.device))
    return out.view(x.shape)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, T, hd] (any strides but the last dimension's) rotated by cos, sin [T, hd]."""
    n, t, hd = x.shape
    out = torch.empty((n, t, hd), dtype=x.dtype, device=x.device)
    _rope[(n * t,)](x, cos.contiguous(), sin.contiguous(), out, t, x.stride(0), x.stride(1), HALF=hd // 2,
                    **launch_options(x.device))
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up [T, H] (rows of any stride: the halves of w1/w3's fused output)."""
    t, h = gate.shape
    out = torch.empty((t, h), dtype=gate.dtype, device=gate.device)
    _silu_mul[(t, triton.cdiv(h, 1024))](gate, up, out, h, gate.stride(0), up.stride(0), BLOCK=1024,
                                         **launch_options(gate.device))
    return out
