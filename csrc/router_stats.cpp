// router_stats, C++ CPU kernels (forward statistics and the logits gradient).
//
// Forward: one pass over L layers x N tokens. Work items are (token chunk, layer) pairs, run by
// at::parallel_for; each item owns partial sums for its [G, E] bins (fp32 within a chunk of at
// most 1024 tokens), so there are no atomics. Partials are reduced in a fixed chunk order in
// double, so results are bitwise identical for any thread count (the chunking is a pure function
// of the shapes). Per token: max, exp, sum, probabilities, entropy and a k-slot insertion top-k
// (exact ties keep the lower expert index): the softmax arithmetic is the MK_HD helpers of
// router_stats.h that the CUDA kernel runs too; the top-k set is the one router_topk_insert
// (CUDA) selects, found by k branch-free vector arg-max passes (select_topk). The O(E) passes
// are written for `omp simd` reductions / vector extensions and are compiled twice: for the
// baseline x86-64 target and for AVX2+FMA (chosen at run time).
//
// Backward: the same per-token softmax recomputed, then dz = p (a - <p, a>) - b p (log p + H).
#include "router_stats.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define MK_X86_DISPATCH 1
#define MK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MK_X86_DISPATCH 0
#define MK_ALWAYS_INLINE inline
#endif

namespace mixkernels {

RouterStatsDims router_stats_check(const std::vector<at::Tensor>& logits, int64_t top_k,
                                   const std::optional<at::Tensor>& group_ids, int64_t num_groups,
                                   const std::optional<at::Tensor>& mask, const char* op) {
  TORCH_CHECK(!logits.empty(), op, ": router_logits is empty; expected L >= 1 tensors [N, E]");
  const at::Tensor& first = logits[0];
  for (size_t i = 0; i < logits.size(); ++i) {
    const at::Tensor& t = logits[i];
    TORCH_CHECK(t.dim() == 2, op, ": router_logits[", i, "] must be [N, E], got shape ", t.sizes());
    TORCH_CHECK(t.sizes() == first.sizes(), op, ": router_logits[", i, "] has shape ", t.sizes(),
                " but router_logits[0] has ", first.sizes(), "; every layer needs the same [N, E]");
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), op, ": router_logits[", i, "] is ", t.scalar_type(),
                " but router_logits[0] is ", first.scalar_type());
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16 ||
                    t.scalar_type() == at::kDouble,
                op, ": router_logits must be float32, float16, bfloat16 (or float64), got ", t.scalar_type());
    check_same_device(first, "router_logits[0]", t, "router_logits[i]");
  }
  const int64_t n = first.size(0);
  const int64_t e = first.size(1);
  TORCH_CHECK(e >= 1, op, ": router_logits has E = 0 experts");
  TORCH_CHECK(top_k >= 1 && top_k <= e, op, ": top_k must be in [1, E = ", e, "], got ", top_k);
  TORCH_CHECK(num_groups >= 1, op, ": num_groups must be >= 1, got ", num_groups);
  if (group_ids.has_value()) {
    const at::Tensor& g = *group_ids;
    check_index_dtype(g, "group_ids");
    TORCH_CHECK(g.dim() == 1 && g.size(0) == n, op, ": group_ids must be [N] with N = ", n, ", got shape ",
                g.sizes());
    check_same_device(first, "router_logits", g, "group_ids");
  }
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": mask must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 1 && m.size(0) == n, op, ": mask must be [N] with N = ", n, ", got shape ", m.sizes());
    check_same_device(first, "router_logits", m, "mask");
  }
  return {static_cast<int64_t>(logits.size()), n, e};
}

std::vector<at::Tensor> router_stats_rows_contiguous(const std::vector<at::Tensor>& logits) {
  std::vector<at::Tensor> rows;
  rows.reserve(logits.size());
  for (const auto& t : logits) rows.push_back(t.stride(1) == 1 ? t : t.contiguous());
  return rows;
}

