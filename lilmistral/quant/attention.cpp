// Attention on the CPU with AVX-512: softmax(q k^T * scale) v for each query row on its own, over the keys in
// chunks of 32 slots merged in slot order (an online softmax), so that a token's row gets the same numbers
// decoded alone as within its prompt. Decode-sized calls cost a few microseconds, where PyTorch's flash kernel
// costs tens. bfloat16 scores take AVX512-BF16 dot products where the CPU has them (checked at run time; the
// rest of the unit needs no more than AVX-512 VNNI). vnni.py compiles this file after vnni.cpp, in one unit:
// load16 and Output are vnni.cpp's.
#include <cmath>
#include <limits>
#include <type_traits>

namespace {

constexpr int64_t KEYS = 32;  // slots per chunk (a mask bit each, at most 64): its float32 keys and values fit L1
constexpr int64_t ROW_BLOCK = 8;   // query rows of one kv head per task: they share each chunk of keys converted once

// exp(x) (below -87 it returns ~1e-38, not 0; above 88.7, inf): 2^n * 2^f, n = round(x / ln 2), 2^f by Cephes'
// exp2f polynomial on [-0.5, 0.5], within 2 ulp.
inline __m512 exp512(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  for (const float c : {1.339887440266574e-3f, 9.618437357674640e-3f, 5.550332471162809e-2f, 2.402264791363012e-1f,
                        6.931472028550421e-1f, 1.f})
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

template <int HD>
struct Attention {
  const void* q; const void* k; const void* v; const bool* mask; Output out;
  bool bf16;  // q, k and v: bfloat16, else float32
  int64_t R, S, k_head, k_slot, v_head, v_slot, mask_rows;
  float scale;
  bool dot_bf16;  // scores by bfloat16 dot products (scores_bf16)

  // The valid slots of chunk [j0, j0 + n) for row r.
  __mmask64 valid(int64_t r, int64_t j0, int64_t n) const {
    const __mmask64 in_range = n >= 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1;
    if (!mask) return in_range;
    const bool* row = mask + (mask_rows == 1 ? 0 : r) * S + j0;
    return _mm512_test_epi8_mask(_mm512_maskz_loadu_epi8(in_range, row), _mm512_set1_epi8(1));
  }

  // The scores q.k * scale of NR rows against a chunk's valid keys (-inf elsewhere), from float32 copies of
  // both.
  template <int NR>
  void scores(__mmask64 ok, const float (*qf)[HD], const float (*kf)[HD], float (*s)[KEYS]) const {
    constexpr int V = HD / 16;
    __m512 qr[NR][V];
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < V; ++i) qr[r][i] = _mm512_load_ps(qf[r] + 16 * i);
    for (__mmask64 bits = ok; bits; bits &= bits - 1) {
      const int64_t j = __builtin_ctzll(bits);
      __m512 dot[NR][2];
      for (int r = 0; r < NR; ++r) dot[r][0] = dot[r][1] = _mm512_setzero_ps();
      for (int i = 0; i < V; ++i) {
        const __m512 key = _mm512_load_ps(kf[j] + 16 * i);
        for (int r = 0; r < NR; ++r) dot[r][i % 2] = _mm512_fmadd_ps(qr[r][i], key, dot[r][i % 2]);
      }
      for (int r = 0; r < NR; ++r) s[r][j] = _mm512_reduce_add_ps(_mm512_add_ps(dot[r][0], dot[r][1])) * scale;
    }
  }

  // The same from bfloat16 q rows (qb, HD apart) and keys (the chunk's first slot at `keys`) as they are,
  // by AVX512-BF16 dot products (pairs of exact products summed into float32): half the multiplies, no
  // conversion of the keys.
  template <int NR>
  __attribute__((target("avx512bf16"))) void scores_bf16(__mmask64 ok, const uint16_t* qb, const uint16_t* keys,
                                                       float (*s)[KEYS]) const {
    constexpr int W = HD / 32;
    __m512bh qr[NR][W];
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < W; ++i) qr[r][i] = (__m512bh)_mm512_loadu_si512(qb + r * HD + 32 * i);
    for (__mmask64 bits = ok; bits; bits &= bits - 1) {
      const int64_t j = __builtin_ctzll(bits);
      __m512 dot[NR];
      for (int r = 0; r < NR; ++r) dot[r] = _mm512_setzero_ps();
      for (int i = 0; i < W; ++i) {
        const __m512bh key = (__m512bh)_mm512_loadu_si512(keys + j * k_slot + 32 * i);
        for (int r = 0; r < NR; ++r) dot[r] = _mm512_dpbf16_ps(dot[r], qr[r][i], key);
      }
      for (int r = 0; r < NR; ++r) s[r][j] = _mm512_reduce_add_ps(dot[r]) * scale;
    }
  }

