// segment_sum: shared declarations and the per-element math used by the CPU and CUDA kernels.
//
//   sums[s, c]  = sum_{i : ids[i] == s, mask[i]} float(values[i, c])   (fp32 output)
//   counts[s]   = #{i : ids[i] == s, mask[i]}
#pragma once

#include "common.h"

#include <optional>
#include <tuple>

namespace mixkernels {

// True when row i takes part: not masked out.
MK_HD bool segment_row_counted(const bool* mask, int64_t i) { return mask == nullptr || mask[i]; }

MK_HD bool segment_id_valid(int64_t id, int64_t num_segments) { return id >= 0 && id < num_segments; }

// Number of independent CPU partial-sum chunks. A pure function of the shapes (never of the
// thread count), so the result has the same bits on any machine and run.
inline int64_t segment_sum_num_chunks(int64_t n, int64_t num_segments) {
  constexpr int64_t kRowsPerChunk = 1 << 15;
  constexpr int64_t kMaxChunks = 64;
  int64_t chunks = (n + kRowsPerChunk - 1) / kRowsPerChunk;
  // Keep the partial buffers (chunks x num_segments) no larger than the input itself.
  int64_t by_memory = num_segments > 0 ? std::max<int64_t>(1, n / num_segments) : 1;
  return std::max<int64_t>(1, std::min({chunks, kMaxChunks, by_memory}));
}

// CUDA launch: the binned kernel keeps num_segments x C fp32 sums and num_segments uint counts per
// block in dynamic shared memory when there are at most kSegmentSharedBins sums and they fit the
// device (one column and 6,145-8,192 segments need the opt-in above 48 KiB); otherwise rows add
// straight to global memory with atomics.
constexpr int64_t kSegmentSharedBins = 8192;
inline SharedMemPlan segment_sum_shared_plan(int64_t num_segments, int64_t c, int64_t optin_limit) {
  if (num_segments * c > kSegmentSharedBins) return {false, false, 0};
  return plan_shared_memory(num_segments * c * static_cast<int64_t>(sizeof(float)) +
                                num_segments * static_cast<int64_t>(sizeof(unsigned int)),
                            optin_limit);
}

// Validates arguments (shared by CPU and CUDA); returns C (1 for 1-D values).
int64_t segment_sum_check(const at::Tensor& values, const at::Tensor& segment_ids, int64_t num_segments,
                          const std::optional<at::Tensor>& mask);

std::tuple<at::Tensor, at::Tensor> segment_sum_cuda(const at::Tensor& values, const at::Tensor& segment_ids,
                                                    int64_t num_segments, const std::optional<at::Tensor>& mask);

}  // namespace mixkernels
