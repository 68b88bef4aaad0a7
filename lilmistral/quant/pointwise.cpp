// RMSNorm, RoPE and SwiGLU's silu(gate) * up on the CPU, one call each: PyTorch spends 10-40 us of
// per-operator overhead on each at decode (composite operators, dtype conversions), more than the layer's
// matrix products take in a small model. Each rounds where PyTorch's bfloat16 operators round, so they give
// the reference's numbers up to the order of a sum. vnni.py compiles this file after lanes.cpp, in one unit.

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

}  // namespace

// x [..., D] over its last dimension: x / sqrt(mean(x^2) + eps) rounded to x's dtype, times weight [D] (x's dtype).
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  const bool bf16 = check_dtype(x_in, "rms_norm");
  const int64_t D = x_in.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D && weight.scalar_type() == x_in.scalar_type(),
              "rms_norm: weight must be [D] in x's dtype");
  const at::Tensor x = x_in.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty_like(x);
  const void *xp = x.data_ptr(), *wp = w.data_ptr();
  void* op = out.data_ptr();
  for_rows(x.numel() / std::max<int64_t>(D, 1), D, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      Floats squares = set1(0.f);
      for (int64_t i = 0; i < D; i += 16) {
        const Floats v = load_n(xp, bf16, r * D + i, D - i);
        squares = fmadd(v, v, squares);
      }
      const Floats inv = set1(1.f / std::sqrt(reduce_add(squares) / D + static_cast<float>(eps)));
      for (int64_t i = 0; i < D; i += 16) {
        const Floats normed = as_dtype(mul(load_n(xp, bf16, r * D + i, D - i), inv), bf16);
        store_n(op, bf16, r * D + i, D - i, as_dtype(mul(load_n(wp, bf16, i, D - i), normed), bf16));
      }
    }
  });
  return out;
}

// x [N, T, hd] (any strides but the last) rotated by cos, sin [T, hd] (x's dtype) as HF's rotate_half pairs
// them: x * cos + rotate_half(x) * sin, each product and the sum rounded to x's dtype. Returns [N, T, hd].
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  const bool bf16 = check_dtype(x, "rope");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "rope: x must be [N, T, hd], hd even");
  const int64_t N = x.size(0), T = x.size(1), hd = x.size(2), half = hd / 2;
  for (const at::Tensor* t : {&cos_in, &sin_in})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == T && t->size(1) == hd && t->scalar_type() == x.scalar_type(),
                "rope: cos and sin must be [T, hd] in x's dtype");
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  at::Tensor out = at::empty({N, T, hd}, x.options());
  const void *xp = x.data_ptr(), *cp = cos.data_ptr(), *sp = sin.data_ptr();
  void* op = out.data_ptr();
  const Floats minus = set1(-1.f);
  for_rows(N * T, hd, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / T, t = row % T, base = n * x.stride(0) + t * x.stride(1);
      for (int64_t i = 0; i < half; i += 16) {
        const int64_t m = half - i;
        const Floats x1 = load_n(xp, bf16, base + i, m), x2 = load_n(xp, bf16, base + half + i, m);
        const Floats c1 = load_n(cp, bf16, t * hd + i, m), c2 = load_n(cp, bf16, t * hd + half + i, m);
        const Floats s1 = load_n(sp, bf16, t * hd + i, m), s2 = load_n(sp, bf16, t * hd + half + i, m);
        const Floats lo = add(as_dtype(mul(x1, c1), bf16), as_dtype(mul(mul(x2, minus), s1), bf16));
        const Floats hi = add(as_dtype(mul(x2, c2), bf16), as_dtype(mul(x1, s2), bf16));
        store_n(op, bf16, row * hd + i, m, as_dtype(lo, bf16));
        store_n(op, bf16, row * hd + half + i, m, as_dtype(hi, bf16));
      }
    }
  });
  return out;
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
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
}

TORCH_LIBRARY_IMPL(lilmistral, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
  m.impl("silu_mul", &silu_mul);
}
