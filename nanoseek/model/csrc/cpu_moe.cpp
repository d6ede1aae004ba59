// nanoseek's routed experts for few tokens on x86 CPUs (AVX2 + FMA), one op per MoE layer:
//   y[n] = sum_k weights[n, k] * down[e] @ (silu(gate[e] @ x[n]) * (up[e] @ x[n])),  e = idx[n, k]
//          + shared_down @ (silu(shared_gate @ x[n]) * (shared_up @ x[n]))   (when the shared MLP is given)
// gate_up [E, 2I, C] holds gate (rows 0..I) over up (rows I..2I); down [E, C, I]; the shared MLP's
// shared_gate and shared_up [Is, C], shared_down [C, Is] (DeepSeekMoE's shared experts, one MLP).
//
// The (token, expert) pairs are grouped by expert on the host side of the op (a CPU reads idx where
// it is), then two parallel passes run every active expert's rows: the gate_up products of all of
// them, then SwiGLU and the down products, each thread taking blocks of 12 weight rows. Every active
// expert's weights are read once per step, whatever its number of tokens; no Python loop, no host
// read in the caller, so the op also sits inside a compiled decode graph (torch.compile). The shared
// MLP's rows join the same passes (its three projections and SwiGLU would be four regions more).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "gemv_blocks.h"

at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& weights,
                       const at::Tensor& gate_up, const at::Tensor& down,
                       const std::optional<at::Tensor>& shared_gate, const std::optional<at::Tensor>& shared_up,
                       const std::optional<at::Tensor>& shared_down) {
  TORCH_CHECK(x.dim() == 2 && idx.dim() == 2 && weights.sizes() == idx.sizes() && x.size(0) == idx.size(0),
              "nanoseek::moe_experts: x [N, C], idx and weights [N, K], got ", x.sizes(), ", ", idx.sizes(),
              ", ", weights.sizes());
  TORCH_CHECK(gate_up.dim() == 3 && down.dim() == 3 && gate_up.size(0) == down.size(0) &&
              gate_up.size(2) == x.size(1) && down.size(1) == x.size(1) && gate_up.size(1) == 2 * down.size(2),
              "nanoseek::moe_experts: gate_up [E, 2I, C] and down [E, C, I], got ", gate_up.sizes(), " and ",
              down.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && gate_up.scalar_type() == at::kFloat && down.scalar_type() == at::kFloat,
              "nanoseek::moe_experts: fp32 only");
  TORCH_CHECK(gate_up.is_contiguous() && down.is_contiguous(), "nanoseek::moe_experts: stacked weights must be contiguous");
  const int64_t N = x.size(0), K = idx.size(1), C = x.size(1), E = gate_up.size(0), I = down.size(2);
  const bool sh = shared_gate.has_value();
  TORCH_CHECK(sh == shared_up.has_value() && sh == shared_down.has_value(),
              "nanoseek::moe_experts: give all three shared weights or none");
  const int64_t Is = sh ? shared_gate->size(0) : 0;
  if (sh) {
    for (const at::Tensor* t : {&*shared_gate, &*shared_up, &*shared_down})
      TORCH_CHECK(t->dim() == 2 && t->scalar_type() == at::kFloat && t->is_contiguous(),
                  "nanoseek::moe_experts: the shared weights must be 2-D fp32 and contiguous, got ", t->sizes());
    TORCH_CHECK(shared_gate->size(1) == C && shared_up->sizes() == shared_gate->sizes() &&
                shared_down->size(0) == C && shared_down->size(1) == Is,
                "nanoseek::moe_experts: shared_gate and shared_up [Is, C], shared_down [C, Is], got ",
                shared_gate->sizes(), ", ", shared_up->sizes(), ", ", shared_down->sizes());
  }
  auto xc = x.contiguous();
  auto ids = idx.to(at::kLong).contiguous();
  auto ws = weights.to(at::kFloat).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* wt = ws.data_ptr<float>();

  // group the pairs by expert: rows[e] = tokens routed to e, with their weights
  std::vector<std::vector<int64_t>> rows(E);
  std::vector<std::vector<float>> rws(E);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = id[n * K + k];
      TORCH_CHECK(e >= 0 && e < E, "nanoseek::moe_experts: expert id ", e, " outside [0, ", E, ")");
      rows[e].push_back(n);
      rws[e].push_back(wt[n * K + k]);
    }
  std::vector<int64_t> active, start;  // active experts; start of each one's rows in the packed buffers
  int64_t P = 0;
  for (int64_t e = 0; e < E; ++e)
    if (!rows[e].empty()) { active.push_back(e); start.push_back(P); P += rows[e].size(); }
  const int64_t A = active.size();

  // packed inputs [P, C] (grouped by expert), gate_up outputs [P, 2I], SwiGLU [P, I], outputs [P, C]
  std::vector<float> xs(P * C), h(P * 2 * I), act(P * I), ys(P * C);
  const float* X = xc.data_ptr<float>();
  for (int64_t a = 0; a < A; ++a)
    for (size_t r = 0; r < rows[active[a]].size(); ++r)
      std::copy(X + rows[active[a]][r] * C, X + (rows[active[a]][r] + 1) * C, xs.data() + (start[a] + r) * C);

  const float* GU = gate_up.data_ptr<float>();
  const float* D = down.data_ptr<float>();
  const int64_t R = nanoseek::kRowsPerTask, gu_blocks = (2 * I + R - 1) / R, d_blocks = (C + R - 1) / R;
  // the shared MLP: every token, weight 1; gate and up blocks, then down blocks after the routed ones
  const int64_t s_blocks = sh ? (Is + R - 1) / R : 0, sd_blocks = sh ? d_blocks : 0;
  const float* SG = sh ? shared_gate->data_ptr<float>() : nullptr;
  const float* SU = sh ? shared_up->data_ptr<float>() : nullptr;
  const float* SD = sh ? shared_down->data_ptr<float>() : nullptr;
  std::vector<float> hs(N * 2 * Is), acts(N * Is);
  auto y = at::empty({N, C}, x.options());
  float* Y = y.data_ptr<float>();
  const int threads = at::get_num_threads();
  const bool par = threads > 1 && (A * 2 * I + 2 * Is) * C >= 65536;
