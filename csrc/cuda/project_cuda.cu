// project / lift, CUDA kernels (compile-checked in CI; no GPU here to run them).
//
// The entries come from the MK_HD hash functions in ../project.h, the very code the CPU kernel
// runs in the tests, so R is bit-identical across devices.
// * dense project: block (column tile of kTJ, row tile of kTN examples); per kTI-row step the
//   block generates R'[kTI x kTJ] into shared memory with one hash per 32 (rademacher) or 2
//   (gaussian) entries and loads x[kTN x kTI]; each thread accumulates kTJ/16 outputs in fp32.
// * dense lift: block (row tile of kTI of R, example tile); loops over out_dim in kTJ steps.
// * sjlt: one thread per (example, input row); nnz atomicAdds (project) or gathers (lift).
// The scale is applied once at the end. int64 index math throughout.
#include "../project.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace mixkernels {
namespace {

constexpr int kTN = static_cast<int>(kProjRowTile);  // rows per tile; tiles loop over grid y
constexpr int kTI = 32;
constexpr int kTJ = 64;
constexpr int kThreads = 256;  // 16 x 16

__device__ __forceinline__ void fill_tile(float (*tile)[kTJ], int kind, uint32_t key, int64_t row0, int64_t rows,
                                          int64_t col0, int64_t cols) {
  // Each thread produces whole words (rademacher: 32 entries, gaussian: 2 entries).
  const int per = kind == kRademacher ? 32 : 2;
  const int words_per_row = kTJ / per;
  for (int w = threadIdx.x; w < kTI * words_per_row; w += blockDim.x) {
    const int r = w / words_per_row, c = (w % words_per_row) * per;
    const int64_t j = col0 + c;
    if (r >= rows) {
      for (int k = 0; k < per; ++k) tile[r][c + k] = 0.0f;
      continue;
    }
    const uint32_t rh = proj_row_hash(key, row0 + r);
    const uint32_t word = proj_word(rh, proj_col_hash(static_cast<uint32_t>(j / per)));
    if (kind == kRademacher) {
      for (int k = 0; k < 32; ++k) tile[r][c + k] = (c + k < cols) ? proj_sign(word, j + k) : 0.0f;
    } else {
      float z0, z1;
      proj_gaussian_pair(word, &z0, &z1);
      tile[r][c] = c < cols ? z0 : 0.0f;
      tile[r][c + 1] = c + 1 < cols ? z1 : 0.0f;
    }
  }
}

template <typename scalar_t>
__global__ void project_dense_kernel(const scalar_t* __restrict__ x, float* __restrict__ y, int64_t n, int64_t in_dim,
                                     int64_t out_dim, int kind, uint32_t key, int64_t row_offset, float scale) {
  __shared__ float tile[kTI][kTJ];
  __shared__ float xs[kTN][kTI];
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTJ;
  const int64_t cols = min(static_cast<int64_t>(kTJ), out_dim - col0);
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  // row tiles stride over grid y (proj_grid_y caps it at 65,535); uniform per block, so the
  // __syncthreads() inside stay uniform
  for (int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTN; n0 < n; n0 += static_cast<int64_t>(gridDim.y) * kTN) {
    float acc[kTJ / 16] = {};
    for (int64_t i0 = 0; i0 < in_dim; i0 += kTI) {
      const int64_t rows = min(static_cast<int64_t>(kTI), in_dim - i0);
      fill_tile(tile, kind, key, row_offset + i0, rows, col0, cols);
      for (int e = threadIdx.x; e < kTN * kTI; e += blockDim.x) {
        const int b = e / kTI, r = e % kTI;
        xs[b][r] = (n0 + b < n && r < rows) ? static_cast<float>(x[(n0 + b) * in_dim + i0 + r]) : 0.0f;
      }
      __syncthreads();
      for (int r = 0; r < kTI; ++r) {
        const float xv = xs[ty][r];
        for (int c = 0; c < kTJ / 16; ++c) acc[c] += xv * tile[r][tx + 16 * c];
      }
      __syncthreads();
    }
    if (n0 + ty < n)
      for (int c = 0; c < kTJ / 16; ++c)
        if (tx + 16 * c < cols) y[(n0 + ty) * out_dim + col0 + tx + 16 * c] = acc[c] * scale;
  }
}

template <typename scalar_t>
__global__ void lift_dense_kernel(const scalar_t* __restrict__ y, float* __restrict__ x, int64_t n, int64_t out_dim,
                                  int64_t in_dim, int kind, uint32_t key, int64_t row_offset, float scale) {
  __shared__ float tile[kTI][kTJ];
  __shared__ float ys[kTN][kTJ];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTI;
  const int64_t rows = min(static_cast<int64_t>(kTI), in_dim - i0);
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  for (int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTN; n0 < n; n0 += static_cast<int64_t>(gridDim.y) * kTN) {
    float acc[kTI / 16] = {};
    for (int64_t col0 = 0; col0 < out_dim; col0 += kTJ) {
      const int64_t cols = min(static_cast<int64_t>(kTJ), out_dim - col0);
      fill_tile(tile, kind, key, row_offset + i0, rows, col0, cols);
      for (int e = threadIdx.x; e < kTN * kTJ; e += blockDim.x) {
        const int b = e / kTJ, c = e % kTJ;
        ys[b][c] = (n0 + b < n && c < cols) ? static_cast<float>(y[(n0 + b) * out_dim + col0 + c]) : 0.0f;
      }
      __syncthreads();
      for (int c = 0; c < kTJ; ++c) {
        const float yv = ys[ty][c];
        for (int r = 0; r < kTI / 16; ++r) acc[r] += yv * tile[tx + 16 * r][c];
      }
      __syncthreads();
    }
    if (n0 + ty < n)
      for (int r = 0; r < kTI / 16; ++r)
        if (tx + 16 * r < rows) x[(n0 + ty) * in_dim + i0 + tx + 16 * r] = acc[r] * scale;
  }
}

template <typename scalar_t>
__global__ void project_sjlt_kernel(const scalar_t* __restrict__ x, float* __restrict__ y, int64_t n, int64_t in_dim,
                                    int64_t out_dim, int64_t nnz, uint32_t key, int64_t row_offset) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n * in_dim) return;
  const int64_t m = e / in_dim, i = e % in_dim;
  const float v = static_cast<float>(x[e]);
  if (v == 0.0f) return;
  const uint32_t rh = proj_row_hash(key, row_offset + i);
  for (int64_t b = 0; b < nnz; ++b) {
    int64_t lo, len;
    proj_sjlt_block(b, out_dim, nnz, &lo, &len);
    const uint32_t h = proj_word(rh, proj_col_hash(static_cast<uint32_t>(b)));
    atomicAdd(&y[m * out_dim + proj_sjlt_col(h, lo, len)], proj_sjlt_sign(h) * v);
  }
}

