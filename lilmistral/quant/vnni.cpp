// int8 and int4 matrix products as llama.cpp does them (cpu.py says where each is used): activations are
// quantized to int8 in blocks of 32 and multiplied with the integer weights by integer dot products: AVX-512
// VNNI's (vpdpbusd: unsigned 8-bit x signed 8-bit, four products summed per 32-bit lane), or AVX2's where the
// unit is built for it, with the same results. vnni.py compiles this file after lanes.cpp, in one unit.
#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr int64_t BLOCK = 32;  // activations per int8 scale
constexpr int64_t K_ALIGN = 64;  // K is a multiple of this: whole blocks (cpu.py pads K to it)
constexpr int64_t ROWS = 8;    // activation rows per block, their accumulators in registers
// bytes of weights ahead (measured on int4): 5-15% more bandwidth with the previous layout; with the 16-column one, 0 to
// 4 KB measured alike within the machine's noise (1 KB ahead in 2 of 3 shapes)
constexpr int64_t PREFETCH = 1024;

// Activations [M, K] as int8 blocks of 32, in the calling thread's buffers (reused: no allocation per call).
struct QuantizedRows {
  const int8_t* q;      // [M, K]
  const float* scale;   // [M, K/32]
  const float* sum;     // [M, K/32]: the block's sum as quantized (scale times the sum of its int8s)
  const float* offset16;  // [M, K/16]: -32 times the sum per half block (int6's groups of 16: q - 32)
};

// The integer parts of the kernels per instruction set (lanes.cpp has the rest).
#ifdef LILMISTRAL_ZMM
// v rounded to int8s at q[0, 16) (v within +-127.5), returning their sum.
inline int32_t store_int8(Floats v, int8_t* q) {
  const __m512i i = _mm512_cvtps_epi32(v.v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(i));
  return _mm512_reduce_add_epi32(i);
}

// acc plus the dot products of w's unsigned bytes with the four int8s at x, broadcast to every lane, in one
// vpdpbusd whose memory operand is the broadcast ({1to16}): GCC does not fold _mm512_broadcastd_epi32 into it,
// and the separate broadcasts' registers and loads cost int5's prefill ~14% (int4's ~2%).
inline __m512i dpbusd_broadcast(__m512i acc, __m512i w, const int8_t* x) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int8_t(*)[4]>(x)));
  return acc;
}

// The integer sums of one block of 32 inputs for a group's 16 columns and M rows of activations (x, K apart):
// w the block's 256 bytes in Int4Gemv's layout. One vpdpbusd per 64 bytes, nibbles times activations. FIFTH
// (int5): fifths the block's 64 bytes of fifth bits, lane c's byte b holding column c's inputs 4s + b in bit s
// (sub-chunk s: chunk s / 2's low nibbles for even s, its high ones for odd), each OR'ed into bit 4 of its
// nibble's byte: 5-bit values 0..31 times the activations.
template <int M, bool FIFTH = false>
inline void int4_block(const uint8_t* w, const uint8_t* fifths, const int8_t* x, int64_t K, Ints (&sum)[M]) {
  const __m512i nibble = _mm512_set1_epi8(0x0F), bit4 = _mm512_set1_epi8(0x10);
  __m512i hb = _mm512_setzero_si512();
  if constexpr (FIFTH) {
    _mm_prefetch(reinterpret_cast<const char*>(fifths + PREFETCH / 4), _MM_HINT_T0);
    hb = _mm512_loadu_si512(fifths);
  }
  const auto fifth = [&](int s) {  // sub-chunk s's fifth bits, moved from bit s to bit 4 of each byte
    return _mm512_and_si512(s < 4 ? _mm512_slli_epi16(hb, 4 - s) : _mm512_srli_epi16(hb, s - 4), bit4);
  };
  constexpr int C = M < 4 ? 2 : 1;  // few rows: two chains of vpdpbusd per row, for their latency
  __m512i chains[M][C];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < C; ++c) chains[m][c] = _mm512_setzero_si512();
  for (int j = 0; j < 4; ++j) {
    _mm_prefetch(reinterpret_cast<const char*>(w + j * 64 + PREFETCH), _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512(w + j * 64);
    __m512i low = _mm512_and_si512(v, nibble), high = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
    if constexpr (FIFTH) low = _mm512_or_si512(low, fifth(2 * j)), high = _mm512_or_si512(high, fifth(2 * j + 1));
    for (int m = 0; m < M; ++m) {
      const int8_t* xm = x + m * K + 8 * j;
      chains[m][0] = dpbusd_broadcast(chains[m][0], low, xm);
      chains[m][C - 1] = dpbusd_broadcast(chains[m][C - 1], high, xm + 4);
    }
  }
  for (int m = 0; m < M; ++m) sum[m] = {C == 2 ? _mm512_add_epi32(chains[m][0], chains[m][C - 1]) : chains[m][0]};
}

// int6 weights' integer sums for a half block, a group of 16 inputs: w its 128 bytes of low 4 bits (two chunks as
// int4_block reads them), high its 64 bytes of high 2 bits, lane c's byte b holding column c's inputs 4i + b in
// bits 2i (so chunk s takes bits 4s (its low nibbles) and 4s + 2 (its high ones), moved to bits 4-5 of each
// byte), x its 16 activations. The 6-bit values 0..63 times the activations, as int4_block; few rows sum in two
// chains for vpdpbusd's latency, more in one (registers: a prompt's 8 rows).
template <int M>
inline void int6_block(const uint8_t* w, const uint8_t* high, const int8_t* x, int64_t K, Ints (&sum)[M]) {
  constexpr int C = M < 4 ? 2 : 1;
  const __m512i nibble = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
  _mm_prefetch(reinterpret_cast<const char*>(high + PREFETCH / 2), _MM_HINT_T0);
  const __m512i hb = _mm512_loadu_si512(high);
  const __m512i tops[2][2] = {
      {_mm512_and_si512(_mm512_slli_epi16(hb, 4), top), _mm512_and_si512(_mm512_slli_epi16(hb, 2), top)},
      {_mm512_and_si512(hb, top), _mm512_and_si512(_mm512_srli_epi16(hb, 2), top)}};
  __m512i chains[M][C];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < C; ++c) chains[m][c] = _mm512_setzero_si512();
  for (int s = 0; s < 2; ++s) {
    _mm_prefetch(reinterpret_cast<const char*>(w + s * 64 + PREFETCH), _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512(w + s * 64);
    const __m512i low = _mm512_or_si512(_mm512_and_si512(v, nibble), tops[s][0]);
    const __m512i high6 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), nibble), tops[s][1]);
    for (int m = 0; m < M; ++m) {
      const int8_t* xm = x + m * K + 8 * s;
      chains[m][0] = _mm512_dpbusd_epi32(chains[m][0], low, _mm512_broadcastd_epi32(_mm_loadu_si32(xm)));
      const __m512i x_high = _mm512_broadcastd_epi32(_mm_loadu_si32(xm + 4));
      chains[m][C - 1] = _mm512_dpbusd_epi32(chains[m][C - 1], high6, x_high);
    }
  }
  for (int m = 0; m < M; ++m) sum[m] = {C == 2 ? _mm512_add_epi32(chains[m][0], chains[m][C - 1]) : chains[m][0]};
}

