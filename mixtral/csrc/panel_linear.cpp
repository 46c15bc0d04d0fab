// y = x @ W.T for a few rows of x, fp32 on CPU, on weights laid out in panels of 16 outputs.
//
// Shapes: M rows of x, K inputs, N outputs (a multiple of 16), P = N / 16 panels.
//
//   panel_pack(w [N, K]) -> p [P, K, 16]      p[j, k, i] = w[16 j + i, k]
//   panel_linear(x [M, K], p [P, K, 16]) -> y [M, N]
//
// A decode step multiplies one or a few rows by every weight of the model: the time is the
// time to stream the weights from memory. In panels, a block of 16 outputs reads its weights
// as one contiguous run, each k a 64-byte line: with AVX-512 one 16-lane FMA per row of x
// consumes it, two panels side by side in one pass (two streams, up to 12 rows sharing each
// weight load: 24 accumulators of the 32 registers); with AVX2 two 8-lane FMAs, one panel,
// up to 6 rows (12 of 16 registers). The row's x[k] is broadcast, and no horizontal sums
// are needed. Threads take whole units of panels.
//
// Every output is the sum over k in order, one FMA per k, whatever M is, whichever rows
// share a pass and whichever panel sits beside it: a row's result does not depend on the
// rows beside it, and the AVX-512, AVX2 and scalar paths give the same bits.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t NR = 16;   // outputs per panel

using Pass = void (*)(const float*, int64_t, const float*, const float*, int64_t, float*, int64_t, int64_t, int64_t,
                     bool);

#ifdef __AVX512F__
constexpr int64_t MR = 12;   // rows of x per pass: 2 x 12 accumulators, 2 weight vectors
constexpr int64_t UNIT = 2;  // panels per pass

// y[m, 0:16 U] = sum_k x[m, k] * (p[k, 0:16], q[k, 0:16]) for the R rows of x at x (row stride
// ldx), q = p + K * 16 the panel beside p when U = 2. Eight rows and more in one pass, where
// the 8-lane path ran them as two passes of four (docs/benchmarks.md): a 32-sequence step's
// matmuls 1.19x faster, 2 threads (one-off). The accumulators are named, not an array: with
// an array GCC keeps them on the stack and stores them every k.
#define MOE_ACC(m) __m512 c_##m = _mm512_setzero_ps(), d_##m = _mm512_setzero_ps();
#define MOE_FMA(m)                                                   \
  if constexpr (R > m) {                                             \
    const __m512 a = _mm512_set1_ps(x[m * ldx + k]);                 \
    c_##m = _mm512_fmadd_ps(a, b, c_##m);                            \
    if constexpr (U == 2) d_##m = _mm512_fmadd_ps(a, e, d_##m);      \
  }
