// GGUF's block formats (convert/gguf.py reads the files): rows of blocks decoded to float32 with the gguf
// package's operations (its dequantize_blocks, step for step: the same bits), or to int8 rows as pack.py's
// quantize_int8 makes them from those floats, one row at a time; Q4_K's (Q5_K's) scales and mins, and the quants
// of Q4 (Q5) blocks, as pack.py's int4 (int5) parts; Q6_K's quants as its int6 parts. Loading a GGUF runs these
// over most of its bytes (docs/performance.md, "Loading"). vnni.py compiles this file after lanes.cpp and
// vnni.cpp (store_int8), in one unit.
#include <c10/util/Half.h>

#include <string>
#include <tuple>
#include <vector>

namespace {

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

inline uint32_t word_at(const uint8_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

// Q4_0 (Q5_0) blocks of 32: float16 d, (32 high bits,) 16 bytes whose low nibbles are values 0-15 and high ones
// 16-31; w = d * (q - 8) (q - 16). Q4_1 (Q5_1): d, a float16 min m, ...; w = d * q + m. Q8_0: d, 32 int8s.
template <bool MIN, bool HIGH_BIT>
void q4_q5(const uint8_t* b, float* y) {
  const float d = half_at(b), m = MIN ? half_at(b + 2) : 0.f;
  const uint32_t high = HIGH_BIT ? word_at(b + (MIN ? 4 : 2)) : 0;
  const uint8_t* qs = b + (MIN ? 4 : 2) + (HIGH_BIT ? 4 : 0);
  for (int i = 0; i < 32; ++i) {
    const int q = ((i < 16 ? qs[i] : qs[i - 16] >> 4) & 0x0F) | ((high >> i) & 1) << 4;
    y[i] = MIN ? d * static_cast<float>(q) + m : d * static_cast<float>(q - (HIGH_BIT ? 16 : 8));
  }
}

void q8_0(const uint8_t* b, float* y) {
  const float d = half_at(b);
  for (int i = 0; i < 32; ++i) y[i] = static_cast<float>(static_cast<int8_t>(b[2 + i])) * d;
}

// The 6-bit scale and min of sub-block j of a Q4_K / Q5_K super-block, from its 12 bytes s: sub-blocks 0-3 in
// the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); 4-7 in the nibbles of bytes 8-11 and those bytes' top 2.
inline std::pair<int, int> scale_min(const uint8_t* s, int j) {
  if (j < 4) return {s[j] & 63, s[j + 4] & 63};
  return {(s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30), (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30)};
}

// Q4_K (Q5_K) super-blocks of 256: float16 d and dmin, 12 bytes of scales and mins, (32 bytes of high bits: bit j
// of byte i for value i of sub-block j,) 128 bytes of quants, 32 bytes for each two sub-blocks (low nibbles the
// first); sub-block j: w = (d * scale_j) * q - dmin * min_j.
template <bool HIGH_BIT>
void k_quant(const uint8_t* b, float* y) {
  const float d = half_at(b), dmin = half_at(b + 2);
  const uint8_t* high = b + 16;
  const uint8_t* qs = b + 16 + (HIGH_BIT ? 32 : 0);
  for (int j = 0; j < 8; ++j) {
    const auto [scale, min] = scale_min(b + 4, j);
    const float dj = d * static_cast<float>(scale), mj = dmin * static_cast<float>(min);
    const uint8_t* chunk = qs + 32 * (j / 2);
    for (int i = 0; i < 32; ++i) {
      const int q = ((chunk[i] >> (4 * (j % 2))) & 0x0F) | (HIGH_BIT ? ((high[i] >> j) & 1) << 4 : 0);
      y[32 * j + i] = dj * static_cast<float>(q) - mj;
    }
  }
}

// Q6_K super-blocks of 256: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales (one per 16 values), float16
// d. Per half of 128 values, value l + 32i (l < 32) takes nibble i / 2 of low byte l + 32 (i % 2) and bits 2i of
// high byte l; w = (d * scale) * (q - 32).
inline int q6k_quant(const uint8_t* low, const uint8_t* high, int i, int l) {  // low, high: a half's bytes
  return ((low[l + 32 * (i % 2)] >> (4 * (i / 2))) & 0x0F) | ((high[l] >> (2 * i)) & 3) << 4;
}

void q6_k(const uint8_t* __restrict b, float* __restrict y) {  // restrict: else GCC does not vectorize it
  const float d = half_at(b + 208);
  for (int h = 0; h < 2; ++h) {
    const uint8_t* low = b + 64 * h;
    const uint8_t* high = b + 128 + 32 * h;
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192 + 8 * h);
    float* out = y + 128 * h;
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 2; ++j) {
        const float scale = d * static_cast<float>(scales[2 * i + j]);
        for (int l = 16 * j; l < 16 * j + 16; ++l)
          out[l + 32 * i] = scale * static_cast<float>(q6k_quant(low, high, i, l) - 32);
      }
  }
}

