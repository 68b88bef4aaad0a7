// Attention on the CPU: softmax(q k^T * scale) v for each query row on its own, over the keys in chunks of 32
// slots merged in slot order (an online softmax), so that a token's row gets the same numbers decoded alone as
// within its prompt. Decode-sized calls cost a few microseconds, where PyTorch's flash kernel costs tens.
// bfloat16 scores take AVX512-BF16 dot products where the CPU has them (checked at run time; the rest of the
// unit needs no more than AVX-512 VNNI, or AVX2). vnni.py compiles this file after lanes.cpp and vnni.cpp, in
// one unit: Output is vnni.cpp's.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t KEYS = 32;  // slots per chunk (a mask bit each, at most 64): its float32 keys and values fit L1
constexpr int64_t ROW_BLOCK = 8;   // query rows of one kv head per task: they share each chunk of keys converted once
// slots per segment: each an online softmax of its own, merged in order, so that a few rows over many slots (decode)
// can be split into tasks per segment with the same results (Attention::run)
constexpr int64_t SEGMENT = 512;
// below this many tasks of rows a thread, rows are split into tasks per segment too
constexpr int64_t TASKS_PER_THREAD = 4;
// output vectors accumulated per pass over a chunk's values: half of AVX-512's registers (AVX2 spills some;
// fewer measured no faster there)
constexpr int ACCUMULATORS = 16;
// chunks ahead that keys and values are prefetched (bfloat16): decode attention reads a cache that is not in
// any cache level. Into L2: 8 chunks into L2 measured 1.25-1.45x faster than 4 into L1 (1-4 into L1 alike),
// at 512-8,192 slots.
constexpr int PREFETCH_CHUNKS = 8;

// The HD bfloat16s at base[i] on their way to L2 (past the cache's end near its last slots: a prefetch does
// not fault, and the address is computed as an integer).
template <int HD>
inline void prefetch_slot(const uint16_t* base, int64_t i) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(i) * 2;
  for (int line = 0; line < HD * 2; line += 64) _mm_prefetch(reinterpret_cast<const char*>(at + line), _MM_HINT_T1);
}

template <int HD>
struct Attention {
  const void* q; const void* k; const void* v; const bool* mask; Output out;
  bool bf16;  // q, k and v: bfloat16, else float32
  int64_t R, S, k_head, k_slot, v_head, v_slot, mask_rows;
  float scale;
  bool dot_bf16;  // scores by bfloat16 dot products (scores_bf16)

  // The valid slots of chunk [j0, j0 + n) for row r.
  uint64_t valid(int64_t r, int64_t j0, int64_t n) const {
    if (!mask) return n >= 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1;
    return true_bits(mask + (mask_rows == 1 ? 0 : r) * S + j0, n);
  }

  // The scores q.k * scale of NR rows against the quads of a chunk's first n keys that hold a valid one, from
  // float32 q rows and float32 copies of the keys (kf, all n) or, DIRECT, the bfloat16 keys converted as they are
  // read (`keys`: the chunk's first slot). Four keys at a time, their sums reduced together (sum4), a key's
  // products summed in one chain, as in every build.
  template <int NR, bool DIRECT>
  void scores(uint64_t ok, int64_t n, const float (*qf)[HD], const float (*kf)[HD], const uint16_t* keys,
              float (*s)[KEYS]) const {
    constexpr int V = HD / 16;
    for (int64_t j = 0; j < n; j += 4) {
      if (!((ok >> j) & 0xF)) continue;
      Floats dot[NR][4];
      for (int r = 0; r < NR; ++r)
        for (int k = 0; k < 4; ++k) dot[r][k] = set1(0.f);
      for (int k = 0; k < std::min<int64_t>(4, n - j); ++k) {
        if (DIRECT) prefetch_slot<HD>(keys, (j + k + PREFETCH_CHUNKS * KEYS) * k_slot);
        for (int i = 0; i < V; ++i) {
          const Floats key = DIRECT ? load16(keys, true, (j + k) * k_slot + 16 * i) : load_floats(kf[j + k] + 16 * i);
          for (int r = 0; r < NR; ++r) dot[r][k] = fmadd(load_floats(qf[r] + 16 * i), key, dot[r][k]);
        }
      }
      for (int r = 0; r < NR; ++r)
        _mm_storeu_ps(s[r] + j, _mm_mul_ps(sum4(dot[r][0], dot[r][1], dot[r][2], dot[r][3]), _mm_set1_ps(scale)));
    }
  }

#ifdef LILMISTRAL_ZMM
  // scores_bf16's four keys from `keys` on: all four read or, in a chunk's last quad (TAIL), the first `count`
  // (the rest zeros).
  template <int NR, bool TAIL>
  __attribute__((target("avx512bf16"))) void quad_scores(const uint16_t* qb, const uint16_t* keys, float (*s)[KEYS],
                                                       int64_t j, int64_t count = 4) const {
    constexpr int W = HD / 32;
    __m512 dot[NR][4];
    for (int r = 0; r < NR; ++r)
      for (int k = 0; k < 4; ++k) dot[r][k] = _mm512_setzero_ps();
    for (int k = 0; k < 4; ++k) {
      if (TAIL && k >= count) break;
      prefetch_slot<HD>(keys, (k + PREFETCH_CHUNKS * KEYS) * k_slot);
      for (int i = 0; i < W; ++i) {
        const __m512bh key = (__m512bh)_mm512_loadu_si512(keys + k * k_slot + 32 * i);
        for (int r = 0; r < NR; ++r)
          dot[r][k] = _mm512_dpbf16_ps(dot[r][k], (__m512bh)_mm512_loadu_si512(qb + r * HD + 32 * i), key);
      }
    }
    for (int r = 0; r < NR; ++r)
      _mm_storeu_ps(s[r] + j,
                    _mm_mul_ps(sum4({dot[r][0]}, {dot[r][1]}, {dot[r][2]}, {dot[r][3]}), _mm_set1_ps(scale)));
  }