// The same for int8 weights (w: 512 bytes in Int8Gemv's layout). vpdpbusd wants one unsigned operand: the
// activations offset by 128 (int8_activations), whose extra 128 * (the weights' sum) is taken off, the sum
// from one more vpdpbusd against ones.
template <int M>
inline void int8_block(const int8_t* w, const uint8_t* x, int64_t K, Ints (&sum)[M]) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i weight_sum = _mm512_setzero_si512(), dot[M];
  for (int m = 0; m < M; ++m) dot[m] = _mm512_setzero_si512();
  for (int j = 0; j < 8; ++j) {
    _mm_prefetch(reinterpret_cast<const char*>(w + j * 64 + PREFETCH), _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512(w + j * 64);
    weight_sum = _mm512_dpbusd_epi32(weight_sum, ones, v);
    for (int m = 0; m < M; ++m)
      dot[m] = _mm512_dpbusd_epi32(dot[m], _mm512_broadcastd_epi32(_mm_loadu_si32(x + m * K + 4 * j)), v);
  }
  const __m512i offset = _mm512_slli_epi32(weight_sum, 7);
  for (int m = 0; m < M; ++m) sum[m] = {_mm512_sub_epi32(dot[m], offset)};
}
#else
inline __m256i broadcast4(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

inline int32_t store_int8(Floats v, int8_t* q) {
  const __m256i lo = _mm256_cvtps_epi32(v.lo), hi = _mm256_cvtps_epi32(v.hi);
  // vpackssdw packs within 128-bit halves (lo 0-3, hi 0-3 | lo 4-7, hi 4-7): the permute puts lo before hi
  const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q),
                   _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1)));
  const __m256i eight = _mm256_add_epi32(lo, hi);
  __m128i four = _mm_add_epi32(_mm256_castsi256_si128(eight), _mm256_extracti128_si256(eight, 1));
  four = _mm_add_epi32(four, _mm_shuffle_epi32(four, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(four, _mm_shuffle_epi32(four, 0xB1)));
}

// 64 bytes of a block's weights: columns 0-7 (lo) and 8-15 (hi); the bytes PREFETCH ahead are fetched.
struct Columns { __m256i lo, hi; };
inline Columns load_columns_at(const uint8_t* w, int64_t ahead) {
  _mm_prefetch(reinterpret_cast<const char*>(w + ahead), _MM_HINT_T0);
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32))};
}
inline Columns load_columns(const uint8_t* w) { return load_columns_at(w, PREFETCH); }
inline Columns load_columns(const int8_t* w) { return load_columns(reinterpret_cast<const uint8_t*>(w)); }
// int4 weights' low and high nibbles (two inputs' codes a byte), as bytes
inline Columns low_nibbles(Columns v) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  return {_mm256_and_si256(v.lo, nibble), _mm256_and_si256(v.hi, nibble)};
}
inline Columns high_nibbles(Columns v) { return low_nibbles({_mm256_srli_epi16(v.lo, 4), _mm256_srli_epi16(v.hi, 4)}); }
// int6's 64 bytes of high bits for a half block (see the AVX-512 int6_block): per chunk s of it, the high
// bits of its low nibbles' values (tops[s][0]) and of its high nibbles' (tops[s][1]), in bits 4-5 of each byte.
struct Tops { Columns c[2][2]; };
inline Tops int6_tops(const uint8_t* high) {
  const Columns hb = load_columns_at(high, PREFETCH / 2);
  const __m256i top = _mm256_set1_epi8(0x30);
  const auto at = [&](int shift) -> Columns {
    const auto move = [shift](__m256i v) {
      return shift > 0 ? _mm256_slli_epi16(v, shift) : shift < 0 ? _mm256_srli_epi16(v, -shift) : v;
    };
    return {_mm256_and_si256(move(hb.lo), top), _mm256_and_si256(move(hb.hi), top)};
  };
  return {{{at(4), at(2)}, {at(0), at(-2)}}};
}
inline Columns with_tops(Columns nibbles, Columns tops) {
  return {_mm256_or_si256(nibbles.lo, tops.lo), _mm256_or_si256(nibbles.hi, tops.hi)};
}
// int5's fifth bits of sub-chunk s (see the AVX-512 int4_block), moved from bit s to bit 4 of each byte.
inline Columns fifth_bits(Columns hb, int s) {
  const __m256i bit4 = _mm256_set1_epi8(0x10);
  const auto move = [s](__m256i v) { return s < 4 ? _mm256_slli_epi16(v, 4 - s) : _mm256_srli_epi16(v, s - 4); };
  return {_mm256_and_si256(move(hb.lo), bit4), _mm256_and_si256(move(hb.hi), bit4)};
}
// A block's nibbles of chunk j: its low ones (inputs 8j..8j+3) and high ones (8j+4..8j+7), with their fifth
// bits from hb where FIFTH (int5).
template <bool FIFTH>
inline std::pair<Columns, Columns> chunk_values(const uint8_t* w, Columns hb, int j) {
  const Columns v = load_columns(w + j * 64), low = low_nibbles(v), high = high_nibbles(v);
  if constexpr (!FIFTH) return {low, high};
  return {with_tops(low, fifth_bits(hb, 2 * j)), with_tops(high, fifth_bits(hb, 2 * j + 1))};
}
template <bool FIFTH>
inline Columns fifth_plane(const uint8_t* high) { return FIFTH ? load_columns_at(high, PREFETCH / 4) : Columns{}; }

#if defined(__AVXVNNI__) || defined(__AVX512VNNI__)
#define LILMISTRAL_YMM_DPBUSD 1
// vpdpbusd on 256-bit registers: AVX-VNNI's (Intel since Alder Lake), or AVX-512 VNNI's EVEX form of it where
// an AVX-512 CPU runs this build (tests, benchmarks). The kernels as the AVX-512 ones, 16 columns in two
// registers.
inline __m256i dpbusd(__m256i sum, __m256i u, __m256i s) {
#ifdef __AVXVNNI__
  return _mm256_dpbusd_avx_epi32(sum, u, s);
#else
  return _mm256_dpbusd_epi32(sum, u, s);
#endif
}

// Few rows leave vpdpbusd's latency exposed: below 4, each register sums in two chains (C), added at the end.
template <int C>
inline __m256i sum_chains(const __m256i (&chains)[C]) {
  return C == 2 ? _mm256_add_epi32(chains[0], chains[C - 1]) : chains[0];
}

