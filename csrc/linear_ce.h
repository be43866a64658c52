// linear_ce / cross_entropy: shared declarations and the per-element math used by the CPU and
// CUDA kernels.
//
// For one row of logits z [V] (fp32, or fp64 for gradcheck), label y, label smoothing eps:
//   m = max_j z_j,  s = sum_j exp(z_j - m),  lse = m + log s
//   loss = lse - (1 - eps) z_y - (eps / V) sum_j z_j                  (0 when y == ignore_index)
//   dz_j = c (exp(z_j - lse) - eps / V) - c (1 - eps) [j == y]        (c: per-row upstream grad)
// The GEMMs around the per-chunk kernel (logits = h W^T + b, dh = dz W, dW += dz^T h) go through
// ATen; see linear_ce_driver.
#pragma once

#include "common.h"

#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>

// Host: force inlining so the (target_clones) row loops that call mk_expf vectorise it.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MK_HD_INLINE MK_HD
#elif defined(__GNUC__)
#define MK_HD_INLINE inline __attribute__((always_inline))
#else
#define MK_HD_INLINE inline
#endif

namespace mixkernels {

// exp for the fused row kernels. GPU: the hardware exp2-based intrinsic. CPU: range reduction to
// |r| <= ln2/2 and a degree-7 Taylor polynomial (max rel. error ~5e-9 < fp32 ulp), written
// branch-free with only arithmetic and a bit cast, so GCC vectorises the row loops that call it
// (glibc's expf would make every row loop scalar).
MK_HD_INLINE float mk_expf(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // keeps 2^k a normal float
  const float kf = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
  float r = x - kf * 0.693145751953125f;  // ln2 split in two for an exact-ish reduction
  r = r - kf * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(float));
  return p * two_k;
#endif
}

MK_HD double mk_expf(double x) { return exp(x); }

// Token loss from the row statistics (eps: label smoothing; sum_z: sum of the row's logits).
template <typename T>
MK_HD T ce_token_loss(T lse, T z_y, T sum_z, T eps, int64_t v) {
  return lse - (T(1) - eps) * z_y - (eps != T(0) ? eps * sum_z / static_cast<T>(v) : T(0));
}

// Gradient element from p = exp(z - lse) (the softmax probability).
template <typename T>
MK_HD T ce_grad(T p, bool is_target, T eps, T inv_v, T coef) {
  return coef * (p - eps * inv_v - (is_target ? T(1) - eps : T(0)));
}

MK_HD bool ce_label_valid(int64_t y, int64_t v) { return y >= 0 && y < v; }

// The per-chunk step of a backend, in place on a contiguous [R, V] acc-dtype logits chunk.
//   forward: writes lse[R], loss[R]; when coef is defined, overwrites z with dz (coef [R] is the
//            per-row upstream gradient, 0 at ignored rows); adds loss/count per group into
//            group_acc/group_cnt when group_ids is defined. Reports a bad label through TORCH_CHECK
//            (CPU) or a device assert (CUDA).
//   grad:    overwrites z with dz from a given lse (recompute-in-backward).
struct CeKernels {
  void (*forward)(at::Tensor& z, const at::Tensor& labels, int64_t ignore_index, double eps, const at::Tensor& coef,
                  at::Tensor& lse, at::Tensor& loss, const at::Tensor& group_ids, at::Tensor& group_acc,
                  at::Tensor& group_cnt, int64_t row_offset);
  void (*grad)(at::Tensor& z, const at::Tensor& labels, int64_t ignore_index, double eps, const at::Tensor& lse,
               const at::Tensor& coef);
  bool gemm_in_input_dtype;  // CUDA: tensor-core GEMMs in bf16/fp16; CPU: GEMMs in fp32
};

using LinearCeOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor>;
using CeOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

LinearCeOut linear_ce_driver(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& group_ids,
                             int64_t num_groups, int64_t ignore_index, double label_smoothing, int64_t reduction,
                             int64_t chunk_size, bool compute_grad, bool weight_grad, const CeKernels& k);

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_backward_driver(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, const std::optional<at::Tensor>& bias,
    const at::Tensor& lse, const at::Tensor& grad_token, int64_t ignore_index, double label_smoothing,
    int64_t chunk_size, const CeKernels& k);

CeOut cross_entropy_driver(const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& group_ids,
                           int64_t num_groups, int64_t ignore_index, double label_smoothing, int64_t reduction,
                           const CeKernels& k);

at::Tensor cross_entropy_backward_driver(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                         const at::Tensor& grad_token, int64_t ignore_index, double label_smoothing,
                                         const CeKernels& k);

}  // namespace mixkernels
