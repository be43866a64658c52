// project / lift, C++ CPU kernels: on-the-fly random projections, R never stored.
//
//   project: y[n, j] = s * sum_i x[n, i] * R'[row_offset + i, j]        y float32 [N, out_dim]
//   lift:    x[n, i] = s * sum_j y[n, j] * R'[row_offset + i, j]        x float32 [N, in_dim]
//   (R' = R / s: +-1 or N(0, 1) entries; s is applied once at the end, so a one-hot input
//    reproduces projection_matrix() bit for bit.)
//
// Dense kinds: R' is generated in [kTI x kTJ] tiles (64 x 256 floats, L2-resident) from one hash
// per 32 entries (rademacher) or per 2 entries (gaussian); a register-blocked micro-kernel (4 rows
// of x by 16 columns) accumulates in float32. project parallelises over (row chunk, column tile)
// work items with per-row-chunk partial sums reduced in a fixed order; lift parallelises over row
// blocks. sjlt: nnz scatter-adds per input (project) or gathers per output (lift).
// Bits depend only on the shapes (chunking is never a function of the thread count).
#include "project.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

// Clones are selected by CPU features. (Not "arch=haswell": that one is chosen by CPU *model*, so
// an AMD CPU with AVX-512 silently ran the SSE2 default clone, 13x slower.) avx512f implies avx2+fma.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define MK_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MK_SIMD_CLONES
#endif

