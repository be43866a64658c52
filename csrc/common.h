// Shared helpers for the CPU (.cpp) and CUDA (.cu) kernels of mixkernels.
//
// Per-element / per-tile arithmetic lives in MK_HD inline functions in per-op headers, so the
// CPU kernels (which the tests run) execute the very code the GPU kernels would run.
#pragma once

#include <ATen/ATen.h>

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

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "mixkernels: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

}  // namespace mixkernels