  // The same from bfloat16 q rows (qb, HD apart) and the chunk's keys as they are (its first slot at `keys`),
  // by AVX512-BF16 dot products (pairs of exact products summed into float32): half the multiplies, no
  // conversion of the keys. Four keys at a time, their sums reduced together (sum4); the first n keys are
  // read, valid or not (chunk() then sets the scores that are not valid to -inf; keys past n count as zeros).
  template <int NR>
  __attribute__((target("avx512bf16"))) void scores_bf16(uint64_t ok, int64_t n, const uint16_t* qb,
                                                       const uint16_t* keys, float (*s)[KEYS]) const {
    for (int64_t j = 0; j < n; j += 4) {
      if ((ok >> j) & 0xF) {
        if (j + 4 <= n) quad_scores<NR, false>(qb, keys + j * k_slot, s, j);
        else quad_scores<NR, true>(qb, keys + j * k_slot, s, j, n - j);
      }
    }
  }
#endif

  // One chunk for NR rows of a block that attend to the same slots (`ok`, of the chunk's n): each key and value
  // vector loaded once for all NR, and each row's arithmetic exactly as it would be alone. Scores, then an
  // online-softmax update of the rows' float32 outputs o, maxima m and sums l. Values from their float32 copies
  // vf or, DIRECT, converted as they are read from the bfloat16 cache (`values`: the chunk's first slot).
  template <int NR, bool DIRECT>
  void chunk(uint64_t ok, int64_t n, const float (*qf)[HD], const uint16_t* qb, float (*o)[HD], float* m, float* l,
             const float (*kf)[HD], const uint16_t* keys, const float (*vf)[HD], const uint16_t* values) const {
    constexpr int V = HD / 16;
    alignas(64) float s[NR][KEYS], p[NR][KEYS];
    float rescale[NR];
#ifdef LILMISTRAL_ZMM
    if (dot_bf16) scores_bf16<NR>(ok, n, qb, keys, s);
    else
#endif
      scores<NR, DIRECT>(ok, n, qf, kf, keys, s);
    // slots the rows may not attend to: computed in a quad with valid ones, skipped, or past n
    for (uint64_t bad = ~ok & ((uint64_t{1} << KEYS) - 1); bad; bad &= bad - 1)
      for (int r = 0; r < NR; ++r) s[r][__builtin_ctzll(bad)] = -std::numeric_limits<float>::infinity();
    for (int r = 0; r < NR; ++r) {
      Floats top = load_floats(s[r]);
      for (int64_t c = 16; c < KEYS; c += 16) top = max(top, load_floats(s[r] + c));
      const float m_new = std::max(m[r], reduce_max(top));
      rescale[r] = std::exp(m[r] - m_new);  // 0 before the first valid chunk
      Floats sum = set1(0.f);
      for (int64_t c = 0; c < KEYS; c += 16) {
        const Floats e = zero_unless(exp16(sub(load_floats(s[r] + c), set1(m_new))), static_cast<uint32_t>(ok >> c) & 0xffff);
        store(p[r] + c, e);
        sum = add(sum, e);
      }
      m[r] = m_new, l[r] = l[r] * rescale[r] + reduce_add(sum);
    }
    constexpr int VB = accumulator_block(V, NR);
    for (int d = 0; d < V; d += VB) {  // VB vectors of each row's output at a time, their accumulators in registers
      Floats acc[NR][VB];
      for (int r = 0; r < NR; ++r)
        for (int i = 0; i < VB; ++i) acc[r][i] = mul(load_floats(o[r] + 16 * (d + i)), set1(rescale[r]));
      for (uint64_t bits = ok; bits; bits &= bits - 1) {
        const int64_t j = __builtin_ctzll(bits);
        if (DIRECT && d == 0) prefetch_slot<HD>(values, (j + PREFETCH_CHUNKS * KEYS) * v_slot);
        for (int i = 0; i < VB; ++i) {
          const Floats value = DIRECT ? load16(values, true, j * v_slot + 16 * (d + i)) : load_floats(vf[j] + 16 * (d + i));
          for (int r = 0; r < NR; ++r) acc[r][i] = fmadd(set1(p[r][j]), value, acc[r][i]);
        }
      }
      for (int r = 0; r < NR; ++r)
        for (int i = 0; i < VB; ++i) store(o[r] + 16 * (d + i), acc[r][i]);
    }
  }