template <int M, bool FIFTH = false>
inline void int4_block(const uint8_t* w, const uint8_t* fifths, const int8_t* x, int64_t K, Ints (&sum)[M]) {
  constexpr int C = M < 4 ? 2 : 1;
  const Columns hb = fifth_plane<FIFTH>(fifths);
  __m256i lo[M][C] = {}, hi[M][C] = {};
  for (int j = 0; j < 4; ++j) {
    const auto [low, high] = chunk_values<FIFTH>(w, hb, j);
    for (int m = 0; m < M; ++m) {
      const __m256i x_low = broadcast4(x + m * K + 8 * j), x_high = broadcast4(x + m * K + 8 * j + 4);
      lo[m][0] = dpbusd(lo[m][0], low.lo, x_low), hi[m][0] = dpbusd(hi[m][0], low.hi, x_low);
      lo[m][C - 1] = dpbusd(lo[m][C - 1], high.lo, x_high), hi[m][C - 1] = dpbusd(hi[m][C - 1], high.hi, x_high);
    }
  }
  for (int m = 0; m < M; ++m) sum[m] = {sum_chains(lo[m]), sum_chains(hi[m])};
}

template <int M>
inline void int6_block(const uint8_t* w, const uint8_t* high, const int8_t* x, int64_t K, Ints (&sum)[M]) {
  constexpr int C = M < 4 ? 2 : 1;
  const Tops tops = int6_tops(high);
  __m256i lo[M][C] = {}, hi[M][C] = {};
  for (int s = 0; s < 2; ++s) {
    const Columns v = load_columns(w + s * 64);
    const Columns low = with_tops(low_nibbles(v), tops.c[s][0]), high6 = with_tops(high_nibbles(v), tops.c[s][1]);
    for (int m = 0; m < M; ++m) {
      const __m256i x_low = broadcast4(x + m * K + 8 * s), x_high = broadcast4(x + m * K + 8 * s + 4);
      lo[m][0] = dpbusd(lo[m][0], low.lo, x_low), hi[m][0] = dpbusd(hi[m][0], low.hi, x_low);
      lo[m][C - 1] = dpbusd(lo[m][C - 1], high6.lo, x_high), hi[m][C - 1] = dpbusd(hi[m][C - 1], high6.hi, x_high);
    }
  }
  for (int m = 0; m < M; ++m) sum[m] = {sum_chains(lo[m]), sum_chains(hi[m])};
}

template <int M>
inline void int8_block(const int8_t* w, const uint8_t* x, int64_t K, Ints (&sum)[M]) {
  constexpr int C = M < 4 ? 2 : 1;
  const __m256i ones = _mm256_set1_epi8(1);
  __m256i weight_lo = _mm256_setzero_si256(), weight_hi = _mm256_setzero_si256(), lo[M][C] = {}, hi[M][C] = {};
  for (int j = 0; j < 8; ++j) {
    const Columns v = load_columns(w + j * 64);
    weight_lo = dpbusd(weight_lo, ones, v.lo), weight_hi = dpbusd(weight_hi, ones, v.hi);
    for (int m = 0; m < M; ++m) {
      const __m256i xm = broadcast4(x + m * K + 4 * j);
      lo[m][j % C] = dpbusd(lo[m][j % C], xm, v.lo), hi[m][j % C] = dpbusd(hi[m][j % C], xm, v.hi);
    }
  }
  const __m256i offset_lo = _mm256_slli_epi32(weight_lo, 7), offset_hi = _mm256_slli_epi32(weight_hi, 7);
  for (int m = 0; m < M; ++m)
    sum[m] = {_mm256_sub_epi32(sum_chains(lo[m]), offset_lo), _mm256_sub_epi32(sum_chains(hi[m]), offset_hi)};
}
#else
// The int8 kernel's activations: the quantized ones as they are (int8_block carries their signs).
const uint8_t* int8_activations(const QuantizedRows& r, int64_t) { return reinterpret_cast<const uint8_t*>(r.q); }

// AVX2 has no vpdpbusd: vpmaddubsw multiplies unsigned by signed bytes, summing pairs into 16 bits (with
// saturation), and vpmaddwd sums pairs of those into 32. Nibbles (0..15) times activations (-127..127) sum over
// a whole block within 16 bits: at most 8 * 2 * 15 * 127 = 30480 a lane; 5-bit values (0..31) over two chunks,
// 4 * 2 * 31 * 127 = 31496, and are widened every two.
template <int M, bool FIFTH = false>
inline void int4_block(const uint8_t* w, const uint8_t* fifths, const int8_t* x, int64_t K, Ints (&sum)[M]) {
  constexpr int SPAN = FIFTH ? 2 : 4;  // chunks summed in 16 bits
  const __m256i ones = _mm256_set1_epi16(1);
  const Columns hb = fifth_plane<FIFTH>(fifths);
  __m256i lo[M], hi[M];  // 16-bit sums: columns 0-7, 8-15
  for (int m = 0; m < M; ++m) lo[m] = hi[m] = _mm256_setzero_si256(), sum[m] = {lo[m], hi[m]};
  for (int j = 0; j < 4; ++j) {
    const auto [low, high] = chunk_values<FIFTH>(w, hb, j);
    for (int m = 0; m < M; ++m) {
      const __m256i x_low = broadcast4(x + m * K + 8 * j), x_high = broadcast4(x + m * K + 8 * j + 4);
      const auto products = [&](__m256i l, __m256i h) {
        return _mm256_add_epi16(_mm256_maddubs_epi16(l, x_low), _mm256_maddubs_epi16(h, x_high));
      };
      lo[m] = _mm256_add_epi16(lo[m], products(low.lo, high.lo));
      hi[m] = _mm256_add_epi16(hi[m], products(low.hi, high.hi));
    }
    if ((j + 1) % SPAN) continue;
    for (int m = 0; m < M; ++m) {
      sum[m].lo = _mm256_add_epi32(sum[m].lo, _mm256_madd_epi16(lo[m], ones));
      sum[m].hi = _mm256_add_epi32(sum[m].hi, _mm256_madd_epi16(hi[m], ones));
      lo[m] = hi[m] = _mm256_setzero_si256();
    }
  }
}

// 6-bit values (0..63) times activations: a chunk's pair sums reach 2 * 2 * 63 * 127 = 32004, so each chunk's
// 16-bit sums are widened to 32 bits before the next is added.
template <int M>
inline void int6_block(const uint8_t* w, const uint8_t* high, const int8_t* x, int64_t K, Ints (&sum)[M]) {
  const __m256i ones = _mm256_set1_epi16(1);
  const Tops tops = int6_tops(high);
  for (int m = 0; m < M; ++m) sum[m] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
  for (int s = 0; s < 2; ++s) {
    const Columns v = load_columns(w + s * 64);
    const Columns low = with_tops(low_nibbles(v), tops.c[s][0]), high6 = with_tops(high_nibbles(v), tops.c[s][1]);
    for (int m = 0; m < M; ++m) {
      const __m256i x_low = broadcast4(x + m * K + 8 * s), x_high = broadcast4(x + m * K + 8 * s + 4);
      const auto products = [&](__m256i l, __m256i h) {
        const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(l, x_low), _mm256_maddubs_epi16(h, x_high));
        return _mm256_madd_epi16(pairs, ones);
      };
      sum[m].lo = _mm256_add_epi32(sum[m].lo, products(low.lo, high6.lo));
      sum[m].hi = _mm256_add_epi32(sum[m].hi, products(low.hi, high6.hi));
    }
  }
}

