// linear_ce / cross_entropy: shared declarations and the per-element math used by the CPU and
// CUDA kernels.
//
// For one row of scaled logits u [V] (u = logit_scale * (h W^T + b): the scale is applied by the
// driver, in the GEMM), fp32 (fp64 for gradcheck), label y, label smoothing eps, softcap C
// (0: off), z-loss weight lam (0: off):
//   z_j = C tanh(u_j / C)  (softcap on)  or  u_j                     (final logits)
//   m = max_j z_j,  s = sum_j exp(z_j - m),  lse = m + log s
//   loss = lse - (1 - eps) z_y - (eps / V) sum_j z_j                  (0 when y == ignore_index)
//   zl   = lam lse^2                                                  (0 when y == ignore_index)
//   dz_j = c ((1 + 2 lam lse) exp(z_j - lse) - eps / V) - c (1 - eps) [j == y]
//   du_j = dz_j (1 - (z_j / C)^2)  (softcap on)  or  dz_j
// (c: per-row upstream grad of loss + zl; the driver passes c * logit_scale, which makes du the
// gradient w.r.t. the raw logits h W^T + b.) The GEMMs around the per-chunk kernel (logits,
// dh = du W, dW += du^T h) go through ATen; see linear_ce_driver.
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

// tanh for the softcap. GPU: tanhf. CPU: branch-free so the row loops vectorise: an odd Taylor
// series for |x| < 0.3 (omitted x^13 term < 2e-9 relative), (1 - e) / (1 + e) with e = exp(-2|x|)
// above (cancellation costs at most ~2 ulp there; mk_expf's clamp makes huge |x| give exactly 1).
MK_HD_INLINE float mk_tanhf(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  const float a = x < 0.0f ? -x : x;
  const float e = mk_expf(-2.0f * a);
  const float big = (1.0f - e) / (1.0f + e);
  const float a2 = a * a;
  float p = -1382.0f / 155925.0f;
  p = p * a2 + 62.0f / 2835.0f;
  p = p * a2 - 17.0f / 315.0f;
  p = p * a2 + 2.0f / 15.0f;
  p = p * a2 - 1.0f / 3.0f;
  const float small = a + a * a2 * p;
  const float r = a < 0.3f ? small : big;
  return x < 0.0f ? -r : r;
#endif
}

MK_HD double mk_tanhf(double x) { return tanh(x); }

// Final logit from a scaled logit u: the softcap C tanh(u / C) (inv_cap = 1 / C), or u when C == 0.
template <typename T>
MK_HD_INLINE T ce_softcap(T u, T cap, T inv_cap) {
  return cap > T(0) ? cap * mk_tanhf(u * inv_cap) : u;
}

// d z / d u of the softcap, from the final logit z: 1 - tanh^2 = 1 - (z / C)^2 (what PyTorch's
// tanh backward computes too); 1 when the softcap is off.
template <typename T>
MK_HD_INLINE T ce_softcap_grad(T z, T cap, T inv_cap) {
  const T t = z * inv_cap;
  return cap > T(0) ? T(1) - t * t : T(1);
}

// z-loss of a counted token, and the factor d(lse + lam lse^2) / d lse that multiplies the softmax
// in the gradient (the z-loss gradient is 2 lam lse softmax).
template <typename T>
MK_HD T ce_z_loss(T lse, T lam) {
  return lam * lse * lse;
}
template <typename T>
MK_HD T ce_prob_coef(T lse, T lam) {
  return T(1) + T(2) * lam * lse;
}

// Token loss from the row statistics (eps: label smoothing; sum_z: sum of the row's logits).
template <typename T>
MK_HD T ce_token_loss(T lse, T z_y, T sum_z, T eps, int64_t v) {
  return lse - (T(1) - eps) * z_y - (eps != T(0) ? eps * sum_z / static_cast<T>(v) : T(0));
}

// Gradient element w.r.t. the final logit from p = exp(z - lse) (the softmax probability) and
// pc = ce_prob_coef(lse, lam) (1 without z-loss).
template <typename T>
MK_HD T ce_grad(T p, bool is_target, T eps, T inv_v, T coef, T pc = T(1)) {
  return coef * (pc * p - eps * inv_v - (is_target ? T(1) - eps : T(0)));
}

// Per-call options of the fused step.
struct CeParams {
  int64_t ignore_index;
  double eps;      // label smoothing
  double softcap;  // C > 0, or 0: off
  double z_loss;   // lam >= 0
};

MK_HD bool ce_label_valid(int64_t y, int64_t v) { return y >= 0 && y < v; }

// The per-chunk step of a backend, in place on a contiguous [R, V] acc-dtype chunk of scaled
// logits u (the kernel may overwrite it even without coef).
//   forward: writes lse[R], loss[R] (cross-entropy), zloss[R] when defined (the z-loss, 0 at
//            ignored rows); when coef is defined, overwrites the chunk with du (coef [R] is the
//            per-row upstream gradient times logit_scale, 0 at ignored rows); adds the CE loss and
//            count per group into group_acc/group_cnt when group_ids is defined. Reports a bad
//            label through TORCH_CHECK (CPU) or a device assert (CUDA).
//   grad:    overwrites the chunk with du from a given lse (recompute-in-backward).
struct CeKernels {
  void (*forward)(at::Tensor& z, const at::Tensor& labels, const CeParams& p, const at::Tensor& coef, at::Tensor& lse,
                  at::Tensor& loss, at::Tensor& zloss, const at::Tensor& group_ids, at::Tensor& group_acc,
                  at::Tensor& group_cnt, int64_t row_offset);
  void (*grad)(at::Tensor& z, const at::Tensor& labels, const CeParams& p, const at::Tensor& lse,
               const at::Tensor& coef);
  bool gemm_in_input_dtype;  // CUDA: tensor-core GEMMs in bf16/fp16; CPU: GEMMs in fp32
};

using LinearCeOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor>;
using CeOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Logit transform / z-loss options as the ops receive them (validated by check_loss_options).
struct LossOptions {
  double softcap;
  double logit_scale;
  double z_loss;
};
void check_loss_options(const LossOptions& o, const char* op);

LinearCeOut linear_ce_driver(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& group_ids,
                             int64_t num_groups, int64_t ignore_index, double label_smoothing, int64_t reduction,
                             int64_t chunk_size, bool compute_grad, bool weight_grad, const LossOptions& o,
                             const CeKernels& k);

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_backward_driver(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, const std::optional<at::Tensor>& bias,
    const at::Tensor& lse, const at::Tensor& grad_token, int64_t ignore_index, double label_smoothing,
    int64_t chunk_size, const LossOptions& o, const CeKernels& k);

CeOut cross_entropy_driver(const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& group_ids,
                           int64_t num_groups, int64_t ignore_index, double label_smoothing, int64_t reduction,
                           const LossOptions& o, const CeKernels& k);

at::Tensor cross_entropy_backward_driver(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                         const at::Tensor& grad_token, int64_t ignore_index, double label_smoothing,
                                         const LossOptions& o, const CeKernels& k);

}  // namespace mixkernels
