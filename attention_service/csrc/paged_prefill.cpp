// Prompt attention on CPU, reading the paged KV cache in place: every prompt chunk of a
// step in one call.
//
// Shapes: T query rows of the step, H heads, KVH kv heads, G = H / KVH query heads per kv
// head, Dh head dim, S cache slots (blocks x bs), C chunks, NB blocks in the longest table.
//
//   q [T, H, Dh]; k_cache / v_cache [S, KVH, Dh]; chunk c: rows starts[c] .. starts[c] + n[c]
//   of q, the last n[c] positions of a context of lens[c] tokens whose blocks are tables[c]
//   (its new K/V already written to the cache) -> out [T, H, Dh]
//   out[t, h] = softmax(q[t, h] . K[0 .. pos(t), h / G] * scale) @ V[0 .. pos(t), h / G]
//
// A work item is one kv head of a run of a chunk's positions: the G query heads of those
// positions share its keys, so they are its rows (up to 256, fewer when a step has few).
// Keys are taken 32 at a time from wherever their blocks lie; a tile's keys are
// transposed once into scratch so that the scores are a small matrix product, 8 rows x 32
// keys in registers (then values: a few rows x Dh in registers). The softmax is online
// (a running max and sum per row).
// Key tiles start at multiples of 32 of the context whatever the chunk, so a row's sums
// run in the same order however its prompt was split into chunks or batched.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "vec.h"

namespace {

constexpr int64_t KT = 32;        // keys per tile
constexpr int64_t ROWS = 256;    // rows (positions x G) per work item, at most

struct Scratch {
  std::vector<float> q, o, p, m, l, alpha, kt;
  std::vector<const float*> v;
  Scratch(int64_t rows, int64_t dh)
      : q(rows * dh), o(rows * dh), p(rows * KT), m(rows), l(rows), alpha(rows), kt(dh * KT), v(KT) {}
};

#ifdef __AVX512F__
// p[r, :] = q[r] . kt for RS rows: kt [Dh, 32] (keys transposed), q [RS, Dh] -> p [RS, 32].
template <int RS>
inline void scores_tile(const float* q, const float* kt, int64_t dh, float* p) {
  __m512 a0[RS], a1[RS];
  for (int r = 0; r < RS; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dh; ++d) {
    const __m512 k0 = _mm512_loadu_ps(kt + d * KT), k1 = _mm512_loadu_ps(kt + d * KT + 16);
    for (int r = 0; r < RS; ++r) {
      const __m512 qb = _mm512_set1_ps(q[r * dh + d]);
      a0[r] = _mm512_fmadd_ps(qb, k0, a0[r]);
      a1[r] = _mm512_fmadd_ps(qb, k1, a1[r]);
    }
  }
  for (int r = 0; r < RS; ++r) {
    _mm512_storeu_ps(p + r * KT, a0[r]);
    _mm512_storeu_ps(p + r * KT + 16, a1[r]);
  }
}

// o[r] = o[r] * alpha[r] + sum_j p[r, j] * v_j for RO rows, head dim 16 * NV.
template <int NV, int RO>
inline void values_tile(float* o, const float* alpha, const float* p, const float* const* v, int64_t nk) {
  __m512 a[RO][NV];
  for (int r = 0; r < RO; ++r) {
    const __m512 al = _mm512_set1_ps(alpha[r]);
    for (int i = 0; i < NV; ++i) a[r][i] = _mm512_mul_ps(_mm512_loadu_ps(o + (r * NV + i) * 16), al);
  }
  for (int64_t j = 0; j < nk; ++j) {
    __m512 pb[RO];
    for (int r = 0; r < RO; ++r) pb[r] = _mm512_set1_ps(p[r * KT + j]);
    for (int i = 0; i < NV; ++i) {
      const __m512 vj = _mm512_loadu_ps(v[j] + 16 * i);
      for (int r = 0; r < RO; ++r) a[r][i] = _mm512_fmadd_ps(pb[r], vj, a[r][i]);
    }
  }
  for (int r = 0; r < RO; ++r)
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(o + (r * NV + i) * 16, a[r][i]);
}

template <int RS>
void scores_rows(const float* q, const float* kt, int64_t dh, float* p, int64_t rows) {
  int64_t r = 0;
  for (; r + RS <= rows; r += RS) scores_tile<RS>(q + r * dh, kt, dh, p + r * KT);
  switch (rows - r) {   // the tail, with its row count known to the compiler
    case 7: scores_tile<7>(q + r * dh, kt, dh, p + r * KT); break;
    case 6: scores_tile<6>(q + r * dh, kt, dh, p + r * KT); break;
    case 5: scores_tile<5>(q + r * dh, kt, dh, p + r * KT); break;
    case 4: scores_tile<4>(q + r * dh, kt, dh, p + r * KT); break;
    case 3: scores_tile<3>(q + r * dh, kt, dh, p + r * KT); break;
    case 2: scores_tile<2>(q + r * dh, kt, dh, p + r * KT); break;
    case 1: scores_tile<1>(q + r * dh, kt, dh, p + r * KT); break;
    default: break;
  }
}

template <int NV, int RO>
void values_rows(float* o, const float* alpha, const float* p, const float* const* v, int64_t nk, int64_t rows) {
  int64_t r = 0;
  for (; r + RO <= rows; r += RO) values_tile<NV, RO>(o + r * NV * 16, alpha + r, p + r * KT, v, nk);
  for (; r < rows; ++r) values_tile<NV, 1>(o + r * NV * 16, alpha + r, p + r * KT, v, nk);
}
#endif

// The same two products for any head dim, left to the compiler.
void scores_generic(const float* q, const float* kt, int64_t dh, float* p, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    float* pr = p + r * KT;
    std::fill(pr, pr + KT, 0.f);
    for (int64_t d = 0; d < dh; ++d) {
      const float qd = q[r * dh + d];
#pragma omp simd
      for (int64_t j = 0; j < KT; ++j) pr[j] += qd * kt[d * KT + j];
    }
  }
}