at::Tensor router_aux_loss(const at::Tensor& counts, const at::Tensor& prob_sum, const at::Tensor& token_count) {
  const auto acc = prob_sum.scalar_type();
  const int64_t e = prob_sum.size(2);
  at::Tensor total = token_count.sum().to(acc).clamp_min(1.0);
  at::Tensor frac_tokens = counts.sum(1).to(acc) / total;
  at::Tensor frac_probs = prob_sum.sum(1) / total;
  return (frac_tokens * frac_probs).sum(-1) * static_cast<double>(e);
}

namespace {
// An environment flag as mixkernels/env.py reads them: "1", "true", "yes" or "on" (any case).
bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return false;
  std::string s(v);
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.erase(s.begin());
  return s == "1" || s == "true" || s == "yes" || s == "on";
}
}  // namespace

bool router_stats_use_avx2() {
#if MK_X86_DISPATCH
  // MIXKERNELS_NO_AVX2=1 forces the baseline build (how the tests cover it on an AVX2 machine)
  static const bool use =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !env_flag("MIXKERNELS_NO_AVX2");
  return use;
#else
  return false;
#endif
}

namespace {

constexpr int64_t kTokensPerChunk = 1024;
constexpr int64_t kMaxChunks = 64;

// Token chunks: a pure function of the shapes, so results do not depend on the thread count.
int64_t router_num_chunks(int64_t n, int64_t num_groups) {
  const int64_t by_size = (n + kTokensPerChunk - 1) / kTokensPerChunk;
  const int64_t by_memory = std::max<int64_t>(1, n / std::max<int64_t>(1, num_groups));  // partials <= input
  return std::max<int64_t>(1, std::min({by_size, kMaxChunks, by_memory}));
}

template <typename scalar_t, typename acc_t, typename index_t>
struct Problem {
  std::vector<const scalar_t*> layer_ptr;
  int64_t row_stride;
  int64_t layers, tokens, experts, groups, top_k;
  const index_t* group_ids;  // nullptr: every token in group 0
  const bool* mask;          // nullptr: every token counted
  int64_t chunks, chunk_tokens;
};

#if MK_X86_DISPATCH
// router_exp on eight floats with AVX2+FMA: the same operations in the same order (clamp, fused
// floor(x log2e + 1/2), two-part ln2 reduction, the degree-7 Horner chain of fmas, exponent bits),
// so each lane equals the scalar router_exp of the AVX2 build. (GCC leaves the scalar loop
// unvectorised: it sees control flow in router_exp.)
__attribute__((target("avx2,fma"), always_inline)) inline __m256 router_exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 zero_out = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);  // underflow and not NaN -> 0
  x = _mm256_blendv_ps(x, lo, zero_out);
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 poly = _mm256_set1_ps(1.f / 5040.f);
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.f / 720.f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.f / 120.f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.f / 24.f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.f / 6.f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(0.5f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_blendv_ps(_mm256_mul_ps(poly, _mm256_castsi256_ps(bits)), _mm256_setzero_ps(), zero_out);
}