  // One chunk for NR rows of a block that attend to the same slots (`ok`): each key and value vector loaded
  // once for all NR, and each row's arithmetic exactly as it would be alone. Scores, then an online-softmax
  // update of the rows' float32 outputs o, maxima m and sums l.
  template <int NR>
  void chunk(__mmask64 ok, const float (*qf)[HD], const uint16_t* qb, float (*o)[HD], float* m, float* l,
             const float (*kf)[HD], const uint16_t* keys, const float (*vf)[HD]) const {
    constexpr int V = HD / 16;
    alignas(64) float s[NR][KEYS], p[NR][KEYS];
    float rescale[NR];
    for (int r = 0; r < NR; ++r)
      for (int64_t c = 0; c < KEYS; c += 16) _mm512_store_ps(s[r] + c, _mm512_set1_ps(-std::numeric_limits<float>::infinity()));
    if (dot_bf16) scores_bf16<NR>(ok, qb, keys, s);
    else scores<NR>(ok, qf, kf, s);
    for (int r = 0; r < NR; ++r) {
      __m512 top = _mm512_load_ps(s[r]);
      for (int64_t c = 16; c < KEYS; c += 16) top = _mm512_max_ps(top, _mm512_load_ps(s[r] + c));
      const float m_new = std::max(m[r], _mm512_reduce_max_ps(top));
      rescale[r] = std::exp(m[r] - m_new);  // 0 before the first valid chunk
      __m512 sum = _mm512_setzero_ps();
      for (int64_t c = 0; c < KEYS; c += 16) {
        const __m512 e = _mm512_maskz_mov_ps(static_cast<__mmask16>(ok >> c),
                                             exp512(_mm512_sub_ps(_mm512_load_ps(s[r] + c), _mm512_set1_ps(m_new))));
        _mm512_store_ps(p[r] + c, e);
        sum = _mm512_add_ps(sum, e);
      }
      m[r] = m_new, l[r] = l[r] * rescale[r] + _mm512_reduce_add_ps(sum);
    }
    __m512 acc[NR][V];
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < V; ++i) acc[r][i] = _mm512_mul_ps(_mm512_load_ps(o[r] + 16 * i), _mm512_set1_ps(rescale[r]));
    for (__mmask64 bits = ok; bits; bits &= bits - 1) {
      const int64_t j = __builtin_ctzll(bits);
      for (int i = 0; i < V; ++i) {
        const __m512 value = _mm512_load_ps(vf[j] + 16 * i);
        for (int r = 0; r < NR; ++r) acc[r][i] = _mm512_fmadd_ps(_mm512_set1_ps(p[r][j]), value, acc[r][i]);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < V; ++i) _mm512_store_ps(o[r] + 16 * i, acc[r][i]);
  }

  // Rows [r0, r1) of kv head h (at most ROW_BLOCK). Each chunk's valid keys and values are converted to float32
  // once for the block, then rows that attend to the same slots (all of them at decode) go through chunk()
  // together, up to GROUP at a time (their query vectors and accumulators in registers).
  void rows(int64_t h, int64_t r0, int64_t r1) const {
    constexpr int V = HD / 16, GROUP = V >= 8 ? 2 : 4;
    const int64_t B = r1 - r0;
    alignas(64) float qf[ROW_BLOCK][HD], o[ROW_BLOCK][HD], kf[KEYS][HD], vf[KEYS][HD];
    float m[ROW_BLOCK], l[ROW_BLOCK];
    for (int64_t b = 0; b < B; ++b) {
      for (int i = 0; i < V; ++i)
        _mm512_store_ps(qf[b] + 16 * i, load16(q, bf16, (h * R + r0 + b) * HD + 16 * i)), _mm512_store_ps(o[b] + 16 * i, _mm512_setzero_ps());
      m[b] = -std::numeric_limits<float>::infinity(), l[b] = 0.f;
    }
    for (int64_t j0 = 0; j0 < S; j0 += KEYS) {
      const int64_t n = std::min(KEYS, S - j0);
      __mmask64 ok[ROW_BLOCK], any = 0;
      for (int64_t b = 0; b < B; ++b) any |= ok[b] = valid(r0 + b, j0, n);
      for (__mmask64 bits = any; bits; bits &= bits - 1) {
        const int64_t j = __builtin_ctzll(bits), kat = h * k_head + (j0 + j) * k_slot, vat = h * v_head + (j0 + j) * v_slot;
        for (int i = 0; i < V; ++i) {
          if (!dot_bf16) _mm512_store_ps(kf[j] + 16 * i, load16(k, bf16, kat + 16 * i));
          _mm512_store_ps(vf[j] + 16 * i, load16(v, bf16, vat + 16 * i));
        }
      }
      const uint16_t* keys = static_cast<const uint16_t*>(k) + h * k_head + j0 * k_slot;  // read if dot_bf16
      const uint16_t* qb = static_cast<const uint16_t*>(q) + (h * R + r0) * HD;
      for (int64_t b = 0, same; b < B; b += same) {
        for (same = 1; same < GROUP && b + same < B && ok[b + same] == ok[b];) ++same;
        if (!ok[b]) continue;
        const uint16_t* qr = qb + b * HD;
        switch (same) {
          case 4: chunk<4>(ok[b], qf + b, qr, o + b, m + b, l + b, kf, keys, vf); break;
          case 3: chunk<3>(ok[b], qf + b, qr, o + b, m + b, l + b, kf, keys, vf); break;
          case 2: chunk<2>(ok[b], qf + b, qr, o + b, m + b, l + b, kf, keys, vf); break;
          default: chunk<1>(ok[b], qf + b, qr, o + b, m + b, l + b, kf, keys, vf);
        }
      }
    }
    for (int64_t b = 0; b < B; ++b) {
      const float inv = l[b] > 0 ? 1.f / l[b] : 0.f;  // a row with no key to attend to gives zeros
      for (int64_t d = 0; d < HD; ++d) out.store((h * R + r0 + b) * HD + d, o[b][d] * inv);
    }
  }