// int8 weights: vpmaddubsw's unsigned operand the weights' magnitudes, the activations given their signs
// (vpsignb); a pair sums to at most 2 * 128 * 127 = 32512, within 16 bits.
template <int M>
inline void int8_block(const int8_t* w, const uint8_t* x, int64_t K, Ints (&sum)[M]) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int m = 0; m < M; ++m) sum[m] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
  for (int j = 0; j < 8; ++j) {
    const Columns v = load_columns(w + j * 64);
    const __m256i lo_abs = _mm256_abs_epi8(v.lo), hi_abs = _mm256_abs_epi8(v.hi);
    for (int m = 0; m < M; ++m) {
      const __m256i xm = broadcast4(x + m * K + 4 * j);
      const auto products = [&](__m256i magnitudes, __m256i signs) {
        return _mm256_madd_epi16(_mm256_maddubs_epi16(magnitudes, _mm256_sign_epi8(xm, signs)), ones);
      };
      sum[m].lo = _mm256_add_epi32(sum[m].lo, products(lo_abs, v.lo));
      sum[m].hi = _mm256_add_epi32(sum[m].hi, products(hi_abs, v.hi));
    }
  }
}
#endif
#endif

#if defined(LILMISTRAL_ZMM) || defined(LILMISTRAL_YMM_DPBUSD)
// The int8 kernel's activations: the quantized ones plus 128, as unsigned bytes (x ^ 0x80), [M, K] in the
// calling thread's buffer (see int8_block).
const uint8_t* int8_activations(const QuantizedRows& r, int64_t count) {
  thread_local std::vector<uint8_t> buffer;
  buffer.resize(count);
  for (int64_t i = 0; i < count; ++i) buffer[i] = static_cast<uint8_t>(r.q[i]) ^ 0x80;
  return buffer.data();
}
#endif

// x [M, K] float32 or bfloat16 (others are converted to float32); the result's dtype is x's.
struct Rows {
  at::Tensor x;
  bool bf16;
  Rows(const at::Tensor& x_in, int64_t K) {
    TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K && K % K_ALIGN == 0, "vnni: x must be [M, K], K a multiple of 64");
    bf16 = x_in.scalar_type() == at::kBFloat16;
    x = (bf16 ? x_in : x_in.to(at::kFloat)).contiguous();
  }
  at::Tensor empty_out(int64_t N) const { return at::empty({x.size(0), N}, x.options()); }
};

// Where a kernel writes its results: float32 or bfloat16 (rounded to nearest even, as PyTorch does).
struct Output {
  void* data;
  bool bf16;
  explicit Output(at::Tensor& out) : data(out.data_ptr()), bf16(out.scalar_type() == at::kBFloat16) {}
  void store(int64_t i, float v) const {
    if (bf16) static_cast<at::BFloat16*>(data)[i] = at::BFloat16(v);
    else static_cast<float*>(data)[i] = v;
  }
  Output operator+(int64_t offset) const {
    Output o = *this;
    o.data = static_cast<char*>(data) + offset * (bf16 ? 2 : 4);
    return o;
  }
  // The first `columns` lanes of v at [at, at + columns).
  void store_lanes(int64_t at, Floats v, int64_t columns) const {
    float lanes[16];
    ::store(lanes, v);
    for (int64_t c = 0; c < columns; ++c) store(at + c, lanes[c]);
  }
};

struct BlockScale { float scale, sum, first_half, second_half; };  // the sums: d times the int8s' sums

// x[i, i + 32) to int8 q[0, 32): round(x / d), d = max |x| / 127.
inline BlockScale quantize_block(const void* x, bool bf16, int64_t i, int8_t* q) {
  const Floats lo = load16(x, bf16, i), hi = load16(x, bf16, i + 16);
  const float d = reduce_max(max(abs(lo), abs(hi))) / 127.f;
  const Floats inv = set1(d > 0 ? 1.f / d : 0.f);
  const int32_t first = store_int8(mul(lo, inv), q), second = store_int8(mul(hi, inv), q + 16);
  return {d, d * static_cast<float>(first + second), d * static_cast<float>(first), d * static_cast<float>(second)};
}

QuantizedRows quantize_rows(const Rows& rows) {
  const int64_t M = rows.x.size(0), K = rows.x.size(1), blocks = K / BLOCK;
  thread_local std::vector<int8_t> q_buffer;
  thread_local std::vector<float> scale_buffer, sum_buffer, offset16_buffer;
  q_buffer.resize(M * K), scale_buffer.resize(M * blocks), sum_buffer.resize(M * blocks);
  offset16_buffer.resize(2 * M * blocks);
  const void* xp = rows.x.data_ptr();
  const bool bf16 = rows.bf16;
  int8_t* qp = q_buffer.data();
  float* scale = scale_buffer.data();
  float* sum = sum_buffer.data();
  float* offset16 = offset16_buffer.data();
  at::parallel_for(0, M * blocks, 8 * blocks, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const BlockScale s = quantize_block(xp, bf16, block * BLOCK, qp + block * BLOCK);
      scale[block] = s.scale, sum[block] = s.sum;
      offset16[2 * block] = -32.f * s.first_half, offset16[2 * block + 1] = -32.f * s.second_half;
    }
  });
  return {qp, scale, sum, offset16};
}

// Calls kernel.template rows<M>(begin, end) over the kernel's units of output columns (one column, or a group
// of 16) for blocks of up to ROWS activation rows, M a constant so that the per-row accumulators live in
// registers. Threads take tiles in turn: of Kernel::TILE units when there are several blocks of rows (the
// tile's weights stay in cache while every block passes), else an eighth of each thread's share, at least
// Kernel::GRAIN units (measured: finer tiles read memory slower, coarser ones balance worse on a busy machine).
// Each output is computed by the same operations whatever the number of rows: a prompt's last token gives
// the same numbers alone as within its prompt.
template <typename Kernel>
void run(const Kernel& kernel, int64_t M) {
  const int64_t units = kernel.units();
  const int64_t tile = M > ROWS ? Kernel::TILE : std::max(Kernel::GRAIN, units / (8 * at::get_num_threads()));
  std::atomic<int64_t> next_tile{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t unit; (unit = next_tile++ * tile) < units;) {
      const int64_t tile_end = std::min(unit + tile, units);
      for (int64_t row = 0; row < M; row += ROWS) {
        const Kernel k = kernel.at_row(row);
        switch (std::min(M - row, ROWS)) {
          case 1: k.template rows<1>(unit, tile_end); break;
          case 2: k.template rows<2>(unit, tile_end); break;
          case 3: k.template rows<3>(unit, tile_end); break;
          case 4: k.template rows<4>(unit, tile_end); break;
          case 5: k.template rows<5>(unit, tile_end); break;
          case 6: k.template rows<6>(unit, tile_end); break;
          case 7: k.template rows<7>(unit, tile_end); break;
          default: k.template rows<ROWS>(unit, tile_end); break;  // ROWS == 8
        }
      }
    }
  });
}