void values_generic(float* o, const float* alpha, const float* p, const float* const* v, int64_t nk, int64_t rows,
                    int64_t dh) {
  for (int64_t r = 0; r < rows; ++r) {
    float* orow = o + r * dh;
#pragma omp simd
    for (int64_t i = 0; i < dh; ++i) orow[i] *= alpha[r];
    for (int64_t j = 0; j < nk; ++j) {
      const float pj = p[r * KT + j];
#pragma omp simd
      for (int64_t i = 0; i < dh; ++i) orow[i] += pj * v[j][i];
    }
  }
}

// The online softmax of one tile for rows [r0, rows): row r sits at position pos0 + r / G
// and sees the tile's first min(32, pos - k0 + 1) keys. p holds the scores and gets the
// probabilities (0 for keys a row does not see); alpha gets each row's rescale factor.
void softmax_tile(float* p, float* m, float* l, float* alpha, int64_t r0, int64_t rows, int64_t G, int64_t pos0,
                  int64_t k0) {
  for (int64_t r = r0; r < rows; ++r) {
    const int64_t cnt = std::min<int64_t>(KT, pos0 + r / G - k0 + 1);
    alpha[r] = softmax_step(p + r * KT, cnt, m[r], l[r]);
    std::fill(p + r * KT + cnt, p + (r + 1) * KT, 0.f);
  }
}

// One work item: kv head g of positions pos0 .. pos0 + np - 1 of a context, whose query
// rows start at q (qrow floats apart) and whose results go to out (rows H * Dh apart).
template <int NV>
void work_item(const float* q, int64_t qrow, const float* kc, const float* vc, const int64_t* table, int64_t bs,
               int64_t H, int64_t KVH, int64_t dh, int64_t g, int64_t pos0, int64_t np, float scale, float* out,
               Scratch& s) {
  const int64_t G = H / KVH, rows = np * G, stride = KVH * dh;
  for (int64_t i = 0; i < np; ++i)
    for (int64_t h = 0; h < G; ++h) {
      const float* src = q + i * qrow + (g * G + h) * dh;
      float* dst = s.q.data() + (i * G + h) * dh;
      for (int64_t d = 0; d < dh; ++d) dst[d] = src[d] * scale;
    }
  std::fill(s.o.begin(), s.o.begin() + rows * dh, 0.f);
  std::fill(s.m.begin(), s.m.begin() + rows, -std::numeric_limits<float>::infinity());
  std::fill(s.l.begin(), s.l.begin() + rows, 0.f);
  const int64_t nkeys = pos0 + np;
  for (int64_t k0 = 0; k0 < nkeys; k0 += KT) {
    const int64_t nk = std::min(KT, nkeys - k0);
    float* kt = s.kt.data();
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t key = k0 + j, slot = table[key / bs] * bs + key % bs;
      const float* kp = kc + slot * stride + g * dh;
      s.v[j] = vc + slot * stride + g * dh;
      for (int64_t d = 0; d < dh; ++d) kt[d * KT + j] = kp[d];
    }
    for (int64_t j = nk; j < KT; ++j)
      for (int64_t d = 0; d < dh; ++d) kt[d * KT + j] = 0.f;
    // Rows before the tile's first key see none of it: they are skipped.
    const int64_t r0 = std::max<int64_t>(0, k0 - pos0) * G;
    float* p = s.p.data() + r0 * KT;
    const float* qr = s.q.data() + r0 * dh;
    float* o = s.o.data() + r0 * dh;
#ifdef __AVX512F__
    if constexpr (NV > 0) {
      scores_rows<8>(qr, kt, dh, p, rows - r0);
      softmax_tile(s.p.data(), s.m.data(), s.l.data(), s.alpha.data(), r0, rows, G, pos0, k0);
      values_rows<NV, (NV >= 8 ? 3 : 6)>(o, s.alpha.data() + r0, p, s.v.data(), nk, rows - r0);
      continue;
    }
#endif
    scores_generic(qr, kt, dh, p, rows - r0);
    softmax_tile(s.p.data(), s.m.data(), s.l.data(), s.alpha.data(), r0, rows, G, pos0, k0);
    values_generic(o, s.alpha.data() + r0, p, s.v.data(), nk, rows - r0, dh);
  }
  for (int64_t i = 0; i < np; ++i)
    for (int64_t h = 0; h < G; ++h) {
      const int64_t r = i * G + h;
      const float inv = 1.f / s.l[r];
      float* dst = out + i * H * dh + (g * G + h) * dh;
      for (int64_t d = 0; d < dh; ++d) dst[d] = s.o[r * dh + d] * inv;
    }
}