__attribute__((target("avx2,fma"), always_inline)) inline float hsum8(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// softmax_row (below) for float accumulation, eight experts at a time; the tail is scalar.
template <typename scalar_t>
__attribute__((target("avx2,fma"), noinline)) float softmax_row_avx2(const scalar_t* __restrict__ row, int64_t e_count,
                                                                      float* __restrict__ x, float* __restrict__ p,
                                                                      float* dot_out) {
  const float* src = x;  // half/bfloat16 rows are widened into x first (x[e] is read before written)
  if constexpr (std::is_same_v<scalar_t, float>) {
    src = row;
  } else {
    for (int64_t e = 0; e < e_count; ++e) x[e] = static_cast<float>(row[e]);
  }
  const int64_t vec_end = e_count / 8 * 8;
  __m256 mv = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t e = 0; e < vec_end; e += 8) mv = _mm256_max_ps(_mm256_loadu_ps(src + e), mv);  // NaN lanes keep mv
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mv);
  float m = -std::numeric_limits<float>::infinity();
  for (int l = 0; l < 8; ++l) m = lanes[l] > m ? lanes[l] : m;
  for (int64_t e = vec_end; e < e_count; ++e) m = src[e] > m ? src[e] : m;
  const __m256 mb = _mm256_set1_ps(m), zero = _mm256_setzero_ps();
  __m256 sv = zero, dv = zero;
  for (int64_t e = 0; e < vec_end; e += 8) {
    const __m256 xe = _mm256_sub_ps(_mm256_loadu_ps(src + e), mb);
    const __m256 ex = router_exp8(xe);
    _mm256_storeu_ps(x + e, xe);
    _mm256_storeu_ps(p + e, ex);
    sv = _mm256_add_ps(sv, ex);
    dv = _mm256_add_ps(dv, _mm256_and_ps(_mm256_mul_ps(ex, xe), _mm256_cmp_ps(ex, zero, _CMP_GT_OQ)));
  }
  float s = hsum8(sv), dot = hsum8(dv);
  for (int64_t e = vec_end; e < e_count; ++e) {
    const float xe = src[e] - m;
    const float ex = router_exp(xe);
    x[e] = xe;
    p[e] = ex;
    s += ex;
    dot += ex > 0.f ? ex * xe : 0.f;
  }
  *dot_out = dot;
  return s;
}
#endif

// Softmax pieces of one token: x[e] = z_e - m, p[e] = router_exp(x_e) (unnormalised); returns
// s = sum_e p[e] and *dot = sum_{p_e > 0} p[e] x[e] (for the entropy). Two O(E) passes.
// kAvx2 (the AVX2+FMA build of an item) with float accumulation takes softmax_row_avx2.
template <bool kAvx2, typename scalar_t, typename acc_t>
MK_ALWAYS_INLINE acc_t softmax_row(const scalar_t* __restrict__ row, int64_t e_count, acc_t* __restrict__ x,
                                   acc_t* __restrict__ p, acc_t* dot_out) {
#if MK_X86_DISPATCH
  if constexpr (kAvx2 && std::is_same_v<acc_t, float>) return softmax_row_avx2<scalar_t>(row, e_count, x, p, dot_out);
#endif
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t e = 0; e < e_count; ++e) {
    const acc_t v = static_cast<acc_t>(row[e]);
    m = v > m ? v : m;
  }
  acc_t s = 0, dot = 0;
#pragma omp simd reduction(+ : s, dot)
  for (int64_t e = 0; e < e_count; ++e) {
    const acc_t xe = static_cast<acc_t>(row[e]) - m;
    const acc_t ex = router_exp(xe);
    x[e] = xe;
    p[e] = ex;
    s += ex;
    dot += ex > acc_t(0) ? ex * xe : acc_t(0);
  }
  *dot_out = dot;
  return s;
}

// Lanes of one 32-byte vector of acc_t (8 floats or 4 doubles) and the matching index lanes.
template <typename acc_t>
struct Lanes {
  static constexpr int kW = 32 / static_cast<int>(sizeof(acc_t));
  using index_t = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;
  typedef acc_t vec __attribute__((vector_size(32)));
  typedef index_t ivec __attribute__((vector_size(32)));
};

// The two ways select_topk (below) finds the top-k set.
template <typename acc_t>
MK_ALWAYS_INLINE void insertion_topk(const acc_t* __restrict__ p, int64_t e_count, int32_t k, acc_t* __restrict__ top_v,
                                     int32_t* __restrict__ top_i) {
  int32_t filled = 0;
  for (int64_t e = 0; e < e_count; ++e) router_topk_insert<acc_t>(p[e], static_cast<int32_t>(e), top_v, top_i, &filled, k);
}

