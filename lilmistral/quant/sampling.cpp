// A token drawn from a decode step's logits on the CPU in one call (generate.Sampler's CPU path): the repeat
// penalty, the top-k candidates (a pass that skips 64 logits at a time below the k-th largest so far), the
// softmax at the temperature, top-p and the draw. PyTorch's operators for the same steps (index_put, topk,
// softmax, cumsum, multinomial) took ~270 us a token over a 49k vocabulary on one thread, more on two: ~5% of a
// small model's token. vnni.py compiles this file after lanes.cpp, in one unit.
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using Candidate = std::pair<float, int64_t>;  // (logit, id)

// The k largest of x[0, n) (ties: the lower id), largest first.
std::vector<Candidate> largest(const float* x, int64_t n, int64_t k) {
  const auto better = [](const Candidate& a, const Candidate& b) {  // so the heap's front is the worst of them
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  std::vector<Candidate> heap;
  heap.reserve(k);
  for (int64_t i = 0; i < k; ++i) heap.emplace_back(x[i], i);
  std::make_heap(heap.begin(), heap.end(), better);
  auto consider = [&](int64_t i) {
    if (x[i] <= heap.front().first) return;  // not above the k-th largest (an equal one has a lower id)
    std::pop_heap(heap.begin(), heap.end(), better);
    heap.back() = {x[i], i};
    std::push_heap(heap.begin(), heap.end(), better);
  };
  int64_t i = k;
  for (; i + 64 <= n; i += 64) {
    const Floats block = max(max(load_floats(x + i), load_floats(x + i + 16)),
                             max(load_floats(x + i + 32), load_floats(x + i + 48)));
    if (reduce_max(block) > heap.front().first)
      for (int64_t j = i; j < i + 64; ++j) consider(j);
  }
  for (; i < n; ++i) consider(i);
  std::sort(heap.begin(), heap.end(), better);
  return heap;
}

// logits float32 [V]; recent int64 [R] the ids whose logits the penalty divides (positive) or multiplies; u in
// [0, 1) the draw. temperature 0: the largest logit (the lowest id among equal ones). top_k 0: every id.
at::Tensor sample(const at::Tensor& logits, const at::Tensor& recent, double penalty, double temperature,
                  int64_t top_k, double top_p, double u) {
  TORCH_CHECK(logits.dim() == 1 && logits.scalar_type() == at::kFloat && logits.is_contiguous() &&
              logits.numel() > 0, "sample: logits must be float32 [V], contiguous");
  TORCH_CHECK(recent.dim() == 1 && recent.scalar_type() == at::kLong, "sample: recent ids must be int64 [R]");
  const int64_t V = logits.numel();
  const float* x = logits.data_ptr<float>();
  const at::Tensor ids = recent.contiguous();
  thread_local std::vector<float> penalized;
  if (penalty != 1.0 && ids.numel() > 0) {
    penalized.assign(x, x + V);
    for (int64_t i = 0; i < ids.numel(); ++i) {
      const int64_t id = ids.data_ptr<int64_t>()[i];
      TORCH_CHECK(id >= 0 && id < V, "sample: a recent id out of the vocabulary");
      penalized[id] = x[id] > 0 ? x[id] / static_cast<float>(penalty) : x[id] * static_cast<float>(penalty);
    }
    x = penalized.data();
  }
  const int64_t k = temperature == 0 ? 1 : top_k > 0 ? std::min(top_k, V) : V;
  const std::vector<Candidate> candidates = largest(x, V, k);
  int64_t chosen = candidates[0].second;
  if (temperature != 0) {  // softmax(values / temperature), the prefix reaching top_p, then the draw
    const float t = static_cast<float>(temperature), top = candidates[0].first / t;
    std::vector<float> weights(k);
    double total = 0;
    for (int64_t i = 0; i < k; ++i) total += weights[i] = std::exp(candidates[i].first / t - top);
    int64_t kept = k;
    if (top_p < 1.0) {
      double before = 0;
      for (kept = 0; kept < k && before < top_p; ++kept) before += weights[kept] / total;
    }
    double mass = 0;
    for (int64_t i = 0; i < kept; ++i) mass += weights[i];
    const double target = u * mass;
    double sum = 0;
    for (int64_t i = 0; i < kept; ++i) {
      chosen = candidates[i].second;
      if ((sum += weights[i]) > target) break;
    }
  }
  at::Tensor out = at::empty({1}, recent.options());
  out.data_ptr<int64_t>()[0] = chosen;
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lilmistral, m) {
  m.def("sample(Tensor logits, Tensor recent, float penalty, float temperature, int top_k, float top_p, float u) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(lilmistral, CPU, m) { m.impl("sample", &sample); }