namespace mixkernels {

int proj_check(const at::Tensor& t, const char* op, const char* t_name, int64_t out_dim, int64_t seed,
               const std::string& kind, int64_t nnz, int64_t row_offset) {
  TORCH_CHECK(t.dim() == 2, "mixkernels.", op, ": ", t_name, " must be 2-D [N, features], got shape ", t.sizes());
  check_float_dtype(t, t_name);
  TORCH_CHECK(out_dim >= 1, "mixkernels.", op, ": out_dim must be >= 1, got ", out_dim);
  TORCH_CHECK(seed >= 0, "mixkernels.", op, ": seed must be >= 0, got ", seed);
  TORCH_CHECK(row_offset >= 0, "mixkernels.", op, ": row_offset must be >= 0, got ", row_offset);
  TORCH_CHECK(nnz >= 1, "mixkernels.", op, ": nnz must be >= 1, got ", nnz);
  int id = 0;
  if (kind == "rademacher") id = kRademacher;
  else if (kind == "gaussian") id = kGaussian;
  else if (kind == "sjlt") id = kSjlt;
  TORCH_CHECK(id != 0, "mixkernels.", op, ": kind must be one of rademacher, gaussian, sjlt, got '", kind, "'");
  TORCH_CHECK(id != kSjlt || nnz <= out_dim, "mixkernels.", op, ": nnz must be <= out_dim = ", out_dim,
              " for kind 'sjlt', got ", nnz);
  return id;
}

namespace {

constexpr int64_t kTI = 64;   // rows of a generated tile
constexpr int64_t kTJ = 256;  // columns of a generated tile (multiple of 32 and of 16)
constexpr int64_t kNB = 4;    // rows of x per micro-kernel call
constexpr int64_t kRowsPerChunk = 8192;
constexpr int64_t kMaxChunks = 16;
constexpr int64_t kPartialBudget = int64_t(64) << 20;  // bytes of per-chunk partial sums

// Eight float32 lanes (GCC/Clang vector extension: one AVX register in the avx2/avx512f clones, two SSE
// registers in the default one). Loads and stores go through memcpy, so no alignment is assumed.
// The helpers below are always inlined into the clones, so the -Wpsabi note about passing a 256-bit
// vector without AVX does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

// Fills tile[r * kTJ + c] = R'[row0 + r, col0 + c] for r < rows, c < cols; zero elsewhere.
// Rademacher: a sign is bit b of a word, written as the float bits 0x3F800000 | (bit << 31), a
// branch-free loop the compiler vectorises with per-lane shifts.
MK_SIMD_CLONES void generate_tile(int kind, uint32_t key, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                                  const uint32_t* col_h, float* tile) {
  for (int64_t r = 0; r < rows; ++r) {
    float* out = tile + r * kTJ;
    const uint32_t rh = proj_row_hash(key, row0 + r);
    if (kind == kRademacher) {
      uint32_t bits[kTJ];
      for (int64_t w = 0; w < kTJ / 32; ++w) {
        const uint32_t word = proj_word(rh, col_h[(col0 >> 5) + w]);
        for (uint32_t b = 0; b < 32; ++b) bits[w * 32 + b] = 0x3F800000u | (((word >> b) & 1u) << 31);
      }
      std::memcpy(out, bits, sizeof(bits));
    } else {
      for (int64_t p = 0; p < kTJ / 2; ++p) {
        if (2 * p >= cols) {
          out[2 * p] = out[2 * p + 1] = 0.0f;
          continue;
        }
        proj_gaussian_pair(proj_word(rh, col_h[(col0 >> 1) + p]), out + 2 * p, out + 2 * p + 1);
      }
    }
    for (int64_t c = cols; c < kTJ; ++c) out[c] = 0.0f;
  }
  for (int64_t r = rows; r < kTI; ++r) std::fill(tile + r * kTJ, tile + (r + 1) * kTJ, 0.0f);
}

// acc[b * lda + j] += sum_r xb[b * kTI + r] * tile[r * kTJ + j] for b < nb (<= kNB), j < kTJ.
// Register block: kNB rows of x by 16 columns = 8 vector accumulators; per tile row, 2 vector loads
// and kNB broadcasts feed 8 vector multiply-adds.
MK_SIMD_CLONES void tile_fma(const float* xb, const float* tile, float* acc, int64_t lda, int64_t nb) {
  static_assert(kNB == 4, "tile_fma's register block is written for 4 rows");
  for (int64_t j0 = 0; j0 < kTJ; j0 += 16) {
    v8f a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
    const float* t = tile + j0;
    for (int64_t r = 0; r < kTI; ++r, t += kTJ) {
      const v8f t0 = load8(t), t1 = load8(t + 8);
      const float x0 = xb[r], x1 = xb[kTI + r], x2 = xb[2 * kTI + r], x3 = xb[3 * kTI + r];
      a00 += x0 * t0; a01 += x0 * t1;
      a10 += x1 * t0; a11 += x1 * t1;
      a20 += x2 * t0; a21 += x2 * t1;
      a30 += x3 * t0; a31 += x3 * t1;
    }
    const v8f lo[kNB] = {a00, a10, a20, a30}, hi[kNB] = {a01, a11, a21, a31};
    for (int64_t b = 0; b < nb; ++b) {
      float* o = acc + b * lda + j0;
      store8(o, load8(o) + lo[b]);
      store8(o + 8, load8(o + 8) + hi[b]);
    }
  }
}

// out[b * kTI + r] += sum_j yb[b * kTJ + j] * tile[r * kTJ + j]: 16 independent lanes per dot.
MK_SIMD_CLONES void tile_dot(const float* yb, const float* tile, float* out, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* y = yb + b * kTJ;
    for (int64_t r = 0; r < kTI; ++r) {
      const float* t = tile + r * kTJ;
      v8f l0 = {}, l1 = {};
      for (int64_t j = 0; j < kTJ; j += 16) {
        l0 += load8(y + j) * load8(t + j);
        l1 += load8(y + j + 8) * load8(t + j + 8);
      }
      const v8f l = l0 + l1;
      float s = 0.0f;
      for (int k = 0; k < 8; ++k) s += l[k];
      out[b * kTI + r] += s;
    }
  }
}

std::vector<uint32_t> column_hashes(int kind, int64_t out_dim) {
  const int64_t per = kind == kRademacher ? 32 : 2;
  const int64_t padded = (out_dim + kTJ - 1) / kTJ * kTJ;
  std::vector<uint32_t> h(static_cast<size_t>(padded / per));
  for (size_t c = 0; c < h.size(); ++c) h[c] = proj_col_hash(static_cast<uint32_t>(c));
  return h;
}

int64_t num_row_chunks(int64_t in_dim, int64_t n, int64_t out_dim) {
  int64_t chunks = std::min(kMaxChunks, std::max<int64_t>(1, in_dim / kRowsPerChunk));
  const int64_t per_chunk = std::max<int64_t>(1, n * out_dim * 4);
  return std::max<int64_t>(1, std::min(chunks, kPartialBudget / per_chunk));
}

// x rows [n0, n0 + kNB) x columns [i0, i0 + rows) as float32 into xb [kNB x kTI] (zero padded).
template <typename scalar_t>
void load_x_block(const scalar_t* x, int64_t ldx, int64_t n0, int64_t nb, int64_t i0, int64_t rows, float* xb) {
  for (int64_t b = 0; b < kNB; ++b)
    for (int64_t r = 0; r < kTI; ++r)
      xb[b * kTI + r] = (b < nb && r < rows) ? static_cast<float>(x[(n0 + b) * ldx + i0 + r]) : 0.0f;
}

template <typename scalar_t>
void project_dense(const scalar_t* x, int64_t n, int64_t in_dim, int64_t out_dim, int kind, uint32_t key,
                   int64_t row_offset, float* y) {
  const int64_t chunks = num_row_chunks(in_dim, n, out_dim);
  const int64_t rows_per_chunk = (in_dim + chunks - 1) / chunks;
  const int64_t tiles = (out_dim + kTJ - 1) / kTJ;
  const int64_t padded = tiles * kTJ;
  const std::vector<uint32_t> col_h = column_hashes(kind, out_dim);
  // partial[c] : [n, padded]; chunk 0 accumulates straight into its own buffer too.
  std::vector<float> partial(static_cast<size_t>(chunks * n * padded), 0.0f);
  const int64_t item_work = std::max<int64_t>(1, rows_per_chunk * kTJ * n);
  at::parallel_for(0, chunks * tiles, std::max<int64_t>(1, (int64_t(1) << 18) / item_work), [&](int64_t begin, int64_t end) {
    std::vector<float> tile(static_cast<size_t>(kTI * kTJ));
    std::vector<float> xb(static_cast<size_t>(kNB * kTI));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item / tiles, t = item % tiles;
      const int64_t lo = c * rows_per_chunk, hi = std::min(in_dim, lo + rows_per_chunk);
      const int64_t col0 = t * kTJ, cols = std::min(kTJ, out_dim - col0);
      float* acc = partial.data() + c * n * padded + col0;
      for (int64_t i0 = lo; i0 < hi; i0 += kTI) {
        const int64_t rows = std::min(kTI, hi - i0);
        generate_tile(kind, key, row_offset + i0, rows, col0, cols, col_h.data(), tile.data());
        for (int64_t n0 = 0; n0 < n; n0 += kNB) {
          const int64_t nb = std::min(kNB, n - n0);
          load_x_block(x, in_dim, n0, nb, i0, rows, xb.data());
          tile_fma(xb.data(), tile.data(), acc + n0 * padded, padded, nb);
        }
      }
    }
  });
  const float s = proj_scale(kind, out_dim, 0);
  // Small outputs stay on the calling thread (waking the pool costs more than the sum).
  at::parallel_for(0, n, std::max<int64_t>(1, (int64_t(1) << 16) / (out_dim * chunks)), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t j = 0; j < out_dim; ++j) {
        float v = 0.0f;
        for (int64_t c = 0; c < chunks; ++c) v += partial[(c * n + b) * padded + j];
        y[b * out_dim + j] = v * s;
      }
  });
}