// int8 weights in the kernel's layout (vnni.py: pack_int8_vnni): columns in groups of 16, column c of a group
// in 32-bit lane c; a group's weights in chunks of 4 inputs, 64 bytes each, lane c's four bytes column c's
// inputs 4j..4j+3, so one dot product instruction multiplies 16 columns by four broadcast activations, and
// eight make a block of 32 (int8_block), whose integer sum is scaled once by the block's activation scale.
// w = q * scale[n]; scales float32 [groups * 16]. x: the activations as int8_block reads them.
struct Int8Gemv {
  const int8_t* w; const float* scale; const uint8_t* x; const float* x_scale; Output out; int64_t N, K;
  static constexpr int64_t TILE = 2, GRAIN = 8;

  int64_t units() const { return (N + 15) / 16; }

  Int8Gemv at_row(int64_t row) const {
    Int8Gemv k = *this;
    k.x += row * K, k.x_scale += row * (K / BLOCK), k.out = out + row * N;
    return k;
  }

  template <int M>
  void rows(int64_t begin, int64_t end) const {
    const int64_t blocks = K / BLOCK;
    for (int64_t g = begin; g < end; ++g) {
      Floats acc[M];
      for (int m = 0; m < M; ++m) acc[m] = set1(0.f);
      for (int64_t b = 0; b < blocks; ++b) {
        Ints sum[M];
        int8_block<M>(w + (g * blocks + b) * BLOCK * 16, x + b * BLOCK, K, sum);
        for (int m = 0; m < M; ++m) acc[m] = fmadd(to_floats(sum[m]), set1(x_scale[m * blocks + b]), acc[m]);
      }
      const Floats ws = load_floats(scale + g * 16);
      for (int m = 0; m < M; ++m) out.store_lanes(m * N + g * 16, mul(acc[m], ws), std::min<int64_t>(16, N - g * 16));
    }
  }
};

// int4 weights in the kernel's layout (vnni.py: pack_int4_vnni): columns in groups of 16, column c of a group
// in 32-bit lane c. A group's weights run in chunks of 8 inputs, 64 bytes each: lane c's four bytes hold
// column c's inputs 8j..8j+3 in their low nibbles and 8j+4..8j+7 in their high nibbles, so one dot product
// instruction multiplies 16 columns by four broadcast activations and each lane sums one column's products.
// Four chunks make a block of 32 (int4_block), whose integer sum is scaled once. Scales and mins float16
// [groups, K/32, 16]. w = q * scale + min, or with no mins (symmetric) w = (q - zero) * scale: a block's min (or
// -zero * scale) times its activation sum is added once. Super-blocked (pack.py; GGUF's Q4_K), scales and mins
// are factors [groups, K/S, 16], one per PER blocks, and codes [groups, K/32, 16] a block's 8-bit codes (scale's
// in the low byte, min's in the high one): a block's scale is factor times code, exactly. int5 (GGUF's Q5_0,
// Q5_1, Q5_K) adds high, 64 bytes of fifth bits a block (int4_block's FIFTH), and zero is 16 (int4: 8).
struct Int4Gemv {
  const uint8_t* w; const uint8_t* high; const uint16_t* scale; const uint16_t* min; const uint16_t* codes;
  int64_t per; float zero; const int8_t* xq; const float* x_scale; const float* x_sum; Output out; int64_t N, K;
  static constexpr int64_t TILE = 4, GRAIN = 8;

  int64_t units() const { return (N + 15) / 16; }

  Int4Gemv at_row(int64_t row) const {
    Int4Gemv k = *this;
    k.xq += row * K, k.x_scale += row * (K / BLOCK), k.x_sum += row * (K / BLOCK), k.out = out + row * N;
    return k;
  }

  template <int M>
  void rows(int64_t begin, int64_t end) const {
    if (high) columns<M, true>(begin, end);
    else columns<M, false>(begin, end);
  }

  template <int M, bool FIFTH>
  void columns(int64_t begin, int64_t end) const {
    const int64_t blocks = K / BLOCK, factors = blocks / per;
    for (int64_t g = begin; g < end; ++g) {
      Floats acc[M];
      for (int m = 0; m < M; ++m) acc[m] = set1(0.f);
      for (int64_t f = 0; f < factors; ++f) {
        const Floats scale_f = load_halves(scale + (g * factors + f) * 16);
        const Floats min_f = min ? load_halves(min + (g * factors + f) * 16) : mul(scale_f, set1(-zero));
        for (int64_t b = f * per; b < (f + 1) * per; ++b) {
          Ints sum[M];
          int4_block<M, FIFTH>(w + (g * blocks + b) * BLOCK * 8, FIFTH ? high + (g * blocks + b) * 64 : nullptr,
                               xq + b * BLOCK, K, sum);
          Floats ws = scale_f, wo = min_f;
          if (codes) {
            const auto [scale_code, min_code] = load_byte_pairs(codes + (g * blocks + b) * 16);
            ws = mul(scale_f, scale_code), wo = mul(min_f, min_code);
          }
          for (int m = 0; m < M; ++m) {
            acc[m] = fmadd(to_floats(sum[m]), mul(ws, set1(x_scale[m * blocks + b])), acc[m]);
            acc[m] = fmadd(wo, set1(x_sum[m * blocks + b]), acc[m]);
          }
        }
      }
      for (int m = 0; m < M; ++m) out.store_lanes(m * N + g * 16, acc[m], std::min<int64_t>(16, N - g * 16));
    }
  }
};

// int6 weights in the kernel's layout (vnni.py: pack_int6_vnni): their low 4 bits as Int4Gemv's w, their high 2
// bits 128 bytes a block (int6_block). A block's two groups of 16 inputs have int8 codes, [groups, K/32, 16, 2],
// times a float16 factor per super-block, [groups, K/S, 16]: w = (factor * code) * (q - 32). A group's
// integer sum times the activations' scale, less 32 times their sum, is scaled once by factor * code. (Its loop
// over column groups is Int4Gemv's, written out: a helper taking the body as a lambda cost ~11% of prefill.)
struct Int6Gemv {
  const uint8_t* w; const uint8_t* high; const uint16_t* factor; const uint16_t* codes; int64_t per;
  const int8_t* xq; const float* x_scale; const float* x_offset16; Output out; int64_t N, K;
  static constexpr int64_t TILE = 4, GRAIN = 8;

  int64_t units() const { return (N + 15) / 16; }

  Int6Gemv at_row(int64_t row) const {
    Int6Gemv k = *this;
    k.xq += row * K, k.x_scale += row * (K / BLOCK), k.x_offset16 += row * (2 * K / BLOCK), k.out = out + row * N;
    return k;
  }

