// Vectors of 16 lanes for the CPU kernels: one AVX-512 register, or two 256-bit ones (lanes 0-7 and 8-15) where
// the unit is built for AVX2 or AVX-VNNI (vnni.py compiles this file first, in one unit with the kernels, and
// picks the instruction set by CPU; LILMISTRAL_YMM keeps a unit compiled with AVX-512 flags to 256-bit
// registers). Every operation gives the bits of its AVX-512 form, horizontal sums included, so the kernels'
// results do not depend on the build.
// The unit's PyTorch headers: the tensor, the operators it calls (at::empty, at::empty_like; add any other's
// header here) and the operator registry. torch/extension.h (pybind11, libtorch's whole C++ API) would make
// the first run's build 46 s, not 16 s; ATen/ATen.h (every operator) 22 s.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__AVX512F__) && !defined(LILMISTRAL_YMM)
#define LILMISTRAL_ZMM 1
#endif

namespace {

#ifdef LILMISTRAL_ZMM
struct Floats { __m512 v; };  // float32
struct Ints { __m512i v; };   // int32

inline Floats set1(float x) { return {_mm512_set1_ps(x)}; }
inline Floats add(Floats a, Floats b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Floats sub(Floats a, Floats b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Floats mul(Floats a, Floats b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Floats div(Floats a, Floats b) { return {_mm512_div_ps(a.v, b.v)}; }
inline Floats max(Floats a, Floats b) { return {_mm512_max_ps(a.v, b.v)}; }
inline Floats fmadd(Floats a, Floats b, Floats c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline Floats abs(Floats a) { return {_mm512_andnot_ps(_mm512_set1_ps(-0.f), a.v)}; }
inline Floats to_floats(Ints a) { return {_mm512_cvtepi32_ps(a.v)}; }
inline Floats load_floats(const float* p) { return {_mm512_loadu_ps(p)}; }
inline Floats load_halves(const uint16_t* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline void store(float* p, Floats a) { _mm512_storeu_ps(p, a.v); }
// Sixteen 16-bit words as float32: their low bytes, and their high bytes.
inline std::pair<Floats, Floats> load_byte_pairs(const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {{_mm512_cvtepi32_ps(_mm512_and_si512(w, _mm512_set1_epi32(0xFF)))}, {_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 8))}};
}
// The same, the bytes read as signed.
inline std::pair<Floats, Floats> load_signed_byte_pairs(const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {{_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 24), 24))},
          {_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 16), 24))}};
}
inline float reduce_add(Floats a) { return _mm512_reduce_add_ps(a.v); }
inline float reduce_max(Floats a) { return _mm512_reduce_max_ps(a.v); }
// The sums of a, b, c and d's lanes, in that order: two rounds of interleaving adds leave each 128-bit lane
// holding a part of all four sums, then the lanes are added (13 operations for 4 sums, not 4 x 8).
inline __m128 sum4(Floats a, Floats b, Floats c, Floats d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a.v, b.v), _mm512_unpackhi_ps(a.v, b.v));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c.v, d.v), _mm512_unpackhi_ps(c.v, d.v));
  const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  const __m512d abcd = _mm512_castps_pd(_mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                                                      _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd))));
  const __m256 half = _mm256_add_ps(_mm256_castpd_ps(_mm512_castpd512_pd256(abcd)),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(abcd, 1)));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}
inline Floats zero_unless(Floats a, uint32_t bits) { return {_mm512_maskz_mov_ps(static_cast<__mmask16>(bits), a.v)}; }
inline Floats round_to_integer(Floats a) {
  return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline Floats times_pow2(Floats a, Floats n) { return {_mm512_scalef_ps(a.v, n.v)}; }  // a * 2^n, n integral

// a rounded to the nearest bfloat16 (ties to even, as PyTorch rounds; NaNs aside), still as float32.
inline Floats round_bits_bf16(Floats a) {
  const __m512i bits = _mm512_castps_si512(a.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return {_mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xffff0000u))))};
}

// n (at most 16) values from float32 or bfloat16 at x[i], zeros past n.
inline Floats load_n(const void* x, bool bf16, int64_t i, int64_t n) {
  const __mmask16 k = n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1);
  if (!bf16) return {_mm512_maskz_loadu_ps(k, static_cast<const float*>(x) + i)};
  const __m256i half = _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(x) + i);
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16))};
}