  // Vectors of output per row per pass: the largest power of two, up to V, whose NR rows' accumulators fit
  // the registers.
  static constexpr int accumulator_block(int V, int NR) {
    int block = V;
    while (block > 1 && block * NR > ACCUMULATORS) block /= 2;
    return block;
  }

  // Rows [r0, r1) of kv head h (at most ROW_BLOCK) over segments [s0, s1) of the slots, each segment an online
  // softmax of its own merged into the rows' total in order (merge), as run() merges segments run as tasks of
  // their own: the same numbers either way. The total goes to `partial` (HD + 2 floats a row: m, l, o) or, with
  // none, normalized to out.
  void rows(int64_t h, int64_t r0, int64_t r1, int64_t s0, int64_t s1, float* partial) const {
    constexpr int V = HD / 16;
    const int64_t B = r1 - r0;
    alignas(64) float qf[ROW_BLOCK][HD], o[ROW_BLOCK][HD], total_o[ROW_BLOCK][HD];
    float m[ROW_BLOCK], l[ROW_BLOCK], total_m[ROW_BLOCK], total_l[ROW_BLOCK];
    for (int64_t b = 0; b < B; ++b) {
      for (int i = 0; i < V; ++i) store(qf[b] + 16 * i, load16(q, bf16, (h * R + r0 + b) * HD + 16 * i));
      empty(total_m[b], total_l[b], total_o[b]);
    }
    for (int64_t seg = s0; seg < s1; ++seg) {
      for (int64_t b = 0; b < B; ++b) empty(m[b], l[b], o[b]);
      segment(h, r0, B, seg, qf, o, m, l);
      for (int64_t b = 0; b < B; ++b) merge(total_m[b], total_l[b], total_o[b], m[b], l[b], o[b]);
    }
    for (int64_t b = 0; b < B; ++b) {
      if (!partial) {
        finish(h * R + r0 + b, total_l[b], total_o[b]);
        continue;
      }
      float* row = partial + b * (HD + 2);
      row[0] = total_m[b], row[1] = total_l[b];
      std::copy(total_o[b], total_o[b] + HD, row + 2);
    }
  }

  // The B rows from r0 of kv head h over segment seg, into their softmax states o, m, l. Each chunk's keys (for
  // float32 scores) and valid values are converted to float32 once for the block, then rows that attend to the
  // same slots (all of them at decode) go through chunk() together, up to 4 at a time. Where one chunk() call
  // takes every row (decode) of a bfloat16 cache, it reads keys and values from the cache itself: no float32
  // copy (1.1-1.3x faster decode attention with bfloat16 scores; 1.2-1.6x with float32 scores, measured).
  void segment(int64_t h, int64_t r0, int64_t B, int64_t seg, const float (*qf)[HD], float (*o)[HD], float* m,
               float* l) const {
    constexpr int V = HD / 16;
    constexpr int group = 4;
    const bool direct = bf16 && B <= group;
    alignas(64) float kf[KEYS][HD], vf[KEYS][HD];
    for (int64_t j0 = seg * SEGMENT; j0 < std::min(S, (seg + 1) * SEGMENT); j0 += KEYS) {
      const int64_t n = std::min(KEYS, S - j0);
      uint64_t ok[ROW_BLOCK], any = 0;
      for (int64_t b = 0; b < B; ++b) any |= ok[b] = valid(r0 + b, j0, n);
      if (!direct && !dot_bf16)  // every key: scores() reads whole quads
        for (int64_t j = 0; j < n; ++j)
          for (int i = 0; i < V; ++i) store(kf[j] + 16 * i, load16(k, bf16, h * k_head + (j0 + j) * k_slot + 16 * i));
      for (uint64_t bits = direct ? 0 : any; bits; bits &= bits - 1) {
        const int64_t j = __builtin_ctzll(bits), vat = h * v_head + (j0 + j) * v_slot;
        for (int i = 0; i < V; ++i) store(vf[j] + 16 * i, load16(v, bf16, vat + 16 * i));
      }
      // read with bfloat16 scores, or direct
      const uint16_t* keys = static_cast<const uint16_t*>(k) + h * k_head + j0 * k_slot;
      const uint16_t* values = static_cast<const uint16_t*>(v) + h * v_head + j0 * v_slot;  // read if direct
      const uint16_t* qb = static_cast<const uint16_t*>(q) + (h * R + r0) * HD;
      for (int64_t b = 0, same; b < B; b += same) {
        for (same = 1; same < group && b + same < B && ok[b + same] == ok[b];) ++same;
        if (!ok[b]) continue;
        const uint16_t* qr = qb + b * HD;
        const auto call = [&](auto rows) {
          constexpr int NR = decltype(rows)::value;
          if (direct) chunk<NR, true>(ok[b], n, qf + b, qr, o + b, m + b, l + b, kf, keys, vf, values);
          else chunk<NR, false>(ok[b], n, qf + b, qr, o + b, m + b, l + b, kf, keys, vf, values);
        };
        switch (same) {
          case 4: call(std::integral_constant<int, 4>{}); break;
          case 3: call(std::integral_constant<int, 3>{}); break;
          case 2: call(std::integral_constant<int, 2>{}); break;
          default: call(std::integral_constant<int, 1>{});
        }
      }
    }
  }

