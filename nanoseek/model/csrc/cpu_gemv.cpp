// nanoseek's few-rows fp32 projection for x86 CPUs with AVX2 + FMA: y[n, o] = sum_i x[n, i] * w[o, i].
//
// Decode multiplies 1-16 activation rows by each weight once, so it is bound by how fast the weight
// streams from memory. Each thread takes whole blocks of 12 weight rows and runs every activation row
// against them while they sit in L1 (gemv_blocks.h: register blocks of 4x2 rows, or 3x4 from 4 rows
// on). Built on first use by nanoseek/model/cpu_kernels.py; `linear` takes it only where tune()
// measured it fastest.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <omp.h>

#include <algorithm>

#include "gemv_blocks.h"


// x [N, I], w [O, I] (both fp32, rows contiguous) -> [N, O]; torch's intra-op thread count
at::Tensor gemv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "nanoseek::gemv: x [N, I] and w [O, I], got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "nanoseek::gemv: fp32 only");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "nanoseek::gemv: CPU tensors only");
  TORCH_CHECK(x.stride(1) == 1 && w.stride(1) == 1 && w.stride(0) == w.size(1),
              "nanoseek::gemv: rows must be contiguous");
  const int64_t N = x.size(0), I = x.size(1), O = w.size(0), xs = x.stride(0);
  auto y = at::empty({N, O}, x.options());
  const int threads = at::get_num_threads();
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t R = nanoseek::kRowsPerTask, tasks = (O + R - 1) / R;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && O * I >= 65536)
  for (int64_t b = 0; b < tasks; ++b) nanoseek::gemv_range(W, I, X, xs, N, Y, O, R * b, std::min(O, R * b + R));
  return y;
}

at::Tensor gemv_meta(const at::Tensor& x, const at::Tensor& w) {  // shapes only (torch.compile's tracing)
  return at::empty({x.size(0), w.size(0)}, x.options());
}

TORCH_LIBRARY_FRAGMENT(nanoseek, m) { m.def("gemv(Tensor x, Tensor w) -> Tensor"); }
TORCH_LIBRARY_IMPL(nanoseek, CPU, m) { m.impl("gemv", &gemv); }
TORCH_LIBRARY_IMPL(nanoseek, Meta, m) { m.impl("gemv", &gemv_meta); }