  template <int M>
  void rows(int64_t begin, int64_t end) const {
    const int64_t blocks = K / BLOCK, factors = blocks / per;
    for (int64_t g = begin; g < end; ++g) {
      Floats acc[M];
      for (int m = 0; m < M; ++m) acc[m] = set1(0.f);
      for (int64_t f = 0; f < factors; ++f) {
        const Floats d = load_halves(factor + (g * factors + f) * 16);
        for (int64_t b = f * per; b < (f + 1) * per; ++b) {
          const auto [first, second] = load_signed_byte_pairs(codes + (g * blocks + b) * 16);
          const Floats ws[2] = {mul(d, first), mul(d, second)};  // exact: an 11-bit mantissa times 8 bits
          for (int h = 0; h < 2; ++h) {  // a group of 16: ws * (sum * xs - 32 * x_sum), the activations' terms first
            Ints sum[M];
            int6_block<M>(w + ((g * blocks + b) * 2 + h) * 128, high + ((g * blocks + b) * 2 + h) * 64,
                          xq + b * BLOCK + 16 * h, K, sum);
            for (int m = 0; m < M; ++m) {
              const Floats x_terms = fmadd(to_floats(sum[m]), set1(x_scale[m * blocks + b]),
                                           set1(x_offset16[m * 2 * blocks + 2 * b + h]));
              acc[m] = fmadd(ws[h], x_terms, acc[m]);
            }
          }
        }
      }
      for (int m = 0; m < M; ++m) out.store_lanes(m * N + g * 16, acc[m], std::min<int64_t>(16, N - g * 16));
    }
  }
};

// The kernel over one int8 weight of N columns in Int8Gemv's layout: q int8 [groups, K * 16], scales float
// [groups * 16]; x the activations as int8_activations gives them.
Int8Gemv int8_kernel(const at::Tensor& q, const at::Tensor& scales, int64_t N, const QuantizedRows& r,
                     const uint8_t* x, Output out) {
  const int64_t groups = q.size(0), K = q.size(1) / 16;
  TORCH_CHECK(q.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat && q.is_contiguous() &&
              scales.is_contiguous() && groups == (N + 15) / 16 && q.size(1) % (16 * K_ALIGN) == 0 &&
              scales.numel() == groups * 16, "int8_gemv: unsupported layout");
  return Int8Gemv{q.data_ptr<int8_t>(), scales.data_ptr<float>(), x, r.scale, out, N, K};
}

// The kernel over one int4 weight of N columns in Int4Gemv's layout: q uint8 [groups, K * 8], scales and mins
// (none: symmetric) float16 [groups, K/32, 16] or, with codes uint8 [groups, K/32, 16, 2], [groups, K/S, 16];
// int5's high uint8 [groups, K * 2].
Int4Gemv int4_kernel(const at::Tensor& q, const at::Tensor& scales, const c10::optional<at::Tensor>& mins, int64_t N,
                     const c10::optional<at::Tensor>& codes, const c10::optional<at::Tensor>& high,
                     const QuantizedRows& r, Output out) {
  const int64_t groups = q.size(0), K = q.size(1) / 8, blocks = K / BLOCK;
  const int64_t factors = scales.dim() == 3 ? scales.size(1) : 0;
  TORCH_CHECK(q.scalar_type() == at::kByte && scales.scalar_type() == at::kHalf && q.is_contiguous() &&
              scales.is_contiguous() && groups == (N + 15) / 16 && q.size(1) % (8 * K_ALIGN) == 0 &&
              factors > 0 && blocks % factors == 0 && scales.sizes() == at::IntArrayRef({groups, factors, 16}) &&
              (codes || factors == blocks) &&
              (!codes || (codes->scalar_type() == at::kByte && codes->is_contiguous() && mins &&
                          codes->sizes() == at::IntArrayRef({groups, blocks, 16, 2}))) &&
              (!mins ||
               (mins->scalar_type() == at::kHalf && mins->is_contiguous() && mins->sizes() == scales.sizes())) &&
              (!high || (high->scalar_type() == at::kByte && high->is_contiguous() &&
                         high->sizes() == at::IntArrayRef({groups, K * 2}))),
              "int4_gemv: unsupported layout");
  const auto bits = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); };
  return Int4Gemv{q.data_ptr<uint8_t>(), high ? high->data_ptr<uint8_t>() : nullptr, bits(scales),
                  mins ? bits(*mins) : nullptr, codes ? bits(*codes) : nullptr, blocks / factors, high ? 16.f : 8.f,
                  r.q, r.scale, r.sum, out, N, K};
}

// The kernel over one int6 weight of N columns in Int6Gemv's layout: q uint8 [groups, K * 8] (as int4's), high
// uint8 [groups, K * 4], factors float16 [groups, K/S, 16], codes int8 [groups, K/32, 16, 2].
Int6Gemv int6_kernel(const at::Tensor& q, const at::Tensor& high, const at::Tensor& factors, const at::Tensor& codes,
                     int64_t N, const QuantizedRows& r, Output out) {
  const int64_t groups = q.size(0), K = q.size(1) / 8, blocks = K / BLOCK;
  const int64_t supers = factors.dim() == 3 ? factors.size(1) : 0;
  TORCH_CHECK(q.scalar_type() == at::kByte && high.scalar_type() == at::kByte && factors.scalar_type() == at::kHalf &&
              codes.scalar_type() == at::kChar && q.is_contiguous() && high.is_contiguous() &&
              factors.is_contiguous() && codes.is_contiguous() && groups == (N + 15) / 16 &&
              q.size(1) % (8 * K_ALIGN) == 0 && high.sizes() == at::IntArrayRef({groups, K * 4}) && supers > 0 &&
              blocks % supers == 0 && factors.sizes() == at::IntArrayRef({groups, supers, 16}) &&
              codes.sizes() == at::IntArrayRef({groups, blocks, 16, 2}), "int6_gemv: unsupported layout");
  const auto bits = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); };
  return Int6Gemv{q.data_ptr<uint8_t>(), high.data_ptr<uint8_t>(), bits(factors), bits(codes), blocks / supers,
                  r.q, r.scale, r.offset16, out, N, K};
}

// Mixture-of-experts decode: row r of the activations times the weight of expert[r], from one kernel per
// expert over that expert's own parts (not a stacked copy). Fills the kernels' output, R rows.
template <typename Kernel>
void expert_rows(const std::vector<Kernel>& experts, const at::Tensor& expert, int64_t R) {
  const at::Tensor chosen = expert.to(at::kLong).contiguous();
  TORCH_CHECK(chosen.numel() == R, "vnni experts: one expert per row");
  const int64_t* e = chosen.data_ptr<int64_t>();
  std::vector<Kernel> kernels;
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(e[r] >= 0 && e[r] < static_cast<int64_t>(experts.size()), "vnni experts: expert index out of range");
    kernels.push_back(experts[e[r]].at_row(r));
  }
  const int64_t units = experts[0].units();
  at::parallel_for(0, R * units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin / units; r < R && r * units < end; ++r)
      kernels[r].template rows<1>(std::max(begin - r * units, int64_t{0}), std::min(end - r * units, units));
  });
}

void check_same_shapes(at::TensorList q) {
  for (const at::Tensor& t : q) TORCH_CHECK(t.sizes() == q[0].sizes(), "vnni experts: the experts' shapes differ");
}

}  // namespace