#define MOE_STORE(m)                                                 \
  if constexpr (R > m) {                                             \
    _mm512_storeu_ps(y + m * ldy, c_##m);                            \
    if constexpr (U == 2) _mm512_storeu_ps(y + m * ldy + NR, d_##m); \
  }

template <int R, int U>
void pass(const float* x, int64_t ldx, const float* p, const float* next, int64_t K, float* y, int64_t ldy,
          int64_t g, int64_t G, bool once) {
  static_assert(R >= 1 && R <= MR && (U == 1 || U == 2));
  MOE_ACC(0) MOE_ACC(1) MOE_ACC(2) MOE_ACC(3) MOE_ACC(4) MOE_ACC(5)
  MOE_ACC(6) MOE_ACC(7) MOE_ACC(8) MOE_ACC(9) MOE_ACC(10) MOE_ACC(11)
  const float* q = p + K * NR;
  // One pass: each stream asks 2 KB ahead of itself (next), non-temporal. More passes: pass g
  // asks for its share of the next unit's U K lines, U lines every G iterations, T0.
  const char* pf = reinterpret_cast<const char*>(next) + (G == 1 ? 0 : g * U * K / G) * NR * 4;
  int64_t tick = 0;
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b = _mm512_loadu_ps(p + k * NR);
    __m512 e = b;
    if constexpr (U == 2) e = _mm512_loadu_ps(q + k * NR);
    if (once) {
      _mm_prefetch(pf, _MM_HINT_NTA);
      if constexpr (U == 2) _mm_prefetch(pf + K * NR * 4, _MM_HINT_NTA);
      pf += NR * 4;
    } else if (++tick == G) {
      tick = 0;
      _mm_prefetch(pf, _MM_HINT_T0);
      if constexpr (U == 2) _mm_prefetch(pf + NR * 4, _MM_HINT_T0);
      pf += U * NR * 4;
    }
    MOE_FMA(0) MOE_FMA(1) MOE_FMA(2) MOE_FMA(3) MOE_FMA(4) MOE_FMA(5)
    MOE_FMA(6) MOE_FMA(7) MOE_FMA(8) MOE_FMA(9) MOE_FMA(10) MOE_FMA(11)
  }
  MOE_STORE(0) MOE_STORE(1) MOE_STORE(2) MOE_STORE(3) MOE_STORE(4) MOE_STORE(5)
  MOE_STORE(6) MOE_STORE(7) MOE_STORE(8) MOE_STORE(9) MOE_STORE(10) MOE_STORE(11)
}

#define MOE_PASSES(U) {nullptr, pass<1, U>, pass<2, U>, pass<3, U>, pass<4, U>, pass<5, U>, pass<6, U>, \
                       pass<7, U>, pass<8, U>, pass<9, U>, pass<10, U>, pass<11, U>, pass<12, U>}
constexpr Pass kPass[UNIT + 1][MR + 1] = {{}, MOE_PASSES(1), MOE_PASSES(2)};
#undef MOE_PASSES

#else
constexpr int64_t MR = 6;    // rows of x per pass: 12 accumulators, 2 weight vectors, 1 broadcast
constexpr int64_t UNIT = 1;  // panels per pass

// y[m, 0:16] = sum_k x[m, k] * p[k, 0:16] for the R rows of x at x (row stride ldx).
#define MOE_ACC(m) __m256 c0_##m = _mm256_setzero_ps(), c1_##m = _mm256_setzero_ps();
#define MOE_FMA(m)                                                   \
  if constexpr (R > m) {                                             \
    const __m256 a = _mm256_broadcast_ss(x + m * ldx + k);           \
    c0_##m = _mm256_fmadd_ps(a, b0, c0_##m);                         \
    c1_##m = _mm256_fmadd_ps(a, b1, c1_##m);                         \
  }
#define MOE_STORE(m)                                                 \
  if constexpr (R > m) {                                             \
    _mm256_storeu_ps(y + m * ldy, c0_##m);                           \
    _mm256_storeu_ps(y + m * ldy + 8, c1_##m);                       \
  }

template <int R, int U>
void pass(const float* x, int64_t ldx, const float* p, const float* next, int64_t K, float* y, int64_t ldy,
          int64_t g, int64_t G, bool once) {
  static_assert(R >= 1 && R <= MR && U == 1);
#ifdef __AVX2__
  MOE_ACC(0) MOE_ACC(1) MOE_ACC(2) MOE_ACC(3) MOE_ACC(4) MOE_ACC(5)
  // G = 1: every pass asks for each of next's lines in turn (the repeats measured faster
  // than asking once). G > 1: pass g asks for its share, one line every G iterations.
  const char* pf = reinterpret_cast<const char*>(next) + (G == 1 ? 0 : g * K / G) * NR * 4;
  int64_t tick = 0;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(p + k * NR), b1 = _mm256_loadu_ps(p + k * NR + 8);
    // One pass: the weights are used once, so they come in non-temporal and leave the caches
    // to what the rest of the step needs (torch's and Python's own data). More passes: T0,
    // as the later passes read the panel again.
    if (++tick == G) {
      tick = 0;
      if (once)
        _mm_prefetch(pf, _MM_HINT_NTA);
      else
        _mm_prefetch(pf, _MM_HINT_T0);
      pf += NR * 4;
    }
    MOE_FMA(0) MOE_FMA(1) MOE_FMA(2) MOE_FMA(3) MOE_FMA(4) MOE_FMA(5)
  }
  MOE_STORE(0) MOE_STORE(1) MOE_STORE(2) MOE_STORE(3) MOE_STORE(4) MOE_STORE(5)
#else
  (void)next, (void)g, (void)G, (void)once;
  float c[R][NR] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int m = 0; m < R; ++m)
      for (int64_t i = 0; i < NR; ++i) c[m][i] = std::fma(x[m * ldx + k], p[k * NR + i], c[m][i]);
  for (int m = 0; m < R; ++m) std::copy(c[m], c[m] + NR, y + m * ldy);
#endif
}