template <typename scalar_t>
void lift_dense(const scalar_t* y, int64_t n, int64_t out_dim, int64_t in_dim, int kind, uint32_t key,
                int64_t row_offset, float* x) {
  const int64_t tiles = (out_dim + kTJ - 1) / kTJ;
  const std::vector<uint32_t> col_h = column_hashes(kind, out_dim);
  const int64_t blocks = (in_dim + kTI - 1) / kTI;
  const float s = proj_scale(kind, out_dim, 0);
  at::parallel_for(0, blocks, std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, kTI * out_dim * n)), [&](int64_t begin, int64_t end) {
    std::vector<float> tile(static_cast<size_t>(kTI * kTJ));
    std::vector<float> yb(static_cast<size_t>(kNB * kTJ));
    std::vector<float> out(static_cast<size_t>(kNB * kTI));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i0 = blk * kTI, rows = std::min(kTI, in_dim - i0);
      for (int64_t n0 = 0; n0 < n; n0 += kNB) {
        const int64_t nb = std::min(kNB, n - n0);
        std::fill(out.begin(), out.end(), 0.0f);
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t col0 = t * kTJ, cols = std::min(kTJ, out_dim - col0);
          // Regenerating per row group keeps the tile in cache; for N <= 4 there is one group.
          generate_tile(kind, key, row_offset + i0, rows, col0, cols, col_h.data(), tile.data());
          for (int64_t b = 0; b < kNB; ++b)
            for (int64_t j = 0; j < kTJ; ++j)
              yb[b * kTJ + j] = (b < nb && j < cols) ? static_cast<float>(y[(n0 + b) * out_dim + col0 + j]) : 0.0f;
          tile_dot(yb.data(), tile.data(), out.data(), nb);
        }
        for (int64_t b = 0; b < nb; ++b)
          for (int64_t r = 0; r < rows; ++r) x[(n0 + b) * in_dim + i0 + r] = out[b * kTI + r] * s;
      }
    }
  });
}