// x [M, K]; q, scales as int8_kernel's for N columns. Returns [M, N] in x's dtype.
at::Tensor int8_gemv(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& scales, int64_t N) {
  const Rows x(x_in, q.size(1) / 16);
  const QuantizedRows r = quantize_rows(x);
  at::Tensor out = x.empty_out(N);
  run(int8_kernel(q, scales, N, r, int8_activations(r, x.x.numel()), Output(out)), out.size(0));
  return out.to(x_in.scalar_type());
}

// x [M, K]; q, scales, mins, codes, high as int4_kernel's for N columns. Returns [M, N] in x's dtype.
at::Tensor int4_gemv(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& mins, int64_t N, const c10::optional<at::Tensor>& codes,
                     const c10::optional<at::Tensor>& high) {
  const Rows x(x_in, q.size(1) / 8);
  const QuantizedRows r = quantize_rows(x);
  at::Tensor out = x.empty_out(N);
  run(int4_kernel(q, scales, mins, N, codes, high, r, Output(out)), out.size(0));
  return out.to(x_in.scalar_type());
}

// x [M, K]; q, high, factors, codes as int6_kernel's for N columns. Returns [M, N] in x's dtype.
at::Tensor int6_gemv(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& high, const at::Tensor& factors,
                     const at::Tensor& codes, int64_t N) {
  const Rows x(x_in, q.size(1) / 8);
  const QuantizedRows r = quantize_rows(x);
  at::Tensor out = x.empty_out(N);
  run(int6_kernel(q, high, factors, codes, N, r, Output(out)), out.size(0));
  return out.to(x_in.scalar_type());
}

at::Tensor int8_gemv_experts(const at::Tensor& x_in, at::TensorList q, at::TensorList scales, int64_t N,
                             const at::Tensor& expert) {
  check_same_shapes(q);
  const Rows x(x_in, q[0].size(1) / 16);
  const QuantizedRows r = quantize_rows(x);
  const uint8_t* xi = int8_activations(r, x.x.numel());
  at::Tensor out = x.empty_out(N);
  std::vector<Int8Gemv> experts;
  for (size_t i = 0; i < q.size(); ++i) experts.push_back(int8_kernel(q[i], scales[i], N, r, xi, Output(out)));
  expert_rows(experts, expert, out.size(0));
  return out.to(x_in.scalar_type());
}

at::Tensor int4_gemv_experts(const at::Tensor& x_in, at::TensorList q, at::TensorList scales,
                             at::TensorList mins, int64_t N, const at::Tensor& expert, at::TensorList codes,
                             at::TensorList high) {
  check_same_shapes(q);
  TORCH_CHECK((mins.empty() || mins.size() == q.size()) && (codes.empty() || codes.size() == q.size()) &&
              (high.empty() || high.size() == q.size()),
              "int4_gemv_experts: mins (and codes, and high) for every expert or none");
  const Rows x(x_in, q[0].size(1) / 8);
  const QuantizedRows r = quantize_rows(x);
  at::Tensor out = x.empty_out(N);
  std::vector<Int4Gemv> experts;
  for (size_t i = 0; i < q.size(); ++i) {
    const auto of_expert = [i](at::TensorList t) { return t.empty() ? c10::nullopt : c10::optional<at::Tensor>(t[i]); };
    experts.push_back(int4_kernel(q[i], scales[i], of_expert(mins), N, of_expert(codes), of_expert(high), r,
                                  Output(out)));
  }
  expert_rows(experts, expert, out.size(0));
  return out.to(x_in.scalar_type());
}

at::Tensor int6_gemv_experts(const at::Tensor& x_in, at::TensorList q, at::TensorList high, at::TensorList factors,
                             at::TensorList codes, int64_t N, const at::Tensor& expert) {
  check_same_shapes(q);
  TORCH_CHECK(high.size() == q.size() && factors.size() == q.size() && codes.size() == q.size(),
              "int6_gemv_experts: every part for every expert");
  const Rows x(x_in, q[0].size(1) / 8);
  const QuantizedRows r = quantize_rows(x);
  at::Tensor out = x.empty_out(N);
  std::vector<Int6Gemv> experts;
  for (size_t i = 0; i < q.size(); ++i)
    experts.push_back(int6_kernel(q[i], high[i], factors[i], codes[i], N, r, Output(out)));
  expert_rows(experts, expert, out.size(0));
  return out.to(x_in.scalar_type());
}

namespace {

// Eight int4 inputs in a 32-bit word, from the canonical layout (byte b: inputs 2b and 2b+1 in its low and
// high nibble) to Int4Gemv's (byte b: inputs b and b+4).
inline uint32_t int4_lanes(uint32_t w) {
  const uint32_t c0 = w & 0xFF, c1 = (w >> 8) & 0xFF, c2 = (w >> 16) & 0xFF, c3 = w >> 24;
  return ((c0 & 0xF) | (c2 & 0xF) << 4) | ((c0 >> 4) | (c2 & 0xF0)) << 8 | ((c1 & 0xF) | (c3 & 0xF) << 4) << 16 |
         ((c1 >> 4) | (c3 & 0xF0)) << 24;
}

// Sixteen 2-bit fields in a 32-bit word, from the canonical int6 high bits (byte t: inputs 4t + i in bits 2i) to
// Int6Gemv's (byte b: inputs 4i + b in bits 2i): a 4x4 transpose of the fields, in two delta swaps (its own inverse).
inline uint32_t int6_high_lanes(uint32_t x) {
  uint32_t t = ((x >> 6) ^ x) & 0x00CC00CCu;
  x ^= t ^ (t << 6);
  t = ((x >> 12) ^ x) & 0x0000F0F0u;
  return x ^ t ^ (t << 12);
}

// 32 1-bit fields in a 32-bit word, from the canonical int5 fifth bits (byte t: inputs 8t + i in bit i) to
// Int4Gemv's (byte b: inputs 4s + b in bit s): input p moves from bit p to bit 8 (p % 4) + p / 4, a byte at a time
// (byte t's bit i to bit 8 (i % 4) + i / 4 + 2t).
inline uint32_t int5_high_lanes(uint32_t x) {
  static const auto spread = [] {
    std::array<uint32_t, 256> table{};
    for (int v = 0; v < 256; ++v)
      for (int i = 0; i < 8; ++i) table[v] |= static_cast<uint32_t>((v >> i) & 1) << (8 * (i % 4) + i / 4);
    return table;
  }();
  return spread[x & 0xFF] | spread[(x >> 8) & 0xFF] << 2 | spread[(x >> 16) & 0xFF] << 4 | spread[x >> 24] << 6;
}

template <typename Word>
void rows_to_columns(const std::vector<const uint8_t*>& x, Word* out, int64_t J, int64_t repeat, int64_t fields) {
  const int64_t N = x.size();
  at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t begin, int64_t end) {
    std::vector<Word> rows(16 * J);  // a group's 16 rows, rearranged in a contiguous pass (which vectorizes)
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t c = 0; c < 16; ++c) {
        Word* row = rows.data() + c * J;
        if (g * 16 + c >= N) {
          std::fill(row, row + J, Word{0});
          continue;
        }
        std::memcpy(row, x[g * 16 + c], J * sizeof(Word));
        if constexpr (sizeof(Word) == 4) {
          if (fields == 4)
            for (int64_t j = 0; j < J; ++j) row[j] = int4_lanes(row[j]);
          if (fields == 2)
            for (int64_t j = 0; j < J; ++j) row[j] = int6_high_lanes(row[j]);
          if (fields == 1)
            for (int64_t j = 0; j < J; ++j) row[j] = int5_high_lanes(row[j]);
        }
      }
      for (int64_t j = 0; j < J; ++j) {  // writing in order (1.7x faster than reading in order)
        Word* o = out + (g * J + j) * repeat * 16;
        for (int64_t c = 0; c < 16; ++c) o[c] = rows[c * J + j];
        for (int64_t r = 1; r < repeat; ++r) std::memcpy(o + r * 16, o, 16 * sizeof(Word));
      }
    }
  });
}

