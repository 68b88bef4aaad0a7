// Decode (a few rows) int8 and int4 matrix-vector products with AVX-512 VNNI, as llama.cpp does them:
// activations are quantized to int8 in blocks of 32 and multiplied with the integer weights by integer dot
// products (vpdpbusd: unsigned 8-bit x signed 8-bit, four products per 32-bit lane). One step multiplies
// 64 inputs: lanes 0-7 of the 16-lane result belong to one block of 32, lanes 8-15 to the next.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int64_t BLOCK = 32;  // activations per int8 scale
constexpr int64_t STEP = 64;   // inputs per vpdpbusd

// Activations [M, K] as int8 blocks. Block b of row m is stored at slot slot_of[b] (the kernel's order).
struct QuantizedRows {
  at::Tensor q;      // int8 [M, K], by slot
  at::Tensor scale;  // float [M, K/32], by slot
  at::Tensor sum;    // float [M, K/32], by slot: the block's sum as quantized (scale times the sum of its int8s)
};

QuantizedRows quantize_rows(const at::Tensor& x, const int32_t* slot_of) {
  const int64_t M = x.size(0), K = x.size(1), blocks = K / BLOCK;
  QuantizedRows r{at::empty({M, K}, at::kChar), at::empty({M, blocks}, at::kFloat), at::empty({M, blocks}, at::kFloat)};
  const float* xp = x.data_ptr<float>();
  int8_t* qp = r.q.data_ptr<int8_t>();
  float* scale = r.scale.data_ptr<float>();
  float* sum = r.sum.data_ptr<float>();
  const __m512 sign_bit = _mm512_set1_ps(-0.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t slot = m * blocks + (slot_of ? slot_of[b] : b);
      const __m512 lo = _mm512_loadu_ps(xp + m * K + b * BLOCK), hi = _mm512_loadu_ps(xp + m * K + b * BLOCK + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign_bit, lo), _mm512_andnot_ps(sign_bit, hi)));
      const float d = amax / 127.f;
      const __m512 inv = _mm512_set1_ps(d > 0 ? 1.f / d : 0.f);
      const __m512i q_lo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), q_hi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qp + slot * BLOCK), _mm512_cvtsepi32_epi8(q_lo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qp + slot * BLOCK + 16), _mm512_cvtsepi32_epi8(q_hi));
      scale[slot] = d;
      sum[slot] = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q_lo, q_hi)));
    }
  }
  return r;
}

// Lanes 0-7 take v[2j], lanes 8-15 take v[2j + 1]: the scales of step j of a run of eight steps (16 blocks).
struct StepLanes {
  __m512i index[8];
  StepLanes() {
    for (int j = 0; j < 8; ++j)
      index[j] = _mm512_set_epi32(2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1,
                                  2 * j + 1, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j);
  }
  __m512 operator()(__m512 v, int64_t j) const { return _mm512_permutexvar_ps(index[j], v); }
};

inline __mmask16 first(int64_t count) { return count >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << count) - 1); }

at::Tensor float_rows(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.size(0) >= 1 && x.size(0) <= 8 && K % STEP == 0,
              "vnni: x must be [1 <= M <= 8, K], K a multiple of 64");
  return x.to(at::kFloat).contiguous();
}

// Calls kernel.template rows<M>(begin, end) with the row count M as a constant, so that the per-row
// accumulators live in registers, over slices of the N output columns.
template <typename Kernel>
void run(const Kernel& kernel, int64_t M, int64_t N) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    switch (M) {
      case 1: return kernel.template rows<1>(begin, end);
      case 2: return kernel.template rows<2>(begin, end);
      case 3: return kernel.template rows<3>(begin, end);
      case 4: return kernel.template rows<4>(begin, end);
      case 5: return kernel.template rows<5>(begin, end);
      case 6: return kernel.template rows<6>(begin, end);
      case 7: return kernel.template rows<7>(begin, end);
      default: return kernel.template rows<8>(begin, end);
    }
  });
}

// int8 weights [N, K], w = q * scale[n]. vpdpbusd wants one unsigned operand: |w| times x with w's sign
// moved onto x.
struct Int8Gemv {
  const int8_t* w; const float* scale; const int8_t* xq; const float* x_scale; float* out; int64_t N, K;
  StepLanes lanes;

  template <int M>
  void rows(int64_t begin, int64_t end) const {
    const int64_t blocks = K / BLOCK;
    for (int64_t n = begin; n < end; ++n) {
      __m512 acc[M][2];
      for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
      for (int64_t s = 0; s < K / STEP; ++s) {
        const __m512i v = _mm512_loadu_si512(w + n * K + s * STEP);
        const __mmask64 negative = _mm512_movepi8_mask(v);
        const __m512i magnitude = _mm512_abs_epi8(v);
        for (int m = 0; m < M; ++m) {
          const __m512i x = _mm512_loadu_si512(xq + m * K + s * STEP);
          const __m512i signed_x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
          const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), magnitude, signed_x);
          const __m512 xs = lanes(_mm512_loadu_ps(x_scale + m * blocks + (s / 8) * 16), s % 8);
          acc[m][s % 2] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), xs, acc[m][s % 2]);
        }
      }
      for (int m = 0; m < M; ++m) out[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) * scale[n];
    }
  }
};

