// Register-blocked fp32 dot products for few-rows projections (AVX2 + FMA), shared by nanoseek's
// CPU kernels (cpu_gemv.cpp, cpu_moe.cpp). w rows are contiguous, I floats each.
#pragma once
#include <immintrin.h>
#include <cstdint>

namespace nanoseek {


inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

inline float dot_tail(const float* a, const float* b, int64_t from, int64_t to) {
  float s = 0.f;
  for (int64_t i = from; i < to; ++i) s += a[i] * b[i];
  return s;
}

// 4 weight rows x 2 activation rows
inline void block_4x2(const float* w, int64_t I, const float* x0, const float* x1, float* y0, float* y1) {
  const float *w0 = w, *w1 = w + I, *w2 = w + 2 * I, *w3 = w + 3 * I;
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
  const int64_t I8 = I & ~int64_t(7);
  const char* next = reinterpret_cast<const char*>(w + 4 * I);  // the next block's rows, as in block_3x4
  for (int64_t i = 0; i < I8; i += 8) {
    if ((i & 15) == 0)
      for (int r = 0; r < 4; ++r) _mm_prefetch(next + 4 * (i + r * I), _MM_HINT_T0);
    const __m256 v0 = _mm256_loadu_ps(w0 + i), v1 = _mm256_loadu_ps(w1 + i);
    const __m256 v2 = _mm256_loadu_ps(w2 + i), v3 = _mm256_loadu_ps(w3 + i);
    const __m256 p = _mm256_loadu_ps(x0 + i), q = _mm256_loadu_ps(x1 + i);
    a00 = _mm256_fmadd_ps(v0, p, a00); a01 = _mm256_fmadd_ps(v1, p, a01);
    a02 = _mm256_fmadd_ps(v2, p, a02); a03 = _mm256_fmadd_ps(v3, p, a03);
    a10 = _mm256_fmadd_ps(v0, q, a10); a11 = _mm256_fmadd_ps(v1, q, a11);
    a12 = _mm256_fmadd_ps(v2, q, a12); a13 = _mm256_fmadd_ps(v3, q, a13);
  }
  y0[0] = hsum(a00) + dot_tail(w0, x0, I8, I); y0[1] = hsum(a01) + dot_tail(w1, x0, I8, I);
  y0[2] = hsum(a02) + dot_tail(w2, x0, I8, I); y0[3] = hsum(a03) + dot_tail(w3, x0, I8, I);
  y1[0] = hsum(a10) + dot_tail(w0, x1, I8, I); y1[1] = hsum(a11) + dot_tail(w1, x1, I8, I);
  y1[2] = hsum(a12) + dot_tail(w2, x1, I8, I); y1[3] = hsum(a13) + dot_tail(w3, x1, I8, I);
}

// 4 weight rows x 1 activation row
inline void block_4x1(const float* w, int64_t I, const float* x0, float* y0) {
  const float *w0 = w, *w1 = w + I, *w2 = w + 2 * I, *w3 = w + 3 * I;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const int64_t I8 = I & ~int64_t(7);
  for (int64_t i = 0; i < I8; i += 8) {
    const __m256 p = _mm256_loadu_ps(x0 + i);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), p, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), p, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), p, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), p, a3);
  }
  y0[0] = hsum(a0) + dot_tail(w0, x0, I8, I); y0[1] = hsum(a1) + dot_tail(w1, x0, I8, I);
  y0[2] = hsum(a2) + dot_tail(w2, x0, I8, I); y0[3] = hsum(a3) + dot_tail(w3, x0, I8, I);
}

inline float dot(const float* w, const float* x, int64_t I) {
  __m256 a = _mm256_setzero_ps();
  const int64_t I8 = I & ~int64_t(7);
  for (int64_t i = 0; i < I8; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a);
  return hsum(a) + dot_tail(w, x, I8, I);
}


// a[3 * r + c] = sum over i < I8 (a multiple of 8) of w_c[i] * x_r[i]: 3 weight rows x 4 activation
// rows, 7 loads feed 12 FMAs. next (or nullptr): 3 rows at stride I to prefetch, a cache line of each
// every 2 steps. Shared by gemv (block_3x4) and the attention's scores (keys as the weight rows).
inline void dot_3x4(const float* const w[3], const float* const x[4], int64_t I8, const char* next, int64_t I,
                    __m256 a[12]) {
  for (int k = 0; k < 12; ++k) a[k] = _mm256_setzero_ps();
  for (int64_t i = 0; i < I8; i += 8) {
    if (next != nullptr && (i & 15) == 0) {
      _mm_prefetch(next + 4 * i, _MM_HINT_T0);
      _mm_prefetch(next + 4 * (i + I), _MM_HINT_T0);
      _mm_prefetch(next + 4 * (i + 2 * I), _MM_HINT_T0);
    }
    const __m256 v0 = _mm256_loadu_ps(w[0] + i), v1 = _mm256_loadu_ps(w[1] + i), v2 = _mm256_loadu_ps(w[2] + i);
    for (int r = 0; r < 4; ++r) {
      const __m256 p = _mm256_loadu_ps(x[r] + i);
      a[3 * r] = _mm256_fmadd_ps(v0, p, a[3 * r]);
      a[3 * r + 1] = _mm256_fmadd_ps(v1, p, a[3 * r + 1]);
      a[3 * r + 2] = _mm256_fmadd_ps(v2, p, a[3 * r + 2]);
    }
  }
}

