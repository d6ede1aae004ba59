// nanoseek's whole decode step of an MLA model on x86 CPUs (AVX2 + FMA, fp32): one token per row, from
// the token ids to the logits, in one OpenMP parallel region.
//
// The eager step runs ~80 parallel regions per token (one per projection, attention and experts op)
// with serial work between them: with 2 threads each spent only ~55 % of a token in kernels, the rest
// waiting at forks and joins (bench/RESULTS.md, "Sixth session"). Here the threads start once per
// step and meet at 5 barriers per layer (6 with q_lora_rank). What every thread needs and costs less
// than a barrier (the norms, the routing) runs on every thread at once.
//
// Per layer (B rows, C hidden, H heads, Dn/Dv/R head dims, L kv_lora_rank, D = L + R):
//   1. every thread: xn = rmsnorm(x) (its own copy); tasks of 12 weight rows over
//      [q_proj | kv_a_proj] (or [q_a_proj | kv_a_proj], then barrier, q_b_proj over the normed q_a)
//   2. barrier; tasks per (4 heads, row): the new latent [kv_a_layernorm(c_kv) | rope(k_pe)] (into the
//      pool), the absorbed queries [q_nope @ W_UK | rope(q_pe)], attention over the row's latents in
//      the pool (latent_attention.h), o = o_lat @ W_UV^T
//   3. barrier; tasks of 12 rows of o_proj, added into the residual x
//   4. barrier; every thread: xn = rmsnorm(x) and, for MoE, the routing (routing.h: V2's softmax with
//      greedy or group-limited top-K, V3's sigmoid with noaux_tc)
//   5. per thread, an even contiguous share of the [gate | up] rows of the active experts and of the
//      shared (or dense) MLP
//   6. barrier; every thread: SwiGLU of all rows; one contiguous share of the down rows per thread:
//      the MLP's and every active expert's (weighted), into x
//   7. barrier (the next layer reads all of x)
// then the final norm and the lm_head. Weight rows go through gemv_blocks.h as in nanoseek::gemv, with
// the few-rows kernel the engine measured faster on this host (dims[9], Rows); the per-row math
// (norms, rope, SwiGLU) is in decode_ops.h.
// The reference is the model's own forward (tests/engine/test_fused_decode.py checks they agree).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "decode_ops.h"
#include "latent_attention.h"
#include "routing.h"

namespace {

constexpr int64_t kR = nanoseek::kRowsPerTask;

// where each of a layer's weights sits in the flat list (an empty tensor where the layer has none);
// kGate/kUp/kDown are the dense MLP of a dense layer and the shared experts of an MoE layer
enum Slot : int64_t {
  kInNorm, kQ, kQA, kQANorm, kQB, kKVA, kKVANorm, kKVB, kO, kPostNorm, kGate, kUp, kDown, kRouter, kRouterBias,
  kExpGateUp, kExpDown, kSlots
};

inline int64_t blocks_of(int64_t n) { return (n + kR - 1) / kR; }

struct Layer {
  const float *in_norm, *q, *qa, *qa_norm, *qb, *kva, *kva_norm, *kvb, *o, *post_norm, *gate, *up, *down, *router,
      *router_bias, *exp_gu, *exp_down;
  int64_t mlp_inter, exp_inter;  // the dense (or shared) MLP's and each routed expert's intermediate size
  float* pool;
};

struct Scratch {
  std::vector<float> xn, qan, s, q4, o4, lat, down_out, act_e, act_m, xs, rl;
  std::vector<const float*> keys;
  nanoseek::Routing routing;
  // each row's argmax over this thread's share of the vocabulary (-1: none yet): the largest value
  // and its first index, and the first NaN's index
  std::vector<float> top_v;
  std::vector<int64_t> top_i, nan_i;
};

const float* ptr(const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

void check_weight(const at::Tensor& t, int64_t layer, const char* name, std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous(),
              "nanoseek::mla_decode_step: layer ", layer, "'s ", name, " must be a contiguous fp32 CPU tensor");
  TORCH_CHECK(t.sizes().equals(at::IntArrayRef(shape)), "nanoseek::mla_decode_step: layer ", layer, "'s ", name,
              " has shape ", t.sizes(), ", expected ", at::IntArrayRef(shape));
}

}  // namespace