// Whether 2 MB pages still come fast (weight_empty): the first that do not turn them off for the process. Off
// where the system has transparent huge pages off (or none).
std::atomic<bool> huge_pages_fast{[] {
  std::ifstream file("/sys/kernel/mm/transparent_hugepage/enabled");
  const std::string modes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  return !modes.empty() && modes.find("[never]") == std::string::npos;
}()};

// uint8 [rows, cols]; where it spans 2 MB, a mapping of its own aligned to 2 MB and asked for transparent huge
// pages before its first touch (its last partial 2 MB in 4 KB pages). A decode step reads each weight from memory
// once a token, which these GEMVs do 1.1-1.2x faster from 2 MB pages (fewer TLB misses; measured in a VM). Where
// they fault in slowly (over 1 ns a byte: a VM whose host backs the guest's memory on first touch, ~3 s a GB
// more at load; a kernel compacting memory), 4 KB pages from then on. LILMISTRAL_HUGE_PAGES=1: always, =0: never.
at::Tensor weight_empty(int64_t rows, int64_t cols) {
  const auto options = at::TensorOptions().dtype(at::kByte);
#ifdef MADV_HUGEPAGE
  constexpr int64_t HUGE_PAGE = 2 << 20, PAGE = 4096;
  const char* setting = std::getenv("LILMISTRAL_HUGE_PAGES");
  const bool always = setting && std::strcmp(setting, "1") == 0, never = setting && std::strcmp(setting, "0") == 0;
  const int64_t length = (rows * cols + PAGE - 1) / PAGE * PAGE;
  if (length >= HUGE_PAGE && !never && (always || huge_pages_fast)) {
    void* mapped = mmap(nullptr, length + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapped != MAP_FAILED) {
      auto* region = static_cast<char*>(mapped);
      char* data = region + (-reinterpret_cast<uintptr_t>(region) & (HUGE_PAGE - 1));
      if (data > region) munmap(region, data - region);
      munmap(data + length, region + HUGE_PAGE - data);  // the rest of the extra 2 MB
      madvise(data, length, MADV_HUGEPAGE);
      const auto start = std::chrono::steady_clock::now();
      for (int64_t i = 0; i < length; i += PAGE) static_cast<volatile char*>(data)[i] = 0;  // faulting them in, timed
      if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > length * 1e-9)
        huge_pages_fast = false;
      return at::from_blob(data, {rows, cols}, [length](void* p) { munmap(p, length); }, options);
    }
  }
#endif
  return at::empty({rows, cols}, options);
}

}  // namespace

// Load-time repacking into the kernels' layouts (vnni.py: pack_int8_vnni, pack_int4_vnni), one pass over the
// weight: the rows of x [N, J words of word_bytes], given as blocks of rows (a fused projection's parts, not
// concatenated first), become columns in groups of 16, uint8 [groups, J * repeat * 16 words]: word (g, j, c) =
// x's word (16g + c, j / repeat), zero past N; each 32-bit word's fields reordered as the kernels read them:
// fields 4, eight int4 inputs (int4_lanes); 2, int6's high bits (int6_high_lanes); 1, int5's fifth bits
// (int5_high_lanes); 0, none.
at::Tensor pack_columns(at::TensorList blocks, int64_t word_bytes, int64_t repeat, int64_t fields) {
  TORCH_CHECK(!blocks.empty() && (word_bytes == 2 || word_bytes == 4) && repeat >= 1 &&
              (fields == 0 || (fields == 1 || fields == 2 || fields == 4) && word_bytes == 4),
              "pack_columns: unsupported arguments");
  const int64_t row_bytes = blocks[0].size(1) * blocks[0].element_size();
  std::vector<at::Tensor> contiguous;
  std::vector<const uint8_t*> rows;
  for (const at::Tensor& block : blocks) {
    TORCH_CHECK(block.dim() == 2 && block.size(1) * block.element_size() == row_bytes && row_bytes % word_bytes == 0,
                "pack_columns: blocks of rows of different sizes");
    contiguous.push_back(block.contiguous());
    const auto* first = static_cast<const uint8_t*>(contiguous.back().data_ptr());
    for (int64_t i = 0; i < block.size(0); ++i) rows.push_back(first + i * row_bytes);
  }
  const int64_t N = rows.size(), J = row_bytes / word_bytes;
  at::Tensor out = weight_empty((N + 15) / 16, J * repeat * 16 * word_bytes);
  if (word_bytes == 4) rows_to_columns(rows, reinterpret_cast<uint32_t*>(out.data_ptr<uint8_t>()), J, repeat, fields);
  else rows_to_columns(rows, reinterpret_cast<uint16_t*>(out.data_ptr<uint8_t>()), J, repeat, fields);
  return out;
}

// Operators in C++ (not torch.library.custom_op, whose Python dispatch costs ~10 us a call): vnni.py adds
// their shapes for torch.compile.
TORCH_LIBRARY(lilmistral, m) {
  m.def("int8_gemv(Tensor x, Tensor q, Tensor scales, int n) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor q, Tensor scales, Tensor? mins, int n, Tensor? codes=None, Tensor? high=None) "
        "-> Tensor");
  m.def("int8_gemv_experts(Tensor x, Tensor[] q, Tensor[] scales, int n, Tensor expert) -> Tensor");
  m.def("int4_gemv_experts(Tensor x, Tensor[] q, Tensor[] scales, Tensor[] mins, int n, Tensor expert, "
        "Tensor[] codes, Tensor[] high) -> Tensor");
  m.def("int6_gemv(Tensor x, Tensor q, Tensor high, Tensor scales, Tensor codes, int n) -> Tensor");
  m.def("int6_gemv_experts(Tensor x, Tensor[] q, Tensor[] high, Tensor[] scales, Tensor[] codes, int n, "
        "Tensor expert) -> Tensor");
  m.def("pack_columns(Tensor[] blocks, int word_bytes, int repeat, int fields) -> Tensor");
}

TORCH_LIBRARY_IMPL(lilmistral, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int8_gemv_experts", &int8_gemv_experts);
  m.impl("int4_gemv_experts", &int4_gemv_experts);
  m.impl("int6_gemv", &int6_gemv);
  m.impl("int6_gemv_experts", &int6_gemv_experts);
  m.impl("pack_columns", &pack_columns);
}