  static void empty(float& m, float& l, float* o) {
    m = -std::numeric_limits<float>::infinity(), l = 0.f;
    std::fill(o, o + HD, 0.f);
  }

  // The softmax state of more slots (m, l, o) merged into a row's total (tm, tl, to); a state with no valid slot
  // (m -inf) changes nothing, and into an empty total (tm -inf) a state goes as it is.
  static void merge(float& tm, float& tl, float* to, float m, float l, const float* o) {
    if (m == -std::numeric_limits<float>::infinity()) return;
    const float top = std::max(tm, m), a = std::exp(tm - top), b = std::exp(m - top);
    tm = top, tl = tl * a + l * b;
    for (int64_t i = 0; i < HD; i += 16)
      store(to + i, add(mul(load_floats(to + i), set1(a)), mul(load_floats(o + i), set1(b))));
  }

  // Output row `row`: o / l (a row with no key to attend to gives zeros).
  void finish(int64_t row, float l, const float* o) const {
    const float inv = l > 0 ? 1.f / l : 0.f;
    for (int64_t d = 0; d < HD; ++d) out.store(row * HD + d, o[d] * inv);
  }

  // Tasks of rows over all slots; where there are too few of them for the threads (decode: one task a kv head),
  // tasks of rows over a segment, whose results are then merged in order.
  void run(int64_t K) const {
    const int64_t blocks = (R + ROW_BLOCK - 1) / ROW_BLOCK, segments = (S + SEGMENT - 1) / SEGMENT, units = K * blocks;
    const auto block_rows = [&](int64_t unit) { return std::pair{unit / blocks, (unit % blocks) * ROW_BLOCK}; };
    if (segments <= 1 || units >= TASKS_PER_THREAD * at::get_num_threads()) {
      at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const auto [h, r0] = block_rows(t);
          rows(h, r0, std::min(r0 + ROW_BLOCK, R), 0, segments, nullptr);
        }
      });
      return;
    }
    constexpr int64_t ROW = HD + 2;
    thread_local std::vector<float> buffer;  // the calling thread's (a worker's thread_local would be its own)
    buffer.resize(units * segments * ROW_BLOCK * ROW);
    float* partials = buffer.data();  // [units, segments, ROW_BLOCK, ROW]
    at::parallel_for(0, units * segments, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const auto [h, r0] = block_rows(t / segments);
        rows(h, r0, std::min(r0 + ROW_BLOCK, R), t % segments, t % segments + 1, partials + t * ROW_BLOCK * ROW);
      }
    });
    at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
      for (int64_t unit = begin; unit < end; ++unit) {
        const auto [h, r0] = block_rows(unit);
        for (int64_t b = 0; b < std::min(ROW_BLOCK, R - r0); ++b) {
          alignas(64) float o[HD];
          float m, l;
          empty(m, l, o);
          for (int64_t seg = 0; seg < segments; ++seg) {
            const float* row = partials + ((unit * segments + seg) * ROW_BLOCK + b) * ROW;
            merge(m, l, o, row[0], row[1], row + 2);
          }
          finish(h * R + r0 + b, l, o);
        }
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
#ifdef LILMISTRAL_ZMM
  static const bool cpu_has_bf16_dot = __builtin_cpu_supports("avx512bf16");
#else
  constexpr bool cpu_has_bf16_dot = false;  // scores_bf16 is in AVX-512 builds only
#endif
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