// The first n (at most 16) lanes of v to out[i], float32 or bfloat16 (v's top halves: round it first).
inline void store_n(void* out, bool bf16, int64_t i, int64_t n, Floats v) {
  const __mmask16 k = n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1);
  if (!bf16) return _mm512_mask_storeu_ps(static_cast<float*>(out) + i, k, v.v);
  const __m256i high = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v.v), 16));
  _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + i, k, high);
}

// Bit j set where row[j] is true, j < n (at most 64).
inline uint64_t true_bits(const bool* row, int64_t n) {
  const __mmask64 in_range = n >= 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1;
  return _mm512_test_epi8_mask(_mm512_maskz_loadu_epi8(in_range, row), _mm512_set1_epi8(1));
}
#else
struct Floats { __m256 lo, hi; };
struct Ints { __m256i lo, hi; };

template <typename Op>
inline Floats each(Floats a, Floats b, Op op) { return {op(a.lo, b.lo), op(a.hi, b.hi)}; }

inline Floats set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline Floats add(Floats a, Floats b) { return each(a, b, [](__m256 x, __m256 y) { return _mm256_add_ps(x, y); }); }
inline Floats sub(Floats a, Floats b) { return each(a, b, [](__m256 x, __m256 y) { return _mm256_sub_ps(x, y); }); }
inline Floats mul(Floats a, Floats b) { return each(a, b, [](__m256 x, __m256 y) { return _mm256_mul_ps(x, y); }); }
inline Floats div(Floats a, Floats b) { return each(a, b, [](__m256 x, __m256 y) { return _mm256_div_ps(x, y); }); }
inline Floats max(Floats a, Floats b) { return each(a, b, [](__m256 x, __m256 y) { return _mm256_max_ps(x, y); }); }
inline Floats fmadd(Floats a, Floats b, Floats c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline Floats abs(Floats a) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  return {_mm256_andnot_ps(sign, a.lo), _mm256_andnot_ps(sign, a.hi)};
}
inline Floats to_floats(Ints a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
inline Floats load_floats(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline Floats load_halves(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline void store(float* p, Floats a) { _mm256_storeu_ps(p, a.lo), _mm256_storeu_ps(p + 8, a.hi); }
inline std::pair<Floats, Floats> load_byte_pairs(const uint16_t* p) {
  const __m256i lo = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i hi = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  const __m256i byte = _mm256_set1_epi32(0xFF);
  return {{_mm256_cvtepi32_ps(_mm256_and_si256(lo, byte)), _mm256_cvtepi32_ps(_mm256_and_si256(hi, byte))},
          {_mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 8)), _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 8))}};
}
inline std::pair<Floats, Floats> load_signed_byte_pairs(const uint16_t* p) {
  const __m256i lo = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i hi = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  const auto byte = [](__m256i w, int at) {
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(w, at), 24));
  };
  return {{byte(lo, 24), byte(hi, 24)}, {byte(lo, 16), byte(hi, 16)}};
}

// In the order of GCC's _mm512_reduce_add_ps: halves, quarters, then pairs.
inline float reduce_add(Floats a) {
  const __m256 eight = _mm256_add_ps(a.hi, a.lo);
  const __m128 four = _mm_add_ps(_mm256_extractf128_ps(eight, 1), _mm256_castps256_ps128(eight));
  const __m128 two = _mm_add_ps(four, _mm_shuffle_ps(four, four, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(two) + _mm_cvtss_f32(_mm_shuffle_ps(two, two, 1));
}
// sum4's first rounds within each 128-bit lane, on one 256-bit half of the four vectors
inline __m256 sum4_half(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
  const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
  const __m256d abd = _mm256_castps_pd(ab), cdd = _mm256_castps_pd(cd);
  return _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(abd, cdd)), _mm256_castpd_ps(_mm256_unpackhi_pd(abd, cdd)));
}
inline __m128 sum4(Floats a, Floats b, Floats c, Floats d) {
  const __m256 half = _mm256_add_ps(sum4_half(a.lo, b.lo, c.lo, d.lo), sum4_half(a.hi, b.hi, c.hi, d.hi));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}