template <typename scalar_t>
void project_sjlt(const scalar_t* x, int64_t n, int64_t in_dim, int64_t out_dim, int64_t nnz, uint32_t key,
                  int64_t row_offset, float* y) {
  const int64_t chunks = num_row_chunks(in_dim, n, out_dim);
  const int64_t rows_per_chunk = (in_dim + chunks - 1) / chunks;
  std::vector<float> partial(static_cast<size_t>(chunks * n * out_dim), 0.0f);
  std::vector<uint32_t> col_h(static_cast<size_t>(nnz));
  std::vector<int64_t> blo(static_cast<size_t>(nnz)), blen(static_cast<size_t>(nnz));
  for (int64_t b = 0; b < nnz; ++b) {
    col_h[b] = proj_col_hash(static_cast<uint32_t>(b));
    proj_sjlt_block(b, out_dim, nnz, &blo[b], &blen[b]);
  }
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> cols(static_cast<size_t>(kTI * nnz));
    std::vector<float> signs(static_cast<size_t>(kTI * nnz));
    for (int64_t c = begin; c < end; ++c) {
      float* acc = partial.data() + c * n * out_dim;
      const int64_t lo = c * rows_per_chunk, hi = std::min(in_dim, lo + rows_per_chunk);
      for (int64_t i0 = lo; i0 < hi; i0 += kTI) {
        const int64_t rows = std::min(kTI, hi - i0);
        for (int64_t r = 0; r < rows; ++r) {
          const uint32_t rh = proj_row_hash(key, row_offset + i0 + r);
          for (int64_t b = 0; b < nnz; ++b) {
            const uint32_t h = proj_word(rh, col_h[b]);
            cols[r * nnz + b] = proj_sjlt_col(h, blo[b], blen[b]);
            signs[r * nnz + b] = proj_sjlt_sign(h);
          }
        }
        for (int64_t m = 0; m < n; ++m) {
          const scalar_t* xr = x + m * in_dim + i0;
          float* out = acc + m * out_dim;
          for (int64_t r = 0; r < rows; ++r) {
            const float v = static_cast<float>(xr[r]);
            for (int64_t b = 0; b < nnz; ++b) out[cols[r * nnz + b]] += signs[r * nnz + b] * v;
          }
        }
      }
    }
  });
  const float s = proj_scale(kSjlt, out_dim, nnz);
  at::parallel_for(0, n * out_dim, std::max<int64_t>(4096, (int64_t(1) << 16) / chunks), [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      float v = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) v += partial[c * n * out_dim + e];
      y[e] = v * s;
    }
  });
}

