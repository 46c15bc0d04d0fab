// Decode attention on CPU, reading the paged KV cache in place.
//
// Shapes: B sequences (one query token each), H heads, KVH kv heads, G = H / KVH query heads
// per kv head, Dh head dim, S cache slots (blocks x bs), NB blocks in the longest table.
//
//   q [B, H, Dh], k_cache / v_cache [S, KVH, Dh], tables [B, NB], lens [B] -> out [B, H, Dh]
//   out[b, h] = softmax(q[b, h] . K[b, :, h / G] * scale) @ V[b, :, h / G]
//
// The torch path gathers each context's blocks into a contiguous copy before attending to
// it; this one walks the block table and keeps a running max and sum per head (online
// softmax), so each K/V byte is read from memory once. Sequences are the unit of work: they
// are sorted longest first and dealt to torch's threads in a snake, which evens out their
// contexts. Each query row's result depends on its own sequence only, never on the batch.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <limits>
#include <vector>

#include "vec.h"

namespace {

#ifdef __AVX512F__
// 16 vectors -> one whose lane j is the sum of a[j]'s lanes: a transpose-and-add tree,
// 45 shuffles and adds where 16 separate reductions would take ~130.
inline __m512 sum16(const __m512* a) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)   // per 128-bit lane: a[2i] in slots 0, 2 and a[2i+1] in 1, 3
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)   // per 128-bit lane: the lane's sums of a[4i .. 4i+3]
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}
#elif defined(__AVX2__)
// 8 vectors -> one whose lane j is the sum of a[j]'s lanes.
inline __m256 sum8(const __m256* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

// scores s[j] = q . k_j * scale for the n keys of one block (rows `row` floats apart).
// NV > 0: head dim 16 * NV in AVX-512 (or AVX2) registers; NV = 0: any head dim dh, left to the compiler.
template <int NV>
inline void scores(const float* q, const float* k, int64_t n, int64_t row, int64_t dh, float scale, float* s) {
#ifdef __AVX512F__
  if constexpr (NV > 0) {
    __m512 qv[NV], a[16];
    for (int v = 0; v < NV; ++v) qv[v] = _mm512_loadu_ps(q + 16 * v);
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      const int m = static_cast<int>(std::min<int64_t>(16, n - j0));
      for (int j = 0; j < 16; ++j) {
        if (j >= m) { a[j] = _mm512_setzero_ps(); continue; }
        const float* kj = k + (j0 + j) * row;
        a[j] = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kj));
        for (int v = 1; v < NV; ++v) a[j] = _mm512_fmadd_ps(qv[v], _mm512_loadu_ps(kj + 16 * v), a[j]);
      }
      _mm512_mask_storeu_ps(s + j0, static_cast<__mmask16>((1u << m) - 1), _mm512_mul_ps(sum16(a), sc));
    }
    return;
  }
#elif defined(__AVX2__)
  if constexpr (NV > 0) {
    // 8 keys at a time, head dim 16 * NV as 2 * NV vectors; the query is read from L1.
    constexpr int W = 2 * NV;
    __m256 a[8];
    const __m256 sc = _mm256_set1_ps(scale);
    int64_t j0 = 0;
    for (; j0 + 8 <= n; j0 += 8) {
      for (int j = 0; j < 8; ++j) {
        const float* kj = k + (j0 + j) * row;
        a[j] = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(kj));
        for (int v = 1; v < W; ++v) a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * v), _mm256_loadu_ps(kj + 8 * v), a[j]);
      }
      _mm256_storeu_ps(s + j0, _mm256_mul_ps(sum8(a), sc));
    }
    for (; j0 < n; ++j0) {
      const float* kj = k + j0 * row;
      __m256 d = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(kj));
      for (int v = 1; v < W; ++v) d = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * v), _mm256_loadu_ps(kj + 8 * v), d);
      s[j0] = hsum8(d) * scale;
    }
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j, k += row) {
    float d = 0.f;
#pragma omp simd reduction(+ : d)
    for (int64_t i = 0; i < dh; ++i) d += q[i] * k[i];
    s[j] = d * scale;
  }
}

// acc = acc * alpha + sum_j p[j] * v_j over the n values of one block.
template <int NV>
inline void accumulate(float* acc, float alpha, const float* p, const float* v, int64_t n, int64_t row, int64_t dh) {
#ifdef __AVX512F__
  if constexpr (NV > 0) {
    __m512 a[NV];
    const __m512 al = _mm512_set1_ps(alpha);
    for (int i = 0; i < NV; ++i) a[i] = _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * i), al);
    for (int64_t j = 0; j < n; ++j, v += row) {
      const __m512 pj = _mm512_set1_ps(p[j]);
      for (int i = 0; i < NV; ++i) a[i] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(v + 16 * i), a[i]);
    }
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(acc + 16 * i, a[i]);
    return;
  }