// ids [B]: each row's new token. seq_lens [B]: keys of each row after this step; the new token sits
// at position seq_lens - 1, stored at slot_mapping [B] (distinct slots, as the engine's metadata gives
// them: rows sharing a slot would race). block_tables [B * nb]: each row's nb block ids. These come
// as lists, not tensors: the engine builds them on the host each step, where each tensor made and
// sliced cost ~50 us (after a step the interpreter's and torch's own code runs with cold caches).
// pools: one [blocks, block_size, L + R] per layer (written: the new latents). weights: kSlots per
// layer, then embed_tokens [V, C], norm [C], lm_head [V, C]. inv_freq [R/2] fp32. dims: H, Dn, R, Dv,
// L, K, norm_topk_prob, interleaved rope, routed_scaling_factor also on normalised weights (V3), the
// few-rows kernel (1: Rows::kStream, 0: kBlocks; gemv_blocks.h), sigmoid scores, the top-K method
// (routing.h's TopK), n_group, topk_group. params: rms eps, softmax scale,
// routed_scaling_factor, rope's attention factor. Returns the logits [B, V] and each row's argmax (as
// torch.argmax: the first maximum, or the first NaN), which is all a greedy row needs.
std::tuple<at::Tensor, std::vector<int64_t>> mla_decode_step(
    at::IntArrayRef ids, at::IntArrayRef seq_lens, at::IntArrayRef slot_mapping, at::IntArrayRef block_tables,
    at::TensorList pools, at::TensorList weights, const at::Tensor& inv_freq, at::IntArrayRef dims,
    at::ArrayRef<double> params) {
  TORCH_CHECK(dims.size() == 14 && params.size() == 4, "nanoseek::mla_decode_step: dims [14] and params [4]");
  const int64_t H = dims[0], Dn = dims[1], R = dims[2], Dv = dims[3], L = dims[4], K = dims[5];
  const bool normalise = dims[6] != 0 && K > 1, interleaved = dims[7] != 0, scale_normalised = dims[8] != 0;
  const nanoseek::Rows rows = dims[9] != 0 ? nanoseek::Rows::kStream : nanoseek::Rows::kBlocks;
  TORCH_CHECK(dims[11] >= 0 && dims[11] <= 2, "nanoseek::mla_decode_step: top-K method ", dims[11], " unknown");
  const nanoseek::RouteSpec route{K, dims[12], dims[13], dims[10] != 0, static_cast<nanoseek::TopK>(dims[11]),
                                  normalise, scale_normalised, static_cast<float>(params[2])};
  const float eps = params[0], scale = params[1], attn_factor = params[3];  // params[2]: in route
  const int64_t n_layers = static_cast<int64_t>(pools.size()), D = L + R, Dq = Dn + R;
  TORCH_CHECK(n_layers >= 1 && static_cast<int64_t>(weights.size()) == kSlots * n_layers + 3,
              "nanoseek::mla_decode_step: ", kSlots, " weights per layer and 3 more, got ", weights.size(),
              " for ", n_layers, " layers");
  const at::Tensor& embed = weights[kSlots * n_layers];
  const at::Tensor& final_norm = weights[kSlots * n_layers + 1];
  const at::Tensor& lm_head = weights[kSlots * n_layers + 2];
  TORCH_CHECK(embed.dim() == 2, "nanoseek::mla_decode_step: embed_tokens must be [V, C]");
  const int64_t V = embed.size(0), C = embed.size(1);
  check_weight(embed, -1, "embed_tokens", {V, C});
  check_weight(final_norm, -1, "norm", {C});
  TORCH_CHECK(lm_head.dim() == 2 && lm_head.size(1) == C, "nanoseek::mla_decode_step: lm_head must be [vocab, ", C,
              "], got ", lm_head.sizes());
  check_weight(lm_head, -1, "lm_head", {lm_head.size(0), C});
  const int64_t Vout = lm_head.size(0);
  check_weight(inv_freq, -1, "inv_freq", {R / 2});
  const int64_t B = static_cast<int64_t>(ids.size());
  TORCH_CHECK(B >= 1, "nanoseek::mla_decode_step: no rows");
  TORCH_CHECK(static_cast<int64_t>(seq_lens.size()) == B && static_cast<int64_t>(slot_mapping.size()) == B &&
                  block_tables.size() % B == 0 && !block_tables.empty(),
              "nanoseek::mla_decode_step: ids, seq_lens, slot_mapping [B] and block_tables [B * nb], got ", B, ", ",
              seq_lens.size(), ", ", slot_mapping.size(), " and ", block_tables.size());
  const int64_t nb = static_cast<int64_t>(block_tables.size()) / B;

  // ---- the layers' weights, checked against the dims
  std::vector<Layer> layers(n_layers);
  int64_t max_mlp = 0, max_exp = 0, E_max = 0, blocks = 0, bs = 0;
  for (int64_t l = 0; l < n_layers; ++l) {
    const at::Tensor* w = &weights[kSlots * l];
    Layer& y = layers[l];
    check_weight(w[kInNorm], l, "input_layernorm", {C});
    if (w[kQ].numel()) {
      check_weight(w[kQ], l, "q_proj", {H * Dq, C});
    } else {
      const int64_t Lq = w[kQA].size(0);
      check_weight(w[kQA], l, "q_a_proj", {Lq, C});
      check_weight(w[kQANorm], l, "q_a_layernorm", {Lq});
      check_weight(w[kQB], l, "q_b_proj", {H * Dq, Lq});
    }
    check_weight(w[kKVA], l, "kv_a_proj_with_mqa", {D, C});
    check_weight(w[kKVANorm], l, "kv_a_layernorm", {L});
    check_weight(w[kKVB], l, "kv_b_proj", {H * (Dn + Dv), L});
    check_weight(w[kO], l, "o_proj", {C, H * Dv});
    check_weight(w[kPostNorm], l, "post_attention_layernorm", {C});
    y.mlp_inter = w[kGate].numel() ? w[kGate].size(0) : 0;
    if (y.mlp_inter) {
      check_weight(w[kGate], l, "gate_proj", {y.mlp_inter, C});
      check_weight(w[kUp], l, "up_proj", {y.mlp_inter, C});
      check_weight(w[kDown], l, "down_proj", {C, y.mlp_inter});
    }
    y.exp_inter = 0;
    if (w[kRouter].numel()) {
      const int64_t E = w[kRouter].size(0);
      TORCH_CHECK(w[kExpDown].dim() == 3 && K >= 1 && K <= E, "nanoseek::mla_decode_step: layer ", l,
                  "'s experts: down_proj [E, C, I] and 1 <= K <= E");
      y.exp_inter = w[kExpDown].size(2);
      TORCH_CHECK(y.exp_inter > 0, "nanoseek::mla_decode_step: layer ", l, "'s experts have no rows");
      check_weight(w[kRouter], l, "gate (router)", {E, C});
      TORCH_CHECK(route.method != nanoseek::TopK::kNoAuxTC || w[kRouterBias].numel(), "nanoseek::mla_decode_step: ",
                  "layer ", l, "'s noaux_tc routing needs its gate.e_score_correction_bias");
      if (w[kRouterBias].numel()) check_weight(w[kRouterBias], l, "gate.e_score_correction_bias", {E});
      if (route.method != nanoseek::TopK::kGreedy) {
        const int64_t G = route.n_group, per = G > 0 ? E / G : 0;
        TORCH_CHECK(G >= 1 && E % G == 0 && route.topk_group >= 1 && route.topk_group <= G &&
                        route.topk_group * per >= K && (route.method != nanoseek::TopK::kNoAuxTC || per >= 2),
                    "nanoseek::mla_decode_step: layer ", l, "'s ", E, " experts cannot take n_group=", G,
                    ", topk_group=", route.topk_group, " and K=", K);
      }
      check_weight(w[kExpGateUp], l, "experts.gate_up_proj", {E, 2 * y.exp_inter, C});
      check_weight(w[kExpDown], l, "experts.down_proj", {E, C, y.exp_inter});
      E_max = std::max(E_max, E);
    }
    TORCH_CHECK(y.mlp_inter || y.exp_inter, "nanoseek::mla_decode_step: layer ", l, " has no MLP and no experts");
    max_mlp = std::max(max_mlp, y.mlp_inter);
    max_exp = std::max(max_exp, y.exp_inter);
    const at::Tensor& pool = pools[l];
    TORCH_CHECK(pool.dim() == 3 && pool.size(2) == D && pool.scalar_type() == at::kFloat && pool.is_contiguous() &&
                    (l == 0 || (pool.size(0) == blocks && pool.size(1) == bs)),
                "nanoseek::mla_decode_step: every pool must be a contiguous fp32 [blocks, block_size, ", D,
                "] of one shape, layer ", l, "'s is ", pool.sizes());
    blocks = pool.size(0), bs = pool.size(1);
    y.in_norm = ptr(w[kInNorm]), y.q = ptr(w[kQ]), y.qa = ptr(w[kQA]), y.qa_norm = ptr(w[kQANorm]);
    y.qb = ptr(w[kQB]), y.kva = ptr(w[kKVA]), y.kva_norm = ptr(w[kKVANorm]), y.kvb = ptr(w[kKVB]);
    y.o = ptr(w[kO]), y.post_norm = ptr(w[kPostNorm]), y.gate = ptr(w[kGate]), y.up = ptr(w[kUp]);
    y.down = ptr(w[kDown]), y.router = ptr(w[kRouter]), y.router_bias = ptr(w[kRouterBias]);
    y.exp_gu = ptr(w[kExpGateUp]);
    y.exp_down = ptr(w[kExpDown]), y.pool = pool.data_ptr<float>();
  }
  const int64_t Lq = layers[0].q ? 0 : weights[kQA].size(0);  // q_lora_rank (0: none), one for all layers
  for (int64_t l = 0; l < n_layers; ++l)
    TORCH_CHECK(!layers[l].q == (Lq > 0) && (Lq == 0 || weights[kSlots * l + kQA].size(0) == Lq),
                "nanoseek::mla_decode_step: every layer must have q_proj, or q_a_proj of one rank");

  // ---- the rows: tokens, slots, block tables (checked), rope angles
  const int64_t *id = ids.data(), *Ls = seq_lens.data(), *sl = slot_mapping.data(), *T = block_tables.data();
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(id[b] >= 0 && id[b] < V, "nanoseek::mla_decode_step: token id ", id[b], " outside [0, ", V, ")");
    TORCH_CHECK(Ls[b] >= 1 && Ls[b] <= nb * bs, "nanoseek::mla_decode_step: row ", b, " has ", Ls[b],
                " keys, its block table holds ", nb * bs);
    TORCH_CHECK(sl[b] >= 0 && sl[b] < blocks * bs, "nanoseek::mla_decode_step: slot ", sl[b], " outside the pool");
    for (int64_t k = 0; k < (Ls[b] + bs - 1) / bs; ++k)
      TORCH_CHECK(T[b * nb + k] >= 0 && T[b * nb + k] < blocks, "nanoseek::mla_decode_step: block id ",
                  T[b * nb + k], " outside the pool's ", blocks);
    longest = std::max(longest, Ls[b]);
  }
  {  // two rows writing one slot would race (and one latent would be lost)
    std::vector<int64_t> seen(sl, sl + B);
    std::sort(seen.begin(), seen.end());
    const auto dup = std::adjacent_find(seen.begin(), seen.end());
    TORCH_CHECK(dup == seen.end(), "nanoseek::mla_decode_step: slot ", dup == seen.end() ? 0 : *dup,
                " is given to more than one row");
  }
  const float* inv = inv_freq.data_ptr<float>();
  std::vector<float> cs(B * R);  // [B, R/2, (cos, sin)] * attn_factor, as rope_cos_sin
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < R / 2; ++i) {
      const float angle = static_cast<float>(Ls[b] - 1) * inv[i];
      cs[b * R + 2 * i] = std::cos(angle) * attn_factor;
      cs[b * R + 2 * i + 1] = std::sin(angle) * attn_factor;
    }

  // ---- shared buffers
  const int64_t QW = H * Dq, AW = (Lq ? Lq : QW) + D;  // [q | kv_a] or [q_a | kv_a] per row
  std::vector<float> x(B * C), qa(B * AW), qb(Lq ? B * QW : 0), ov(B * H * Dv), yo(B * C),
      h_exp(2 * B * K * std::max<int64_t>(max_exp, 1)), h_mlp(2 * B * std::max<int64_t>(max_mlp, 1));
  const float* EMB = embed.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) std::copy_n(EMB + id[b] * C, C, x.data() + b * C);
  auto logits = at::empty({B, Vout}, embed.options());
  float* OUT = logits.data_ptr<float>();
  const float* FN = final_norm.data_ptr<float>();
  const float* LM = lm_head.data_ptr<float>();
  const int threads = at::get_num_threads();
  const int64_t groups = (H + 3) / 4, BK = B * std::max<int64_t>(K, 1);
  // every thread's scratch, allocated here: an allocation failing inside the region would terminate
  std::vector<Scratch> scratch;
  scratch.reserve(threads);
  for (int t = 0; t < threads; ++t)
    scratch.emplace_back(Scratch{std::vector<float>(B * C), std::vector<float>(B * std::max<int64_t>(Lq, 1)),
                                 std::vector<float>(longest * 4 + 8), std::vector<float>(4 * D),
                                 std::vector<float>(4 * L), std::vector<float>(D), std::vector<float>(B * C),
                                 std::vector<float>(BK * std::max<int64_t>(max_exp, 1)),
                                 std::vector<float>(B * std::max<int64_t>(max_mlp, 1)), std::vector<float>(BK * C),
                                 std::vector<float>(E_max), std::vector<const float*>(longest),
                                 nanoseek::Routing(B, K, E_max, route.n_group), std::vector<float>(B),
                                 std::vector<int64_t>(B, -1), std::vector<int64_t>(B, -1)});
  const unsigned int csr = _mm_getcsr();  // the caller's floating-point mode (denormals), for every thread