template <typename acc_t>
MK_ALWAYS_INLINE void vector_topk(const acc_t* __restrict__ p, int64_t e_count, int32_t k, int32_t* __restrict__ top_i) {
  using L = Lanes<acc_t>;
  using ivec = typename L::ivec;
  using index_t = typename L::index_t;
  constexpr int W = L::kW;
  const int64_t padded = (e_count + W - 1) / W * W;
  ivec lane;
  for (int l = 0; l < W; ++l) lane[l] = l;
  // The passes compare keys, not floats: the IEEE bits of p read as signed integers of the same
  // width order every p >= 0 exactly as the floats do, and put the -1 padding (negative) below
  // them. The arg-max chain is latency-bound, and an integer compare takes 1 cycle where a float
  // compare takes 3-4.
  ivec prev_v = ivec{} + std::numeric_limits<index_t>::max();  // pass 0: every expert eligible
  ivec prev_i = ivec{} - 1;
  for (int32_t j = 0; j < k; ++j) {
    ivec best = ivec{} + std::numeric_limits<index_t>::min();  // below every key, padding included
    ivec best_i = ivec{};
    ivec idx = lane;
    for (int64_t e = 0; e < padded; e += W, idx += W) {
      ivec v;
      std::memcpy(&v, p + e, sizeof(ivec));
      const auto take = ((v < prev_v) | ((v == prev_v) & (idx > prev_i))) & (v > best);
      best = take ? v : best;
      best_i = take ? idx : best_i;
    }
    ivec m = best;
    for (int step = W / 2; step >= 1; step /= 2) {
      const ivec o = __builtin_shuffle(m, lane ^ step);
      m = o > m ? o : m;
    }
    ivec mi = best == m ? best_i : ivec{} + std::numeric_limits<index_t>::max();
    for (int step = W / 2; step >= 1; step /= 2) {
      const ivec o = __builtin_shuffle(mi, lane ^ step);
      mi = o < mi ? o : mi;
    }
    prev_v = m;  // the butterflies leave the winner in every lane
    prev_i = mi;
    top_i[j] = static_cast<int32_t>(mi[0]);
  }
}

// Top-k set of p[0..E) (ties to the lower index), written to top_i[0..k): the same set as
// inserting every expert with router_topk_insert (what the CUDA kernel does). Experts are ranked
// by (p descending, index ascending), a strict total order; pass j finds the largest expert that
// comes after pass j-1's winner in that order, by a vectorised arg-max over p (each lane keeps
// its largest eligible value and, by strict '>', the lowest index holding it), then a butterfly
// merge of the lanes (largest value, then lowest index). Nothing is written between passes and no
// branch depends on the data. p is padded to whole vectors with -1: never chosen, since
// probabilities are >= 0 and k <= E. NaN probabilities (a NaN or +inf logit makes s NaN) fail
// every comparison; then the insertion path decides, as on CUDA. The baseline x86-64 build
// (kVector false: SSE2 has no blend or variable shuffle, the passes would be 5-10x slower) always
// takes the insertion path.
template <bool kVector, typename acc_t>
MK_ALWAYS_INLINE void select_topk(const acc_t* __restrict__ p, int64_t e_count, int32_t k, acc_t s,
                                  acc_t* __restrict__ top_v, int32_t* __restrict__ top_i) {
  if constexpr (!kVector) {
    insertion_topk(p, e_count, k, top_v, top_i);
  } else {
    if (!(s == s)) return insertion_topk(p, e_count, k, top_v, top_i);
    vector_topk(p, e_count, k, top_i);
  }
}

