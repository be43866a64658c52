// linear_ce / cross_entropy, CUDA kernels for the fused per-chunk step.
//
// The chunk driver (csrc/linear_ce.cpp, linear_ce_driver) runs the GEMMs through ATen in the
// input dtype (tensor cores; fp32 accumulate), upcasts each [R, V] logits chunk to fp32 and calls
// these kernels: one block per row, 512 threads striding over the vocabulary. The chunk holds the
// scaled logits u (logit_scale applied by the GEMM); the final logit z = softcap(u) is recomputed
// from u where needed (the row is written only once, with the gradient).
//   forward: per-thread online (max, sum exp) of z -> block reduction -> lse; sum z (label
//            smoothing); thread 0 reads z_y, writes lse/loss/z-loss and adds the loss to its group
//            (double atomics, one per row) before any thread overwrites the row with
//            du_j = [c ((1 + 2 lam lse) exp(z_j - lse) - eps / V) - c (1 - eps) [j == y]] softcap'(z_j)
//            (c = per-row upstream grad times logit_scale)
//   grad:    the same du from a saved lse (recompute-in-backward for reduction "none").
// Per-element math comes from csrc/linear_ce.h (ce_softcap, ce_softcap_grad, ce_token_loss,
// ce_z_loss, ce_prob_coef, ce_grad, mk_expf), the same functions the CPU kernels run. int64 offsets (row * V may exceed 2^31). Bad labels / group ids
// trip a device-side assert (no host sync). This file cannot run on the development machines
// (no GPU); it must compile.
#include "../linear_ce.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

namespace mixkernels {
namespace {

constexpr int kThreads = 512;

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// Merge two (max, sum exp(x - max)) partials.
template <typename T>
__device__ __forceinline__ void lse_combine(T& m, T& s, T m2, T s2) {
  const T mn = m > m2 ? m : m2;
  if (mn == neg_inf<T>()) return;  // both partials empty
  s = s * mk_expf(m - mn) + s2 * mk_expf(m2 - mn);
  m = mn;
}

template <typename T>
__device__ void block_reduce_lse(T& m, T& s) {
  __shared__ T sh_m[32];
  __shared__ T sh_s[32];
  for (int off = 16; off > 0; off >>= 1) {
    const T m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const T s2 = __shfl_xor_sync(0xffffffffu, s, off);
    lse_combine(m, s, m2, s2);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sh_m[warp] = m;
    sh_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
    m = lane < warps ? sh_m[lane] : neg_inf<T>();
    s = lane < warps ? sh_s[lane] : T(0);
    for (int off = 16; off > 0; off >>= 1) {
      const T m2 = __shfl_xor_sync(0xffffffffu, m, off);
      const T s2 = __shfl_xor_sync(0xffffffffu, s, off);
      lse_combine(m, s, m2, s2);
    }
    if (lane == 0) {
      sh_m[0] = m;
      sh_s[0] = s;
    }
  }
  __syncthreads();
  m = sh_m[0];
  s = sh_s[0];
  __syncthreads();  // the shared slots may be reused by the next reduction
}

template <typename T>
__device__ T block_reduce_sum(T x) {
  __shared__ T sh[32];
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < static_cast<int>(blockDim.x >> 5) ? sh[lane] : T(0);
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    if (lane == 0) sh[0] = x;
  }
  __syncthreads();
  x = sh[0];
  __syncthreads();
  return x;
}

template <typename T>
__global__ void ce_forward_kernel(T* __restrict__ z, const int64_t* __restrict__ y, const T* __restrict__ coef,
                                  T* __restrict__ lse, T* __restrict__ loss, T* __restrict__ zl,
                                  const int64_t* __restrict__ gid, double* __restrict__ gacc,
                                  unsigned long long* __restrict__ gcnt, int64_t v, int64_t ignore_index, T eps,
                                  T cap, T inv_cap, T lam, int64_t num_groups) {
  const int64_t row = blockIdx.x;
  T* zr = z + row * v;
  const int64_t label = y[row];
  CUDA_KERNEL_ASSERT((label == ignore_index || ce_label_valid(label, v)) &&
                     "mixkernels.linear_cross_entropy: label out of range [0, V) and not ignore_index");
  const bool counted = label != ignore_index && ce_label_valid(label, v);
  T m = neg_inf<T>(), s = T(0), sum_z = T(0);
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
    const T x = ce_softcap(zr[j], cap, inv_cap);
    if (x > m) {
      s = s * mk_expf(m - x) + T(1);
      m = x;
    } else {
      s += mk_expf(x - m);
    }
    sum_z += x;
  }
  block_reduce_lse(m, s);
  if (eps != T(0)) sum_z = block_reduce_sum(sum_z);
  const T l = m + log(s);
  if (threadIdx.x == 0) {
    const T z_y = counted ? ce_softcap(zr[label], cap, inv_cap) : T(0);
    const T token = counted ? ce_token_loss<T>(l, z_y, sum_z, eps, v) : T(0);
    lse[row] = l;
    loss[row] = token;
    if (zl != nullptr) zl[row] = counted ? ce_z_loss<T>(l, lam) : T(0);
    if (gid != nullptr && counted) {
      const int64_t g = gid[row];
      CUDA_KERNEL_ASSERT(g >= 0 && g < num_groups && "mixkernels.linear_cross_entropy: group id out of range");
      if (g >= 0 && g < num_groups) {
        atomicAdd(gacc + g, static_cast<double>(token));
        atomicAdd(gcnt + g, 1ull);
      }
    }
  }
  if (coef == nullptr) return;
  __syncthreads();  // z_y was read before the row is overwritten
  const T c = counted ? coef[row] : T(0);
  const T inv_v = T(1) / static_cast<T>(v);
  const T pc = ce_prob_coef<T>(l, lam);
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
    const T x = ce_softcap(zr[j], cap, inv_cap);
    zr[j] = c == T(0) ? T(0)
                      : ce_grad<T>(mk_expf(x - l), j == label, eps, inv_v, c, pc) * ce_softcap_grad(x, cap, inv_cap);
  }
}