#pragma omp parallel num_threads(threads) if (par)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < A * gu_blocks + 2 * s_blocks; ++t) {  // every active expert's gate_up rows
      if (t >= A * gu_blocks) {  // the shared MLP's gate (then up) rows, for all N tokens
        const int64_t u = t - A * gu_blocks, up = u >= s_blocks, o = R * (u - up * s_blocks);
        nanoseek::gemv_range(up ? SU : SG, C, X, C, N, hs.data() + up * Is, 2 * Is, o, std::min(Is, o + R));
        continue;
      }
      const int64_t a = t / gu_blocks, o = R * (t % gu_blocks), n = rows[active[a]].size();
      nanoseek::gemv_range(GU + active[a] * 2 * I * C, C, xs.data() + start[a] * C, C, n,
                           h.data() + start[a] * 2 * I, 2 * I, o, std::min(2 * I, o + R));
    }
#pragma omp for schedule(static)
    for (int64_t p = 0; p < P + (sh ? N : 0); ++p) {  // SwiGLU: silu(gate) * up
      const bool s_row = p >= P;
      const int64_t Ip = s_row ? Is : I;
      const float* hp = s_row ? hs.data() + (p - P) * 2 * Is : h.data() + p * 2 * I;
      float* ap = s_row ? acts.data() + (p - P) * Is : act.data() + p * I;
      for (int64_t i = 0; i < Ip; ++i) ap[i] = hp[i] / (1.f + std::exp(-hp[i])) * hp[Ip + i];
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < A * d_blocks + sd_blocks; ++t) {  // every active expert's down rows
      if (t >= A * d_blocks) {  // the shared MLP's down rows, written straight into y
        const int64_t o = R * (t - A * d_blocks);
        nanoseek::gemv_range(SD, Is, acts.data(), Is, N, Y, C, o, std::min(C, o + R));
        continue;
      }
      const int64_t a = t / d_blocks, o = R * (t % d_blocks), n = rows[active[a]].size();
      nanoseek::gemv_range(D + active[a] * C * I, I, act.data() + start[a] * I, I, n, ys.data() + start[a] * C, C,
                           o, std::min(C, o + R));
    }
  }
  if (!sh) y.zero_();
  for (int64_t a = 0; a < A; ++a)  // y[n] += w * expert output, in the pairs' order per expert
    for (size_t r = 0; r < rows[active[a]].size(); ++r) {
      const float w = rws[active[a]][r];
      const float* src = ys.data() + (start[a] + r) * C;
      float* dst = Y + rows[active[a]][r] * C;
      for (int64_t c = 0; c < C; ++c) dst[c] += w * src[c];
    }
  return y;
}

at::Tensor moe_experts_meta(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& weights,
                            const at::Tensor& gate_up, const at::Tensor& down,
                            const std::optional<at::Tensor>& shared_gate, const std::optional<at::Tensor>& shared_up,
                            const std::optional<at::Tensor>& shared_down) {
  return at::empty_like(x);
}

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
  m.def("moe_experts(Tensor x, Tensor idx, Tensor weights, Tensor gate_up, Tensor down, Tensor? shared_gate=None, "
        "Tensor? shared_up=None, Tensor? shared_down=None) -> Tensor");
}
TORCH_LIBRARY_IMPL(nanoseek, CPU, m) { m.impl("moe_experts", &moe_experts); }
TORCH_LIBRARY_IMPL(nanoseek, Meta, m) { m.impl("moe_experts", &moe_experts_meta); }