#pragma omp parallel num_threads(threads)
  {
    // every thread computes the routing itself, so all must round alike: the caller's mode, restored after
    const unsigned int own_csr = _mm_getcsr();
    _mm_setcsr(csr);
    Scratch& sc = scratch[omp_get_thread_num()];
    std::vector<float>&xn = sc.xn, &qan = sc.qan, &s = sc.s, &q4 = sc.q4, &o4 = sc.o4, &lat = sc.lat,
        &down_out = sc.down_out, &act_e = sc.act_e, &act_m = sc.act_m, &xs = sc.xs, &rl = sc.rl;
    std::vector<const float*>& keys = sc.keys;
    nanoseek::Routing& rt = sc.routing;  // the routing as every thread sees it

    for (int64_t l = 0; l < n_layers; ++l) {
      const Layer& w = layers[l];
      // 1: input norm (every thread its own copy), then [q | kv_a] (or [q_a | kv_a])
      for (int64_t b = 0; b < B; ++b) nanoseek::rmsnorm(x.data() + b * C, w.in_norm, C, eps, xn.data() + b * C);
      const int64_t first = Lq ? Lq : QW, nq = blocks_of(first);
      const float* W1 = Lq ? w.qa : w.q;
#pragma omp for schedule(static)
      for (int64_t t = 0; t < nq + blocks_of(D); ++t) {
        if (t < nq)
          nanoseek::gemv_range(W1, C, xn.data(), C, B, qa.data(), AW, kR * t, std::min(first, kR * t + kR), rows);
        else
          nanoseek::gemv_rows(w.kva, C, xn.data(), C, B, qa.data() + first + kR * (t - nq), AW, kR * (t - nq),
                    std::min(D, kR * (t - nq) + kR), rows);
      }
      const float* Qp = qa.data();  // q [B, H, Dq] at stride QS
      int64_t QS = AW;
      if (Lq) {  // q_b_proj over the normed q_a
        for (int64_t b = 0; b < B; ++b) nanoseek::rmsnorm(qa.data() + b * AW, w.qa_norm, Lq, eps, qan.data() + b * Lq);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < blocks_of(QW); ++t)
          nanoseek::gemv_range(w.qb, Lq, qan.data(), Lq, B, qb.data(), QW, kR * t, std::min(QW, kR * t + kR), rows);
        Qp = qb.data(), QS = QW;
      }
      // 2: per (4 heads, row): the row's new latent (written to the pool by the first group's task; each
      // task attends its own copy as the last key, so no task waits for another's write), the absorbed
      // queries [q_nope @ W_UK | rope(q_pe)], attention over the row's latents where they lie in the
      // pool, and o = o_lat @ W_UV^T. Rows outer: a thread's consecutive tasks read the same row's keys
      // (from memory once, then from its cache), which outweighs the heads' W_UK and W_UV at any context.
#pragma omp for schedule(static)
      for (int64_t t = 0; t < groups * B; ++t) {
        const int64_t b = t / groups, g = t % groups, h0 = 4 * g, nh = std::min<int64_t>(4, H - h0), S = Ls[b];
        const float* kv = qa.data() + b * AW + first;  // [c_kv | k_pe] of the new token
        nanoseek::rmsnorm(kv, w.kva_norm, L, eps, lat.data());
        nanoseek::rope(kv + L, cs.data() + b * R, R, interleaved, lat.data() + L);
        if (g == 0) std::copy_n(lat.data(), D, w.pool + sl[b] * D);
        for (int64_t hh = 0; hh < 4; ++hh) {  // a short last group repeats its first head, never read
          const int64_t h = h0 + (hh < nh ? hh : 0);
          const float* qh = Qp + b * QS + h * Dq;
          float* out = q4.data() + hh * D;
          nanoseek::rope(qh + Dn, cs.data() + b * R, R, interleaved, out + L);
          std::fill_n(out, L, 0.f);
          const float* wuk = w.kvb + h * (Dn + Dv) * L;  // W_UK of head h: [Dn, L]
          for (int64_t d = 0; d < Dn; ++d) {  // out[:L] += q_nope[d] * W_UK[d, :]
            const __m256 qd = _mm256_set1_ps(qh[d]);
            const float* wr = wuk + d * L;
            int64_t i = 0;
            for (; i + 8 <= L; i += 8)
              _mm256_storeu_ps(out + i, _mm256_fmadd_ps(qd, _mm256_loadu_ps(wr + i), _mm256_loadu_ps(out + i)));
            for (; i < L; ++i) out[i] += qh[d] * wr[i];
          }
        }
        nanoseek::row_keys(w.pool, T + b * nb, bs, D, S - 1, keys.data());
        keys[S - 1] = lat.data();
        nanoseek::attend_4heads(q4.data(), keys.data(), S, D, L, scale, s.data(), o4.data());
        for (int64_t hh = 0; hh < nh; ++hh)  // W_UV of head h: rows Dn.. of its kv_b_proj rows, [Dv, L]
          nanoseek::gemv_range(w.kvb + ((h0 + hh) * (Dn + Dv) + Dn) * L, L, o4.data() + hh * L, L, 1,
                               ov.data() + b * H * Dv + (h0 + hh) * Dv, Dv, 0, Dv, rows);
      }
      // 3: x += o_proj(o), each task its own columns
#pragma omp for schedule(static)
      for (int64_t t = 0; t < blocks_of(C); ++t) {
        const int64_t o0 = kR * t, o1 = std::min(C, o0 + kR);
        nanoseek::gemv_range(w.o, H * Dv, ov.data(), H * Dv, B, yo.data(), C, o0, o1, rows);
        for (int64_t b = 0; b < B; ++b)
          for (int64_t c = o0; c < o1; ++c) x[b * C + c] += yo[b * C + c];
      }
      // 4: every thread: the post-attention norm and, in an MoE layer, the routing of every row
      // (routing.h), grouped by expert. The same inputs and code give every thread the same choice;
      // ~E * C * B multiply-adds, less than a barrier's wait at the batch sizes of decode.
      const int64_t E = w.router ? weights[kSlots * l + kRouter].size(0) : 0;
      for (int64_t b = 0; b < B; ++b) nanoseek::rmsnorm(x.data() + b * C, w.post_norm, C, eps, xn.data() + b * C);
      int64_t P = 0, A = 0;
      if (E) {
        for (int64_t b = 0; b < B; ++b) {
          nanoseek::gemv_range(w.router, C, xn.data() + b * C, C, 1, rl.data(), E, 0, E, rows);
          rt.route(b, rl.data(), w.router_bias, E, route);
        }
        A = rt.group(B, K, E);  // (row, expert) pairs by expert: rt.active, rt.start, rt.count, rt.row, rt.pw
        for (int64_t p = 0; p < B * K; ++p)  // the rows, packed by expert
          std::copy_n(xn.data() + rt.row[p] * C, C, xs.data() + p * C);
        P = B * K;
      }
      const int64_t I = w.exp_inter, Im = w.mlp_inter;
      const int64_t nt = omp_get_num_threads();
      // 5: [gate | up] rows of every active expert (for its own rows) and of the MLP (for every row), each
      // thread an even contiguous share of both, so that it streams each matrix in one run; then every
      // thread computes the SwiGLU of all rows for itself (the down rows it takes need all of them).
      // Gate and up rows in separate 12-row tasks made two streams per thread; one ran ~7 % faster at B=1.
#pragma omp for schedule(static)
      for (int64_t th = 0; th < nt; ++th) {
        const int64_t tot = A * 2 * I, lo = tot * th / nt, hi = tot * (th + 1) / nt;
        for (int64_t a = A ? lo / (2 * I) : 0; a < A && a * 2 * I < hi; ++a) {
          const int64_t e = rt.active[a], n = rt.count[a];
          const int64_t o0 = std::max(lo - a * 2 * I, int64_t(0)), o1 = std::min(hi - a * 2 * I, 2 * I);
          nanoseek::gemv_rows(w.exp_gu + e * 2 * I * C, C, xs.data() + rt.start[a] * C, C, n,
                              h_exp.data() + rt.start[a] * 2 * I + o0, 2 * I, o0, o1, rows);
        }
        const int64_t mlo = 2 * Im * th / nt, mhi = 2 * Im * (th + 1) / nt;
        if (mlo < std::min(mhi, Im))
          nanoseek::gemv_rows(w.gate, C, xn.data(), C, B, h_mlp.data() + mlo, 2 * Im, mlo, std::min(mhi, Im), rows);
        if (std::max(mlo, Im) < mhi)
          nanoseek::gemv_rows(w.up, C, xn.data(), C, B, h_mlp.data() + std::max(mlo, Im), 2 * Im,
                              std::max(mlo, Im) - Im, mhi - Im, rows);
      }
      for (int64_t p = 0; p < P; ++p) nanoseek::swiglu_row(h_exp.data() + p * 2 * I, I, act_e.data() + p * I);
      for (int64_t b = 0; b < B && Im; ++b) nanoseek::swiglu_row(h_mlp.data() + b * 2 * Im, Im, act_m.data() + b * Im);
      // 6: down rows, one contiguous share of the C output rows per thread: the MLP's, then every
      // active expert's (weighted), added into x. Each thread streams its share of each matrix in one
      // run (with 12-row tasks each expert was a 12-row run, and the step ~10 % slower at batch 8).
      const int64_t nbC = blocks_of(C);
#pragma omp for schedule(static)
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t o0 = std::min(C, kR * (nbC * t / nt)), o1 = std::min(C, kR * (nbC * (t + 1) / nt)), n0 = o1 - o0;
        float* y = down_out.data();  // [rows, n0]
        if (n0 == 0) continue;
        if (Im) {
          nanoseek::gemv_rows(w.down, Im, act_m.data(), Im, B, y, n0, o0, o1, rows);
          for (int64_t b = 0; b < B; ++b)
            for (int64_t c = o0; c < o1; ++c) x[b * C + c] += y[b * n0 + c - o0];
        }
        for (int64_t a = 0; a < A; ++a) {
          const int64_t e = rt.active[a], n = rt.count[a], p0 = rt.start[a];
          nanoseek::gemv_rows(w.exp_down + e * C * I, I, act_e.data() + p0 * I, I, n, y, n0, o0, o1, rows);
          for (int64_t r = 0; r < n; ++r) {
            const float wt = rt.pw[p0 + r];
            float* xr = x.data() + rt.row[p0 + r] * C;
            for (int64_t c = o0; c < o1; ++c) xr[c] += wt * y[r * n0 + c - o0];
          }
        }
      }
    }
    // the final norm (every thread its own copy) and the lm_head
    for (int64_t b = 0; b < B; ++b) nanoseek::rmsnorm(x.data() + b * C, FN, C, eps, xn.data() + b * C);
    // (and each row's argmax over the thread's tasks, while their logits are in its cache)
