// The greedy token of x @ W.T (the lm_head) without computing every logit in fp32: exact.
// Needs AVX-512 BF16; elsewhere greedy_screen_built() is false and callers take every logit.
//
// Shapes: M rows of x, K inputs (even), N outputs (the vocabulary, a multiple of 16),
// P = N / 16 panels, B = K / 2 pairs of inputs.
//
//   greedy_argmax(x [M, K], p [P, K, 16] fp32 panels, b [P, B, 16, 2] bf16 panels, bound [3],
//                 q [P, K, 16] int8 panels, scale [N], qbound [3])
//     -> tokens [M] int64, -1 where the row needs every logit after all (non-finite values)
//
// A greedy step wants only argmax_n f_n, f_n the fp32 logit panel_linear computes. The
// screen computes every logit from bf16 copies of x and W (half the bytes to stream, twice
// the products per instruction), a_n, and a bound E >= |a_n - f_n| for every n. Only an n
// with a_n >= max a - 2E can hold the maximum: any other has f_n <= a_n + E < max a - E <=
// f_m for the m of max a. The panels of those candidates (one or two, for a model's peaked
// logits or random ones) are computed again in fp32 exactly as panel_linear does (one FMA
// per k, in order, the same instructions: the same bits), and the first of their maxima is
// the token torch.argmax gives over all N logits.
//
// The bound, for a row x, its bf16 copy y (denormals flushed, as the dot product reads them),
// and W's rows w_n with bf16 copies v_n (likewise flushed):
//   |f_n - x.w_n| <= g |x| |w_n|                    K fp32 roundings, in order
//   |a_n - y.v_n| <= g |y| |v_n| + 2 K 2^-126        K roundings in any order, flushed denormals
//   |x.w_n - y.v_n| <= |x| |w_n - v_n| + |x - y| |v_n|
// with g = K u / (1 - K u), u = 2^-24 (Cauchy-Schwarz for the sums of |products|). The pack
// gives max_n |w_n|, max_n |v_n| and max_n |w_n - v_n| (bound, computed in fp64); the norms of
// x are taken here in fp64. g is doubled for slack in the instruction's rounding, and 4 K 2^-126
// covers both sums' flushed or underflowed partials.
//
// Up to Q8_ROWS rows, where the screen is the time to stream it, it reads int8 weights
// instead (a quarter of the fp32 bytes): v_n = s_n q_n, q_n in [-127, 127] with a scale per
// output, against x itself in fp32 (FMAs, then times s_n):
//   |a_n - x.v_n| <= (g + 2u) |x| |v_n| + 2 K 2^-126
// and the same two terms as above with x - y = 0 (qbound: the same three maxima for v_n = s_n q_n).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define MOE_SCREEN 1
#endif

namespace {

constexpr int64_t NR = 16;   // outputs per panel

#ifdef MOE_SCREEN
constexpr int64_t MR = 12;   // rows per pass: 2 x 12 accumulators, as in panel_linear.cpp

// a[m, 0:16 U] = the bf16 dot products of R rows of xb (bf16 [R, K] as uint16, stride ldx)
// with the panel b and, when U = 2, the one beside it.
#define MOE_ACC(m) __m512 c_##m = _mm512_setzero_ps(), d_##m = _mm512_setzero_ps();
#define MOE_DP(m)                                                                        \
  if constexpr (R > m) {                                                                 \
    int32_t pair;                                                                        \
    std::memcpy(&pair, xb + m * ldx + 2 * i, 4);                                         \
    const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);                               \
    c_##m = _mm512_dpbf16_ps(c_##m, xv, wl);                                             \
    if constexpr (U == 2) d_##m = _mm512_dpbf16_ps(d_##m, xv, wr);                       \
  }