template <typename T>
__global__ void ce_grad_kernel(T* __restrict__ z, const int64_t* __restrict__ y, const T* __restrict__ lse,
                               const T* __restrict__ coef, int64_t v, int64_t ignore_index, T eps, T cap, T inv_cap,
                               T lam) {
  const int64_t row = blockIdx.x;
  T* zr = z + row * v;
  const int64_t label = y[row];
  const bool counted = label != ignore_index && ce_label_valid(label, v);
  const T c = counted ? coef[row] : T(0);
  const T l = lse[row];
  const T inv_v = T(1) / static_cast<T>(v);
  const T pc = ce_prob_coef<T>(l, lam);
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
    const T x = ce_softcap(zr[j], cap, inv_cap);
    zr[j] = c == T(0) ? T(0)
                      : ce_grad<T>(mk_expf(x - l), j == label, eps, inv_v, c, pc) * ce_softcap_grad(x, cap, inv_cap);
  }
}

void forward_cuda(at::Tensor& z, const at::Tensor& labels, const CeParams& p, const at::Tensor& coef, at::Tensor& lse,
                  at::Tensor& loss, at::Tensor& zl, const at::Tensor& groups, at::Tensor& group_acc,
                  at::Tensor& group_cnt, int64_t /*row_offset*/) {
  const int64_t r = z.size(0), v = z.size(1);
  if (r == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  auto* gcnt = groups.defined() ? reinterpret_cast<unsigned long long*>(group_cnt.data_ptr<int64_t>()) : nullptr;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "linear_ce_forward_cuda", [&] {
    const scalar_t cap = static_cast<scalar_t>(p.softcap);
    ce_forward_kernel<scalar_t><<<static_cast<unsigned int>(r), kThreads, 0, stream>>>(
        z.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), coef.defined() ? coef.data_ptr<scalar_t>() : nullptr,
        lse.data_ptr<scalar_t>(), loss.data_ptr<scalar_t>(), zl.defined() ? zl.data_ptr<scalar_t>() : nullptr,
        groups.defined() ? groups.data_ptr<int64_t>() : nullptr,
        groups.defined() ? group_acc.data_ptr<double>() : nullptr, gcnt, v, p.ignore_index,
        static_cast<scalar_t>(p.eps), cap, cap > scalar_t(0) ? scalar_t(1) / cap : scalar_t(0),
        static_cast<scalar_t>(p.z_loss), group_acc.size(0));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void grad_cuda(at::Tensor& z, const at::Tensor& labels, const CeParams& p, const at::Tensor& lse,
               const at::Tensor& coef) {
  const int64_t r = z.size(0), v = z.size(1);
  if (r == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "linear_ce_grad_cuda", [&] {
    const scalar_t cap = static_cast<scalar_t>(p.softcap);
    ce_grad_kernel<scalar_t><<<static_cast<unsigned int>(r), kThreads, 0, stream>>>(
        z.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), lse.data_ptr<scalar_t>(), coef.data_ptr<scalar_t>(), v,
        p.ignore_index, static_cast<scalar_t>(p.eps), cap, cap > scalar_t(0) ? scalar_t(1) / cap : scalar_t(0),
        static_cast<scalar_t>(p.z_loss));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

constexpr CeKernels kCudaKernels{&forward_cuda, &grad_cuda, /*gemm_in_input_dtype=*/true};

LinearCeOut linear_ce_cuda(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& group_ids,
                           int64_t num_groups, int64_t ignore_index, double label_smoothing, int64_t reduction,
                           int64_t chunk_size, bool compute_grad, bool weight_grad, double softcap, double logit_scale,
                           double z_loss) {
  c10::cuda::CUDAGuard guard(hidden.device());
  return linear_ce_driver(hidden, weight, labels, bias, group_ids, num_groups, ignore_index, label_smoothing,
                          reduction, chunk_size, compute_grad, weight_grad, {softcap, logit_scale, z_loss},
                          kCudaKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_backward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, const std::optional<at::Tensor>& bias,
    const at::Tensor& lse, const at::Tensor& grad_token, int64_t ignore_index, double label_smoothing,
    int64_t chunk_size, double softcap, double logit_scale, double z_loss) {
  c10::cuda::CUDAGuard guard(hidden.device());
  return linear_ce_backward_driver(hidden, weight, labels, bias, lse, grad_token, ignore_index, label_smoothing,
                                   chunk_size, {softcap, logit_scale, z_loss}, kCudaKernels);
}

CeOut cross_entropy_cuda(const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& group_ids,
                         int64_t num_groups, int64_t ignore_index, double label_smoothing, int64_t reduction,
                         double softcap, double logit_scale, double z_loss) {
  c10::cuda::CUDAGuard guard(logits.device());
  return cross_entropy_driver(logits, labels, group_ids, num_groups, ignore_index, label_smoothing, reduction,
                              {softcap, logit_scale, z_loss}, kCudaKernels);
}

at::Tensor cross_entropy_backward_cuda(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                       const at::Tensor& grad_token, int64_t ignore_index, double label_smoothing,
                                       double softcap, double logit_scale, double z_loss) {
  c10::cuda::CUDAGuard guard(logits.device());
  return cross_entropy_backward_driver(logits, labels, lse, grad_token, ignore_index, label_smoothing,
                                       {softcap, logit_scale, z_loss}, kCudaKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(mixkernels, CUDA, m) {
  m.impl("linear_ce", &linear_ce_cuda);
  m.impl("linear_ce_backward", &linear_ce_backward_cuda);
  m.impl("cross_entropy", &cross_entropy_cuda);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cuda);
}

}  // namespace mixkernels