  void run(int64_t K) const {
    const int64_t blocks = (R + ROW_BLOCK - 1) / ROW_BLOCK;
    at::parallel_for(0, K * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t h = t / blocks, r0 = (t % blocks) * ROW_BLOCK;
        rows(h, r0, std::min(r0 + ROW_BLOCK, R));
      }
    });
  }
};

}  // namespace

// q [K, R, hd] (the R query rows of each of K kv heads); keys, values [K, S, hd] (any stride but the last);
// mask bool [1 or R, S], true where a row may attend (none: everywhere). hd 16, 32, 64 or 128; float32 or bfloat16,
// all alike. Returns [K, R, hd] in q's dtype.
at::Tensor attention(const at::Tensor& q_in, const at::Tensor& keys, const at::Tensor& values,
                     const c10::optional<at::Tensor>& mask_in, double scale) {
  const at::Tensor q = q_in.contiguous();
  const int64_t K = q.size(0), R = q.size(1), hd = q.size(2), S = keys.size(1);
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  TORCH_CHECK(q.dim() == 3 && (bf16 || q.scalar_type() == at::kFloat) && (hd == 16 || hd == 32 || hd == 64 || hd == 128),
              "attention: q must be float32 or bfloat16 [K, R, hd], hd 16, 32, 64 or 128");
  for (const at::Tensor* t : {&keys, &values})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == K && t->size(1) == S && t->size(2) == hd && t->stride(2) == 1 &&
                t->scalar_type() == q.scalar_type(), "attention: keys and values must be [K, S, hd] like q");
  at::Tensor mask;
  if (mask_in) {
    mask = mask_in->contiguous();
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(1) == S &&
                (mask.size(0) == 1 || mask.size(0) == R), "attention: mask must be bool [1 or R, S]");
  }
  static const bool cpu_has_bf16_dot = __builtin_cpu_supports("avx512bf16");
  at::Tensor out = at::empty_like(q);
  Output o(out);
  const bool* m = mask_in ? mask.data_ptr<bool>() : nullptr;
  const int64_t mask_rows = mask_in ? mask.size(0) : 1;
  const auto run = [&](auto head_dim) {
    constexpr int HD = decltype(head_dim)::value;
    Attention<HD>{q.data_ptr(), keys.data_ptr(), values.data_ptr(), m, o, bf16, R, S, keys.stride(0), keys.stride(1),
                  values.stride(0), values.stride(1), mask_rows, static_cast<float>(scale),
                  bf16 && HD >= 32 && cpu_has_bf16_dot}.run(K);
  };
  switch (hd) {
    case 16: run(std::integral_constant<int, 16>{}); break;
    case 32: run(std::integral_constant<int, 32>{}); break;
    case 64: run(std::integral_constant<int, 64>{}); break;
    default: run(std::integral_constant<int, 128>{});
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(lilmistral, m) {
  m.def("attention(Tensor q, Tensor keys, Tensor values, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lilmistral, CPU, m) {
  m.impl("attention", &attention);
}
