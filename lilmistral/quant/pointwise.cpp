// RMSNorm, RoPE and SwiGLU's silu(gate) * up on the CPU, one call each (and a decode step's residual sum with
// its norm, q and k's RoPE with the cache's write): PyTorch spends 10-40 us of per-operator overhead on each at
// decode (composite operators, dtype conversions), more than the layer's matrix products take in a small model.
// Each rounds where PyTorch's bfloat16 operators round, so they give the reference's numbers up to the order of
// a sum. vnni.py compiles this file after lanes.cpp, in one unit.

namespace {

// What a PyTorch operator with this dtype keeps of a float32 result.
inline Floats as_dtype(Floats v, bool bf16) { return bf16 ? round_bits_bf16(v) : v; }

bool check_dtype(const at::Tensor& t, const char* op) {
  const bool bf16 = t.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || t.scalar_type() == at::kFloat, op, ": tensors must be float32 or bfloat16");
  return bf16;
}

// Rows [begin, end) in parallel, enough of them per task to be worth a thread.
template <typename F>
void for_rows(int64_t rows, int64_t row_size, const F& f) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(row_size, 1)), f);
}

// Row r of x [rows, D] (contiguous) normalized into out: x / sqrt(mean(x^2) + eps) rounded to x's dtype, times
// weight [D] (x's dtype).
void norm_row(const void* xp, const void* wp, void* op, int64_t r, int64_t D, float eps, bool bf16) {
  Floats squares = set1(0.f);
  for (int64_t i = 0; i < D; i += 16) {
    const Floats v = load_n(xp, bf16, r * D + i, D - i);
    squares = fmadd(v, v, squares);
  }
  const Floats inv = set1(1.f / std::sqrt(reduce_add(squares) / D + eps));
  for (int64_t i = 0; i < D; i += 16) {
    const Floats normed = as_dtype(mul(load_n(xp, bf16, r * D + i, D - i), inv), bf16);
    store_n(op, bf16, r * D + i, D - i, as_dtype(mul(load_n(wp, bf16, i, D - i), normed), bf16));
  }
}

void check_norm_weight(const at::Tensor& weight, const at::Tensor& x, const char* op) {
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1) && weight.scalar_type() == x.scalar_type(), op,
              ": weight must be [D] in x's dtype");
}

}  // namespace

// x [..., D] over its last dimension (norm_row).
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  const bool bf16 = check_dtype(x_in, "rms_norm");
  check_norm_weight(weight, x_in, "rms_norm");
  const int64_t D = x_in.size(-1);
  const at::Tensor x = x_in.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty_like(x);
  const void *xp = x.data_ptr(), *wp = w.data_ptr();
  void* op = out.data_ptr();
  for_rows(x.numel() / std::max<int64_t>(D, 1), D, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) norm_row(xp, wp, op, r, D, static_cast<float>(eps), bf16);
  });
  return out;
}

// (residual + x, rms_norm of that) for x, residual [..., D] of one dtype: the sum rounded to it, as PyTorch's
// `residual + x`. A layer's output projection adds its residual and normalizes for the next in one call.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_in, const at::Tensor& residual_in,
                                                const at::Tensor& weight, double eps) {
  const bool bf16 = check_dtype(x_in, "add_rms_norm");
  TORCH_CHECK(residual_in.sizes() == x_in.sizes() && residual_in.scalar_type() == x_in.scalar_type(),
              "add_rms_norm: x and residual must be alike");
  check_norm_weight(weight, x_in, "add_rms_norm");
  const int64_t D = x_in.size(-1);
  const at::Tensor x = x_in.contiguous(), residual = residual_in.contiguous(), w = weight.contiguous();
  at::Tensor sum = at::empty_like(x), out = at::empty_like(x);
  const void *xp = x.data_ptr(), *rp = residual.data_ptr(), *wp = w.data_ptr();
  void *sp = sum.data_ptr(), *op = out.data_ptr();
  for_rows(x.numel() / std::max<int64_t>(D, 1), D, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t i = 0; i < D; i += 16) {
        const int64_t at = r * D + i;
        store_n(sp, bf16, at, D - i, as_dtype(add(load_n(rp, bf16, at, D - i), load_n(xp, bf16, at, D - i)), bf16));
      }
      norm_row(sp, wp, op, r, D, static_cast<float>(eps), bf16);
    }
  });
  return {sum, out};
}

namespace {

// One head's vector x (hd elements at x_at) rotated by cos, sin (at cs_at) as HF's rotate_half pairs them:
// x * cos + rotate_half(x) * sin, each product and the sum rounded to the dtype; written at out_at.
void rotate(const void* xp, int64_t x_at, const void* cp, const void* sp, int64_t cs_at, void* op, int64_t out_at,
            int64_t hd, bool bf16) {
  const int64_t half = hd / 2;
  const Floats minus = set1(-1.f);
  for (int64_t i = 0; i < half; i += 16) {
    const int64_t m = half - i;
    const Floats x1 = load_n(xp, bf16, x_at + i, m), x2 = load_n(xp, bf16, x_at + half + i, m);
    const Floats c1 = load_n(cp, bf16, cs_at + i, m), c2 = load_n(cp, bf16, cs_at + half + i, m);
    const Floats s1 = load_n(sp, bf16, cs_at + i, m), s2 = load_n(sp, bf16, cs_at + half + i, m);
    const Floats lo = add(as_dtype(mul(x1, c1), bf16), as_dtype(mul(mul(x2, minus), s1), bf16));
    const Floats hi = add(as_dtype(mul(x2, c2), bf16), as_dtype(mul(x1, s2), bf16));
    store_n(op, bf16, out_at + i, m, as_dtype(lo, bf16));
    store_n(op, bf16, out_at + half + i, m, as_dtype(hi, bf16));
  }
}

void check_cos_sin(const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& x, int64_t T, int64_t hd,
                   const char* op) {
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == T && t->size(1) == hd && t->scalar_type() == x.scalar_type(), op,
                ": cos and sin must be [T, hd] in x's dtype");
}

}  // namespace