struct Item {
  int64_t chunk, g, pos0, np, cost;
};

}  // namespace

torch::Tensor paged_prefill_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                      torch::Tensor tables, torch::Tensor starts, torch::Tensor qlens,
                                      torch::Tensor lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  // q may be a view whose rows are further apart (q and k from one projection): each row's
  // heads must be contiguous.
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q's rows must each be contiguous");
  for (const auto& t : {q, k_cache, v_cache})
    TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.device().is_cpu(), "q and the caches must be fp32 CPU tensors");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the caches must be contiguous");
  for (const auto& t : {tables, starts, qlens, lens})
    TORCH_CHECK(t.scalar_type() == torch::kInt64 && t.is_contiguous(), "tables, starts, qlens and lens must be int64");
  const int64_t T = q.size(0), H = q.size(1), Dh = q.size(2), KVH = k_cache.size(1);
  const int64_t C = tables.size(0), NB = tables.size(1);
  TORCH_CHECK(k_cache.size(2) == Dh && H % KVH == 0 && starts.size(0) == C && qlens.size(0) == C &&
              lens.size(0) == C, "bad shapes");
  const int64_t *st = starts.data_ptr<int64_t>(), *n = qlens.data_ptr<int64_t>(), *L = lens.data_ptr<int64_t>();
  for (int64_t c = 0; c < C; ++c) {
    TORCH_CHECK(n[c] >= 1 && n[c] <= L[c], "chunk ", c, ": ", n[c], " new tokens in a context of ", L[c]);
    TORCH_CHECK(L[c] <= NB * block_size, "context length ", L[c], " does not fit its block table");
    TORCH_CHECK(st[c] >= 0 && st[c] + n[c] <= T, "chunk ", c, " rows out of range");
  }
  auto out = torch::empty({T, H, Dh}, q.options());
  const int64_t qrow = q.stride(0);
  const float* Q = q.data_ptr<float>();
  const float* KC = k_cache.data_ptr<float>();
  const float* VC = v_cache.data_ptr<float>();
  const int64_t* TB = tables.data_ptr<int64_t>();
  float* O = out.data_ptr<float>();

  // Positions per work item: ROWS rows' worth, fewer where that would leave threads idle.
  int64_t positions = 0;
  for (int64_t c = 0; c < C; ++c) positions += n[c];
  const int64_t G = H / KVH, nthreads = at::get_num_threads();
  const int64_t per = std::max<int64_t>(1, std::min<int64_t>(ROWS / G, positions * KVH / (4 * nthreads)));
  std::vector<Item> items;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < n[c]; i += per)
      for (int64_t g = 0; g < KVH; ++g) {
        const int64_t pos0 = L[c] - n[c] + i, np = std::min(per, n[c] - i);
        items.push_back({c, g, pos0, np, np * (pos0 + np)});
      }
  // Longest first, dealt to the threads in a snake: their shares come out about even.
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  auto run = Dh == 16 ? work_item<1> : Dh == 32 ? work_item<2> : Dh == 64 ? work_item<4>
           : Dh == 128 ? work_item<8> : work_item<0>;
  const int64_t N = static_cast<int64_t>(items.size());
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(nthreads, N));
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    Scratch s(per * G, Dh);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t i = 0; i < N; ++i) {
        const int64_t lap = i / nt, pos = i % nt;
        if ((lap % 2 == 0 ? pos : nt - 1 - pos) != t) continue;
        const Item& it = items[i];
        const int64_t row = st[it.chunk] + it.pos0 - (L[it.chunk] - n[it.chunk]);
        run(Q + row * qrow, qrow, KC, VC, TB + it.chunk * NB, block_size, H, KVH, Dh, it.g, it.pos0, it.np,
            static_cast<float>(scale), O + row * H * Dh, s);
      }
  });
  return out;
}