#elif defined(__AVX2__)
  if constexpr (NV > 0) {
    constexpr int W = 2 * NV;
    __m256 a[W];
    const __m256 al = _mm256_set1_ps(alpha);
    for (int i = 0; i < W; ++i) a[i] = _mm256_mul_ps(_mm256_loadu_ps(acc + 8 * i), al);
    for (int64_t j = 0; j < n; ++j, v += row) {
      const __m256 pj = _mm256_set1_ps(p[j]);
      for (int i = 0; i < W; ++i) a[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8 * i), a[i]);
    }
    for (int i = 0; i < W; ++i) _mm256_storeu_ps(acc + 8 * i, a[i]);
    return;
  }
#endif
#pragma omp simd
  for (int64_t i = 0; i < dh; ++i) acc[i] *= alpha;
  for (int64_t j = 0; j < n; ++j, v += row) {
#pragma omp simd
    for (int64_t i = 0; i < dh; ++i) acc[i] += p[j] * v[i];
  }
}

// One sequence: every head over every block of its table. s [H * bs], acc [H * DH], m, l [H]
// are the calling thread's scratch.
template <int NV>
void one_sequence(const float* q, const float* kc, const float* vc, const int64_t* table, int64_t L, int64_t bs,
                  int64_t H, int64_t KVH, int64_t DH, float scale, float* out, float* s, float* acc, float* m,
                  float* l) {
  const int64_t G = H / KVH, row = KVH * DH;
  std::fill(m, m + H, -std::numeric_limits<float>::infinity());
  std::fill(l, l + H, 0.f);
  std::fill(acc, acc + H * DH, 0.f);
  for (int64_t b = 0, nb = (L + bs - 1) / bs; b < nb; ++b) {
    const int64_t n = std::min(bs, L - b * bs);
    const float* K = kc + table[b] * bs * row;
    const float* V = vc + table[b] * bs * row;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t off = (h / G) * DH;
      float* sh = s + h * bs;
      scores<NV>(q + h * DH, K + off, n, row, DH, scale, sh);
      const float alpha = softmax_step(sh, n, m[h], l[h]);
      accumulate<NV>(acc + h * DH, alpha, sh, V + off, n, row, DH);
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    const float inv = 1.f / l[h];
    for (int i = 0; i < DH; ++i) out[h * DH + i] = acc[h * DH + i] * inv;
  }
}

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor tables, torch::Tensor lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  for (const auto& t : {q, k_cache, v_cache})
    TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.device().is_cpu(),
                "q and the caches must be contiguous fp32 CPU tensors");
  TORCH_CHECK(tables.scalar_type() == torch::kInt64 && lens.scalar_type() == torch::kInt64 && tables.is_contiguous(),
              "tables and lens must be int64");
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2), KVH = k_cache.size(1), NB = tables.size(1);
  TORCH_CHECK(k_cache.size(2) == Dh && H % KVH == 0 && tables.size(0) == B && lens.size(0) == B, "bad shapes");
  const int64_t* Lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(Lp[b] >= 1 && Lp[b] <= NB * block_size, "context length ", Lp[b], " does not fit its block table");
  auto out = torch::empty_like(q);
  const float* Q = q.data_ptr<float>();
  const float* KC = k_cache.data_ptr<float>();
  const float* VC = v_cache.data_ptr<float>();
  const int64_t* T = tables.data_ptr<int64_t>();
  float* O = out.data_ptr<float>();

  std::vector<int64_t> order(B);
  for (int64_t i = 0; i < B; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return Lp[a] > Lp[b]; });
  // Head dims of 16 to 128 in steps of 16 keep a head's query and sums in registers.
  auto run = Dh == 16 ? one_sequence<1> : Dh == 32 ? one_sequence<2> : Dh == 64 ? one_sequence<4>
           : Dh == 128 ? one_sequence<8> : one_sequence<0>;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B));
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> s(H * block_size), acc(H * Dh), m(H), l(H);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t i = 0; i < B; ++i) {
        const int64_t lap = i / nt, pos = i % nt;
        if ((lap % 2 == 0 ? pos : nt - 1 - pos) != t) continue;
        const int64_t b = order[i];
        run(Q + b * H * Dh, KC, VC, T + b * NB, Lp[b], block_size, H, KVH, Dh, static_cast<float>(scale),
            O + b * H * Dh, s.data(), acc.data(), m.data(), l.data());
      }
    }
  });
  return out;
}