// One (chunk, layer) work item of the forward.
template <bool kAvx2, typename scalar_t, typename acc_t, typename index_t>
MK_ALWAYS_INLINE void forward_item(const Problem<scalar_t, acc_t, index_t>& pb, int64_t chunk, int64_t layer,
                                   acc_t* __restrict__ probs, acc_t* __restrict__ entropy, int64_t* __restrict__ counts,
                                   int64_t* __restrict__ tokens, int64_t* bad_token, acc_t* x, acc_t* p, acc_t* top_v,
                                   int32_t* top_i) {
  const int64_t e_count = pb.experts;
  const int32_t k = static_cast<int32_t>(pb.top_k);
  const int64_t t0 = chunk * pb.chunk_tokens;
  const int64_t t1 = std::min(pb.tokens, t0 + pb.chunk_tokens);
  const scalar_t* base = pb.layer_ptr[layer];
  for (int64_t t = t0; t < t1; ++t) {
    if (!router_token_counted(pb.mask, t)) continue;
    const int64_t g = pb.group_ids ? static_cast<int64_t>(pb.group_ids[t]) : 0;
    if (g < 0 || g >= pb.groups) {
      *bad_token = t;
      return;
    }
    acc_t dot;
    const acc_t s = softmax_row<kAvx2, scalar_t, acc_t>(base + t * pb.row_stride, e_count, x, p, &dot);
    const acc_t inv = acc_t(1) / s;
    acc_t* __restrict__ dst = probs + g * e_count;
#pragma omp simd
    for (int64_t e = 0; e < e_count; ++e) {
      p[e] *= inv;
      dst[e] += p[e];
    }
    entropy[g] += router_entropy(s, dot, inv);
    select_topk<kAvx2, acc_t>(p, e_count, k, s, top_v, top_i);
    int64_t* __restrict__ c = counts + g * e_count;
    for (int32_t j = 0; j < k; ++j) c[top_i[j]] += 1;
    if (tokens) tokens[g] += 1;
  }
}

template <bool kAvx2, typename scalar_t, typename acc_t, typename index_t>
MK_ALWAYS_INLINE void backward_item(const Problem<scalar_t, acc_t, index_t>& pb, int64_t chunk, int64_t layer,
                                    const acc_t* __restrict__ grad_probs, const acc_t* __restrict__ grad_entropy,
                                    scalar_t* __restrict__ out, acc_t* x, acc_t* p) {
  const int64_t e_count = pb.experts;
  const int64_t t0 = chunk * pb.chunk_tokens;
  const int64_t t1 = std::min(pb.tokens, t0 + pb.chunk_tokens);
  const scalar_t* base = pb.layer_ptr[layer];
  for (int64_t t = t0; t < t1; ++t) {
    scalar_t* __restrict__ o = out + t * e_count;
    const int64_t g = pb.group_ids ? static_cast<int64_t>(pb.group_ids[t]) : 0;
    if (!router_token_counted(pb.mask, t) || g < 0 || g >= pb.groups) {
      for (int64_t e = 0; e < e_count; ++e) o[e] = scalar_t(0);
      continue;
    }
    acc_t dot;
    const acc_t s = softmax_row<kAvx2, scalar_t, acc_t>(base + t * pb.row_stride, e_count, x, p, &dot);
    const acc_t inv = acc_t(1) / s;
    const acc_t* __restrict__ a = grad_probs + (layer * pb.groups + g) * e_count;
    const acc_t b = grad_entropy[layer * pb.groups + g];
    acc_t pa = 0;
#pragma omp simd reduction(+ : pa)
    for (int64_t e = 0; e < e_count; ++e) {
      p[e] *= inv;
      pa += p[e] * a[e];
    }
    const acc_t log_s = router_log(s);
    const acc_t h = router_entropy(s, dot, inv);
    for (int64_t e = 0; e < e_count; ++e) {
      o[e] = static_cast<scalar_t>(router_grad_term<acc_t>(p[e], x[e], log_s, h, a[e], pa, b));
    }
  }
}

