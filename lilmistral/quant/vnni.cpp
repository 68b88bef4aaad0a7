// Decode (a few rows) int8 matrix-vector products with AVX-512 VNNI, as llama.cpp does them: activations
// are quantized to int8 in blocks of 32 and multiplied with the int8 weights by integer dot products
// (vpdpbusd: unsigned 8-bit x signed 8-bit, four products per 32-bit lane). A 64-byte register holds
// two activation blocks: lanes 0-7 belong to the first, 8-15 to the second.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int64_t BLOCK = 32;  // activations per int8 scale
constexpr int64_t CHUNK = 64;  // inputs per inner step

struct QuantizedRows {  // activations [M, K]
  at::Tensor q;      // int8 [M, K]
  at::Tensor scale;  // float [M, K/64, 16]: per lane, the scale of its block
};

QuantizedRows quantize_rows(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1), chunks = K / CHUNK;
  QuantizedRows r{at::empty({M, K}, at::kChar), at::empty({M, chunks, 16}, at::kFloat)};
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    int8_t* q = r.q.data_ptr<int8_t>() + m * K;
    float* scale = r.scale.data_ptr<float>() + m * chunks * 16;
    for (int64_t b = 0; b < K / BLOCK; ++b) {
      const float* xb = xp + m * K + b * BLOCK;
      float amax = 0;
      for (int64_t i = 0; i < BLOCK; ++i) amax = std::max(amax, std::abs(xb[i]));
      const float d = amax / 127.f, inv = d > 0 ? 1.f / d : 0.f;
      for (int64_t i = 0; i < BLOCK; ++i) q[b * BLOCK + i] = static_cast<int8_t>(std::nearbyint(xb[i] * inv));
      for (int64_t lane = 0; lane < 8; ++lane) scale[(b / 2) * 16 + (b % 2) * 8 + lane] = d;
    }
  }
  return r;
}

}  // namespace

// x float [M, K]; q int8 [N, K]; scales float [N] (w = q * scale). Returns float [M, N].
// vpdpbusd wants one unsigned operand: |w| times x with w's sign moved onto x.
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), chunks = K / CHUNK;
  TORCH_CHECK(K % CHUNK == 0 && M <= 8 && q.size(1) == K && scales.numel() == N, "int8_gemv: unsupported shape");
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat &&
              x.is_contiguous() && q.is_contiguous() && scales.is_contiguous(), "int8_gemv: unsupported layout");
  const QuantizedRows r = quantize_rows(x);
  at::Tensor out = at::empty({M, N}, at::kFloat);
  const int8_t* wp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  const int8_t* qp = r.q.data_ptr<int8_t>();
  const float* dp = r.scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      __m512 acc[8];
      for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512i w = _mm512_loadu_si512(wp + n * K + c * CHUNK);
        const __mmask64 negative = _mm512_movepi8_mask(w);
        const __m512i magnitude = _mm512_abs_epi8(w);
        for (int64_t m = 0; m < M; ++m) {
          const __m512i xq = _mm512_loadu_si512(qp + m * K + c * CHUNK);
          const __m512i signed_x = _mm512_mask_sub_epi8(xq, negative, _mm512_setzero_si512(), xq);
          const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), magnitude, signed_x);
          acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(dp + (m * chunks + c) * 16), acc[m]);
        }
      }
      for (int64_t m = 0; m < M; ++m) op[m * N + n] = _mm512_reduce_add_ps(acc[m]) * sp[n];
    }
  });
  return out;
}
