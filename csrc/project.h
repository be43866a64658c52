// project / lift: the counter-based hash that defines every random projection matrix, shared by
// the CPU (.cpp) and CUDA (.cu) kernels (and mirrored bit for bit by mixkernels/reference/project.py
// and mixkernels/triton/project.py).
//
//   key        = stream_key(seed, kind, nnz, out_dim)           host, once per call
//   row(i)     = mix(mix(key ^ lo32(i)) ^ hi32(i))
//   col(c)     = mix(c ^ 0x6A09E667)
//   word(i, c) = mix(row(i) + col(c))
//   rademacher R[i, j] = (bit (j & 31) of word(i, j >> 5)) ? -s : +s,    s = 1/sqrt(out_dim)
//   gaussian   R[i, j] = float(Box-Muller_fp64(word(i, j >> 1)))[j & 1] * s
//   sjlt       block b in [0, nnz): one +-1/sqrt(nnz) at lo_b + (((h >> 1) * len_b) >> 31), h = word(i, b)
#pragma once

#include "common.h"

#include <cmath>
#include <string>

namespace mixkernels {

// CUDA dense project / lift: blocks own tiles of kProjRowTile rows on grid y and loop over row
// tiles with a stride of gridDim.y tiles, so any number of rows works (grid y alone would stop at
// 65,535 x 16 = 1,048,560 rows).
constexpr int64_t kProjRowTile = 16;
inline int64_t proj_grid_y(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>((rows + kProjRowTile - 1) / kProjRowTile, kMaxGridY));
}

enum ProjKind : int { kRademacher = 1, kGaussian = 2, kSjlt = 3 };

MK_HD uint32_t mk_mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x846CA68Bu;
  h ^= h >> 16;
  return h;
}

MK_HD uint32_t proj_row_hash(uint32_t key, int64_t i) {
  const uint64_t u = static_cast<uint64_t>(i);
  return mk_mix32(mk_mix32(key ^ static_cast<uint32_t>(u)) ^ static_cast<uint32_t>(u >> 32));
}

MK_HD uint32_t proj_col_hash(uint32_t c) { return mk_mix32(c ^ 0x6A09E667u); }

MK_HD uint32_t proj_word(uint32_t row_h, uint32_t col_h) { return mk_mix32(row_h + col_h); }

// +1 / -1 for entry j of a rademacher row whose word for (j >> 5) is `word`.
MK_HD float proj_sign(uint32_t word, int64_t j) { return ((word >> (j & 31)) & 1u) ? -1.0f : 1.0f; }

// Unscaled N(0, 1) pair from one word (Box-Muller in float64, rounded to float32).
MK_HD void proj_gaussian_pair(uint32_t h1, float* z0, float* z1) {
  const uint32_t h2 = mk_mix32(h1 ^ 0x5BE0CD19u);
  const double u1 = (static_cast<double>(h1 >> 8) + 0.5) * 5.9604644775390625e-08;  // 2^-24
  const double u2 = static_cast<double>(h2 >> 8) * 5.9604644775390625e-08;
  const double r = sqrt(-2.0 * log(u1));
  const double theta = 6.283185307179586 * u2;
  *z0 = static_cast<float>(r * cos(theta));
  *z1 = static_cast<float>(r * sin(theta));
}

// Column range of sjlt block b: [lo, lo + len).
MK_HD void proj_sjlt_block(int64_t b, int64_t out_dim, int64_t nnz, int64_t* lo, int64_t* len) {
  *lo = b * out_dim / nnz;
  *len = (b + 1) * out_dim / nnz - *lo;
}

MK_HD int64_t proj_sjlt_col(uint32_t h, int64_t lo, int64_t len) {
  return lo + ((static_cast<int64_t>(h >> 1) * len) >> 31);
}

MK_HD float proj_sjlt_sign(uint32_t h) { return (h & 1u) ? -1.0f : 1.0f; }

// Host-side helpers (the same values as mixkernels/reference/project.py computes in Python).
inline uint32_t proj_stream_key(int64_t seed, int kind, int64_t nnz, int64_t out_dim) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint64_t o = static_cast<uint64_t>(out_dim);
  uint32_t k = mk_mix32(static_cast<uint32_t>(s) ^ 0x243F6A88u);
  k = mk_mix32(k ^ static_cast<uint32_t>(s >> 32));
  k = mk_mix32(k ^ static_cast<uint32_t>(kind));
  k = mk_mix32(k ^ (kind == kSjlt ? static_cast<uint32_t>(nnz) : 0u));
  k = mk_mix32(k ^ static_cast<uint32_t>(o));
  return mk_mix32(k ^ static_cast<uint32_t>(o >> 32));
}

inline float proj_scale(int kind, int64_t out_dim, int64_t nnz) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(kind == kSjlt ? nnz : out_dim)));
}

// Validates the arguments shared by project and lift; returns the kind id.
int proj_check(const at::Tensor& t, const char* op, const char* t_name, int64_t out_dim, int64_t seed,
               const std::string& kind, int64_t nnz, int64_t row_offset);

at::Tensor project_cuda(const at::Tensor& x, int64_t out_dim, int64_t seed, const std::string& kind, int64_t nnz,
                        int64_t row_offset);
at::Tensor lift_cuda(const at::Tensor& y, int64_t in_dim, int64_t seed, const std::string& kind, int64_t nnz,
                     int64_t row_offset);

}  // namespace mixkernels