#pragma omp for schedule(static)
    for (int64_t t = 0; t < blocks_of(Vout); ++t) {
      const int64_t o0 = kR * t, o1 = std::min(Vout, kR * t + kR);
      nanoseek::gemv_range(LM, C, xn.data(), C, B, OUT, Vout, o0, o1, rows);
      for (int64_t b = 0; b < B; ++b)
        nanoseek::argmax_update(OUT + b * Vout, o0, o1, sc.top_v[b], sc.top_i[b], sc.nan_i[b]);
    }
    _mm_setcsr(own_csr);
  }
  // a static schedule gives thread t a contiguous share of the tasks, ascending with t: merged in
  // thread order, the first maximum (or NaN) of the shares is the first of the row, as torch.argmax
  std::vector<int64_t> top(B, 0);
  for (int64_t b = 0; b < B; ++b) {
    float best = 0.f;
    int64_t at = -1;
    for (int t = 0; t < threads; ++t) {
      const Scratch& sc = scratch[t];
      if (sc.nan_i[b] >= 0) {
        at = sc.nan_i[b];
        break;
      }
      if (sc.top_i[b] >= 0 && (at < 0 || sc.top_v[b] > best)) best = sc.top_v[b], at = sc.top_i[b];
    }
    top[b] = at;
  }
  return {logits, top};
}

// no Meta kernel: the argmax is data, which shapes alone cannot give (nothing traces this op)
TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
  m.def("mla_decode_step(int[] ids, int[] seq_lens, int[] slot_mapping, int[] block_tables, Tensor(a!)[] pools, "
        "Tensor[] weights, Tensor inv_freq, int[] dims, float[] params) -> (Tensor, int[])");
}
TORCH_LIBRARY_IMPL(nanoseek, CPU, m) { m.impl("mla_decode_step", &mla_decode_step); }