// The same item bodies compiled for the baseline target and for AVX2+FMA.
template <typename S, typename A, typename I>
void forward_item_base(const Problem<S, A, I>& pb, int64_t c, int64_t l, A* pr, A* en, int64_t* co, int64_t* tk,
                       int64_t* bad, A* x, A* p, A* tv, int32_t* ti) {
  forward_item<false>(pb, c, l, pr, en, co, tk, bad, x, p, tv, ti);
}
template <typename S, typename A, typename I>
void backward_item_base(const Problem<S, A, I>& pb, int64_t c, int64_t l, const A* gp, const A* ge, S* out, A* x,
                        A* p) {
  backward_item<false>(pb, c, l, gp, ge, out, x, p);
}
#if MK_X86_DISPATCH
template <typename S, typename A, typename I>
__attribute__((target("avx2,fma"))) void forward_item_avx2(const Problem<S, A, I>& pb, int64_t c, int64_t l, A* pr,
                                                           A* en, int64_t* co, int64_t* tk, int64_t* bad, A* x, A* p,
                                                           A* tv, int32_t* ti) {
  forward_item<true>(pb, c, l, pr, en, co, tk, bad, x, p, tv, ti);
}
template <typename S, typename A, typename I>
__attribute__((target("avx2,fma"))) void backward_item_avx2(const Problem<S, A, I>& pb, int64_t c, int64_t l,
                                                            const A* gp, const A* ge, S* out, A* x, A* p) {
  backward_item<true>(pb, c, l, gp, ge, out, x, p);
}
#endif

template <typename scalar_t, typename acc_t, typename index_t>
Problem<scalar_t, acc_t, index_t> make_problem(const std::vector<at::Tensor>& rows, const RouterStatsDims& d,
                                               int64_t top_k, const at::Tensor& ids, int64_t num_groups,
                                               const at::Tensor& mask) {
  Problem<scalar_t, acc_t, index_t> pb;
  for (const auto& t : rows) pb.layer_ptr.push_back(t.data_ptr<scalar_t>());
  pb.row_stride = rows[0].stride(0);
  pb.layers = d.layers;
  pb.tokens = d.tokens;
  pb.experts = d.experts;
  pb.groups = num_groups;
  pb.top_k = top_k;
  pb.group_ids = ids.defined() ? ids.data_ptr<index_t>() : nullptr;
  pb.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  pb.chunks = router_num_chunks(d.tokens, num_groups);
  pb.chunk_tokens = (d.tokens + pb.chunks - 1) / pb.chunks;
  return pb;
}

// Every layer with unit column stride and one common row stride (copies only the odd ones out).
std::vector<at::Tensor> uniform_rows(const std::vector<at::Tensor>& logits) {
  std::vector<at::Tensor> rows = router_stats_rows_contiguous(logits);
  for (const auto& t : rows) {
    if (t.stride(0) != rows[0].stride(0)) {
      for (auto& r : rows) r = r.contiguous();
      break;
    }
  }
  return rows;
}