template <typename scalar_t>
__global__ void lift_sjlt_kernel(const scalar_t* __restrict__ y, float* __restrict__ x, int64_t n, int64_t out_dim,
                                 int64_t in_dim, int64_t nnz, uint32_t key, int64_t row_offset, float scale) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n * in_dim) return;
  const int64_t m = e / in_dim, i = e % in_dim;
  const uint32_t rh = proj_row_hash(key, row_offset + i);
  float acc = 0.0f;
  for (int64_t b = 0; b < nnz; ++b) {
    int64_t lo, len;
    proj_sjlt_block(b, out_dim, nnz, &lo, &len);
    const uint32_t h = proj_word(rh, proj_col_hash(static_cast<uint32_t>(b)));
    acc += proj_sjlt_sign(h) * static_cast<float>(y[m * out_dim + proj_sjlt_col(h, lo, len)]);
  }
  x[e] = acc * scale;
}

}  // namespace

at::Tensor project_cuda(const at::Tensor& x, int64_t out_dim, int64_t seed, const std::string& kind, int64_t nnz,
                        int64_t row_offset) {
  const int kid = proj_check(x, "project", "x", out_dim, seed, kind, nnz, row_offset);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), in_dim = x.size(1);
  at::Tensor y = at::zeros({n, out_dim}, x.options().dtype(at::kFloat));
  if (n == 0 || in_dim == 0) return y;
  at::Tensor xc = x.contiguous();
  const uint32_t key = proj_stream_key(seed, kid, nnz, out_dim);
  const float scale = proj_scale(kid, out_dim, nnz);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "project_cuda", [&] {
    if (kid == kSjlt) {
      const int64_t blocks = (n * in_dim + kThreads - 1) / kThreads;
      project_sjlt_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(xc.data_ptr<scalar_t>(), y.data_ptr<float>(), n,
                                                                     in_dim, out_dim, nnz, key, row_offset);
    } else {
      dim3 grid((out_dim + kTJ - 1) / kTJ, static_cast<unsigned int>(proj_grid_y(n)));
      project_dense_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(xc.data_ptr<scalar_t>(), y.data_ptr<float>(), n,
                                                                    in_dim, out_dim, kid, key, row_offset, scale);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (kid == kSjlt) y.mul_(scale);
  return y;
}

at::Tensor lift_cuda(const at::Tensor& y, int64_t in_dim, int64_t seed, const std::string& kind, int64_t nnz,
                     int64_t row_offset) {
  TORCH_CHECK(in_dim >= 0, "mixkernels.lift: in_dim must be >= 0, got ", in_dim);
  TORCH_CHECK(y.dim() == 2, "mixkernels.lift: y must be 2-D [N, out_dim], got shape ", y.sizes());
  const int64_t n = y.size(0), out_dim = y.size(1);
  const int kid = proj_check(y, "lift", "y", out_dim, seed, kind, nnz, row_offset);
  c10::cuda::CUDAGuard guard(y.device());
  at::Tensor x = at::zeros({n, in_dim}, y.options().dtype(at::kFloat));
  if (n == 0 || in_dim == 0) return x;
  at::Tensor yc = y.contiguous();
  const uint32_t key = proj_stream_key(seed, kid, nnz, out_dim);
  const float scale = proj_scale(kid, out_dim, nnz);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, yc.scalar_type(), "lift_cuda", [&] {
    if (kid == kSjlt) {
      const int64_t blocks = (n * in_dim + kThreads - 1) / kThreads;
      lift_sjlt_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(yc.data_ptr<scalar_t>(), x.data_ptr<float>(), n,
                                                                  out_dim, in_dim, nnz, key, row_offset, scale);
    } else {
      dim3 grid((in_dim + kTI - 1) / kTI, static_cast<unsigned int>(proj_grid_y(n)));
      lift_dense_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(yc.data_ptr<scalar_t>(), x.data_ptr<float>(), n,
                                                                 out_dim, in_dim, kid, key, row_offset, scale);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return x;
}

TORCH_LIBRARY_IMPL(mixkernels, CUDA, m) {
  m.impl("project", &project_cuda);
  m.impl("lift", &lift_cuda);
}

}  // namespace mixkernels