inline float reduce_max(Floats a) {
  const __m256 eight = _mm256_max_ps(a.hi, a.lo);
  __m128 four = _mm_max_ps(_mm256_extractf128_ps(eight, 1), _mm256_castps256_ps128(eight));
  four = _mm_max_ps(four, _mm_shuffle_ps(four, four, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(_mm_max_ps(four, _mm_shuffle_ps(four, four, 1)));
}

// All ones in the lanes of bits' set bits (lane c: bit c).
inline __m256i lane_mask(uint32_t bits) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), bit), bit);
}
inline Floats zero_unless(Floats a, uint32_t bits) {
  return {_mm256_and_ps(a.lo, _mm256_castsi256_ps(lane_mask(bits & 0xff))),
          _mm256_and_ps(a.hi, _mm256_castsi256_ps(lane_mask((bits >> 8) & 0xff)))};
}
inline Floats round_to_integer(Floats a) {
  constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, mode), _mm256_round_ps(a.hi, mode)};
}
// a * 2^n, n integral and at least -126 (the callers' range): 2^n built as a float32's exponent, and above 128
// (an infinite 2^n) as 2^128, infinite too, as vscalefps gives.
inline Floats times_pow2(Floats a, Floats n) {
  const auto pow2 = [](__m256 m) {
    const __m256i e = _mm256_cvtps_epi32(_mm256_min_ps(m, _mm256_set1_ps(128.f)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
  };
  return {_mm256_mul_ps(a.lo, pow2(n.lo)), _mm256_mul_ps(a.hi, pow2(n.hi))};
}

inline Floats round_bits_bf16(Floats a) {
  const auto round = [](__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    return _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  };
  return {round(a.lo), round(a.hi)};
}

inline Floats load_n(const void* x, bool bf16, int64_t i, int64_t n) {
  if (n < 16) {  // a tail: through a zeroed copy
    alignas(32) uint32_t copy[16] = {};
    std::memcpy(copy, static_cast<const char*>(x) + i * (bf16 ? 2 : 4), n * (bf16 ? 2 : 4));
    return load_n(copy, bf16, 0, 16);
  }
  if (!bf16) return load_floats(static_cast<const float*>(x) + i);
  const __m128i* h = reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i);
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(h)), 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(h + 1)), 16))};
}

inline void store_n(void* out, bool bf16, int64_t i, int64_t n, Floats v) {
  alignas(32) float lanes[16];
  store(lanes, v);
  char* to = static_cast<char*>(out) + i * (bf16 ? 2 : 4);
  if (!bf16) return (void)std::memcpy(to, lanes, std::min<int64_t>(n, 16) * 4);
  uint16_t high[16];
  for (int c = 0; c < 16; ++c) high[c] = static_cast<uint16_t>(reinterpret_cast<const uint32_t*>(lanes)[c] >> 16);
  std::memcpy(to, high, std::min<int64_t>(n, 16) * 2);
}

inline uint64_t true_bits(const bool* row, int64_t n) {
  if (n == 32) {  // a whole chunk of attention's slots: each bool's low bit to its byte's top, gathered
    const __m256i bools = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
    return static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_slli_epi16(bools, 7)));
  }
  uint64_t bits = 0;
  for (int64_t j = 0; j < n; ++j) bits |= static_cast<uint64_t>(reinterpret_cast<const uint8_t*>(row)[j] & 1) << j;
  return bits;
}
#endif

// The sixteen values at x[i], float32 or bfloat16 (a bfloat16 is the top half of a float32).
inline Floats load16(const void* x, bool bf16, int64_t i) { return load_n(x, bf16, i, 16); }

// exp(x) (below -87 it returns ~1e-38, not 0; above 88.7, inf): 2^n * 2^f, n = round(x / ln 2), 2^f by Cephes'
// exp2f polynomial on [-0.5, 0.5], within 2 ulp.
inline Floats exp16(Floats x) {
  const Floats t = mul(max(x, set1(-87.f)), set1(1.44269504088896341f));
  const Floats n = round_to_integer(t);
  const Floats f = sub(t, n);
  Floats p = set1(1.535336188319500e-4f);
  for (const float c : {1.339887440266574e-3f, 9.618437357674640e-3f, 5.550332471162809e-2f, 2.402264791363012e-1f,
                        6.931472028550421e-1f, 1.f})
    p = fmadd(p, f, set1(c));
  return times_pow2(p, n);
}

}  // namespace