template <typename scalar_t, typename acc_t, typename index_t>
void forward_cpu(const Problem<scalar_t, acc_t, index_t>& pb, acc_t* prob_out, acc_t* entropy_out, int64_t* count_out,
                 int64_t* token_out, acc_t* aux_out) {
  const int64_t L = pb.layers, G = pb.groups, E = pb.experts, C = pb.chunks;
  const int64_t items = C * L;
  std::vector<acc_t> part_probs(static_cast<size_t>(items * G * E), acc_t(0));
  std::vector<acc_t> part_entropy(static_cast<size_t>(items * G), acc_t(0));
  std::vector<int64_t> part_counts(static_cast<size_t>(items * G * E), 0);
  std::vector<int64_t> part_tokens(static_cast<size_t>(C * G), 0);
  std::vector<int64_t> bad(static_cast<size_t>(items), -1);
#if MK_X86_DISPATCH
  const bool avx2 = router_stats_use_avx2();
#endif
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    // p padded to whole vectors with -1 for select_topk (the tail is never written)
    std::vector<acc_t> x(static_cast<size_t>(E)), p(static_cast<size_t>(E + 8), acc_t(-1));
    std::vector<acc_t> top_v(static_cast<size_t>(pb.top_k));
    std::vector<int32_t> top_i(static_cast<size_t>(E + 1));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t chunk = item / L, layer = item % L;
      acc_t* pr = part_probs.data() + item * G * E;
      acc_t* en = part_entropy.data() + item * G;
      int64_t* co = part_counts.data() + item * G * E;
      int64_t* tk = layer == 0 ? part_tokens.data() + chunk * G : nullptr;
#if MK_X86_DISPATCH
      if (avx2) {
        forward_item_avx2(pb, chunk, layer, pr, en, co, tk, &bad[item], x.data(), p.data(), top_v.data(), top_i.data());
        continue;
      }
#endif
      forward_item_base(pb, chunk, layer, pr, en, co, tk, &bad[item], x.data(), p.data(), top_v.data(), top_i.data());
    }
  });
  int64_t first_bad = -1;
  for (int64_t b : bad)
    if (b >= 0 && (first_bad < 0 || b < first_bad)) first_bad = b;
  TORCH_CHECK(first_bad < 0, "mixkernels.router_stats: group_ids[", first_bad, "] = ",
              static_cast<int64_t>(pb.group_ids ? pb.group_ids[std::max<int64_t>(first_bad, 0)] : 0),
              " is out of range [0, ", G, ")");
  // Deterministic reduction over chunks in chunk order, in double.
  std::vector<double> probs_d(static_cast<size_t>(L * G * E), 0.0);
  at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      for (int64_t ge = 0; ge < G * E; ++ge) {
        double ps = 0.0;
        int64_t cs = 0;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t off = (c * L + l) * G * E + ge;
          ps += static_cast<double>(part_probs[off]);
          cs += part_counts[off];
        }
        probs_d[l * G * E + ge] = ps;
        prob_out[l * G * E + ge] = static_cast<acc_t>(ps);
        count_out[l * G * E + ge] = cs;
      }
      for (int64_t g = 0; g < G; ++g) {
        double es = 0.0;
        for (int64_t c = 0; c < C; ++c) es += static_cast<double>(part_entropy[(c * L + l) * G + g]);
        entropy_out[l * G + g] = static_cast<acc_t>(es);
      }
    }
  });
  int64_t total = 0;
  for (int64_t g = 0; g < G; ++g) {
    int64_t ts = 0;
    for (int64_t c = 0; c < C; ++c) ts += part_tokens[c * G + g];
    token_out[g] = ts;
    total += ts;
  }
  const double denom = static_cast<double>(std::max<int64_t>(total, 1));
  for (int64_t l = 0; l < L; ++l) {
    double acc = 0.0;
    for (int64_t e = 0; e < E; ++e) {
      double cl = 0.0, pl = 0.0;
      for (int64_t g = 0; g < G; ++g) {
        cl += static_cast<double>(count_out[(l * G + g) * E + e]);
        pl += probs_d[(l * G + g) * E + e];
      }
      acc += (cl / denom) * (pl / denom);
    }
    aux_out[l] = static_cast<acc_t>(static_cast<double>(E) * acc);
  }
}

template <typename F>
void dispatch_index(const at::Tensor& ids, F&& f) {
  if (ids.defined() && ids.scalar_type() == at::kInt) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> router_stats_cpu(
    const std::vector<at::Tensor>& logits, int64_t top_k, const std::optional<at::Tensor>& group_ids,
    int64_t num_groups, const std::optional<at::Tensor>& mask) {
  const RouterStatsDims d = router_stats_check(logits, top_k, group_ids, num_groups, mask, "mixkernels.router_stats");
  const auto in_type = logits[0].scalar_type();
  const auto acc_type = in_type == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logits[0].options();
  at::Tensor prob_sum = at::zeros({d.layers, num_groups, d.experts}, opts.dtype(acc_type));
  at::Tensor entropy_sum = at::zeros({d.layers, num_groups}, opts.dtype(acc_type));
  at::Tensor aux = at::zeros({d.layers}, opts.dtype(acc_type));
  at::Tensor counts = at::zeros({d.layers, num_groups, d.experts}, opts.dtype(at::kLong));
  at::Tensor tokens = at::zeros({num_groups}, opts.dtype(at::kLong));
  if (d.tokens == 0) return {prob_sum, entropy_sum, aux, counts, tokens};
  const std::vector<at::Tensor> rows = uniform_rows(logits);
  const at::Tensor ids = group_ids.has_value() ? group_ids->contiguous() : at::Tensor();
  const at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_type, "router_stats_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    dispatch_index(ids, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      auto pb = make_problem<scalar_t, acc_t, index_t>(rows, d, top_k, ids, num_groups, m);
      forward_cpu<scalar_t, acc_t, index_t>(pb, prob_sum.data_ptr<acc_t>(), entropy_sum.data_ptr<acc_t>(),
                                            counts.data_ptr<int64_t>(), tokens.data_ptr<int64_t>(), aux.data_ptr<acc_t>());
    });
  });
  return {prob_sum, entropy_sum, aux, counts, tokens};
}

