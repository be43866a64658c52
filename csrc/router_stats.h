// router_stats: shared declarations and the per-token math of the CPU and CUDA kernels.
//
// For one token's logits z[0..E) (any float dtype, math in acc_t = float, or double for float64):
//   m      = max_e z_e
//   x_e    = z_e - m                       (<= 0)
//   s      = sum_e router_exp(x_e)
//   p_e    = router_exp(x_e) * (1 / s)     (the probability every kernel uses, selection included)
//   H      = log s - (1 / s) sum_{e : p_e > 0} router_exp(x_e) x_e    (= -sum p log p, 0 log 0 = 0)
//   top-k  = the k largest p_e scanned in expert order with strict '>' against the current k-th
//            value, so exact ties keep the lower expert index (router_topk_insert)
// Backward for a counted token with upstream a[e] (d/dprob_sum row) and b (d/dentropy_sum):
//   dz_e   = p_e (a_e - <p, a>) - b p_e (log p_e + H),   log p_e = x_e - log s
#pragma once

#include "common.h"

#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace mixkernels {

// exp(x) for x <= 0 in fp32: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, the degree-7
// Taylor polynomial of e^r (truncation < 1e-8 relative), then scaling by 2^n through the exponent bits.
// Relative error ~2 ulp; branch-free so the CPU loop vectorises. Returns exactly 0 below
// -87.3 (where fp32 would go denormal) and for -inf, so a masked-out (-inf) expert has p = 0.
MK_HD float router_exp(float x) {
  const bool underflow = !(x >= -87.3f);  // also catches -inf (NaN propagates below)
  x = x < -87.3f ? -87.3f : x;
  const float n = floorf(x * 1.44269504088896341f + 0.5f);
  float r = fmaf(n, -0.693359375f, x);  // ln2 split in a short high part ...
  r = fmaf(n, 2.12194440e-4f, r);       // ... and the low remainder
  float poly = 1.f / 5040.f;
  poly = fmaf(poly, r, 1.f / 720.f);
  poly = fmaf(poly, r, 1.f / 120.f);
  poly = fmaf(poly, r, 1.f / 24.f);
  poly = fmaf(poly, r, 1.f / 6.f);
  poly = fmaf(poly, r, 0.5f);
  poly = fmaf(poly, r, 1.f);
  poly = fmaf(poly, r, 1.f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
#if defined(__CUDA_ARCH__)
  scale = __int_as_float(bits);
#elif defined(__CUDACC__)
  memcpy(&scale, &bits, sizeof(float));  // host pass of nvcc (never the hot path)
#else
  scale = __builtin_bit_cast(float, bits);  // (a memcpy here would stop the CPU loop vectorising)
#endif
  return underflow && x == x ? 0.f : poly * scale;
}

MK_HD double router_exp(double x) { return exp(x); }

MK_HD float router_log(float x) { return logf(x); }
MK_HD double router_log(double x) { return log(x); }

// Entropy of a token from s = sum_e exp(x_e), dot = sum_e exp(x_e) x_e and inv = 1 / s.
template <typename acc_t>
MK_HD acc_t router_entropy(acc_t s, acc_t dot, acc_t inv) {
  return router_log(s) - dot * inv;
}

// Insert (v, e) into the descending list vals/idx of length *filled (capacity k). Called for
// e = 0, 1, 2, ... in order; strict comparisons keep the earlier (lower) index ahead on ties.
template <typename acc_t>
MK_HD void router_topk_insert(acc_t v, int32_t e, acc_t* vals, int32_t* idx, int32_t* filled, int32_t k) {
  int32_t pos;
  if (*filled < k) {
    pos = *filled;
    *filled += 1;
  } else if (v > vals[k - 1]) {
    pos = k - 1;
  } else {
    return;
  }
  while (pos > 0 && v > vals[pos - 1]) {
    vals[pos] = vals[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  vals[pos] = v;
  idx[pos] = e;
}

// Per-token gradient term of the backward (see the header comment), for one expert.
template <typename acc_t>
MK_HD acc_t router_grad_term(acc_t p, acc_t x, acc_t log_s, acc_t entropy, acc_t a, acc_t pa, acc_t b) {
  const acc_t log_p = x - log_s;
  const acc_t ent_term = p > acc_t(0) ? p * (log_p + entropy) : acc_t(0);
  return p * (a - pa) - b * ent_term;
}

MK_HD bool router_token_counted(const bool* mask, int64_t t) { return mask == nullptr || mask[t]; }

// Whether the CPU kernels run their AVX2+FMA build (CPU support, and MIXKERNELS_NO_AVX2 unset).
bool router_stats_use_avx2();

// Validated shapes of a router_stats call.
struct RouterStatsDims {
  int64_t layers;
  int64_t tokens;
  int64_t experts;
};

// CUDA launch: the forward kernel bins [G, E] probability sums and [G] entropy sums (acc_bytes
// each: 4 for fp32, 8 for fp64 inputs) plus as many uint counts per block in dynamic shared memory
// when G x E <= kRouterSharedBins and they fit the device (fp64 near G x E = 4,096 needs the opt-in
// above 48 KiB); otherwise it adds to global memory with atomics.
constexpr int64_t kRouterSharedBins = 4096;
inline SharedMemPlan router_stats_shared_plan(int64_t num_groups, int64_t num_experts, int64_t acc_bytes,
                                              int64_t optin_limit) {
  if (num_groups * num_experts > kRouterSharedBins) return {false, false, 0};
  return plan_shared_memory((num_groups * num_experts + num_groups) *
                                (acc_bytes + static_cast<int64_t>(sizeof(unsigned int))),
                            optin_limit);
}

// Checks shared by CPU and CUDA (names the argument and the value); returns L, N, E.
RouterStatsDims router_stats_check(const std::vector<at::Tensor>& logits, int64_t top_k,
                                   const std::optional<at::Tensor>& group_ids, int64_t num_groups,
                                   const std::optional<at::Tensor>& mask, const char* op);

// Logits as one strided view: base pointer per layer plus row stride (E contiguous).
std::vector<at::Tensor> router_stats_rows_contiguous(const std::vector<at::Tensor>& logits);

// aux_loss[l] = E * sum_e C_le P_le / T^2 from reduced counts (int64 [L, G, E]) and prob sums.
at::Tensor router_aux_loss(const at::Tensor& counts, const at::Tensor& prob_sum, const at::Tensor& token_count);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> router_stats_cuda(
    const std::vector<at::Tensor>& logits, int64_t top_k, const std::optional<at::Tensor>& group_ids,
    int64_t num_groups, const std::optional<at::Tensor>& mask);

std::vector<at::Tensor> router_stats_backward_cuda(const std::vector<at::Tensor>& logits,
                                                   const std::optional<at::Tensor>& group_ids, int64_t num_groups,
                                                   const std::optional<at::Tensor>& mask,
                                                   const at::Tensor& grad_prob_sum,
                                                   const at::Tensor& grad_entropy_sum);

}  // namespace mixkernels