template <typename scalar_t>
void lift_sjlt(const scalar_t* y, int64_t n, int64_t out_dim, int64_t in_dim, int64_t nnz, uint32_t key,
               int64_t row_offset, float* x) {
  std::vector<uint32_t> col_h(static_cast<size_t>(nnz));
  std::vector<int64_t> blo(static_cast<size_t>(nnz)), blen(static_cast<size_t>(nnz));
  for (int64_t b = 0; b < nnz; ++b) {
    col_h[b] = proj_col_hash(static_cast<uint32_t>(b));
    proj_sjlt_block(b, out_dim, nnz, &blo[b], &blen[b]);
  }
  const float s = proj_scale(kSjlt, out_dim, nnz);
  at::parallel_for(0, in_dim, std::max<int64_t>(1024, (int64_t(1) << 16) / std::max<int64_t>(1, n * nnz)), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> cols(static_cast<size_t>(nnz));
    std::vector<float> signs(static_cast<size_t>(nnz));
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t rh = proj_row_hash(key, row_offset + i);
      for (int64_t b = 0; b < nnz; ++b) {
        const uint32_t h = proj_word(rh, col_h[b]);
        cols[b] = proj_sjlt_col(h, blo[b], blen[b]);
        signs[b] = proj_sjlt_sign(h);
      }
      for (int64_t m = 0; m < n; ++m) {
        float v = 0.0f;
        for (int64_t b = 0; b < nnz; ++b) v += signs[b] * static_cast<float>(y[m * out_dim + cols[b]]);
        x[m * in_dim + i] = v * s;
      }
    }
  });
}

at::Tensor project_cpu(const at::Tensor& x, int64_t out_dim, int64_t seed, const std::string& kind, int64_t nnz,
                       int64_t row_offset) {
  const int kid = proj_check(x, "project", "x", out_dim, seed, kind, nnz, row_offset);
  const int64_t n = x.size(0), in_dim = x.size(1);
  at::Tensor y = at::zeros({n, out_dim}, x.options().dtype(at::kFloat));
  if (n == 0 || in_dim == 0) return y;
  at::Tensor xc = x.contiguous();
  const uint32_t key = proj_stream_key(seed, kid, nnz, out_dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "project_cpu", [&] {
    if (kid == kSjlt)
      project_sjlt(xc.data_ptr<scalar_t>(), n, in_dim, out_dim, nnz, key, row_offset, y.data_ptr<float>());
    else
      project_dense(xc.data_ptr<scalar_t>(), n, in_dim, out_dim, kid, key, row_offset, y.data_ptr<float>());
  });
  return y;
}

at::Tensor lift_cpu(const at::Tensor& y, int64_t in_dim, int64_t seed, const std::string& kind, int64_t nnz,
                    int64_t row_offset) {
  TORCH_CHECK(in_dim >= 0, "mixkernels.lift: in_dim must be >= 0, got ", in_dim);
  TORCH_CHECK(y.dim() == 2, "mixkernels.lift: y must be 2-D [N, out_dim], got shape ", y.sizes());
  const int64_t n = y.size(0), out_dim = y.size(1);
  const int kid = proj_check(y, "lift", "y", out_dim, seed, kind, nnz, row_offset);
  at::Tensor x = at::zeros({n, in_dim}, y.options().dtype(at::kFloat));
  if (n == 0 || in_dim == 0) return x;
  at::Tensor yc = y.contiguous();
  const uint32_t key = proj_stream_key(seed, kid, nnz, out_dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, yc.scalar_type(), "lift_cpu", [&] {
    if (kid == kSjlt)
      lift_sjlt(yc.data_ptr<scalar_t>(), n, out_dim, in_dim, nnz, key, row_offset, x.data_ptr<float>());
    else
      lift_dense(yc.data_ptr<scalar_t>(), n, out_dim, in_dim, kid, key, row_offset, x.data_ptr<float>());
  });
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixkernels, CPU, m) {
  m.impl("project", &project_cpu);
  m.impl("lift", &lift_cpu);
}

}  // namespace mixkernels