std::vector<at::Tensor> router_stats_backward_cpu(const std::vector<at::Tensor>& logits,
                                                  const std::optional<at::Tensor>& group_ids, int64_t num_groups,
                                                  const std::optional<at::Tensor>& mask,
                                                  const at::Tensor& grad_prob_sum, const at::Tensor& grad_entropy_sum) {
  const RouterStatsDims d =
      router_stats_check(logits, 1, group_ids, num_groups, mask, "mixkernels.router_stats_backward");
  TORCH_CHECK(grad_prob_sum.dim() == 3 && grad_prob_sum.size(0) == d.layers && grad_prob_sum.size(1) == num_groups &&
                  grad_prob_sum.size(2) == d.experts,
              "mixkernels.router_stats_backward: grad_prob_sum must be [L, G, E] = [", d.layers, ", ", num_groups, ", ",
              d.experts, "], got ", grad_prob_sum.sizes());
  TORCH_CHECK(grad_entropy_sum.dim() == 2 && grad_entropy_sum.size(0) == d.layers &&
                  grad_entropy_sum.size(1) == num_groups,
              "mixkernels.router_stats_backward: grad_entropy_sum must be [L, G] = [", d.layers, ", ", num_groups,
              "], got ", grad_entropy_sum.sizes());
  const auto in_type = logits[0].scalar_type();
  const auto acc_type = in_type == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<at::Tensor> grads;
  for (const auto& t : logits) grads.push_back(at::empty({d.tokens, d.experts}, t.options()));
  if (d.tokens == 0) return grads;
  const at::Tensor gp = grad_prob_sum.to(acc_type).contiguous();
  const at::Tensor ge = grad_entropy_sum.to(acc_type).contiguous();
  const std::vector<at::Tensor> rows = uniform_rows(logits);
  const at::Tensor ids = group_ids.has_value() ? group_ids->contiguous() : at::Tensor();
  const at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_type, "router_stats_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    dispatch_index(ids, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      auto pb = make_problem<scalar_t, acc_t, index_t>(rows, d, 1, ids, num_groups, m);
      const acc_t* gp_ptr = gp.data_ptr<acc_t>();
      const acc_t* ge_ptr = ge.data_ptr<acc_t>();
#if MK_X86_DISPATCH
      const bool avx2 = router_stats_use_avx2();
#endif
      at::parallel_for(0, pb.chunks * pb.layers, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> x(static_cast<size_t>(d.experts)), p(static_cast<size_t>(d.experts));
        for (int64_t item = begin; item < end; ++item) {
          const int64_t chunk = item / pb.layers, layer = item % pb.layers;
          scalar_t* out = grads[layer].data_ptr<scalar_t>();
#if MK_X86_DISPATCH
          if (avx2) {
            backward_item_avx2(pb, chunk, layer, gp_ptr, ge_ptr, out, x.data(), p.data());
            continue;
          }
#endif
          backward_item_base(pb, chunk, layer, gp_ptr, ge_ptr, out, x.data(), p.data());
        }
      });
    });
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixkernels, CPU, m) {
  m.impl("router_stats", &router_stats_cpu);
  m.impl("router_stats_backward", &router_stats_backward_cpu);
}

}  // namespace mixkernels
