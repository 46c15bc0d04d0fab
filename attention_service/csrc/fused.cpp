// Small per-layer ops of the attention side fused into one pass each, fp32 on CPU.
//
// Shapes: T tokens, D hidden, H heads, KVH kv heads, Dh head dim, S cache slots.
//
// A decode step of one sequence does a few microseconds of math per op; torch's dispatch,
// allocation and Python around each op cost more than that, and a layer has ~30 of them.
// These two take the place of the norm's seven ops and of rope + the K/V cache writes.
//
//   rms_norm(x [T, D], w [D], eps) -> w * (x * rsqrt(mean(x^2) + eps))       (Mixtral's RMSNorm)
//   qkv_rope_cache(qkv [T, (H + 2KVH) Dh], cos, sin [T, Dh], k_cache, v_cache [S, KVH, Dh],
//                  slots [T], H) -> q [T, H, Dh]
//     q and k rotated (rotate-half convention: x * cos + rotate_half(x) * sin), the rotated
//     k and the v of token t written to slot slots[t] of the caches.
//
//   argmax_rows(x [B, V]) -> [B] int64                                      (greedy sampling)
//     torch.argmax(x, -1): the first of equal maxima, and a NaN above everything (the first
//     one); torch's takes ~1 ms over a batch of 32 vocabularies, this one a tenth of that.
//
// Each element is computed with the same operations, in the same order, as the torch code
// they replace (attention_service/model.py); only the sum of squares is added up in another
// order.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

void check_cpu_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous fp32 CPU tensor");
}

// x * cos + rotate_half(x) * sin for one head of dh values, rotate_half(x) = [-x2, x1].
inline void rotate(const float* x, const float* c, const float* s, int64_t dh, float* out) {
  const int64_t half = dh / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = -x[i + half] * s[i] + x[i] * c[i];
  for (int64_t i = half; i < dh; ++i) out[i] = x[i - half] * s[i] + x[i] * c[i];
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check_cpu_f32(x, "x");
  check_cpu_f32(w, "the norm's weight");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && w.size(0) == x.size(1), "rms_norm: x [T, D] and weight [D]");
  const int64_t T = x.size(0), D = x.size(1);
  auto out = torch::empty_like(x);
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* xr = X + t * D;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t i = 0;
      for (; i + 8 <= D; i += 8)
        for (int j = 0; j < 8; ++j) acc[j] += xr[i + j] * xr[i + j];
      float ss = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      for (; i < D; ++i) ss += xr[i] * xr[i];
      const float r = 1.0f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
      float* o = O + t * D;
      for (int64_t j = 0; j < D; ++j) o[j] = W[j] * (xr[j] * r);
    }
  });
  return out;
}

torch::Tensor qkv_rope_cache(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                             torch::Tensor v_cache, torch::Tensor slots, int64_t H) {
  for (const auto& [t, name] : {std::pair{qkv, "qkv"}, {cos, "cos"}, {sin, "sin"}, {k_cache, "k_cache"},
                                {v_cache, "v_cache"}})
    check_cpu_f32(t, name);
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous() && slots.dim() == 1,
              "slots must be a contiguous int64 vector");
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "caches: [S, KVH, Dh] each");
  const int64_t T = qkv.size(0), S = k_cache.size(0), KVH = k_cache.size(1), Dh = k_cache.size(2);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (H + 2 * KVH) * Dh && Dh % 2 == 0, "qkv must be [T, (H + 2KVH) Dh]");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == T && cos.size(1) == Dh,
              "cos and sin must be [T, Dh]");
  TORCH_CHECK(slots.size(0) == T, "one slot per token");
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sl[t] >= 0 && sl[t] < S, "slot ", sl[t], " out of the cache's ", S);
  auto q = torch::empty({T, H, Dh}, qkv.options());
  const float* X = qkv.data_ptr<float>();
  const float* C = cos.data_ptr<float>();
  const float* Sn = sin.data_ptr<float>();
  float* Q = q.data_ptr<float>();
  float* KC = k_cache.data_ptr<float>();
  float* VC = v_cache.data_ptr<float>();
  const int64_t width = (H + 2 * KVH) * Dh, row = KVH * Dh;
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* x = X + t * width;
      const float* c = C + t * Dh;
      const float* s = Sn + t * Dh;
      for (int64_t h = 0; h < H; ++h) rotate(x + h * Dh, c, s, Dh, Q + (t * H + h) * Dh);
      for (int64_t h = 0; h < KVH; ++h) rotate(x + (H + h) * Dh, c, s, Dh, KC + sl[t] * row + h * Dh);
      std::copy(x + (H + KVH) * Dh, x + width, VC + sl[t] * row);
    }
  });
  return q;
}

namespace {

// The index of the first NaN of r[0 .. V), or -1.
int64_t first_nan(const float* r, int64_t V) {
  for (int64_t j = 0; j < V; ++j)
    if (std::isnan(r[j])) return j;
  return -1;
}

int64_t argmax_row(const float* r, int64_t V) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
#ifdef __AVX2__
  // A pass for the maximum (NaNs noted on the side), then one for its first index.
  __m256 vm = _mm256_set1_ps(m), unord = _mm256_setzero_ps();
  for (; j + 8 <= V; j += 8) {
    const __m256 v = _mm256_loadu_ps(r + j);
    unord = _mm256_or_ps(unord, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vm = _mm256_max_ps(vm, v);
  }
  if (_mm256_movemask_ps(unord)) return first_nan(r, V);
  float lanes[8];
  _mm256_storeu_ps(lanes, vm);
  for (float x : lanes) m = std::max(m, x);
#endif
  for (; j < V; ++j) {
    if (std::isnan(r[j])) return first_nan(r, V);
    m = std::max(m, r[j]);
  }
  j = 0;
#ifdef __AVX2__
  const __m256 target = _mm256_set1_ps(m);
  for (; j + 8 <= V; j += 8)
    if (const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(r + j), target, _CMP_EQ_OQ)))
      return j + __builtin_ctz(hit);
#endif
  for (; j < V; ++j)
    if (r[j] == m) return j;
  return 0;   // every entry -inf
}

}  // namespace

torch::Tensor argmax_rows(torch::Tensor x) {
  check_cpu_f32(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "x must be [B, V] with V > 0");
  const int64_t B = x.size(0), V = x.size(1);
  auto out = torch::empty({B}, x.options().dtype(torch::kInt64));
  const float* X = x.data_ptr<float>();
  int64_t* O = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) O[b] = argmax_row(X + b * V, V);
  });
  return out;
}
