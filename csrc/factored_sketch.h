// factored_sketch: shared declarations and the per-token math of the CPU and CUDA kernels.
//
//   xp = x @ p_in [N, k_in], gp = g @ p_out [N, k_out]   (skipped when p_in / p_out is absent)
//   S[b, o, i] = sum_{t in [offsets[b], offsets[b+1])} gp[t, o] * xp[t, i]      float32 [B, k_out, k_in]
#pragma once

#include "common.h"

#include <optional>

namespace mixkernels {

// S_b[o, :] += gp_t[o] * xp_t[:] for one token: the rank-1 update both kernels accumulate.
MK_HD void sketch_rank1_row(float* __restrict__ s_row, float g, const float* __restrict__ xp, int64_t k_in) {
  for (int64_t i = 0; i < k_in; ++i) s_row[i] += g * xp[i];
}

// Segment b covers tokens [start, end) of N: 0 <= start <= end <= N. The public op checks this on
// the host for every device; the CUDA kernel asserts it (device side) for direct callers of the op.
MK_HD bool sketch_segment_valid(int64_t start, int64_t end, int64_t n) { return 0 <= start && start <= end && end <= n; }

// Validates arguments (shared by CPU and CUDA); returns B.
int64_t factored_sketch_check(const at::Tensor& x, const at::Tensor& g, const at::Tensor& offsets,
                              const std::optional<at::Tensor>& p_in, const std::optional<at::Tensor>& p_out);

at::Tensor factored_sketch_cuda(const at::Tensor& x, const at::Tensor& g, const at::Tensor& offsets,
                                const std::optional<at::Tensor>& p_in, const std::optional<at::Tensor>& p_out);

}  // namespace mixkernels