// int4 weights in the kernel's layout (vnni.py: pack_int4_vnni): per 64 inputs 32 bytes, byte j holding
// input j (low nibble) and input 32 + j (high nibble), so that two 64-input runs load as one 64-byte
// register whose low nibbles are the blocks at slots 4i, 4i+1 and high nibbles those at 4i+2, 4i+3 (an odd
// last run loads alone). Scales and mins float16 [N, K/32] by slot. w = q * scale + min, or with no mins
// (symmetric) w = (q - 8) * scale: the sum over a block of min (or -8 * scale) times x is added once per
// block from the block's activation sum.
struct Int4Gemv {
  const uint8_t* w; const uint16_t* scale; const uint16_t* min; const int8_t* xq; const float* x_scale;
  const float* x_sum; float* out; int64_t N, K;
  StepLanes lanes;

  template <int M>
  void rows(int64_t begin, int64_t end) const {
    const int64_t blocks = K / BLOCK, steps = K / STEP;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* wn = w + n * K / 2;
      __m512 acc[M][2], offset[M];
      for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = offset[m] = _mm512_setzero_ps();
      for (int64_t first_step = 0; first_step < steps; first_step += 8) {  // 16 blocks at a time
        const int64_t slot = 2 * first_step, last_step = std::min(first_step + 8, steps);
        const __mmask16 valid = first(blocks - slot);
        const __m512 ws = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, scale + n * blocks + slot));
        const __m512 wo = min ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, min + n * blocks + slot)) : ws;
        __m512 step_scale[M];  // weight scale times activation scale, per block
        for (int m = 0; m < M; ++m) {
          step_scale[m] = _mm512_mul_ps(ws, _mm512_maskz_loadu_ps(valid, x_scale + m * blocks + slot));
          offset[m] = _mm512_fmadd_ps(wo, _mm512_maskz_loadu_ps(valid, x_sum + m * blocks + slot), offset[m]);
        }
        int64_t s = first_step;
        for (; s + 1 < last_step; s += 2) {
          const __m512i v = _mm512_loadu_si512(wn + s * STEP / 2);
          const __m512i low = _mm512_and_si512(v, nibble), high = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
          for (int m = 0; m < M; ++m) {
            const int8_t* x = xq + m * K + s * STEP;
            const __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), low, _mm512_loadu_si512(x));
            const __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), high, _mm512_loadu_si512(x + STEP));
            acc[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), lanes(step_scale[m], s - first_step), acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), lanes(step_scale[m], s + 1 - first_step), acc[m][1]);
          }
        }
        if (s < last_step) {  // the odd last run of 64 inputs
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wn + s * STEP / 2));
          const __m256i nib = _mm512_castsi512_si256(nibble);
          const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, nib)),
                                                  _mm256_and_si256(_mm256_srli_epi16(v, 4), nib), 1);
          for (int m = 0; m < M; ++m) {
            const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), both, _mm512_loadu_si512(xq + m * K + s * STEP));
            acc[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), lanes(step_scale[m], s - first_step), acc[m][0]);
          }
        }
      }
      const float offset_factor = min ? 1.f : -8.f;
      for (int m = 0; m < M; ++m)
        out[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) +
                         offset_factor * _mm512_reduce_add_ps(offset[m]);
    }
  }
};

// Sixteen floats to bfloat16, rounding to nearest even (as PyTorch does), without needing AVX-512 BF16.
inline __m256i to_bfloat16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

// The bfloat16 weight [N, K] of Int4Gemv's parts (for prefill, where a bfloat16 matmul beats any int4 kernel).
struct Int4Dequantize {
  const uint8_t* w; const uint16_t* scale; const uint16_t* min; uint16_t* out; int64_t K;