struct BlockType {
  int64_t values, bytes;
  void (*decode)(const uint8_t*, float*);
};

BlockType block_type(const std::string& kind) {
  if (kind == "Q4_0") return {32, 18, q4_q5<false, false>};
  if (kind == "Q4_1") return {32, 20, q4_q5<true, false>};
  if (kind == "Q5_0") return {32, 22, q4_q5<false, true>};
  if (kind == "Q5_1") return {32, 24, q4_q5<true, true>};
  if (kind == "Q8_0") return {32, 34, q8_0};
  if (kind == "Q4_K") return {256, 144, k_quant<false>};
  if (kind == "Q5_K") return {256, 176, k_quant<true>};
  TORCH_CHECK(kind == "Q6_K", "gguf blocks: unsupported type ", kind);
  return {256, 210, q6_k};
}

// The values of a row of `blocks` blocks of `type` at row, as float32 at out.
inline void decode_row(const BlockType& type, const uint8_t* row, int64_t blocks, float* out) {
  for (int64_t b = 0; b < blocks; ++b) type.decode(row + b * type.bytes, out + b * type.values);
}

// The blocks of `type` in each row of raw (uint8 [N, row bytes]).
int64_t row_blocks(const at::Tensor& raw, const BlockType& type) {
  TORCH_CHECK(raw.dim() == 2 && raw.scalar_type() == at::kByte && raw.stride(1) == 1 && raw.size(1) % type.bytes == 0,
              "gguf blocks: raw must be uint8 [N, whole blocks]");
  return raw.size(1) / type.bytes;
}

}  // namespace

// Rows of GGUF blocks of type `kind` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), uint8 [N, row bytes] ->
// float32 [N, values], the gguf package's bits.
at::Tensor gguf_dequantize(const at::Tensor& raw, c10::string_view kind) {
  const BlockType type = block_type(std::string(kind));
  const int64_t blocks = row_blocks(raw, type), K = blocks * type.values;
  at::Tensor out = at::empty({raw.size(0), K}, raw.options().dtype(at::kFloat));
  const uint8_t* in = raw.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, raw.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) decode_row(type, in + n * raw.stride(0), blocks, o + n * K);
  });
  return out;
}

// The same rows as int8 [N, values] and float16 scales [N]: pack.py's quantize_int8 of gguf_dequantize(raw), bit
// for bit (scale = max |w| / 127, at least 1e-10, as float16; q = round(w / scale) within +-127; 0 / 0 gives 0),
// each row decoded into a buffer of the thread's.
std::tuple<at::Tensor, at::Tensor> gguf_int8(const at::Tensor& raw, c10::string_view kind) {
  const BlockType type = block_type(std::string(kind));
  const int64_t blocks = row_blocks(raw, type), K = blocks * type.values;
  at::Tensor q = at::empty({raw.size(0), K}, raw.options().dtype(at::kChar));
  at::Tensor scales = at::empty({raw.size(0)}, raw.options().dtype(at::kHalf));
  const uint8_t* in = raw.data_ptr<uint8_t>();
  int8_t* qp = q.data_ptr<int8_t>();
  at::Half* sp = scales.data_ptr<at::Half>();
  at::parallel_for(0, raw.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(K);
    for (int64_t n = begin; n < end; ++n) {
      decode_row(type, in + n * raw.stride(0), blocks, w.data());
      Floats top = set1(0.f);
      for (int64_t k = 0; k < K; k += 16) top = max(top, abs(load_floats(w.data() + k)));  // K: whole blocks of 32
      sp[n] = at::Half(std::max(reduce_max(top) / 127.f, 1e-10f));
      const float scale = static_cast<float>(sp[n]);
      int8_t* q_row = qp + n * K;
      if (scale == 0.f) {  // w / 0: +-inf, rounded and clamped to +-127, or NaN (0 / 0), which PyTorch makes 0
        for (int64_t k = 0; k < K; ++k) q_row[k] = w[k] > 0.f ? 127 : w[k] < 0.f ? -127 : 0;
        continue;
      }
      for (int64_t k = 0; k < K; k += 16)  // |w / scale| < 255 here: above 127, store_int8 saturates
        store_int8(max(round_to_integer(div(load_floats(w.data() + k), set1(scale))), set1(-127.f)), q_row + k);
    }
  });
  return {q, scales};
}

