// router_stats, CUDA kernels (compile-checked in CI; no GPU to run them on here).
//
// Forward: one warp per token (grid-stride over tokens; blockIdx.y = layer within a launch of up
// to kMaxLayersPerLaunch layers). Lanes stride over the experts e = lane, lane + 32, ...:
//   1. m = warp max of z,  2. s = warp sum of router_exp(z - m), dot = warp sum of exp(x) x,
//   3. p_e = router_exp(x_e) * (1 / s) added to the block's shared [G, E] bins,
//   4. top-k: k rounds of a warp arg-max over the experts not yet chosen (ties -> lower index,
//      exactly router_topk_insert's set), each winner counted in the shared bins.
// The per-element arithmetic (router_exp, router_entropy) is the MK_HD code of router_stats.h
// that the CPU kernel runs under test. Blocks flush bins to global memory with atomics (int64
// counts through unsigned long long atomics). When G * E does not fit in shared memory
// (router_stats_shared_plan in ../router_stats.h, opting in above 48 KiB where the device allows) the
// warps add straight to global memory. aux_loss is formed from the reduced tensors with ATen.
// Float atomics: the last bits of prob_sum / entropy_sum vary run to run (CPU is bitwise
// deterministic). An out-of-range group id trips a device-side assert (no host sync).
//
// Backward: one warp per token recomputes m, s, dot, then <p, a> and writes
// dz_e = router_grad_term(...) for its experts; masked tokens get zeros.
#include "../router_stats.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>

namespace mixkernels {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int64_t kMaxExperts = 32 * 32;  // one chosen-bit per (lane, slot): 32 slots per lane
constexpr int kMaxLayersPerLaunch = 64;

template <typename scalar_t>
struct LayerPointers {
  const scalar_t* ptr[kMaxLayersPerLaunch];
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const acc_t other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Warp arg-max of (v, e) pairs: larger v wins, equal v -> lower e. NaN never wins.
template <typename acc_t>
__device__ __forceinline__ void warp_argmax(acc_t& v, int32_t& e) {
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const acc_t ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int32_t oe = __shfl_xor_sync(0xffffffffu, e, o);
    if (ov > v || (ov == v && oe < e)) {
      v = ov;
      e = oe;
    }
  }
}

template <typename scalar_t, typename acc_t, typename index_t, bool kShared>
__global__ void router_stats_forward_kernel(LayerPointers<scalar_t> layers, int64_t layer_offset, int64_t row_stride,
                                            int64_t n, int64_t num_experts, int32_t top_k,
                                            const index_t* __restrict__ group_ids, const bool* __restrict__ mask,
                                            int64_t num_groups, acc_t* __restrict__ prob_sum,
                                            unsigned long long* __restrict__ counts, acc_t* __restrict__ entropy_sum,
                                            unsigned long long* __restrict__ token_count) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* bins_p = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* bins_h = bins_p + (kShared ? num_groups * num_experts : 0);
  unsigned int* bins_c = reinterpret_cast<unsigned int*>(bins_h + (kShared ? num_groups : 0));
  unsigned int* bins_t = bins_c + (kShared ? num_groups * num_experts : 0);
  const int64_t ge = num_groups * num_experts;
  if (kShared) {
    for (int64_t i = threadIdx.x; i < ge; i += blockDim.x) {
      bins_p[i] = acc_t(0);
      bins_c[i] = 0u;
    }
    for (int64_t i = threadIdx.x; i < num_groups; i += blockDim.x) {
      bins_h[i] = acc_t(0);
      bins_t[i] = 0u;
    }
    __syncthreads();
  }
  const int64_t layer = layer_offset + blockIdx.y;
  const scalar_t* base = layers.ptr[blockIdx.y];
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const bool count_tokens = layer == 0;
  acc_t* out_p = prob_sum + layer * ge;
  unsigned long long* out_c = counts + layer * ge;
  acc_t* out_h = entropy_sum + layer * num_groups;

