// segment_sum, CUDA kernel.
//
// Grid-stride over rows. When num_segments * C fits in shared memory (segment_sum_shared_plan in
// ../segment_sum.h: at most 8,192 bins, opting in above the default 48 KiB where the device allows),
// each block bins into shared memory and flushes once with global atomics (few global atomics even
// for 16 segments); otherwise rows atomically add straight to global memory. fp32 accumulation.
//
// Behaviour on bad ids (documented in mixkernels.segment_sum): an out-of-range segment id trips
// a device-side assert (as PyTorch's own index ops do), reported at the next synchronisation;
// no host synchronisation is added to check ids eagerly. Float atomics make the summation order,
// and so the last bits, vary run to run on CUDA (CPU results are bitwise deterministic).
#include "../segment_sum.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace mixkernels {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename index_t, bool kShared>
__global__ void segment_sum_kernel(const scalar_t* __restrict__ values, const index_t* __restrict__ ids,
                                   const bool* __restrict__ mask, int64_t n, int64_t c, int64_t num_segments,
                                   float* __restrict__ sums, unsigned long long* __restrict__ counts) {
  extern __shared__ unsigned char smem_raw[];
  float* bins = reinterpret_cast<float*>(smem_raw);
  unsigned int* bin_counts = reinterpret_cast<unsigned int*>(bins + (kShared ? num_segments * c : 0));
  if (kShared) {
    for (int64_t k = threadIdx.x; k < num_segments * c; k += blockDim.x) bins[k] = 0.f;
    for (int64_t k = threadIdx.x; k < num_segments; k += blockDim.x) bin_counts[k] = 0u;
    __syncthreads();
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    if (!segment_row_counted(mask, i)) continue;
    const int64_t id = static_cast<int64_t>(ids[i]);
    CUDA_KERNEL_ASSERT(segment_id_valid(id, num_segments) && "mixkernels.segment_sum: segment id out of range");
    if (!segment_id_valid(id, num_segments)) continue;
    if (kShared) {
      atomicAdd(&bin_counts[id], 1u);
      for (int64_t j = 0; j < c; ++j) atomicAdd(&bins[id * c + j], static_cast<float>(values[i * c + j]));
    } else {
      atomicAdd(&counts[id], 1ull);
      for (int64_t j = 0; j < c; ++j) atomicAdd(&sums[id * c + j], static_cast<float>(values[i * c + j]));
    }
  }
  if (kShared) {
    __syncthreads();
    for (int64_t k = threadIdx.x; k < num_segments * c; k += blockDim.x)
      if (bins[k] != 0.f) atomicAdd(&sums[k], bins[k]);
    for (int64_t k = threadIdx.x; k < num_segments; k += blockDim.x)
      if (bin_counts[k] != 0u) atomicAdd(&counts[k], static_cast<unsigned long long>(bin_counts[k]));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> segment_sum_cuda(const at::Tensor& values, const at::Tensor& segment_ids,
                                                    int64_t num_segments, const std::optional<at::Tensor>& mask) {
  const int64_t c = segment_sum_check(values, segment_ids, num_segments, mask);
  const int64_t n = values.size(0);
  c10::cuda::CUDAGuard guard(values.device());
  auto sum_shape = values.dim() == 2 ? std::vector<int64_t>{num_segments, c} : std::vector<int64_t>{num_segments};
  at::Tensor sums = at::zeros(sum_shape, values.options().dtype(at::kFloat));
  at::Tensor counts = at::zeros({num_segments}, values.options().dtype(at::kLong));
  if (n == 0) return {sums, counts};
  at::Tensor v = values.contiguous();
  at::Tensor ids = segment_ids.contiguous();
  at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  const bool* mask_ptr = m.defined() ? m.data_ptr<bool>() : nullptr;
  auto* counts_ptr = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const SharedMemPlan plan =
      segment_sum_shared_plan(num_segments, c, static_cast<int64_t>(props->sharedMemPerBlockOptin));
  const int sms = props->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, static_cast<int64_t>(sms) * 8);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "segment_sum_cuda", [&] {
    auto launch = [&](auto index_tag) {
      using index_t = decltype(index_tag);
      const auto* ids_ptr = ids.data_ptr<index_t>();
      if (plan.use_shared) {
        auto* kernel = &segment_sum_kernel<scalar_t, index_t, true>;
        if (plan.opt_in) {
          C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(plan.bytes)));
        }
        kernel<<<blocks, kThreads, static_cast<size_t>(plan.bytes), stream>>>(
            v.data_ptr<scalar_t>(), ids_ptr, mask_ptr, n, c, num_segments, sums.data_ptr<float>(), counts_ptr);
      } else {
        segment_sum_kernel<scalar_t, index_t, false><<<blocks, kThreads, 0, stream>>>(
            v.data_ptr<scalar_t>(), ids_ptr, mask_ptr, n, c, num_segments, sums.data_ptr<float>(), counts_ptr);
      }
    };
    if (ids.scalar_type() == at::kLong) launch(int64_t{}); else launch(int32_t{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sums, counts};
}

TORCH_LIBRARY_IMPL(mixkernels, CUDA, m) { m.impl("segment_sum", &segment_sum_cuda); }

}  // namespace mixkernels