// Q4_K (Q5_K) super-blocks uint8 [N, B, 144 (176)] -> the 6-bit codes of their sub-blocks' scales and mins, uint8
// [N, B * 8] each, as convert/gguf.py's q4k_parts keeps them (times the super-block's d and -dmin).
std::tuple<at::Tensor, at::Tensor> q4k_codes(const at::Tensor& blocks) {
  const int64_t size = blocks.dim() == 3 ? blocks.size(2) : 0;
  TORCH_CHECK(blocks.scalar_type() == at::kByte && (size == 144 || size == 176) && blocks.stride(2) == 1 &&
              blocks.stride(1) == size, "q4k_codes: blocks must be uint8 [N, B, 144 or 176]");
  const int64_t N = blocks.size(0), B = blocks.size(1), stride = blocks.stride(0);
  at::Tensor scales = at::empty({N, B * 8}, blocks.options()), mins = at::empty_like(scales);
  const uint8_t* in = blocks.data_ptr<uint8_t>();
  uint8_t* s = scales.data_ptr<uint8_t>();
  uint8_t* m = mins.data_ptr<uint8_t>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t b = 0; b < B; ++b)
        for (int j = 0; j < 8; ++j) {
          const auto [scale, min] = scale_min(in + n * stride + b * size + 4, j);
          s[(n * B + b) * 8 + j] = static_cast<uint8_t>(scale), m[(n * B + b) * 8 + j] = static_cast<uint8_t>(min);
        }
  });
  return {scales, mins};
}

namespace {

// 16 bytes of GGUF int4 quants, byte j holding values j (low nibble) and j + 16 (high): as 16-bit lanes (bytes
// 2j, 2j + 1), pack.py's bytes of their low nibbles' values (lanes' low bytes: (v[2j] | v[2j + 1] << 4)) and of
// their high nibbles'.
inline std::pair<__m128i, __m128i> nibble_pairs(const uint8_t* q) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i nibble = _mm_set1_epi8(0x0F), low_byte = _mm_set1_epi16(0x00FF);
  const __m128i lo = _mm_and_si128(v, nibble), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nibble);
  return {_mm_and_si128(_mm_or_si128(lo, _mm_srli_epi16(lo, 4)), low_byte),
          _mm_and_si128(_mm_or_si128(hi, _mm_srli_epi16(hi, 4)), low_byte)};
}

}  // namespace

// GGUF's Q4_0 / Q4_1 / Q4_K quants (convert/gguf.py) as pack.py's canonical bytes, one pass. blocks: uint8 [N,
// B, block bytes], each block's quants after `head` bytes. Q4_0 / Q4_1 (k_quants false): 16 bytes of 32
// values, byte j holding values j and j + 16. Q4_K (true): 128 bytes of 256 values, 4 chunks of 32 bytes, chunk
// c's low nibbles values 64c..64c+31 and its high ones the next 32. Out: uint8 [N, B * values / 2], byte b of
// a block holding values 2b, 2b + 1 (low, high nibble).
at::Tensor q4_canonical(const at::Tensor& blocks, int64_t head, bool k_quants) {
  const int64_t quant_bytes = k_quants ? 128 : 16;
  TORCH_CHECK(blocks.dim() == 3 && blocks.scalar_type() == at::kByte && blocks.size(2) == head + quant_bytes &&
              blocks.stride(2) == 1 && blocks.stride(1) == head + quant_bytes, "q4_canonical: unsupported arguments");
  const int64_t N = blocks.size(0), B = blocks.size(1), row_stride = blocks.stride(0);
  at::Tensor out = at::empty({N, B * quant_bytes}, blocks.options());
  const uint8_t* in = blocks.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t b = 0; b < B; ++b) {
        const uint8_t* q = in + n * row_stride + b * (head + quant_bytes) + head;
        auto* w = reinterpret_cast<__m128i*>(o + (n * B + b) * quant_bytes);
        if (!k_quants) {
          const auto [lo, hi] = nibble_pairs(q);  // values 0..15, 16..31
          _mm_storeu_si128(w, _mm_packus_epi16(lo, hi));
          continue;
        }
        for (int c = 0; c < 4; ++c) {  // a chunk's halves: values 0..15 and 16..31 of its two sub-blocks
          const auto [lo_a, hi_a] = nibble_pairs(q + 32 * c);
          const auto [lo_b, hi_b] = nibble_pairs(q + 32 * c + 16);
          _mm_storeu_si128(w + 2 * c, _mm_packus_epi16(lo_a, lo_b));
          _mm_storeu_si128(w + 2 * c + 1, _mm_packus_epi16(hi_a, hi_b));
        }
      }
  });
  return out;
}

