// segment_sum, C++ CPU kernel.
//
// Parallel over a shape-determined number of row chunks; each chunk accumulates its own
// [num_segments, C] partial sums (double) and counts, then partials are reduced in a fixed order.
// Same bits for the same input on any thread count. One pass computes sums and counts.
#include "segment_sum.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace mixkernels {

int64_t segment_sum_check(const at::Tensor& values, const at::Tensor& segment_ids, int64_t num_segments,
                          const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(values.dim() == 1 || values.dim() == 2, "mixkernels.segment_sum: values must be [N] or [N, C], got shape ",
              values.sizes());
  check_float_dtype(values, "values");
  TORCH_CHECK(segment_ids.dim() == 1 && segment_ids.size(0) == values.size(0),
              "mixkernels.segment_sum: segment_ids must be [N] with N = values.shape[0] = ", values.size(0),
              ", got shape ", segment_ids.sizes());
  check_index_dtype(segment_ids, "segment_ids");
  check_same_device(values, "values", segment_ids, "segment_ids");
  TORCH_CHECK(num_segments >= 0, "mixkernels.segment_sum: num_segments must be >= 0, got ", num_segments);
  if (mask.has_value()) {
    const auto& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "mixkernels.segment_sum: mask must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 1 && m.size(0) == values.size(0), "mixkernels.segment_sum: mask must be [N] with N = ",
                values.size(0), ", got shape ", m.sizes());
    check_same_device(values, "values", m, "mask");
  }
  return values.dim() == 2 ? values.size(1) : 1;
}

namespace {

// Rows hitting the same segment back to back form a serial add chain through one memory slot
// (a few cycles each). With few segments that chain is the bottleneck, so each chunk keeps
// kLanes interleaved copies of its bins (row i adds into copy i % kLanes) and folds them at the end.
constexpr int64_t kLanes = 4;
constexpr int64_t kMaxLanedBins = 4096;

template <typename scalar_t, typename index_t>
void segment_sum_cpu_impl(const scalar_t* values, const index_t* ids, const bool* mask, int64_t n, int64_t c,
                          int64_t num_segments, float* sums, int64_t* counts) {
  const int64_t chunks = segment_sum_num_chunks(n, num_segments);
  const int64_t rows_per_chunk = (n + chunks - 1) / chunks;
  const int64_t bins = num_segments * c;
  const int64_t lanes = bins <= kMaxLanedBins ? kLanes : 1;
  std::vector<double> part_sums(static_cast<size_t>(chunks * lanes * bins), 0.0);
  std::vector<int64_t> part_counts(static_cast<size_t>(chunks * lanes * num_segments), 0);
  std::vector<int64_t> bad_row(static_cast<size_t>(chunks), -1);

  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      double* acc = part_sums.data() + chunk * lanes * bins;
      int64_t* cnt = part_counts.data() + chunk * lanes * num_segments;
      const int64_t lo = chunk * rows_per_chunk;
      const int64_t hi = std::min(n, lo + rows_per_chunk);
      int64_t i = lo;
      if (mask == nullptr && c == 1 && lanes == kLanes) {
        // Hot path (per-token losses into few domains): 4 rows per step, one lane each, so the
        // four read-modify-writes are independent; one combined range test per step.
        const auto s = static_cast<uint64_t>(num_segments);
        for (; i + kLanes <= hi; i += kLanes) {
          const auto a = static_cast<uint64_t>(static_cast<int64_t>(ids[i]));
          const auto b = static_cast<uint64_t>(static_cast<int64_t>(ids[i + 1]));
          const auto d = static_cast<uint64_t>(static_cast<int64_t>(ids[i + 2]));
          const auto e = static_cast<uint64_t>(static_cast<int64_t>(ids[i + 3]));
          if ((a >= s) | (b >= s) | (d >= s) | (e >= s)) break;  // the generic loop below reports it
          acc[a] += static_cast<double>(static_cast<float>(values[i]));
          acc[bins + b] += static_cast<double>(static_cast<float>(values[i + 1]));
          acc[2 * bins + d] += static_cast<double>(static_cast<float>(values[i + 2]));
          acc[3 * bins + e] += static_cast<double>(static_cast<float>(values[i + 3]));
          cnt[a] += 1;
          cnt[num_segments + b] += 1;
          cnt[2 * num_segments + d] += 1;
          cnt[3 * num_segments + e] += 1;
        }
      }
      for (; i < hi; ++i) {
        if (!segment_row_counted(mask, i)) continue;
        const int64_t id = static_cast<int64_t>(ids[i]);
        if (!segment_id_valid(id, num_segments)) {
          bad_row[chunk] = i;
          break;
        }
        const int64_t lane = lanes == 1 ? 0 : (i & (kLanes - 1));
        cnt[lane * num_segments + id] += 1;
        double* out = acc + lane * bins + id * c;
        const scalar_t* row = values + i * c;
        for (int64_t j = 0; j < c; ++j) out[j] += static_cast<double>(static_cast<float>(row[j]));
      }
    }
  });
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t i = bad_row[chunk];
    TORCH_CHECK(i < 0, "mixkernels.segment_sum: segment_ids[", i, "] = ", static_cast<int64_t>(ids[i]),
                " is out of range [0, ", num_segments, ")");
  }
  // Fold lanes and chunks in a fixed order: the same bits whatever the thread count.
  at::parallel_for(0, num_segments, 64, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      int64_t total = 0;
      for (int64_t p = 0; p < chunks * lanes; ++p) total += part_counts[p * num_segments + s];
      counts[s] = total;
      for (int64_t j = 0; j < c; ++j) {
        double sum = 0.0;
        for (int64_t p = 0; p < chunks * lanes; ++p) sum += part_sums[p * bins + s * c + j];
        sums[s * c + j] = static_cast<float>(sum);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> segment_sum_cpu(const at::Tensor& values, const at::Tensor& segment_ids,
                                                   int64_t num_segments, const std::optional<at::Tensor>& mask) {
  const int64_t c = segment_sum_check(values, segment_ids, num_segments, mask);
  const int64_t n = values.size(0);
  auto sum_shape = values.dim() == 2 ? std::vector<int64_t>{num_segments, c} : std::vector<int64_t>{num_segments};
  at::Tensor sums = at::zeros(sum_shape, values.options().dtype(at::kFloat));
  at::Tensor counts = at::zeros({num_segments}, values.options().dtype(at::kLong));
  if (n == 0) return {sums, counts};
  at::Tensor v = values.contiguous();
  at::Tensor ids = segment_ids.contiguous();
  at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  const bool* mask_ptr = m.defined() ? m.data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "segment_sum_cpu", [&] {
    if (ids.scalar_type() == at::kLong) {
      segment_sum_cpu_impl<scalar_t, int64_t>(v.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), mask_ptr, n, c,
                                              num_segments, sums.data_ptr<float>(), counts.data_ptr<int64_t>());
    } else {
      segment_sum_cpu_impl<scalar_t, int32_t>(v.data_ptr<scalar_t>(), ids.data_ptr<int32_t>(), mask_ptr, n, c,
                                              num_segments, sums.data_ptr<float>(), counts.data_ptr<int64_t>());
    }
  });
  return {sums, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(mixkernels, CPU, m) { m.impl("segment_sum", &segment_sum_cpu); }

}  // namespace mixkernels
