// factored_sketch, C++ CPU kernel (LoGra's factored per-example gradient sketch).
//
//   S[b] = sum_{t in segment b} (g_t p_out)^T (x_t p_in) = p_out^T G_b p_in,  G_b = sum_t g_t x_t^T
//
// The two projections are float32 GEMMs (BLAS via at::mm, multi-threaded); the segmented sum of
// rank-1 updates runs per segment in parallel, each segment accumulating its [k_out, k_in] block
// in cache in token order, so no [N, k_out, k_in] temporary exists and the bits do not depend
// on the thread count. Tokens outside every segment are ignored.
#include "factored_sketch.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

namespace mixkernels {

int64_t factored_sketch_check(const at::Tensor& x, const at::Tensor& g, const at::Tensor& offsets,
                              const std::optional<at::Tensor>& p_in, const std::optional<at::Tensor>& p_out) {
  TORCH_CHECK(x.dim() == 2, "mixkernels.factored_sketch: x must be 2-D [N, features], got shape ", x.sizes());
  TORCH_CHECK(g.dim() == 2, "mixkernels.factored_sketch: g must be 2-D [N, features], got shape ", g.sizes());
  check_float_dtype(x, "x");
  check_float_dtype(g, "g");
  TORCH_CHECK(g.size(0) == x.size(0), "mixkernels.factored_sketch: g must have N = x.shape[0] = ", x.size(0),
              " rows, got ", g.size(0));
  check_same_device(x, "x", g, "g");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.numel() >= 1,
              "mixkernels.factored_sketch: offsets must be int64 [B + 1] with B >= 0, got ", offsets.scalar_type(), " ",
              offsets.sizes());
  check_same_device(x, "x", offsets, "offsets");
  if (p_in.has_value()) {
    check_float_dtype(*p_in, "p_in");
    TORCH_CHECK(p_in->dim() == 2 && p_in->size(0) == x.size(1), "mixkernels.factored_sketch: p_in must be [x.shape[1] = ",
                x.size(1), ", k], got shape ", p_in->sizes());
    check_same_device(x, "x", *p_in, "p_in");
  }
  if (p_out.has_value()) {
    check_float_dtype(*p_out, "p_out");
    TORCH_CHECK(p_out->dim() == 2 && p_out->size(0) == g.size(1),
                "mixkernels.factored_sketch: p_out must be [g.shape[1] = ", g.size(1), ", k], got shape ", p_out->sizes());
    check_same_device(x, "x", *p_out, "p_out");
  }
  return offsets.numel() - 1;
}

namespace {

at::Tensor project_factor(const at::Tensor& t, const std::optional<at::Tensor>& p) {
  at::Tensor f = t.to(at::kFloat);
  return p.has_value() ? at::mm(f, p->to(at::kFloat)) : f.contiguous();
}

at::Tensor factored_sketch_cpu(const at::Tensor& x, const at::Tensor& g, const at::Tensor& offsets,
                               const std::optional<at::Tensor>& p_in, const std::optional<at::Tensor>& p_out) {
  const int64_t b = factored_sketch_check(x, g, offsets, p_in, p_out);
  const int64_t n = x.size(0);
  const int64_t k_in = p_in.has_value() ? p_in->size(1) : x.size(1);
  const int64_t k_out = p_out.has_value() ? p_out->size(1) : g.size(1);
  at::Tensor off = offsets.contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  for (int64_t s = 0; s < b; ++s)
    TORCH_CHECK(o[s] <= o[s + 1], "mixkernels.factored_sketch: offsets must be non-decreasing, got offsets[", s,
                "] = ", o[s], " > offsets[", s + 1, "] = ", o[s + 1]);
  TORCH_CHECK(o[0] >= 0 && o[b] <= n, "mixkernels.factored_sketch: offsets must lie in [0, N = ", n, "], got first ",
              o[0], " and last ", o[b]);
  at::Tensor out = at::zeros({b, k_out, k_in}, x.options().dtype(at::kFloat));
  if (b == 0 || o[b] == o[0] || k_in == 0 || k_out == 0) return out;
  // Only the covered rows are projected.
  at::Tensor xp = project_factor(x.narrow(0, o[0], o[b] - o[0]), p_in);
  at::Tensor gp = project_factor(g.narrow(0, o[0], o[b] - o[0]), p_out);
  const float* xpp = xp.data_ptr<float>();
  const float* gpp = gp.data_ptr<float>();
  float* s_all = out.data_ptr<float>();
  const int64_t base = o[0];
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      float* sb = s_all + s * k_out * k_in;
      for (int64_t t = o[s] - base; t < o[s + 1] - base; ++t) {
        const float* xr = xpp + t * k_in;
        const float* gr = gpp + t * k_out;
        for (int64_t r = 0; r < k_out; ++r) sketch_rank1_row(sb + r * k_in, gr[r], xr, k_in);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixkernels, CPU, m) { m.impl("factored_sketch", &factored_sketch_cpu); }

}  // namespace mixkernels