  for (int64_t t = warp; t < n; t += warps) {
    if (!router_token_counted(mask, t)) continue;
    const int64_t g = group_ids ? static_cast<int64_t>(group_ids[t]) : 0;
    CUDA_KERNEL_ASSERT(g >= 0 && g < num_groups && "mixkernels.router_stats: group id out of range");
    if (g < 0 || g >= num_groups) continue;
    const scalar_t* row = base + t * row_stride;
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t e = lane; e < num_experts; e += kWarp) {
      const acc_t v = static_cast<acc_t>(row[e]);
      m = v > m ? v : m;
    }
    m = warp_max(m);
    acc_t s = 0, dot = 0;
    for (int64_t e = lane; e < num_experts; e += kWarp) {
      const acc_t x = static_cast<acc_t>(row[e]) - m;
      const acc_t ex = router_exp(x);
      s += ex;
      dot += ex > acc_t(0) ? ex * x : acc_t(0);
    }
    s = warp_sum(s);
    dot = warp_sum(dot);
    const acc_t inv = acc_t(1) / s;
    for (int64_t e = lane; e < num_experts; e += kWarp) {
      const acc_t p = router_exp(static_cast<acc_t>(row[e]) - m) * inv;
      if (kShared) atomicAdd(&bins_p[g * num_experts + e], p);
      else atomicAdd(&out_p[g * num_experts + e], p);
    }
    if (lane == 0) {
      const acc_t h = router_entropy(s, dot, inv);
      if (kShared) {
        atomicAdd(&bins_h[g], h);
        if (count_tokens) atomicAdd(&bins_t[g], 1u);
      } else {
        atomicAdd(&out_h[g], h);
        if (count_tokens) atomicAdd(&token_count[g], 1ull);
      }
    }
    uint32_t chosen = 0u;  // bit j: expert lane + 32 j already selected
    for (int32_t round = 0; round < top_k; ++round) {
      acc_t best = -std::numeric_limits<acc_t>::infinity();
      int32_t best_e = std::numeric_limits<int32_t>::max();
      int32_t slot = 0;
      for (int64_t e = lane; e < num_experts; e += kWarp, ++slot) {
        if (chosen & (1u << slot)) continue;
        const acc_t p = router_exp(static_cast<acc_t>(row[e]) - m) * inv;
        if (p > best) {  // strict: on ties the lower e (seen first) is kept; NaN never enters
          best = p;
          best_e = static_cast<int32_t>(e);
        }
      }
      warp_argmax(best, best_e);
      if (best_e == std::numeric_limits<int32_t>::max()) break;  // NaN row
      if (best_e % kWarp == lane) chosen |= 1u << (best_e / kWarp);
      if (lane == 0) {
        if (kShared) atomicAdd(&bins_c[g * num_experts + best_e], 1u);
        else atomicAdd(&out_c[g * num_experts + best_e], 1ull);
      }
    }
  }
  if (kShared) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < ge; i += blockDim.x) {
      if (bins_p[i] != acc_t(0)) atomicAdd(&out_p[i], bins_p[i]);
      if (bins_c[i] != 0u) atomicAdd(&out_c[i], static_cast<unsigned long long>(bins_c[i]));
    }
    for (int64_t i = threadIdx.x; i < num_groups; i += blockDim.x) {
      if (bins_h[i] != acc_t(0)) atomicAdd(&out_h[i], bins_h[i]);
      if (count_tokens && bins_t[i] != 0u) atomicAdd(&token_count[i], static_cast<unsigned long long>(bins_t[i]));
    }
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void router_stats_backward_kernel(const scalar_t* __restrict__ logits, scalar_t* __restrict__ grad,
                                             int64_t layer, int64_t row_stride, int64_t n, int64_t num_experts,
                                             const index_t* __restrict__ group_ids, const bool* __restrict__ mask,
                                             int64_t num_groups, const acc_t* __restrict__ grad_prob_sum,
                                             const acc_t* __restrict__ grad_entropy_sum) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  for (int64_t t = warp; t < n; t += warps) {
    scalar_t* out = grad + t * num_experts;
    const int64_t g = group_ids ? static_cast<int64_t>(group_ids[t]) : 0;
    if (!router_token_counted(mask, t) || g < 0 || g >= num_groups) {
      for (int64_t e = lane; e < num_experts; e += kWarp) out[e] = scalar_t(0);
      continue;
    }
    const scalar_t* row = logits + t * row_stride;
    const acc_t* a = grad_prob_sum + (layer * num_groups + g) * num_experts;
    const acc_t b = grad_entropy_sum[layer * num_groups + g];
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t e = lane; e < num_experts; e += kWarp) {
      const acc_t v = static_cast<acc_t>(row[e]);
      m = v > m ? v : m;
    }
    m = warp_max(m);
    acc_t s = 0, dot = 0, pa_unnorm = 0;
    for (int64_t e = lane; e < num_experts; e += kWarp) {
      const acc_t x = static_cast<acc_t>(row[e]) - m;
      const acc_t ex = router_exp(x);
      s += ex;
      dot += ex > acc_t(0) ? ex * x : acc_t(0);
      pa_unnorm += ex * a[e];
    }
    s = warp_sum(s);
    dot = warp_sum(dot);
    pa_unnorm = warp_sum(pa_unnorm);
    const acc_t inv = acc_t(1) / s;
    const acc_t log_s = router_log(s);
    const acc_t h = router_entropy(s, dot, inv);
    const acc_t pa = pa_unnorm * inv;
    for (int64_t e = lane; e < num_experts; e += kWarp) {
      const acc_t x = static_cast<acc_t>(row[e]) - m;
      const acc_t p = router_exp(x) * inv;
      out[e] = static_cast<scalar_t>(router_grad_term<acc_t>(p, x, log_s, h, a[e], pa, b));
    }
  }
}

