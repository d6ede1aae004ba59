// Absorbed-MLA decode attention of 4 query heads over one row's cached latents (AVX2 + FMA), shared by
// nanoseek::paged_latent_decode (cpu_attention.cpp) and the fused decode step (cpu_decode.cpp).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "gemv_blocks.h"

namespace nanoseek {

// s[j * 4 + h] = q[h] . k_j for 4 query rows q [4, D] and S keys (pointers, D floats each).
// Register blocks of 3 keys x 4 heads: 7 loads feed 12 FMAs; a key's 4 sums leave as one __m128.
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d), abcd = _mm256_hadd_ps(ab, cd);
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

inline void scores_4heads(const float* q, const float* const* keys, int64_t S, int64_t D, float* s) {
  const int64_t D8 = D & ~int64_t(7);
  const float* qr[4] = {q, q + D, q + 2 * D, q + 3 * D};
  for (int64_t j = 0; j < S; j += 3) {
    // past the end: recompute the last key, unused
    const float* kr[3] = {keys[j], keys[std::min(j + 1, S - 1)], keys[std::min(j + 2, S - 1)]};
    __m256 a[12];  // a[3 * head + key]
    // prefetch the keys two steps ahead where they lie side by side in one block (a key's D floats
    // are a few cache lines, each row's keys come from memory once, and 3 streams alone ran short)
    const int64_t ahead = j + 6;
    const bool run = ahead + 2 < S && keys[ahead + 2] == keys[ahead] + 2 * D;
    nanoseek::dot_3x4(kr, qr, D8, run ? reinterpret_cast<const char*>(keys[ahead]) : nullptr, D, a);
    for (int64_t r = 0; r < 3 && j + r < S; ++r) {
      __m128 v = hsum4(a[r], a[3 + r], a[6 + r], a[9 + r]);
      if (D8 < D) {  // the last D % 8 columns
        float tail[4];
        for (int h = 0; h < 4; ++h) tail[h] = nanoseek::dot_tail(kr[r], qr[h], D8, D);
        v = _mm_add_ps(v, _mm_loadu_ps(tail));
      }
      _mm_storeu_ps(s + (j + r) * 4, v);
    }
  }
}

// o[h, c] = sum_j p[j * 4 + h] * k_j[c] for 4 heads, c < V: columns 16 at a time (8 accumulators,
// each key's 2 loads + 4 broadcasts feed 8 FMAs), then 8, then one by one.
inline void weighted_values_4heads(const float* p, const float* const* keys, int64_t S, int64_t V, float* o) {
  int64_t c = 0;
  for (; c + 16 <= V; c += 16) {
    __m256 a[8];
    for (int r = 0; r < 8; ++r) a[r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < S; ++j) {
      const __m256 v0 = _mm256_loadu_ps(keys[j] + c), v1 = _mm256_loadu_ps(keys[j] + c + 8);
      for (int h = 0; h < 4; ++h) {
        const __m256 w = _mm256_broadcast_ss(p + j * 4 + h);
        a[2 * h] = _mm256_fmadd_ps(w, v0, a[2 * h]);
        a[2 * h + 1] = _mm256_fmadd_ps(w, v1, a[2 * h + 1]);
      }
    }
    for (int h = 0; h < 4; ++h) {
      _mm256_storeu_ps(o + h * V + c, a[2 * h]);
      _mm256_storeu_ps(o + h * V + c + 8, a[2 * h + 1]);
    }
  }
  for (; c + 8 <= V; c += 8) {
    __m256 a[4];
    for (int r = 0; r < 4; ++r) a[r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < S; ++j) {
      const __m256 v = _mm256_loadu_ps(keys[j] + c);
      for (int h = 0; h < 4; ++h) a[h] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j * 4 + h), v, a[h]);
    }
    for (int h = 0; h < 4; ++h) _mm256_storeu_ps(o + h * V + c, a[h]);
  }
  for (; c < V; ++c)
    for (int h = 0; h < 4; ++h) {
      float acc = 0.f;
      for (int64_t j = 0; j < S; ++j) acc += p[j * 4 + h] * keys[j][c];
      o[h * V + c] = acc;
    }
}

// keys[j] = where key j < S of a row lies in pool [blocks, bs, D]: block table[j / bs], slot j % bs
// (block by block: a division per key cost ~10 us of a 512-key row)
inline void row_keys(const float* pool, const int64_t* table, int64_t bs, int64_t D, int64_t S, const float** keys) {
  for (int64_t j0 = 0, k = 0; j0 < S; j0 += bs, ++k) {
    const float* base = pool + table[k] * bs * D;
    for (int64_t i = 0; i < std::min(bs, S - j0); ++i) keys[j0 + i] = base + i * D;
  }
}

// o4[h, :V] = sum_j softmax_j(sc * q4[h] . k_j) * k_j[:V] for 4 query rows q4 [4, D] over the S keys
// `keys` (pointers, D floats each); s: scratch of 4 * S + 8 floats.
inline void attend_4heads(const float* q4, const float* const* keys, int64_t S, int64_t D, int64_t V, float sc,
                          float* s, float* o4) {
  scores_4heads(q4, keys, S, D, s);  // s[j * 4 + hh] = q_hh . kv_j
  // softmax over j of each head: the 4 heads of key j sit side by side, so two keys are one vector
  float mx[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY}, inv[4];
  for (int64_t j = 0; j < S; ++j)
    for (int64_t hh = 0; hh < 4; ++hh) mx[hh] = std::max(mx[hh], sc * s[j * 4 + hh]);
  const __m256 vmx = _mm256_setr_ps(mx[0], mx[1], mx[2], mx[3], mx[0], mx[1], mx[2], mx[3]);
  const __m256 vsc = _mm256_set1_ps(sc);
  __m256 vsum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 1 < S; j += 2) {
    const __m256 e = nanoseek::exp_nonpos(_mm256_fmsub_ps(vsc, _mm256_loadu_ps(s + j * 4), vmx));
    _mm256_storeu_ps(s + j * 4, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sums[8];
  _mm256_storeu_ps(sums, vsum);
  for (int64_t hh = 0; hh < 4; ++hh) {
    float sum = sums[hh] + sums[4 + hh];
    if (j < S) sum += (s[j * 4 + hh] = std::exp(sc * s[j * 4 + hh] - mx[hh]));  // an odd last key
    inv[hh] = 1.f / sum;
  }
  for (int64_t k = 0; k < S; ++k)
    for (int64_t hh = 0; hh < 4; ++hh) s[k * 4 + hh] *= inv[hh];
  weighted_values_4heads(s, keys, S, V, o4);
}

}  // namespace nanoseek