  // 32 nibbles (one block) at `nibbles` (16 bytes per __m128i half) -> 32 bfloat16 weights at `dst`.
  void block(__m128i lo16, __m128i hi16, float s, float m, uint16_t* dst) const {
    const __m512 scale_v = _mm512_set1_ps(s), offset = _mm512_set1_ps(m);
    const __m512 a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo16)), scale_v, offset);
    const __m512 b = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi16)), scale_v, offset);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), to_bfloat16(a));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16), to_bfloat16(b));
  }

  void rows(int64_t begin, int64_t end) const {
    const int64_t blocks = K / BLOCK;
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t run = 0; run < K / STEP; ++run) {  // 64 inputs: 32 bytes, block 2 * run low, 2 * run + 1 high
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * K / 2 + run * STEP / 2));
        const __m256i low = _mm256_and_si256(v, nibble), high = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
        for (int half = 0; half < 2; ++half) {
          const int64_t b = 2 * run + half;
          const int64_t slot = run / 2 < K / 128 ? (b / 4) * 4 + (run % 2) + 2 * half : b;  // vnni.py: slot_order
          const float s = _cvtsh_ss(scale[n * blocks + slot]);
          const float m = min ? _cvtsh_ss(min[n * blocks + slot]) : -8.f * s;
          const __m256i q = half ? high : low;
          block(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1), s, m, out + n * K + b * BLOCK);
        }
      }
    }
  }
};

}  // namespace

// x [M, K]; q int8 [N, K]; scales float [N]. Returns [M, N] in x's dtype.
at::Tensor int8_gemv(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& scales) {
  const int64_t M = x_in.size(0), N = q.size(0), K = q.size(1);
  const at::Tensor x = float_rows(x_in, K);
  TORCH_CHECK(q.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat && scales.numel() == N &&
              q.is_contiguous() && scales.is_contiguous(), "int8_gemv: unsupported layout");
  const QuantizedRows r = quantize_rows(x, nullptr);
  at::Tensor out = at::empty({M, N}, at::kFloat);
  run(Int8Gemv{q.data_ptr<int8_t>(), scales.data_ptr<float>(), r.q.data_ptr<int8_t>(), r.scale.data_ptr<float>(),
               out.data_ptr<float>(), N, K}, M, N);
  return out.to(x_in.scalar_type());
}

// x [M, K]; q uint8 [N, K/2], scales and mins (none: symmetric) float16 [N, K/32] in Int4Gemv's layout;
// slot_of int32 [K/32], the slot of each block. Returns [M, N] in x's dtype.
at::Tensor int4_gemv(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& mins, const at::Tensor& slot_of) {
  const int64_t M = x_in.size(0), N = q.size(0), K = q.size(1) * 2, blocks = K / BLOCK;
  const at::Tensor x = float_rows(x_in, K);
  const bool symmetric = !mins.has_value();
  TORCH_CHECK(q.scalar_type() == at::kByte && scales.scalar_type() == at::kHalf && q.is_contiguous() &&
              scales.is_contiguous() && scales.size(0) == N && scales.size(1) == blocks &&
              slot_of.scalar_type() == at::kInt && slot_of.numel() == blocks &&
              (symmetric || (mins->scalar_type() == at::kHalf && mins->is_contiguous() && mins->sizes() == scales.sizes())),
              "int4_gemv: unsupported layout");
  const QuantizedRows r = quantize_rows(x, slot_of.data_ptr<int32_t>());
  at::Tensor out = at::empty({M, N}, at::kFloat);
  const auto half_bits = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); };
  run(Int4Gemv{q.data_ptr<uint8_t>(), half_bits(scales), symmetric ? nullptr : half_bits(*mins), r.q.data_ptr<int8_t>(),
               r.scale.data_ptr<float>(), r.sum.data_ptr<float>(), out.data_ptr<float>(), N, K}, M, N);
  return out.to(x_in.scalar_type());
}

// q, scales, mins as int4_gemv's. Returns the bfloat16 weight [N, K].
at::Tensor int4_dequantize(const at::Tensor& q, const at::Tensor& scales, const c10::optional<at::Tensor>& mins) {
  const int64_t N = q.size(0), K = q.size(1) * 2;
  TORCH_CHECK(q.scalar_type() == at::kByte && scales.scalar_type() == at::kHalf && q.is_contiguous() &&
              scales.is_contiguous() && K % STEP == 0 && scales.numel() == N * K / BLOCK,
              "int4_dequantize: unsupported layout");
  at::Tensor out = at::empty({N, K}, at::kBFloat16);
  const auto half_bits = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); };
  const Int4Dequantize kernel{q.data_ptr<uint8_t>(), half_bits(scales), mins ? half_bits(*mins) : nullptr,
                              reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), K};
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) { kernel.rows(begin, end); });
  return out;
}

// Operators in C++ (not torch.library.custom_op, whose Python dispatch costs ~10 us a call): vnni.py adds
// their shapes for torch.compile.
TORCH_LIBRARY(lilmistral, m) {
  m.def("int8_gemv(Tensor x, Tensor q, Tensor scales) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor q, Tensor scales, Tensor? mins, Tensor slot_of) -> Tensor");
  m.def("int4_dequantize(Tensor q, Tensor scales, Tensor? mins) -> Tensor");
}

TORCH_LIBRARY_IMPL(lilmistral, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int4_dequantize", &int4_dequantize);
}
