// The small per-row operations of nanoseek's fused decode step (cpu_decode.cpp), AVX2 + FMA, fp32:
// RMSNorm, rope, SwiGLU, a few-rows product over a range of weight rows, and the MoE routing's grouping.
#pragma once
#include <immintrin.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <vector>

#include "gemv_blocks.h"

namespace nanoseek {

// y[:n] = x / rms(x) * w (torch's rms_norm: mean of squares, + eps, reciprocal square root)
inline void rmsnorm(const float* x, const float* w, int64_t n, float eps, float* y) {
  const int64_t n8 = n & ~int64_t(7);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n8; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  const float ss = nanoseek::hsum(acc) + nanoseek::dot_tail(x, x, n8, n);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
}

// y = x rotated by cs ([R/2] pairs of cos, sin): DeepSeek's interleaved pairs or Llama's half-split
inline void rope(const float* x, const float* cs, int64_t R, bool interleaved, float* y) {
  const int64_t h = R / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float c = cs[2 * i], s = cs[2 * i + 1];
    const int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + h;
    const float x0 = x[a], x1 = x[b];
    y[a] = x0 * c - x1 * s;
    y[b] = x0 * s + x1 * c;
  }
}

inline float silu_mul(float g, float u) { return g / (1.f + std::exp(-g)) * u; }

// out[i] = silu(h[i]) * h[I + i] for i < I (one row of [gate | up]): sigmoid(g) from e = exp(-|g|) <= 1,
// 1 / (1 + e) for g >= 0 and e / (1 + e) below, 8 lanes at a time (every thread runs this for all rows)
inline void swiglu_row(const float* h, int64_t I, float* out) {
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  int64_t i = 0;
  for (; i + 8 <= I; i += 8) {
    const __m256 g = _mm256_loadu_ps(h + i), u = _mm256_loadu_ps(h + I + i);
    const __m256 e = nanoseek::exp_nonpos(_mm256_or_ps(g, sign));  // exp(-|g|)
    const __m256 r = _mm256_div_ps(one, _mm256_add_ps(one, e));
    const __m256 sig = _mm256_blendv_ps(r, _mm256_mul_ps(e, r), g);  // g's sign bit picks e / (1 + e)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), u));
  }
  for (; i < I; ++i) out[i] = silu_mul(h[i], h[I + i]);
}

// a running argmax over x[o0, o1) as torch.argmax keeps it, for calls over ascending ranges: the
// largest value and its first index (best_i < 0: none yet), and the first NaN's index (< 0: none)
inline void argmax_update(const float* x, int64_t o0, int64_t o1, float& best_v, int64_t& best_i, int64_t& nan_i) {
  if (nan_i >= 0) return;
  for (int64_t o = o0; o < o1; ++o) {
    if (std::isnan(x[o])) {
      nan_i = o;
      return;
    }
    if (best_i < 0 || x[o] > best_v) best_v = x[o], best_i = o;
  }
}

// rows n < N of X (stride xs) times weight rows [o0, o1) of W ([*, I], rows contiguous) -> Y[n * ys + o - o0]
inline void gemv_rows(const float* W, int64_t I, const float* X, int64_t xs, int64_t N, float* Y, int64_t ys,
                      int64_t o0, int64_t o1, Rows rows) {
  gemv_range(W + o0 * I, I, X, xs, N, Y, ys, 0, o1 - o0, rows);
}

}  // namespace nanoseek