#define MOE_STORE(m)                                                                     \
  if constexpr (R > m) {                                                                 \
    _mm512_storeu_ps(a + m * lda, c_##m);                                                \
    if constexpr (U == 2) _mm512_storeu_ps(a + m * lda + NR, d_##m);                     \
  }

template <int R, int U>
void screen(const uint16_t* xb, int64_t ldx, const uint16_t* b, const uint16_t* next, int64_t Bk, float* a,
            int64_t lda, int64_t g, int64_t G) {
  MOE_ACC(0) MOE_ACC(1) MOE_ACC(2) MOE_ACC(3) MOE_ACC(4) MOE_ACC(5)
  MOE_ACC(6) MOE_ACC(7) MOE_ACC(8) MOE_ACC(9) MOE_ACC(10) MOE_ACC(11)
  const uint16_t* q = b + Bk * NR * 2;
  // As panel_linear's passes: one pass asks for each stream's lines 2 KB ahead, non-temporal;
  // with G passes, pass g asks for its share of the next unit's lines, U every G iterations.
  const bool once = G == 1 && next == b;
  const char* pf = reinterpret_cast<const char*>(next) + (once ? 2048 : g * U * Bk / G * 64);
  int64_t tick = 0;
  for (int64_t i = 0; i < Bk; ++i) {
    const __m512bh wl = (__m512bh)_mm512_loadu_si512(b + i * NR * 2);
    __m512bh wr = wl;
    if constexpr (U == 2) wr = (__m512bh)_mm512_loadu_si512(q + i * NR * 2);
    if (once) {
      _mm_prefetch(pf, _MM_HINT_NTA);
      if constexpr (U == 2) _mm_prefetch(pf + Bk * NR * 4, _MM_HINT_NTA);
      pf += 64;
    } else if (++tick == G) {
      tick = 0;
      _mm_prefetch(pf, _MM_HINT_T0);
      if constexpr (U == 2) _mm_prefetch(pf + 64, _MM_HINT_T0);
      pf += U * 64;
    }
    MOE_DP(0) MOE_DP(1) MOE_DP(2) MOE_DP(3) MOE_DP(4) MOE_DP(5)
    MOE_DP(6) MOE_DP(7) MOE_DP(8) MOE_DP(9) MOE_DP(10) MOE_DP(11)
  }
  MOE_STORE(0) MOE_STORE(1) MOE_STORE(2) MOE_STORE(3) MOE_STORE(4) MOE_STORE(5)
  MOE_STORE(6) MOE_STORE(7) MOE_STORE(8) MOE_STORE(9) MOE_STORE(10) MOE_STORE(11)
}

#undef MOE_ACC
#undef MOE_DP
#undef MOE_STORE

using Screen = void (*)(const uint16_t*, int64_t, const uint16_t*, const uint16_t*, int64_t, float*, int64_t, int64_t,
                       int64_t);
#define MOE_SCREENS(U) {nullptr, screen<1, U>, screen<2, U>, screen<3, U>, screen<4, U>, screen<5, U>, screen<6, U>, \
                        screen<7, U>, screen<8, U>, screen<9, U>, screen<10, U>, screen<11, U>, screen<12, U>}
constexpr Screen kScreen[3][MR + 1] = {{}, MOE_SCREENS(1), MOE_SCREENS(2)};
#undef MOE_SCREENS

constexpr int64_t Q8_ROWS = 6;   // more rows: the bf16 screen, whose products cost half as much (measured)

// a[m, 0:16 U] = s * sum_k x[m, k] q[k, 0:16] over the int8 panel q (and the one beside it).
template <int R, int U>
void screen8(const float* x, int64_t ldx, const int8_t* q, const float* s, int64_t K, float* a, int64_t lda) {
  __m512 c[R], d[R];   // at most 2 x 6: the compiler keeps them in registers
  for (int m = 0; m < R; ++m) c[m] = d[m] = _mm512_setzero_ps();
  const int8_t* r = q + K * NR;
  const char* pf = reinterpret_cast<const char*>(q) + 8192;   // each stream 8 KB ahead, non-temporal (measured)
  for (int64_t k = 0; k < K; ++k) {
    if ((k & 3) == 0) {
      _mm_prefetch(pf, _MM_HINT_NTA);
      if constexpr (U == 2) _mm_prefetch(pf + K * NR, _MM_HINT_NTA);
      pf += 64;
    }
    const __m512 wl = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k * NR))));
    __m512 wr = wl;
    if constexpr (U == 2)
      wr = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + k * NR))));
    for (int m = 0; m < R; ++m) {
      const __m512 xv = _mm512_set1_ps(x[m * ldx + k]);
      c[m] = _mm512_fmadd_ps(xv, wl, c[m]);
      if constexpr (U == 2) d[m] = _mm512_fmadd_ps(xv, wr, d[m]);
    }
  }
  for (int m = 0; m < R; ++m) {
    _mm512_storeu_ps(a + m * lda, _mm512_mul_ps(c[m], _mm512_loadu_ps(s)));
    if constexpr (U == 2) _mm512_storeu_ps(a + m * lda + NR, _mm512_mul_ps(d[m], _mm512_loadu_ps(s + NR)));
  }
}