constexpr Pass kPass[UNIT + 1][MR + 1] = {
    {}, {nullptr, pass<1, 1>, pass<2, 1>, pass<3, 1>, pass<4, 1>, pass<5, 1>, pass<6, 1>}};
#endif

#undef MOE_ACC
#undef MOE_FMA
#undef MOE_STORE

void check_cpu_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.device().is_cpu(), name, " must be an fp32 CPU tensor");
}

}  // namespace

torch::Tensor panel_pack(torch::Tensor w) {
  check_cpu_f32(w, "w");
  TORCH_CHECK(w.dim() == 2 && w.size(0) % NR == 0, "w must be [N, K] with N a multiple of ", NR);
  const int64_t N = w.size(0), K = w.size(1);
  return w.contiguous().view({N / NR, NR, K}).transpose(1, 2).contiguous();
}

torch::Tensor panel_linear(torch::Tensor x, torch::Tensor p) {
  check_cpu_f32(x, "x");
  check_cpu_f32(p, "p");
  TORCH_CHECK(x.dim() == 2 && p.dim() == 3 && p.size(2) == NR && p.size(1) == x.size(1) && p.is_contiguous(),
              "x must be [M, K] and p [N / 16, K, 16]");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), P = p.size(0), N = P * NR;
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* pp = p.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Rows split evenly over the passes (8 rows: 4 + 4, not 6 + 2): a pass of few rows
  // spends its time on loads, not FMAs.
  const int64_t passes = (M + MR - 1) / MR;
  const auto rows = [&](int64_t g) { return M / passes + (g < M % passes); };
  // The passes share the next unit's fetch; with one panel a unit, from three passes on each
  // asks for all of it (both measured).
  const int64_t spread = UNIT == 2 ? passes : passes == 2 ? 2 : 1;
  const int64_t units = (P + UNIT - 1) / UNIT;  // the last one short when P is not a multiple
  at::parallel_for(0, units, std::max<int64_t>(1, 4 / UNIT), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t j = u * UNIT, U = std::min(UNIT, P - j);
      const float* panel = pp + j * K * NR;
      // With more than one pass, the computing leaves the memory idle: each pass asks for the
      // thread's next unit, line by line, so it is on its way while this one is worked on.
      // One pass (up to MR rows) asks 2 KB ahead of itself, which streams faster than asking
      // for the next unit (docs/benchmarks.md); prefetches never fault, past the end or not.
      const float* next = passes == 1 ? reinterpret_cast<const float*>(reinterpret_cast<uintptr_t>(panel) + 2048)
                        : u + 1 < u1 ? panel + U * K * NR : panel;
      for (int64_t g = 0, m = 0; g < passes; m += rows(g), ++g)
        kPass[U][rows(g)](xp + m * K, K, panel, next, K, yp + m * N + j * NR, N, g, spread, passes == 1);
    }
  });
  return y;
}

// x [R, D] through one SwiGLU expert, unscaled: the math of
//   gate, up = (x @ W13.T).chunk(2);  (silu(gate) * up) @ W2.T
// as the expert code writes it in torch, op for op (torch's own silu, fp32 products). The
// callers below scale it by the routing weights, so that an expert's rows take one call: a
// decode step runs one per expert and layer, and the six ops and their Python cost more
// than the math beside the matmuls.
static torch::Tensor swiglu(const torch::Tensor& x, const torch::Tensor& w13, const torch::Tensor& w2) {
  auto gu = panel_linear(x, w13);                               // [R, 2F]
  const int64_t F = gu.size(1) / 2;
  TORCH_CHECK(w2.dim() == 3 && w2.size(1) == F, "w2 must be the panels of [D, F] with 2F the rows of w13");
  auto a = at::silu(gu.narrow(1, 0, F));
  a.mul_(gu.narrow(1, F, F));
  return panel_linear(a, w2);                                   // [R, D]
}

