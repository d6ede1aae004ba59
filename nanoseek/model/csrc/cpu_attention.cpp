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

#include "latent_attention.h"

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
      nanoseek::row_keys(P, T + b * nb, bs, D, S, keys.data());
      nanoseek::attend_4heads(qbuf.data(), keys.data(), S, D, V, sc, s.data(), o4.data());
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