// x [N, T, hd] (any strides but the last) rotated by cos, sin [T, hd] (x's dtype): `rotate`. Returns [N, T, hd].
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  const bool bf16 = check_dtype(x, "rope");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "rope: x must be [N, T, hd], hd even");
  const int64_t N = x.size(0), T = x.size(1), hd = x.size(2);
  check_cos_sin(cos_in, sin_in, x, T, hd, "rope");
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  at::Tensor out = at::empty({N, T, hd}, x.options());
  const void *xp = x.data_ptr(), *cp = cos.data_ptr(), *sp = sin.data_ptr();
  void* op = out.data_ptr();
  for_rows(N * T, hd, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / T, t = row % T;
      rotate(xp, n * x.stride(0) + t * x.stride(1), cp, sp, t * hd, op, row * hd, hd, bf16);
    }
  });
  return out;
}

// A decode step's attention input in one call: qkv [T, (H + 2K) * hd] (wq, wk and wv's outputs side by side)
// -> q [T, H * hd] rotated by cos, sin [T, hd], while its K keys, rotated, and K values go into slot slot[t]
// of keys, values [K, slots, hd] (rows contiguous). The bits of `rope` and an index_copy_ of its keys.
at::Tensor rope_store(const at::Tensor& qkv_in, const at::Tensor& cos_in, const at::Tensor& sin_in,
                      const at::Tensor& keys, const at::Tensor& values, const at::Tensor& slot_in) {
  const bool bf16 = check_dtype(qkv_in, "rope_store");
  TORCH_CHECK(keys.dim() == 3 && keys.sizes() == values.sizes() && keys.stride(2) == 1 && values.stride(2) == 1 &&
              keys.scalar_type() == qkv_in.scalar_type() && values.scalar_type() == qkv_in.scalar_type(),
              "rope_store: keys and values must be [K, slots, hd] alike, in qkv's dtype");
  const int64_t K = keys.size(0), slots = keys.size(1), hd = keys.size(2), T = qkv_in.size(0);
  TORCH_CHECK(qkv_in.dim() == 2 && hd % 2 == 0 && qkv_in.size(1) % hd == 0 && qkv_in.size(1) / hd > 2 * K,
              "rope_store: qkv must be [T, (H + 2K) * hd], hd even");
  const int64_t H = qkv_in.size(1) / hd - 2 * K;
  check_cos_sin(cos_in, sin_in, qkv_in, T, hd, "rope_store");
  const at::Tensor slot = slot_in.to(at::kLong).contiguous();
  TORCH_CHECK(slot.numel() == T, "rope_store: one slot per row");
  const at::Tensor qkv = qkv_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  at::Tensor q = at::empty({T, H * hd}, qkv.options());
  const int64_t width = qkv.size(1);
  const void *xp = qkv.data_ptr(), *cp = cos.data_ptr(), *sp = sin.data_ptr();
  void *qp = q.data_ptr(), *kp = keys.data_ptr();
  char* vp = static_cast<char*>(values.data_ptr());
  const char* bytes_in = static_cast<const char*>(xp);
  const int64_t size = qkv.element_size();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t s = slot.data_ptr<int64_t>()[t], row = t * width;
    TORCH_CHECK(0 <= s && s < slots, "rope_store: slot ", s, " out of range");
    for (int64_t h = 0; h < H; ++h) rotate(xp, row + h * hd, cp, sp, t * hd, qp, (t * H + h) * hd, hd, bf16);
    for (int64_t k = 0; k < K; ++k) {
      rotate(xp, row + (H + k) * hd, cp, sp, t * hd, kp, k * keys.stride(0) + s * keys.stride(1), hd, bf16);
      std::memcpy(vp + (k * values.stride(0) + s * values.stride(1)) * size,
                  bytes_in + (row + (H + K + k) * hd) * size, hd * size);
    }
  }
  return q;
}

// silu(gate) * up for gate, up [R, F] (any row stride, the same dtype), silu's result and the product rounded
// to their dtype. Returns [R, F].
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  const bool bf16 = check_dtype(gate, "silu_mul");
  TORCH_CHECK(gate.dim() == 2 && gate.sizes() == up.sizes() && gate.stride(1) == 1 && up.stride(1) == 1 &&
              up.scalar_type() == gate.scalar_type(), "silu_mul: gate and up must be [R, F] alike");
  const int64_t R = gate.size(0), F = gate.size(1);
  at::Tensor out = at::empty({R, F}, gate.options());
  const void *gp = gate.data_ptr(), *upp = up.data_ptr();
  void* op = out.data_ptr();
  const Floats one = set1(1.f), minus = set1(-1.f);
  for_rows(R, F, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t i = 0; i < F; i += 16) {
        const Floats g = load_n(gp, bf16, r * gate.stride(0) + i, F - i);
        const Floats silu = as_dtype(div(g, add(one, exp16(mul(g, minus)))), bf16);
        store_n(op, bf16, r * F + i, F - i, as_dtype(mul(silu, load_n(upp, bf16, r * up.stride(0) + i, F - i)), bf16));
      }
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(lilmistral, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("rope_store(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) keys, Tensor(b!) values, Tensor slot) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
}

TORCH_LIBRARY_IMPL(lilmistral, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope", &rope);
  m.impl("rope_store", &rope_store);
  m.impl("silu_mul", &silu_mul);
}