// One row, times its routing weight (a float: no tensor to build for it).
torch::Tensor panel_ffn_row(torch::Tensor x, torch::Tensor w13, torch::Tensor w2, double scale) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1, "x must be one row [1, D]");
  return swiglu(x, w13, w2).mul_(scale);
}

// A few rows, each times its own weight (scale [R]): as torch would do ... * scale[:, None].
torch::Tensor panel_ffn(torch::Tensor x, torch::Tensor w13, torch::Tensor w2, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && scale.dim() == 1 && scale.size(0) == x.size(0) &&
              scale.scalar_type() == x.scalar_type(), "scale must hold one weight per row of x, in x's dtype");
  return swiglu(x, w13, w2).mul_(scale.unsqueeze(1));
}

// The rows rows[start .. start + n) of y through the expert, each times its scale, added
// into the same rows of out in place: gather, panel_ffn, and index_add_'s sums (one fp32
// add per element), without the row copies and the three ops around each expert of a step.
void panel_ffn_add(torch::Tensor out, torch::Tensor y, torch::Tensor rows, torch::Tensor w13, torch::Tensor w2,
                   torch::Tensor scale, int64_t start, int64_t n) {
  check_cpu_f32(out, "out");
  check_cpu_f32(y, "y");
  TORCH_CHECK(out.is_contiguous() && y.is_contiguous() && out.dim() == 2 && out.sizes() == y.sizes(),
              "out and y must be contiguous [T, D] of one shape");
  TORCH_CHECK(rows.scalar_type() == torch::kInt64 && rows.dim() == 1 && rows.is_contiguous(),
              "rows must be a contiguous int64 vector");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == rows.size(0), "scale must hold one weight per entry of rows");
  TORCH_CHECK(start >= 0 && n >= 0 && start + n <= rows.size(0), "rows [start, start + n) out of range");
  const int64_t T = y.size(0), D = y.size(1);
  const int64_t* r = rows.data_ptr<int64_t>() + start;
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(r[i] >= 0 && r[i] < T, "row ", r[i], " out of y's ", T);
  auto x = torch::empty({n, D}, y.options());
  const float* Y = y.data_ptr<float>();
  float* X = x.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) std::copy(Y + r[i] * D, Y + (r[i] + 1) * D, X + i * D);
  const auto h = panel_ffn(x, w13, w2, scale.narrow(0, start, n));
  const float* H = h.data_ptr<float>();
  float* O = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    float* o = O + r[i] * D;
    const float* hi = H + i * D;
    for (int64_t d = 0; d < D; ++d) o[d] += hi[d];
  }
}

TORCH_LIBRARY(moe_serve_linear, m) {
  m.def("panel_pack(Tensor w) -> Tensor");
  m.def("panel_linear(Tensor x, Tensor p) -> Tensor");
  m.def("panel_ffn_row(Tensor x, Tensor w13, Tensor w2, float scale) -> Tensor");
  m.def("panel_ffn(Tensor x, Tensor w13, Tensor w2, Tensor scale) -> Tensor");
  m.def("panel_ffn_add(Tensor(a!) out, Tensor y, Tensor rows, Tensor w13, Tensor w2, Tensor scale, int start, "
        "int n) -> ()");
}

TORCH_LIBRARY_IMPL(moe_serve_linear, CPU, m) {
  m.impl("panel_pack", &panel_pack);
  m.impl("panel_linear", &panel_linear);
  m.impl("panel_ffn_row", &panel_ffn_row);
  m.impl("panel_ffn", &panel_ffn);
  m.impl("panel_ffn_add", &panel_ffn_add);
}
