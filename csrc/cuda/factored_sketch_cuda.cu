// factored_sketch, CUDA kernel (compile-checked in CI; no GPU here to run it).
//
// The projections are float32 cuBLAS GEMMs (at::mm) over the covered rows; then one block per
// segment accumulates S_b[o, :] += gp[t, o] * xp[t, :] with the shared MK_HD rank-1 row update of
// ../factored_sketch.h (the code the CPU kernel runs in the tests), each thread owning rows o of
// S_b, so there are no atomics and the bits are deterministic. The public op validates the offsets
// on the host (mixkernels/ops/factored_sketch.py, for CUDA inputs too); for direct callers of the
// op the kernel asserts sketch_segment_valid (device side) and skips a bad segment instead of
// reading outside xp / gp.
#include "../factored_sketch.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace mixkernels {
namespace {

__global__ void segmented_outer_kernel(const float* __restrict__ xp, const float* __restrict__ gp,
                                       const int64_t* __restrict__ offsets, int64_t base, int64_t n, int64_t k_in,
                                       int64_t k_out, float* __restrict__ out) {
  const int64_t b = blockIdx.x;
  const int64_t start = offsets[b] - base, end = offsets[b + 1] - base;
  const bool valid = sketch_segment_valid(start, end, n);
  CUDA_KERNEL_ASSERT(valid && "mixkernels.factored_sketch: offsets must be non-decreasing and lie in [0, N]");
  if (!valid) return;
  float* sb = out + b * k_out * k_in;
  for (int64_t o = threadIdx.x; o < k_out; o += blockDim.x)
    for (int64_t t = start; t < end; ++t) sketch_rank1_row(sb + o * k_in, gp[t * k_out + o], xp + t * k_in, k_in);
}

at::Tensor project_factor(const at::Tensor& t, const std::optional<at::Tensor>& p) {
  at::Tensor f = t.to(at::kFloat);
  return p.has_value() ? at::mm(f, p->to(at::kFloat)) : f.contiguous();
}

}  // namespace

at::Tensor factored_sketch_cuda(const at::Tensor& x, const at::Tensor& g, const at::Tensor& offsets,
                                const std::optional<at::Tensor>& p_in, const std::optional<at::Tensor>& p_out) {
  const int64_t b = factored_sketch_check(x, g, offsets, p_in, p_out);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t k_in = p_in.has_value() ? p_in->size(1) : x.size(1);
  const int64_t k_out = p_out.has_value() ? p_out->size(1) : g.size(1);
  at::Tensor out = at::zeros({b, k_out, k_in}, x.options().dtype(at::kFloat));
  if (b == 0 || x.size(0) == 0 || k_in == 0 || k_out == 0) return out;
  // Project every row (the covered range is not known on the host without a sync).
  at::Tensor xp = project_factor(x, p_in);
  at::Tensor gp = project_factor(g, p_out);
  at::Tensor off = offsets.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  const int threads = static_cast<int>(std::min<int64_t>(256, ((k_out + 31) / 32) * 32));
  segmented_outer_kernel<<<b, threads, 0, stream>>>(xp.data_ptr<float>(), gp.data_ptr<float>(),
                                                    off.data_ptr<int64_t>(), 0, x.size(0), k_in, k_out,
                                                    out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(mixkernels, CUDA, m) { m.impl("factored_sketch", &factored_sketch_cuda); }

}  // namespace mixkernels