// 3 weight rows x 4 activation rows (for 4+ rows, where 4x2 ran short of FMAs). The next block's 3
// weight rows are prefetched: with 4+ activation rows the FMAs take longer than the loads, and the
// hardware prefetcher alone left the memory idle between blocks (8 rows, weights from memory: 10-25 %
// faster with the prefetch here)
inline void block_3x4(const float* w, int64_t I, const float* x, int64_t xs, float* y, int64_t ys) {
  const float* wr[3] = {w, w + I, w + 2 * I};
  const float* xr[4] = {x, x + xs, x + 2 * xs, x + 3 * xs};
  const int64_t I8 = I & ~int64_t(7);
  __m256 a[12];
  dot_3x4(wr, xr, I8, reinterpret_cast<const char*>(w + 3 * I), I, a);
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 3; ++c) y[r * ys + c] = hsum(a[3 * r + c]) + dot_tail(wr[c], xr[r], I8, I);
}

// y[n * ys] = x[n * xs] . w for n < N (1..3): one weight row read front to back, U 8-float chunks
// per step (U accumulators per activation row, so that the FMAs' latency hides behind the loads).
template <int N, int U>
inline void row_dots(const float* w, const float* x, int64_t xs, int64_t I, float* y, int64_t ys) {
  __m256 a[N][U];
  for (int n = 0; n < N; ++n)
    for (int u = 0; u < U; ++u) a[n][u] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 * U <= I; i += 8 * U)
    for (int u = 0; u < U; ++u) {
      const __m256 v = _mm256_loadu_ps(w + i + 8 * u);
      for (int n = 0; n < N; ++n) a[n][u] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + n * xs + i + 8 * u), a[n][u]);
    }
  for (; i + 8 <= I; i += 8) {
    const __m256 v = _mm256_loadu_ps(w + i);
    for (int n = 0; n < N; ++n) a[n][0] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + n * xs + i), a[n][0]);
  }
  for (int n = 0; n < N; ++n) {
    __m256 s = a[n][0];
    for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, a[n][u]);
    y[n * ys] = hsum(s) + dot_tail(w, x + n * xs, i, I);
  }
}

// How gemv_range runs the activation rows left over from fours (all of them below 4 rows):
// kBlocks: 4 weight rows side by side (4x2 and 4x1 register blocks); kStream: one weight row at a
// time, front to back, against up to 3 activation rows. With short rows (128-512 floats) the
// blocks make 4 short streams per thread, and the fused decode step ran 1.14-1.23x as fast at batch
// 1 with one long stream on a Zen 3 host (bench/RESULTS.md, "Eighth session"); hosts differ, so the
// engine measures both (fused_decode.choose_decode_step).
enum class Rows { kBlocks, kStream };

// y[n * ys + o] = x[n * xs] . w[o] for o in [o0, o1), n < N. Rows in fours take 3x4 blocks (weight
// rows three at a time); the rest of the rows (or all of them, when fewer than 4) as `rows` says.
inline void gemv_range(const float* W, int64_t I, const float* X, int64_t xs, int64_t N, float* Y, int64_t ys,
                       int64_t o0, int64_t o1, Rows rows = Rows::kBlocks) {
  const int64_t n4 = N & ~int64_t(3);
  if (n4 > 0) {
    int64_t o = o0;
    for (; o + 2 < o1; o += 3)
      for (int64_t n = 0; n < n4; n += 4) block_3x4(W + o * I, I, X + n * xs, xs, Y + n * ys + o, ys);
    for (; o < o1; ++o)
      for (int64_t n = 0; n < n4; ++n) Y[n * ys + o] = dot(W + o * I, X + n * xs, I);
  }
  if (n4 == N) return;
  if (rows == Rows::kStream) {
    const float* x = X + n4 * xs;
    float* y = Y + n4 * ys;
    switch (N - n4) {
      case 1: for (int64_t o = o0; o < o1; ++o) row_dots<1, 4>(W + o * I, x, xs, I, y + o, ys); break;
      case 2: for (int64_t o = o0; o < o1; ++o) row_dots<2, 2>(W + o * I, x, xs, I, y + o, ys); break;
      default: for (int64_t o = o0; o < o1; ++o) row_dots<3, 2>(W + o * I, x, xs, I, y + o, ys); break;
    }
    return;
  }
  int64_t o = o0;
  for (; o + 3 < o1; o += 4) {
    int64_t n = n4;
    for (; n + 1 < N; n += 2) block_4x2(W + o * I, I, X + n * xs, X + (n + 1) * xs, Y + n * ys + o, Y + (n + 1) * ys + o);
    if (n < N) block_4x1(W + o * I, I, X + n * xs, Y + n * ys + o);
  }
  for (; o < o1; ++o)
    for (int64_t n = n4; n < N; ++n) Y[n * ys + o] = dot(W + o * I, X + n * xs, I);
}

// output rows per parallel task: a multiple of both block heights (3 and 4)
constexpr int64_t kRowsPerTask = 12;

// e^x for 8 lanes, x <= 0 (softmax after subtracting the max), relative error ~2e-7: x = n ln2 + r
// with |r| <= ln2 / 2, e^r by a degree-6 polynomial (Taylor coefficients refined for the interval,
// as in Cephes' expf), 2^n built in the exponent bits. Inputs below -87 give 0-ish (2^-126 scale).
inline __m256 exp_nonpos(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2, ln2 split in two so that n * hi is exact
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

}  // namespace nanoseek
