// nanoseek's absorbed-MLA decode attention over the paged latent pool, for x86 CPUs (AVX2 + FMA):
// one new query token per row, every head attending the row's cached latents [c_kv | k_pe] straight
// from their blocks (no gathered [B, S, D] copy per layer, no padding mask):
//   out[b, h] = sum_j softmax_j(scale * q[b, h] . kv_j) * kv_j[:value_dim],  j < seq_lens[b],
//   kv_j = pool[block_tables[b, j / bs], j % bs]
// One task per (row, 4 heads): scores in register blocks of 3 keys x 4 heads, the weighted sum of
// values in blocks of 16 columns x 4 heads; OpenMP over tasks at torch's thread count. Chosen against
// the torch backends by measurement (nanoseek/engine/backends: choose_backend).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "gemv_blocks.h"

namespace {

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
    nanoseek::dot_3x4(kr, qr, D8, nullptr, D, a);
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

}  // namespace

at::Tensor paged_latent_decode(const at::Tensor& pool, const at::Tensor& q, const at::Tensor& block_tables,
                               const at::Tensor& seq_lens, double scale, int64_t value_dim) {
  TORCH_CHECK(pool.dim() == 3 && q.dim() == 3 && q.size(2) == pool.size(2),
              "nanoseek::paged_latent_decode: pool [blocks, block_size, D] and q [B, H, D], got ", pool.sizes(),
              " and ", q.sizes());
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) && seq_lens.dim() == 1 &&
              seq_lens.size(0) == q.size(0), "nanoseek::paged_latent_decode: block_tables [B, nb] and seq_lens [B]");
  TORCH_CHECK(pool.scalar_type() == at::kFloat && q.scalar_type() == at::kFloat,
              "nanoseek::paged_latent_decode: fp32 only");
  TORCH_CHECK(pool.is_contiguous(), "nanoseek::paged_latent_decode: the pool must be contiguous");
  TORCH_CHECK(value_dim > 0 && value_dim <= pool.size(2), "nanoseek::paged_latent_decode: value_dim ", value_dim,
              " outside (0, ", pool.size(2), "]");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), nb = block_tables.size(1), bs = pool.size(1),
                blocks = pool.size(0), V = value_dim;
  auto qc = q.contiguous();
  auto bt = block_tables.to(at::kLong).contiguous();
  auto lens = seq_lens.to(at::kLong).contiguous();
  const int64_t* T = bt.data_ptr<int64_t>();
  const int64_t* Ls = lens.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(Ls[b] >= 1 && Ls[b] <= nb * bs, "nanoseek::paged_latent_decode: row ", b, " has ", Ls[b],
                " keys, its block table holds ", nb * bs);
    for (int64_t k = 0; k < (Ls[b] + bs - 1) / bs; ++k)
      TORCH_CHECK(T[b * nb + k] >= 0 && T[b * nb + k] < blocks, "nanoseek::paged_latent_decode: block id ",
                  T[b * nb + k], " outside the pool's ", blocks);
    longest = std::max(longest, Ls[b]);
  }
  auto out = at::empty({B, H, V}, q.options());
  const float* P = pool.data_ptr<float>();
  const float* Q = qc.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int threads = at::get_num_threads();
  const float sc = static_cast<float>(scale);
  const int64_t groups = (H + 3) / 4;  // a task: one row, up to 4 heads (each key loaded once for them)
#pragma omp parallel num_threads(threads) if (threads > 1 && B * H * longest * D >= 65536)
  {
    std::vector<float> s(longest * 4 + 8), qbuf(4 * D), o4(4 * V);
    std::vector<const float*> keys(longest);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < B * groups; ++t) {
      const int64_t b = t / groups, h0 = 4 * (t % groups), nh = std::min<int64_t>(4, H - h0), S = Ls[b];
      // 4 query rows (a short last group repeats its first head; those lanes are never read)
      for (int64_t hh = 0; hh < 4; ++hh)
        std::copy_n(Q + (b * H + h0 + (hh < nh ? hh : 0)) * D, D, qbuf.data() + hh * D);
      for (int64_t j = 0; j < S; ++j) keys[j] = P + (T[b * nb + j / bs] * bs + j % bs) * D;
      scores_4heads(qbuf.data(), keys.data(), S, D, s.data());  // s[j * 4 + hh] = q_hh . kv_j
      // softmax over j of each head: the 4 heads of key j sit side by side, so two keys are one vector
      float mx[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY}, inv[4];
      for (int64_t j = 0; j < S; ++j)
        for (int64_t hh = 0; hh < 4; ++hh) mx[hh] = std::max(mx[hh], sc * s[j * 4 + hh]);
      const __m256 vmx = _mm256_setr_ps(mx[0], mx[1], mx[2], mx[3], mx[0], mx[1], mx[2], mx[3]);
      const __m256 vsc = _mm256_set1_ps(sc);
      __m256 vsum = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 1 < S; j += 2) {
        const __m256 e = nanoseek::exp_nonpos(_mm256_fmsub_ps(vsc, _mm256_loadu_ps(s.data() + j * 4), vmx));
        _mm256_storeu_ps(s.data() + j * 4, e);
        vsum = _mm256_add_ps(vsum, e);
      }
      float sums[8];
      _mm256_storeu_ps(sums, vsum);
      for (int64_t hh = 0; hh < 4; ++hh) {
        float sum = sums[hh] + sums[4 + hh];
        if (j < S) sum += (s[j * 4 + hh] = std::exp(sc * s[j * 4 + hh] - mx[hh]));  // an odd last key
        inv[hh] = 1.f / sum;
      }
      for (int64_t j = 0; j < S; ++j)
        for (int64_t hh = 0; hh < 4; ++hh) s[j * 4 + hh] *= inv[hh];
      weighted_values_4heads(s.data(), keys.data(), S, V, o4.data());
      for (int64_t hh = 0; hh < nh; ++hh) std::copy_n(o4.data() + hh * V, V, O + (b * H + h0 + hh) * V);
    }
  }
  return out;
}

at::Tensor paged_latent_decode_meta(const at::Tensor& pool, const at::Tensor& q, const at::Tensor& block_tables,
                                    const at::Tensor& seq_lens, double scale, int64_t value_dim) {
  return at::empty({q.size(0), q.size(1), value_dim}, q.options());
}

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
  m.def("paged_latent_decode(Tensor pool, Tensor q, Tensor block_tables, Tensor seq_lens, float scale, "
        "int value_dim) -> Tensor");
}
TORCH_LIBRARY_IMPL(nanoseek, CPU, m) { m.impl("paged_latent_decode", &paged_latent_decode); }
TORCH_LIBRARY_IMPL(nanoseek, Meta, m) { m.impl("paged_latent_decode", &paged_latent_decode_meta); }
