// mixkernels::_launch_plan: the host-side launch decisions of the CUDA kernels, callable on CPU so
// tests check them on machines without a GPU (the launchers in csrc/cuda/*.cu call the same
// functions). Returns:
//   "segment_sum"  [num_segments, C, optin_bytes]              -> [use_shared, opt_in, bytes]
//   "router_stats" [groups, experts, acc_bytes, optin_bytes]    -> [use_shared, opt_in, bytes]
//   "project_rows" [rows]                                       -> [grid_y, rows_per_tile]
// (optin_bytes: the device's cudaDevAttrMaxSharedMemoryPerBlockOptin.)
#include "project.h"
#include "router_stats.h"
#include "segment_sum.h"

#include <torch/library.h>

#include <string>
#include <vector>

namespace mixkernels {
namespace {

std::vector<int64_t> plan_out(const SharedMemPlan& p) {
  return {p.use_shared ? 1 : 0, p.opt_in ? 1 : 0, p.bytes};
}

void check_sizes(const std::string& kernel, at::IntArrayRef sizes, size_t n, const char* names) {
  TORCH_CHECK(sizes.size() == n, "mixkernels._launch_plan: ", kernel, " takes [", names, "], got ", sizes.size(),
              " sizes");
}

std::vector<int64_t> launch_plan(const at::Tensor& /*device_hint*/, c10::string_view kernel_view,
                                 at::IntArrayRef sizes) {
  const std::string kernel(kernel_view);
  if (kernel == "segment_sum") {
    check_sizes(kernel, sizes, 3, "num_segments, C, optin_bytes");
    return plan_out(segment_sum_shared_plan(sizes[0], sizes[1], sizes[2]));
  }
  if (kernel == "router_stats") {
    check_sizes(kernel, sizes, 4, "groups, experts, acc_bytes, optin_bytes");
    return plan_out(router_stats_shared_plan(sizes[0], sizes[1], sizes[2], sizes[3]));
  }
  if (kernel == "project_rows") {
    check_sizes(kernel, sizes, 1, "rows");
    return {proj_grid_y(sizes[0]), kProjRowTile};
  }
  TORCH_CHECK(false, "mixkernels._launch_plan: unknown kernel '", kernel,
              "'; expected 'segment_sum', 'router_stats' or 'project_rows'");
}

}  // namespace

TORCH_LIBRARY_IMPL(mixkernels, CPU, m) { m.impl("_launch_plan", &launch_plan); }

}  // namespace mixkernels