int64_t grid_blocks(int64_t n, int64_t layers_in_launch) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = (n + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t cap = std::max<int64_t>(1, static_cast<int64_t>(sms) * 8 / std::max<int64_t>(1, layers_in_launch));
  return std::max<int64_t>(1, std::min(wanted, cap));
}

template <typename F>
void dispatch_index_cuda(const at::Tensor& ids, F&& f) {
  if (ids.defined() && ids.scalar_type() == at::kInt) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

std::vector<at::Tensor> uniform_rows_cuda(const std::vector<at::Tensor>& logits) {
  std::vector<at::Tensor> rows = router_stats_rows_contiguous(logits);
  for (const auto& t : rows) {
    if (t.stride(0) != rows[0].stride(0)) {
      for (auto& r : rows) r = r.contiguous();
      break;
    }
  }
  return rows;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> router_stats_cuda(
    const std::vector<at::Tensor>& logits, int64_t top_k, const std::optional<at::Tensor>& group_ids,
    int64_t num_groups, const std::optional<at::Tensor>& mask) {
  const RouterStatsDims d = router_stats_check(logits, top_k, group_ids, num_groups, mask, "mixkernels.router_stats");
  TORCH_CHECK(d.experts <= kMaxExperts, "mixkernels.router_stats: the CUDA kernel supports E <= ", kMaxExperts,
              " experts, got E = ", d.experts, "; use the triton or reference backend");
  c10::cuda::CUDAGuard guard(logits[0].device());
  const auto in_type = logits[0].scalar_type();
  const auto acc_type = in_type == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logits[0].options();
  at::Tensor prob_sum = at::zeros({d.layers, num_groups, d.experts}, opts.dtype(acc_type));
  at::Tensor entropy_sum = at::zeros({d.layers, num_groups}, opts.dtype(acc_type));
  at::Tensor counts = at::zeros({d.layers, num_groups, d.experts}, opts.dtype(at::kLong));
  at::Tensor tokens = at::zeros({num_groups}, opts.dtype(at::kLong));
  if (d.tokens > 0) {
    const std::vector<at::Tensor> rows = uniform_rows_cuda(logits);
    const at::Tensor ids = group_ids.has_value() ? group_ids->contiguous() : at::Tensor();
    const at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
    const bool* mask_ptr = m.defined() ? m.data_ptr<bool>() : nullptr;
    const int64_t optin = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
    auto stream = at::cuda::getCurrentCUDAStream();
    auto* counts_ptr = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
    auto* tokens_ptr = reinterpret_cast<unsigned long long*>(tokens.data_ptr<int64_t>());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_type, "router_stats_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      // [G, E] + [G] bins of acc_t sums and uint counts; fp64 near G x E = 4,096 opts in above 48 KiB
      const SharedMemPlan plan =
          router_stats_shared_plan(num_groups, d.experts, static_cast<int64_t>(sizeof(acc_t)), optin);
      const size_t smem = static_cast<size_t>(plan.bytes);
      const bool use_shared = plan.use_shared;
      dispatch_index_cuda(ids, [&](auto index_tag) {
        using index_t = decltype(index_tag);
        const index_t* ids_ptr = ids.defined() ? ids.data_ptr<index_t>() : nullptr;
        if (plan.opt_in) {
          C10_CUDA_CHECK(cudaFuncSetAttribute(&router_stats_forward_kernel<scalar_t, acc_t, index_t, true>,
                                              cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(plan.bytes)));
        }
        for (int64_t first = 0; first < d.layers; first += kMaxLayersPerLaunch) {
          const int64_t count = std::min<int64_t>(kMaxLayersPerLaunch, d.layers - first);
          LayerPointers<scalar_t> table{};
          for (int64_t i = 0; i < count; ++i) table.ptr[i] = rows[first + i].data_ptr<scalar_t>();
          const dim3 grid(static_cast<unsigned int>(grid_blocks(d.tokens, count)), static_cast<unsigned int>(count));
          if (use_shared) {
            router_stats_forward_kernel<scalar_t, acc_t, index_t, true><<<grid, kThreads, smem, stream>>>(
                table, first, rows[0].stride(0), d.tokens, d.experts, static_cast<int32_t>(top_k), ids_ptr, mask_ptr,
                num_groups, prob_sum.data_ptr<acc_t>(), counts_ptr, entropy_sum.data_ptr<acc_t>(), tokens_ptr);
          } else {
            router_stats_forward_kernel<scalar_t, acc_t, index_t, false><<<grid, kThreads, 0, stream>>>(
                table, first, rows[0].stride(0), d.tokens, d.experts, static_cast<int32_t>(top_k), ids_ptr, mask_ptr,
                num_groups, prob_sum.data_ptr<acc_t>(), counts_ptr, entropy_sum.data_ptr<acc_t>(), tokens_ptr);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
    });
  }
  at::Tensor aux = router_aux_loss(counts, prob_sum, tokens);
  return {prob_sum, entropy_sum, aux, counts, tokens};
}

std::vector<at::Tensor> router_stats_backward_cuda(const std::vector<at::Tensor>& logits,
                                                   const std::optional<at::Tensor>& group_ids, int64_t num_groups,
                                                   const std::optional<at::Tensor>& mask,
                                                   const at::Tensor& grad_prob_sum,
                                                   const at::Tensor& grad_entropy_sum) {
  const RouterStatsDims d =
      router_stats_check(logits, 1, group_ids, num_groups, mask, "mixkernels.router_stats_backward");
  TORCH_CHECK(grad_prob_sum.dim() == 3 && grad_prob_sum.size(0) == d.layers && grad_prob_sum.size(1) == num_groups &&
                  grad_prob_sum.size(2) == d.experts,
              "mixkernels.router_stats_backward: grad_prob_sum must be [L, G, E], got ", grad_prob_sum.sizes());
  TORCH_CHECK(grad_entropy_sum.dim() == 2 && grad_entropy_sum.size(0) == d.layers &&
                  grad_entropy_sum.size(1) == num_groups,
              "mixkernels.router_stats_backward: grad_entropy_sum must be [L, G], got ", grad_entropy_sum.sizes());
  c10::cuda::CUDAGuard guard(logits[0].device());
  const auto in_type = logits[0].scalar_type();
  const auto acc_type = in_type == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<at::Tensor> grads;
  for (const auto& t : logits) grads.push_back(at::empty({d.tokens, d.experts}, t.options()));
  if (d.tokens == 0) return grads;
  const at::Tensor gp = grad_prob_sum.to(acc_type).contiguous();
  const at::Tensor ge = grad_entropy_sum.to(acc_type).contiguous();
  const std::vector<at::Tensor> rows = uniform_rows_cuda(logits);
  const at::Tensor ids = group_ids.has_value() ? group_ids->contiguous() : at::Tensor();
  const at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  const bool* mask_ptr = m.defined() ? m.data_ptr<bool>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_type, "router_stats_backward_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    dispatch_index_cuda(ids, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const index_t* ids_ptr = ids.defined() ? ids.data_ptr<index_t>() : nullptr;
      const unsigned int blocks = static_cast<unsigned int>(grid_blocks(d.tokens, 1));
      for (int64_t layer = 0; layer < d.layers; ++layer) {
        router_stats_backward_kernel<scalar_t, acc_t, index_t><<<blocks, kThreads, 0, stream>>>(
            rows[layer].data_ptr<scalar_t>(), grads[layer].data_ptr<scalar_t>(), layer, rows[layer].stride(0),
            d.tokens, d.experts, ids_ptr, mask_ptr, num_groups, gp.data_ptr<acc_t>(), ge.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return grads;
}

TORCH_LIBRARY_IMPL(mixkernels, CUDA, m) {
  m.impl("router_stats", &router_stats_cuda);
  m.impl("router_stats_backward", &router_stats_backward_cuda);
}

}  // namespace mixkernels
