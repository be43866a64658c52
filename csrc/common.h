// Shared helpers for the CPU (.cpp) and CUDA (.cu) kernels of mixkernels.
//
// Per-element / per-tile arithmetic lives in MK_HD inline functions in per-op headers, so the
// CPU kernels (which the tests run) execute the very code the GPU kernels would run.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MK_HD __host__ __device__ __forceinline__
#else
#define MK_HD inline
#endif

namespace mixkernels {

// Argument checks shared by every op; the messages name the argument and the bad value.
inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "mixkernels: ", a_name, " is on ", a.device(), " but ", b_name, " is on ",
              b.device(), "; expected both on the same device");
}

inline void check_index_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, "mixkernels: ", name,
              " must be int32 or int64, got ", t.scalar_type());
}

// ---- launch plans: pure host functions of the sizes, so CPU tests check what a GPU launch would do
// (exposed to Python as mixkernels::_launch_plan, see csrc/launch_plan.cpp) ----------------------

// Dynamic shared memory a kernel gets without opting in through cudaFuncSetAttribute(...,
// cudaFuncAttributeMaxDynamicSharedMemorySize, ...).
constexpr int64_t kDefaultDynamicSharedBytes = 48 * 1024;
// Largest grid y (and z) dimension.
constexpr int64_t kMaxGridY = 65535;

struct SharedMemPlan {
  bool use_shared;  // false: take the kernel's global-memory path
  bool opt_in;      // true: raise the kernel's dynamic shared memory limit to `bytes` first
  int64_t bytes;    // dynamic shared memory per block (0 without shared memory)
};

// `bytes` per block of dynamic shared memory: used when it fits the device's opt-in limit
// (cudaDevAttrMaxSharedMemoryPerBlockOptin, `optin_limit`), with the opt-in above 48 KiB.
inline SharedMemPlan plan_shared_memory(int64_t bytes, int64_t optin_limit) {
  const int64_t limit = std::max(optin_limit, kDefaultDynamicSharedBytes);
  if (bytes <= 0 || bytes > limit) return {false, false, 0};
  return {true, bytes > kDefaultDynamicSharedBytes, bytes};
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "mixkernels: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

}  // namespace mixkernels