using Screen8 = void (*)(const float*, int64_t, const int8_t*, const float*, int64_t, float*, int64_t);
constexpr Screen8 kScreen8[3][Q8_ROWS + 1] = {
    {}, {nullptr, screen8<1, 1>, screen8<2, 1>, screen8<3, 1>, screen8<4, 1>, screen8<5, 1>, screen8<6, 1>},
    {nullptr, screen8<1, 2>, screen8<2, 2>, screen8<3, 2>, screen8<4, 2>, screen8<5, 2>, screen8<6, 2>}};

// One row's 16 fp32 logits of panel p: panel_linear's one-row pass, instruction for instruction.
void exact_panel(const float* x, const float* p, int64_t K, float* f) {
  __m512 c = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) c = _mm512_fmadd_ps(_mm512_set1_ps(x[k]), _mm512_loadu_ps(p + k * NR), c);
  _mm512_storeu_ps(f, c);
}
#endif

// fp32 -> bf16 bits, round to nearest even, a denormal result flushed to a zero of its sign.
uint16_t to_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  uint16_t h = static_cast<uint16_t>(u >> 16);
  if ((h & 0x7F80) == 0) h &= 0x8000;
  return h;
}

double from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

}  // namespace

bool greedy_screen_built() {
#ifdef MOE_SCREEN
  return true;
#else
  return false;
#endif
}

torch::Tensor greedy_argmax(torch::Tensor x, torch::Tensor p, torch::Tensor b, torch::Tensor bound, torch::Tensor q,
                            torch::Tensor scale, torch::Tensor qbound) {
  TORCH_CHECK(greedy_screen_built(), "greedy_argmax needs AVX-512 BF16 (greedy_screen_built() is false)");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && p.scalar_type() == torch::kFloat32 &&
              b.scalar_type() == torch::kBFloat16 && bound.scalar_type() == torch::kFloat64,
              "x and p must be fp32, b bf16, bound fp64");
  TORCH_CHECK(x.dim() == 2 && p.dim() == 3 && p.size(2) == NR && p.size(1) == x.size(1) && p.is_contiguous() &&
              b.dim() == 4 && b.size(0) == p.size(0) && b.size(1) * 2 == x.size(1) && b.size(2) == NR &&
              b.size(3) == 2 && b.is_contiguous() && bound.numel() == 3,
              "x must be [M, K], p [N / 16, K, 16], b [N / 16, K / 2, 16, 2] and bound [3]");
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && q.sizes() == p.sizes() && q.is_contiguous() &&
              scale.scalar_type() == torch::kFloat32 && scale.dim() == 1 && scale.size(0) == p.size(0) * NR &&
              scale.is_contiguous() && qbound.scalar_type() == torch::kFloat64 && qbound.numel() == 3,
              "q must be int8 [N / 16, K, 16], scale fp32 [N] and qbound fp64 [3]");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), P = p.size(0), N = P * NR, Bk = K / 2;
  auto tokens = torch::full({M}, -1, x.options().dtype(torch::kInt64));
  if (M == 0) return tokens;
