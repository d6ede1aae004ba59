// DeepSeekMoE routing of one row for nanoseek's fused decode step (cpu_decode.cpp): what
// nanoseek.model.moe.route computes, on each thread (the threads need the same choice, and the
// routing costs less than a barrier at decode's batch sizes).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace nanoseek {

enum class TopK : int64_t { kGreedy = 0, kGroupLimited = 1, kNoAuxTC = 2 };

struct RouteSpec {
  int64_t K, n_group, topk_group;
  bool sigmoid;             // scores: sigmoid(logits) (V3), else softmax (V2)
  TopK method;              // greedy; group_limited_greedy (V2: groups by their best score); noaux_tc (V3)
  bool normalise;           // norm_topk_prob with K > 1
  bool scale_normalised;    // routed_scaling_factor also on normalised weights (V3)
  float rsf;                // routed_scaling_factor
};

// the index of the largest of x[0, n) not yet taken, the lower on a tie (NaN compares false: the
// first untaken then), and marks it taken
inline int64_t take_best(const float* x, int64_t n, char* taken) {
  int64_t best = -1;
  for (int64_t i = 0; i < n; ++i)
    if (!taken[i] && (best < 0 || x[i] > x[best])) best = i;
  taken[best] = 1;
  return best;
}

// the routing of one MoE layer as one thread sees it: each row's K experts and weights, then the
// (row, expert) pairs grouped by expert (experts ascending, rows ascending within one)
struct Routing {
  std::vector<int64_t> id, row, active, start, count;
  std::vector<float> w, pw, choice, group_score;
  std::vector<char> taken;
  Routing(int64_t B, int64_t K, int64_t E, int64_t G)
      : id(B * std::max<int64_t>(K, 1)), row(B * std::max<int64_t>(K, 1)), active(E), start(E), count(E + 1),
        w(B * std::max<int64_t>(K, 1)), pw(B * std::max<int64_t>(K, 1)), choice(E),
        group_score(std::max<int64_t>(G, 1)), taken(std::max(E, G)) {}

  // row b's experts and weights from its router logits s [E] (overwritten with its scores); bias [E]
  // (noaux_tc's e_score_correction_bias) or nullptr
  void route(int64_t b, float* s, const float* bias, int64_t E, const RouteSpec& r) {
    if (r.sigmoid) {
      for (int64_t e = 0; e < E; ++e) s[e] = 1.f / (1.f + std::exp(-s[e]));
    } else {
      float mx = s[0], sum = 0.f;
      for (int64_t e = 1; e < E; ++e) mx = std::max(mx, s[e]);
      for (int64_t e = 0; e < E; ++e) sum += (s[e] = std::exp(s[e] - mx));
      for (int64_t e = 0; e < E; ++e) s[e] /= sum;
    }
    float* c = choice.data();  // what chooses: the scores, plus the bias for noaux_tc
    for (int64_t e = 0; e < E; ++e) c[e] = s[e] + (r.method == TopK::kNoAuxTC && bias ? bias[e] : 0.f);
    if (r.method != TopK::kGreedy) {  // only the topk_group best groups' experts may be chosen
      const int64_t G = r.n_group, per = E / G;
      for (int64_t g = 0; g < G; ++g) {  // a group's score: its best choice (V2) or its best two summed (V3)
        std::fill_n(taken.data(), per, 0);
        const float first = c[g * per + take_best(c + g * per, per, taken.data())];
        group_score[g] = r.method == TopK::kNoAuxTC ? first + c[g * per + take_best(c + g * per, per, taken.data())]
                                                    : first;
      }
      std::fill_n(taken.data(), G, 0);
      for (int64_t k = 0; k < r.topk_group; ++k) take_best(group_score.data(), G, taken.data());
      const float masked = r.method == TopK::kNoAuxTC ? -std::numeric_limits<float>::infinity() : 0.f;
      for (int64_t g = 0; g < G; ++g)
        if (!taken[g]) std::fill_n(c + g * per, per, masked);
    }
    std::fill_n(taken.data(), E, 0);
    float chosen = 0.f;
    for (int64_t k = 0; k < r.K; ++k) {  // the K best choices; the weight: the expert's score (unbiased)
      const int64_t e = take_best(c, E, taken.data());
      id[b * r.K + k] = e;
      chosen += (w[b * r.K + k] = r.method == TopK::kNoAuxTC ? s[e] : c[e]);
    }
    for (int64_t k = 0; k < r.K; ++k) {
      float& wk = w[b * r.K + k];
      if (r.normalise) wk /= chosen + 1e-20f;
      if ((!r.normalise || r.scale_normalised) && r.rsf != 1.f) wk *= r.rsf;
    }
  }

  // fills active/start/count (per active expert) and row/pw (per pair); returns the active experts
  int64_t group(int64_t B, int64_t K, int64_t E) {
    std::fill_n(count.data(), E + 1, 0);
    for (int64_t p = 0; p < B * K; ++p) ++count[id[p] + 1];
    for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];  // count[e]: pairs of experts below e
    std::copy_n(count.data(), E, start.data());                 // where expert e's pairs go
    for (int64_t p = 0; p < B * K; ++p) {                        // rows ascending within an expert
      const int64_t at = start[id[p]]++;
      row[at] = p / K, pw[at] = w[p];
    }
    int64_t A = 0;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t first = count[e], n = count[e + 1] - count[e];
      if (n) active[A] = e, start[A] = first, ++A;
    }
    for (int64_t a = 0; a < A; ++a) count[a] = (a + 1 < A ? start[a + 1] : B * K) - start[a];
    return A;
  }
};

}  // namespace nanoseek