// Q6_K super-blocks uint8 [N, B, 210] (see q6_k) -> pack.py's int6 quants: qweight uint8 [N, B * 128] (byte j:
// values 2j, 2j + 1 in its low and high nibble, their low 4 bits) and qhigh uint8 [N, B * 64] (byte j: values
// 4j..4j+3's high 2 bits, value 4j + i in bits 2i), one pass.
std::tuple<at::Tensor, at::Tensor> q6k_canonical(const at::Tensor& blocks) {
  TORCH_CHECK(blocks.dim() == 3 && blocks.scalar_type() == at::kByte && blocks.size(2) == 210 &&
              blocks.stride(2) == 1 && blocks.stride(1) == 210, "q6k_canonical: blocks must be uint8 [N, B, 210]");
  const int64_t N = blocks.size(0), B = blocks.size(1), stride = blocks.stride(0);
  at::Tensor low = at::empty({N, B * 128}, blocks.options()), high = at::empty({N, B * 64}, blocks.options());
  const uint8_t* in = blocks.data_ptr<uint8_t>();
  uint8_t* lo = low.data_ptr<uint8_t>();
  uint8_t* hi = high.data_ptr<uint8_t>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    uint8_t q[256];  // a block's quants in order
    for (int64_t n = begin; n < end; ++n)
      for (int64_t b = 0; b < B; ++b) {
        const uint8_t* block = in + n * stride + b * 210;
        for (int h = 0; h < 2; ++h)
          for (int i = 0; i < 4; ++i)
            for (int l = 0; l < 32; ++l)
              q[128 * h + 32 * i + l] = static_cast<uint8_t>(q6k_quant(block + 64 * h, block + 128 + 32 * h, i, l));
        uint8_t* l = lo + (n * B + b) * 128;
        uint8_t* t = hi + (n * B + b) * 64;
        for (int j = 0; j < 128; ++j) l[j] = (q[2 * j] & 0x0F) | (q[2 * j + 1] & 0x0F) << 4;
        for (int j = 0; j < 64; ++j)
          t[j] = (q[4 * j] >> 4) | (q[4 * j + 1] >> 4) << 2 | (q[4 * j + 2] >> 4) << 4 | (q[4 * j + 3] >> 4) << 6;
      }
  });
  return {low, high};
}

// Q5_K super-blocks uint8 [N, B, 176] -> pack.py's int5 qhigh, uint8 [N, B * 32]: their 32 bytes of fifth bits
// (bit j of byte i: value i of sub-block j) transposed, 8x8 bits at a time, to byte 4j + t holding values 32j + 8t
// + r in bit r.
at::Tensor q5k_highs(const at::Tensor& blocks) {
  TORCH_CHECK(blocks.dim() == 3 && blocks.scalar_type() == at::kByte && blocks.size(2) == 176 &&
              blocks.stride(2) == 1 && blocks.stride(1) == 176, "q5k_highs: blocks must be uint8 [N, B, 176]");
  const int64_t N = blocks.size(0), B = blocks.size(1), stride = blocks.stride(0);
  at::Tensor out = at::empty({N, B * 32}, blocks.options());
  const uint8_t* in = blocks.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t b = 0; b < B; ++b)
        for (int t = 0; t < 4; ++t) {
          uint64_t x;  // byte r: value 8t + r's bits, bit j its sub-block j's; transposed (Hacker's Delight 7-3)
          std::memcpy(&x, in + n * stride + b * 176 + 16 + 8 * t, 8);
          uint64_t d = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAull;
          x ^= d ^ (d << 7);
          d = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCull;
          x ^= d ^ (d << 14);
          d = (x ^ (x >> 28)) & 0x00000000F0F0F0F0ull;
          x ^= d ^ (d << 28);
          for (int j = 0; j < 8; ++j) o[(n * B + b) * 32 + 4 * j + t] = static_cast<uint8_t>(x >> (8 * j));
        }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(lilmistral, m) {
  m.def("gguf_dequantize(Tensor raw, str kind) -> Tensor");
  m.def("gguf_int8(Tensor raw, str kind) -> (Tensor, Tensor)");
  m.def("q4k_codes(Tensor blocks) -> (Tensor, Tensor)");
  m.def("q4_canonical(Tensor blocks, int head, bool k_quants) -> Tensor");
  m.def("q6k_canonical(Tensor blocks) -> (Tensor, Tensor)");
  m.def("q5k_highs(Tensor blocks) -> Tensor");
}

TORCH_LIBRARY_IMPL(lilmistral, CPU, m) {
  m.impl("gguf_dequantize", &gguf_dequantize);
  m.impl("gguf_int8", &gguf_int8);
  m.impl("q4k_codes", &q4k_codes);
  m.impl("q4_canonical", &q4_canonical);
  m.impl("q6k_canonical", &q6k_canonical);
  m.impl("q5k_highs", &q5k_highs);
}