#ifdef MOE_SCREEN
  const bool q8 = M <= Q8_ROWS;
  const double* bd = (q8 ? qbound : bound).contiguous().data_ptr<double>();
  const double Wn = bd[0], Vn = bd[1], Dn = bd[2];   // max |w_n|, max |v_n|, max |w_n - v_n|
  const double u = std::ldexp(1.0, -24), g = 2 * K * u / (1 - K * u);
  const float* X = x.data_ptr<float>();
  std::vector<uint16_t> xb(q8 ? 0 : M * K);
  std::vector<double> err(M);
  std::vector<char> ok(M);
  for (int64_t m = 0; m < M; ++m) {
    double nx = 0, ny = 0, nd = 0;
    for (int64_t k = 0; k < K; ++k) {
      const float v = X[m * K + k];
      nx += double(v) * v;
      if (q8) continue;                        // the int8 screen reads x itself
      const uint16_t h = to_bf16(v);
      const double y = from_bf16(h);
      xb[m * K + k] = h;
      ny += y * y, nd += (v - y) * (v - y);
    }
    nx = std::sqrt(nx), ny = std::sqrt(ny), nd = std::sqrt(nd);
    const double tiny = 4 * K * std::ldexp(1.0, -126);   // flushed or underflowed partial sums
    err[m] = (q8 ? g * nx * Wn + (g + 2 * u) * nx * Vn + nx * Dn + tiny
                 : g * (nx * Wn + ny * Vn) + nx * Dn + nd * Vn + tiny) * (1 + 1e-6);
    // Finite, and far from overflow: every partial sum is below |x| max|w_n| (1 + g).
    ok[m] = std::isfinite(nx) && std::isfinite(err[m]) && nx * Wn < FLT_MAX / 4;
  }
  thread_local std::vector<float> screened;   // [M, N], kept from call to call
  screened.resize(M * N);
  float* A = screened.data();
  const uint16_t* bp = reinterpret_cast<const uint16_t*>(b.data_ptr<at::BFloat16>());
  const int64_t passes = (M + MR - 1) / MR;
  const auto rows = [&](int64_t g) { return M / passes + (g < M % passes); };
  const int64_t units = (P + 1) / 2;
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  at::parallel_for(0, units, 2, [&](int64_t u0, int64_t u1) {
    for (int64_t un = u0; un < u1; ++un) {
      const int64_t j = 2 * un, U = std::min<int64_t>(2, P - j);
      if (q8) {
        kScreen8[U][M](X, K, qp + j * K * NR, sp + j * NR, K, A + j * NR, N);
        continue;
      }
      const uint16_t* unit = bp + j * Bk * NR * 2;
      const uint16_t* next = passes == 1 ? unit : un + 1 < u1 ? unit + U * Bk * NR * 2 : unit;
      for (int64_t g = 0, m = 0; g < passes; m += rows(g), ++g)
        kScreen[U][rows(g)](xb.data() + m * K, K, unit, next, Bk, A + m * N + j * NR, N, g, passes);
    }
  });
  int64_t* T = tokens.data_ptr<int64_t>();
  const float* pp = p.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if (!ok[m]) continue;
      const float* am = A + m * N;
      __m512 vtop = _mm512_loadu_ps(am);
      bool finite = true;
      for (int64_t j = 1; j < P; ++j) vtop = _mm512_max_ps(vtop, _mm512_loadu_ps(am + j * NR));
      const float top = _mm512_reduce_max_ps(vtop);
      for (int64_t j = 0; j < P && finite; ++j)   // a NaN anywhere: max_ps may have passed it by
        finite = _mm512_cmp_ps_mask(_mm512_loadu_ps(am + j * NR), _mm512_loadu_ps(am + j * NR), _CMP_ORD_Q) == 0xFFFF;
      if (!finite || !std::isfinite(top)) continue;
      // In float, rounded down: a candidate test that keeps every output the fp64 one keeps.
      const double lo = double(top) - 2 * err[m];
      float floor = static_cast<float>(lo);
      if (double(floor) > lo) floor = std::nextafter(floor, -FLT_MAX);
      const __m512 vfloor = _mm512_set1_ps(floor);
      int64_t best = -1;
      float best_f = 0, f[NR];
      for (int64_t j = 0; j < P; ++j) {
        const __mmask16 keep = _mm512_cmp_ps_mask(_mm512_loadu_ps(am + j * NR), vfloor, _CMP_GE_OQ);
        if (!keep) continue;
        exact_panel(X + m * K, pp + j * K * NR, K, f);
        for (int64_t i = 0; i < NR; ++i) {
          if (!(keep >> i & 1)) continue;
          if (std::isnan(f[i])) { best = -2; break; }
          if (best == -1 || f[i] > best_f) best = j * NR + i, best_f = f[i];
        }
        if (best == -2) break;
      }
      T[m] = best < 0 ? -1 : best;
    }
  });
#else
  (void)bound, (void)qbound;
#endif
  return tokens;
}

TORCH_LIBRARY(moe_serve_greedy, m) {
  m.def("greedy_screen_built() -> bool", &greedy_screen_built);
  m.def("greedy_argmax(Tensor x, Tensor p, Tensor b, Tensor bound, Tensor q, Tensor scale, Tensor qbound) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_serve_greedy, CPU, m) {
  m.impl("greedy_argmax", &greedy_argmax);
}
