// linear_ce / cross_entropy, C++ CPU kernels and the device-agnostic chunk driver.
//
//   u_c = s (h_c W^T (+ b))           ATen GEMM (MKL/oneDNN), fp32 (fp64 for fp64 inputs); the
//                                     logit scale s rides on the GEMM's alpha/beta (free)
//   fused per-row step (this file)    softcap (optional), max, sum z, sum exp -> lse, token loss,
//                                     z-loss, group sums, and in place the gradient
//                                     du = c s (softmax * (1 + 2 lam lse) - target) * softcap'
//   dh_c = du W,  dW += du^T h_c      ATen GEMMs (only when the forward computes the gradients)
// Shapes: hidden [N, d], weight [V, d], labels [N] int64, group_ids [N] int64, chunk of R rows.
//
// Parallelism: chunks run one after another, each GEMM uses every ATen thread, and the fused
// step is parallel over the chunk's rows (at::parallel_for). Running whole chunks in parallel
// with single-threaded GEMMs would need one [V, d] fp32 dW accumulator per thread; the GEMMs
// here are large enough (>= hundreds of rows x V x d) to scale inside BLAS instead.
//
// Accumulation: lse, losses in fp32 (fp64 for fp64 inputs); row sums in SIMD partial sums;
// group sums in double, in row order (bitwise reproducible for any thread count); the weight
// gradient in an fp32 [V, d] buffer across chunks; gradients returned in the input dtype.
// fp16/bf16 inputs: W is upcast to fp32 once (V x d x 4 bytes) and each h chunk per chunk.
#include "linear_ce.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>

namespace mixkernels {

// ---- argument checks (shared by the CPU and CUDA entry points) -------------------------------

namespace {

void check_labels_tensor(const at::Tensor& labels, int64_t n, const char* lead) {
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n, "mixkernels.linear_cross_entropy: labels has shape ",
              labels.sizes(), " but ", lead, " has ", n, " rows; expected labels of shape [", n, "]");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "mixkernels.linear_cross_entropy: labels must be int64, got ",
              labels.scalar_type());
}

void check_groups(const std::optional<at::Tensor>& group_ids, int64_t num_groups, int64_t n, const at::Tensor& lead) {
  if (!group_ids.has_value()) return;
  const auto& g = *group_ids;
  TORCH_CHECK(g.dim() == 1 && g.size(0) == n, "mixkernels.linear_cross_entropy: group_ids has shape ", g.sizes(),
              " but labels has shape [", n, "]; expected the same shape");
  TORCH_CHECK(g.scalar_type() == at::kLong, "mixkernels.linear_cross_entropy: group_ids must be int64, got ",
              g.scalar_type());
  TORCH_CHECK(num_groups >= 1, "mixkernels.linear_cross_entropy: num_groups must be >= 1 with group_ids, got ",
              num_groups);
  check_same_device(lead, "hidden", g, "group_ids");
}

void check_linear(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(hidden.dim() == 2, "mixkernels.linear_cross_entropy: hidden must be [N, d], got shape ", hidden.sizes());
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kHalf ||
                  hidden.scalar_type() == at::kBFloat16 || hidden.scalar_type() == at::kDouble,
              "mixkernels.linear_cross_entropy: hidden must be float32, float16, bfloat16 or float64, got ",
              hidden.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1) && weight.size(0) >= 1,
              "mixkernels.linear_cross_entropy: weight has shape ", weight.sizes(), " but hidden has shape ",
              hidden.sizes(), "; expected weight of shape [V >= 1, ", hidden.size(1), "]");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "mixkernels.linear_cross_entropy: weight is ",
              weight.scalar_type(), " but hidden is ", hidden.scalar_type(), "; expected the same dtype");
  check_same_device(hidden, "hidden", weight, "weight");
  check_labels_tensor(labels, hidden.size(0), "hidden");
  check_same_device(hidden, "hidden", labels, "labels");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "mixkernels.linear_cross_entropy: bias has shape ",
                bias->sizes(), " but weight has shape ", weight.sizes(), "; expected bias of shape [", weight.size(0),
                "]");
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), "mixkernels.linear_cross_entropy: bias is ",
                bias->scalar_type(), " but weight is ", weight.scalar_type(), "; expected the same dtype");
    check_same_device(weight, "weight", *bias, "bias");
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// u = scale * (h W^T (+ b)); the scale goes into the GEMM (alpha, and beta for the bias).
at::Tensor chunk_logits(const at::Tensor& hc, const at::Tensor& wg, const at::Tensor& bg, double scale) {
  if (bg.defined()) return scale == 1.0 ? at::addmm(bg, hc, wg.t()) : at::addmm(bg, hc, wg.t(), scale, scale);
  if (scale == 1.0) return at::mm(hc, wg.t());
  return at::empty({hc.size(0), wg.size(0)}, hc.options()).addmm_(hc, wg.t(), /*beta=*/0, /*alpha=*/scale);
}

// (loss, token_loss output, z_loss output) from the per-token CE and z-loss (zl undefined: off).
std::tuple<at::Tensor, at::Tensor, at::Tensor> reduce_losses(const at::Tensor& token_loss, const at::Tensor& zl,
                                                             const at::Tensor& scale, int64_t reduction) {
  // custom ops may not return aliases of one another: a fresh empty tensor per output
  auto empty = [&] { return at::empty({0}, token_loss.options()); };
  if (!zl.defined()) {
    if (reduction == 0) return {token_loss, empty(), empty()};
    return {token_loss.sum().mul_(scale), token_loss, empty()};
  }
  if (reduction == 0) return {token_loss + zl, token_loss, zl};
  at::Tensor z_out = zl.sum().mul_(scale);
  return {token_loss.sum().mul_(scale).add_(z_out), token_loss, z_out};
}

}  // namespace

void check_loss_options(const LossOptions& o, const char* op) {
  TORCH_CHECK(std::isfinite(o.softcap) && o.softcap >= 0.0, "mixkernels.", op,
              ": softcap must be 0 (off) or a finite float > 0, got ", o.softcap);
  TORCH_CHECK(std::isfinite(o.logit_scale) && o.logit_scale > 0.0, "mixkernels.", op,
              ": logit_scale must be a finite float > 0, got ", o.logit_scale);
  TORCH_CHECK(std::isfinite(o.z_loss) && o.z_loss >= 0.0, "mixkernels.", op,
              ": z_loss must be a finite float >= 0, got ", o.z_loss);
}

// ---- chunk drivers (device-agnostic ATen code; the fused step comes from CeKernels) ----------

LinearCeOut linear_ce_driver(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& group_ids,
                             int64_t num_groups, int64_t ignore_index, double label_smoothing, int64_t reduction,
                             int64_t chunk_size, bool compute_grad, bool weight_grad, const LossOptions& o,
                             const CeKernels& k) {
  check_linear(hidden, weight, labels, bias);
  check_loss_options(o, "linear_cross_entropy");
  check_groups(group_ids, num_groups, hidden.size(0), hidden);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "mixkernels.linear_cross_entropy: reduction code must be 0 (none), ",
              "1 (sum) or 2 (mean), got ", reduction);
  TORCH_CHECK(chunk_size >= 1, "mixkernels.linear_cross_entropy: chunk_size must be >= 1, got ", chunk_size);
  const int64_t n = hidden.size(0), d = hidden.size(1), v = weight.size(0);
  const auto acc = acc_type(hidden.scalar_type());
  const auto gemm = k.gemm_in_input_dtype ? hidden.scalar_type() : acc;
  const auto fopt = hidden.options().dtype(acc);
  const at::Tensor y = labels.contiguous();
  const at::Tensor valid = y.ne(ignore_index);
  // Mean: 1 / max(count, 1) kept as a device tensor (no host sync on CUDA); count 0 -> loss 0.
  const at::Tensor scale =
      reduction == 2 ? valid.sum().clamp_min(1).to(acc).reciprocal() : at::ones({}, fopt);
  const bool grads = compute_grad && reduction != 0;
  const bool wgrad = grads && weight_grad;  // a frozen head needs no [V, d] accumulator nor its GEMM

  at::Tensor token_loss = at::empty({n}, fopt);
  at::Tensor lse = at::empty({n}, fopt);
  const at::Tensor gids = group_ids.has_value() ? group_ids->contiguous() : at::Tensor();
  const int64_t g = gids.defined() ? num_groups : 0;
  at::Tensor group_acc = at::zeros({g}, hidden.options().dtype(at::kDouble));
  at::Tensor group_cnt = at::zeros({g}, hidden.options().dtype(at::kLong));
  const at::Tensor wg = weight.to(gemm);
  const at::Tensor bg = bias.has_value() ? bias->to(gemm) : at::Tensor();
  // the kernels return d/du; times logit_scale (folded into coef) that is d/d(h W^T + b)
  const at::Tensor coef = grads ? at::where(valid, scale, at::zeros({}, fopt)).mul_(o.logit_scale) : at::Tensor();
  at::Tensor zl = o.z_loss != 0.0 ? at::empty({n}, fopt) : at::Tensor();
  const CeParams params{ignore_index, label_smoothing, o.softcap, o.z_loss};
  at::Tensor grad_hidden = grads ? at::empty({n, d}, hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor gw_acc = wgrad ? at::zeros({v, d}, fopt) : at::Tensor();
  at::Tensor gb_acc = wgrad && bias.has_value() ? at::zeros({v}, fopt) : at::Tensor();

  for (int64_t lo = 0; lo < n; lo += chunk_size) {
    const int64_t r = std::min(chunk_size, n - lo);
    const at::Tensor hc = hidden.narrow(0, lo, r).to(gemm);
    at::Tensor z = chunk_logits(hc, wg, bg, o.logit_scale);
    if (z.scalar_type() != acc) z = z.to(acc);
    z = z.contiguous();
    at::Tensor lse_c = lse.narrow(0, lo, r);
    at::Tensor loss_c = token_loss.narrow(0, lo, r);
    at::Tensor zl_c = zl.defined() ? zl.narrow(0, lo, r) : at::Tensor();
    const at::Tensor coef_c = grads ? coef.narrow(0, lo, r) : at::Tensor();
    const at::Tensor gid_c = gids.defined() ? gids.narrow(0, lo, r) : at::Tensor();
    k.forward(z, y.narrow(0, lo, r), params, coef_c, lse_c, loss_c, zl_c, gid_c, group_acc, group_cnt, lo);
    if (!grads) continue;
    const at::Tensor dz = z.scalar_type() == gemm ? z : z.to(gemm);
    at::Tensor gh_c = grad_hidden.narrow(0, lo, r);
    if (gemm == hidden.scalar_type()) {
      at::mm_out(gh_c, dz, wg);
    } else {
      gh_c.copy_(at::mm(dz, wg));
    }
    if (!wgrad) continue;
    if (gemm == acc) {
      gw_acc.addmm_(dz.t(), hc);
    } else {
      gw_acc.add_(at::mm(dz.t(), hc));
    }
    if (gb_acc.defined()) gb_acc.add_(z.sum(0));
  }

  auto [loss, token_out, z_out] = reduce_losses(token_loss, zl, scale, reduction);
  at::Tensor grad_weight = wgrad ? gw_acc.to(weight.scalar_type()) : at::empty({0}, weight.options());
  at::Tensor grad_bias = gb_acc.defined() ? gb_acc.to(bias->scalar_type()) : at::empty({0}, hidden.options());
  return {loss, token_out, lse, group_acc.to(acc), group_cnt, grad_hidden, grad_weight, grad_bias, z_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_backward_driver(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, const std::optional<at::Tensor>& bias,
    const at::Tensor& lse, const at::Tensor& grad_token, int64_t ignore_index, double label_smoothing,
    int64_t chunk_size, const LossOptions& o, const CeKernels& k) {
  check_linear(hidden, weight, labels, bias);
  check_loss_options(o, "linear_cross_entropy");
  const int64_t n = hidden.size(0), d = hidden.size(1), v = weight.size(0);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == n, "mixkernels.linear_cross_entropy backward: lse has shape ",
              lse.sizes(), " but hidden has ", n, " rows");
  TORCH_CHECK(grad_token.dim() == 1 && grad_token.size(0) == n,
              "mixkernels.linear_cross_entropy backward: grad_token has shape ", grad_token.sizes(), " but hidden has ",
              n, " rows");
  TORCH_CHECK(chunk_size >= 1, "mixkernels.linear_cross_entropy: chunk_size must be >= 1, got ", chunk_size);
  const auto acc = acc_type(hidden.scalar_type());
  const auto gemm = k.gemm_in_input_dtype ? hidden.scalar_type() : acc;
  const at::Tensor y = labels.contiguous();
  const at::Tensor lse_a = lse.to(acc).contiguous();
  const at::Tensor coef = grad_token.to(acc).mul(o.logit_scale).contiguous();
  const CeParams params{ignore_index, label_smoothing, o.softcap, o.z_loss};
  const at::Tensor wg = weight.to(gemm);
  const at::Tensor bg = bias.has_value() ? bias->to(gemm) : at::Tensor();
  at::Tensor grad_hidden = at::empty({n, d}, hidden.options());
  at::Tensor gw_acc = at::zeros({v, d}, hidden.options().dtype(acc));
  at::Tensor gb_acc = bias.has_value() ? at::zeros({v}, hidden.options().dtype(acc)) : at::Tensor();
  for (int64_t lo = 0; lo < n; lo += chunk_size) {
    const int64_t r = std::min(chunk_size, n - lo);
    const at::Tensor hc = hidden.narrow(0, lo, r).to(gemm);
    at::Tensor z = chunk_logits(hc, wg, bg, o.logit_scale);
    if (z.scalar_type() != acc) z = z.to(acc);
    z = z.contiguous();
    k.grad(z, y.narrow(0, lo, r), params, lse_a.narrow(0, lo, r), coef.narrow(0, lo, r));
    const at::Tensor dz = z.scalar_type() == gemm ? z : z.to(gemm);
    at::Tensor gh_c = grad_hidden.narrow(0, lo, r);
    if (gemm == hidden.scalar_type()) {
      at::mm_out(gh_c, dz, wg);
    } else {
      gh_c.copy_(at::mm(dz, wg));
    }
    if (gemm == acc) {
      gw_acc.addmm_(dz.t(), hc);
    } else {
      gw_acc.add_(at::mm(dz.t(), hc));
    }
    if (gb_acc.defined()) gb_acc.add_(z.sum(0));
  }
  at::Tensor grad_bias = gb_acc.defined() ? gb_acc.to(bias->scalar_type()) : at::empty({0}, hidden.options());
  return {grad_hidden, gw_acc.to(weight.scalar_type()), grad_bias};
}

namespace {

void check_logits(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) >= 1, "mixkernels.cross_entropy: logits must be [N, V >= 1], got shape ",
              logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                  logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kDouble,
              "mixkernels.cross_entropy: logits must be float32, float16, bfloat16 or float64, got ",
              logits.scalar_type());
  check_labels_tensor(labels, logits.size(0), "logits");
  check_same_device(logits, "logits", labels, "labels");
}

// Rows per chunk for given logits: bounds the fp32 copy of a low-precision chunk to ~16 MiB.
int64_t ce_rows_per_chunk(int64_t v) { return std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(v, 1)); }

}  // namespace

CeOut cross_entropy_driver(const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& group_ids,
                           int64_t num_groups, int64_t ignore_index, double label_smoothing, int64_t reduction,
                           const LossOptions& o, const CeKernels& k) {
  check_logits(logits, labels);
  check_loss_options(o, "cross_entropy");
  check_groups(group_ids, num_groups, logits.size(0), logits);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "mixkernels.cross_entropy: reduction code must be 0, 1 or 2, got ",
              reduction);
  const int64_t n = logits.size(0), v = logits.size(1);
  const auto acc = acc_type(logits.scalar_type());
  const auto fopt = logits.options().dtype(acc);
  const at::Tensor y = labels.contiguous();
  const at::Tensor scale =
      reduction == 2 ? y.ne(ignore_index).sum().clamp_min(1).to(acc).reciprocal() : at::ones({}, fopt);
  at::Tensor token_loss = at::empty({n}, fopt);
  at::Tensor lse = at::empty({n}, fopt);
  const at::Tensor gids = group_ids.has_value() ? group_ids->contiguous() : at::Tensor();
  const int64_t g = gids.defined() ? num_groups : 0;
  at::Tensor group_acc = at::zeros({g}, logits.options().dtype(at::kDouble));
  at::Tensor group_cnt = at::zeros({g}, logits.options().dtype(at::kLong));
  at::Tensor zl = o.z_loss != 0.0 ? at::empty({n}, fopt) : at::Tensor();
  const CeParams params{ignore_index, label_smoothing, o.softcap, o.z_loss};
  const bool transform = o.softcap > 0.0 || o.logit_scale != 1.0;
  const at::Tensor z_all = logits.contiguous();
  const int64_t step = ce_rows_per_chunk(v);
  for (int64_t lo = 0; lo < n; lo += step) {
    const int64_t r = std::min(step, n - lo);
    // Without coef and softcap the forward step only reads z, so acc-dtype logits are used in
    // place; the softcap may overwrite the chunk, so then it is a copy (the scaled logits).
    const at::Tensor zc = z_all.narrow(0, lo, r);
    at::Tensor z = transform ? zc.to(acc).mul(o.logit_scale) : zc.to(acc);
    at::Tensor lse_c = lse.narrow(0, lo, r);
    at::Tensor loss_c = token_loss.narrow(0, lo, r);
    at::Tensor zl_c = zl.defined() ? zl.narrow(0, lo, r) : at::Tensor();
    at::Tensor group_c = gids.defined() ? gids.narrow(0, lo, r) : at::Tensor();
    k.forward(z, y.narrow(0, lo, r), params, at::Tensor(), lse_c, loss_c, zl_c, group_c, group_acc, group_cnt, lo);
  }
  auto [loss, token_out, z_out] = reduce_losses(token_loss, zl, scale, reduction);
  return {loss, token_out, lse, group_acc.to(acc), group_cnt, z_out};
}

at::Tensor cross_entropy_backward_driver(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                         const at::Tensor& grad_token, int64_t ignore_index, double label_smoothing,
                                         const LossOptions& o, const CeKernels& k) {
  check_logits(logits, labels);
  check_loss_options(o, "cross_entropy");
  const int64_t n = logits.size(0), v = logits.size(1);
  const auto acc = acc_type(logits.scalar_type());
  const at::Tensor y = labels.contiguous();
  const at::Tensor lse_a = lse.to(acc).contiguous();
  const at::Tensor coef = grad_token.to(acc).mul(o.logit_scale).contiguous();
  const CeParams params{ignore_index, label_smoothing, o.softcap, o.z_loss};
  at::Tensor grad = at::empty({n, v}, logits.options());
  const int64_t step = ce_rows_per_chunk(v);
  for (int64_t lo = 0; lo < n; lo += step) {
    const int64_t r = std::min(step, n - lo);
    at::Tensor out_c = grad.narrow(0, lo, r);
    if (logits.scalar_type() == acc) {  // compute straight in the output buffer
      if (o.logit_scale != 1.0) {
        at::mul_out(out_c, logits.narrow(0, lo, r), o.logit_scale);
      } else {
        out_c.copy_(logits.narrow(0, lo, r));
      }
      k.grad(out_c, y.narrow(0, lo, r), params, lse_a.narrow(0, lo, r), coef.narrow(0, lo, r));
    } else {
      at::Tensor z = logits.narrow(0, lo, r).to(acc).mul(o.logit_scale).contiguous();
      k.grad(z, y.narrow(0, lo, r), params, lse_a.narrow(0, lo, r), coef.narrow(0, lo, r));
      out_c.copy_(z);
    }
  }
  return grad;
}

// ---- CPU fused row kernels ---------------------------------------------------------------------

namespace {

// Row loops, compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load time (the
// extension itself is built for baseline x86-64; these loops are where the exp work is).
// Feature-based clones (arch= clones dispatch on the CPU *model*, so AMD parts fell back to the
// baseline). no-trapping-math lets GCC if-convert the clamps in mk_expf; without it the
// baseline/AVX2 loops stay scalar ("control flow in loop").
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#define MK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define MK_POP_OPTIONS 1
#else
#define MK_CLONES
#endif

MK_CLONES float row_max_f32(const float* z, int64_t v) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < v; ++j) m = z[j] > m ? z[j] : m;
  return m;
}

MK_CLONES float row_sum_f32(const float* z, int64_t v) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < v; ++j) s += z[j];
  return s;
}

MK_CLONES float row_exp_sum_f32(const float* z, int64_t v, float m) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < v; ++j) s += mk_expf(z[j] - m);
  return s;
}

// z_j <- exp(z_j - m); returns the sum (so the gradient later needs no second exp).
MK_CLONES float row_exp_store_f32(float* z, int64_t v, float m) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < v; ++j) {
    const float e = mk_expf(z[j] - m);
    z[j] = e;
    s += e;
  }
  return s;
}

MK_CLONES void row_affine_f32(float* z, int64_t v, float a, float b) {
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) z[j] = z[j] * a - b;
}

MK_CLONES void row_exp_affine_f32(float* z, int64_t v, float shift, float a, float b) {
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) z[j] = a * mk_expf(z[j] - shift) - b;
}

// Softcap rows. z_j <- C tanh(u_j / C) in place; returns the row max.
MK_CLONES float row_softcap_max_f32(float* z, int64_t v, float cap, float inv_cap) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < v; ++j) {
    const float t = ce_softcap(z[j], cap, inv_cap);
    z[j] = t;
    m = t > m ? t : m;
  }
  return m;
}

// z_j (final logits) <- (a exp(z_j - shift) - b) * softcap'(z_j)
MK_CLONES void row_exp_affine_softcap_f32(float* z, int64_t v, float shift, float a, float b, float cap,
                                          float inv_cap) {
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) {
    const float x = z[j];
    z[j] = (a * mk_expf(x - shift) - b) * ce_softcap_grad(x, cap, inv_cap);
  }
}

// The same from scaled logits u (recompute-in-backward): the softcap and the gradient in one pass.
MK_CLONES void row_softcap_exp_affine_f32(float* z, int64_t v, float shift, float a, float b, float cap,
                                          float inv_cap) {
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) {
    const float x = ce_softcap(z[j], cap, inv_cap);
    z[j] = (a * mk_expf(x - shift) - b) * ce_softcap_grad(x, cap, inv_cap);
  }
}

#ifdef MK_POP_OPTIONS
#pragma GCC pop_options
#endif

// fp64 (gradcheck only): plain loops.
double row_max(const double* z, int64_t v) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < v; ++j) m = z[j] > m ? z[j] : m;
  return m;
}
double row_sum(const double* z, int64_t v) {
  double s = 0;
  for (int64_t j = 0; j < v; ++j) s += z[j];
  return s;
}
double row_exp_sum(const double* z, int64_t v, double m) {
  double s = 0;
  for (int64_t j = 0; j < v; ++j) s += std::exp(z[j] - m);
  return s;
}
double row_exp_store(double* z, int64_t v, double m) {
  double s = 0;
  for (int64_t j = 0; j < v; ++j) s += (z[j] = std::exp(z[j] - m));
  return s;
}
void row_affine(double* z, int64_t v, double a, double b) {
  for (int64_t j = 0; j < v; ++j) z[j] = z[j] * a - b;
}
void row_exp_affine(double* z, int64_t v, double shift, double a, double b) {
  for (int64_t j = 0; j < v; ++j) z[j] = a * std::exp(z[j] - shift) - b;
}
double row_softcap_max(double* z, int64_t v, double cap, double inv_cap) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < v; ++j) {
    z[j] = ce_softcap(z[j], cap, inv_cap);
    m = z[j] > m ? z[j] : m;
  }
  return m;
}
void row_exp_affine_softcap(double* z, int64_t v, double shift, double a, double b, double cap, double inv_cap) {
  for (int64_t j = 0; j < v; ++j) z[j] = (a * std::exp(z[j] - shift) - b) * ce_softcap_grad(z[j], cap, inv_cap);
}
void row_softcap_exp_affine(double* z, int64_t v, double shift, double a, double b, double cap, double inv_cap) {
  for (int64_t j = 0; j < v; ++j) {
    const double x = ce_softcap(z[j], cap, inv_cap);
    z[j] = (a * std::exp(x - shift) - b) * ce_softcap_grad(x, cap, inv_cap);
  }
}
float row_max(const float* z, int64_t v) { return row_max_f32(z, v); }
float row_sum(const float* z, int64_t v) { return row_sum_f32(z, v); }
float row_exp_sum(const float* z, int64_t v, float m) { return row_exp_sum_f32(z, v, m); }
float row_exp_store(float* z, int64_t v, float m) { return row_exp_store_f32(z, v, m); }
void row_affine(float* z, int64_t v, float a, float b) { row_affine_f32(z, v, a, b); }
void row_exp_affine(float* z, int64_t v, float s, float a, float b) { row_exp_affine_f32(z, v, s, a, b); }
float row_softcap_max(float* z, int64_t v, float cap, float inv_cap) { return row_softcap_max_f32(z, v, cap, inv_cap); }
void row_exp_affine_softcap(float* z, int64_t v, float s, float a, float b, float cap, float inv_cap) {
  row_exp_affine_softcap_f32(z, v, s, a, b, cap, inv_cap);
}
void row_softcap_exp_affine(float* z, int64_t v, float s, float a, float b, float cap, float inv_cap) {
  row_softcap_exp_affine_f32(z, v, s, a, b, cap, inv_cap);
}

// Keeps the smallest bad row index seen by any thread.
void note_bad(std::atomic<int64_t>& bad, int64_t i) {
  int64_t cur = bad.load();
  while ((cur < 0 || i < cur) && !bad.compare_exchange_weak(cur, i)) {
  }
}

int64_t rows_grain(int64_t v) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(v, 1)); }

template <typename T>
void forward_rows_cpu(at::Tensor& z_t, const at::Tensor& labels, const CeParams& p, const at::Tensor& coef_t,
                      at::Tensor& lse_t, at::Tensor& loss_t, at::Tensor& zl_t, const at::Tensor& groups,
                      at::Tensor& group_acc, at::Tensor& group_cnt, int64_t row_offset) {
  const int64_t r = z_t.size(0), v = z_t.size(1);
  const int64_t ignore_index = p.ignore_index;
  T* z = z_t.data_ptr<T>();
  const int64_t* y = labels.data_ptr<int64_t>();
  const T* coef = coef_t.defined() ? coef_t.data_ptr<T>() : nullptr;
  T* lse = lse_t.data_ptr<T>();
  T* loss = loss_t.data_ptr<T>();
  T* zl = zl_t.defined() ? zl_t.data_ptr<T>() : nullptr;
  const T eps = static_cast<T>(p.eps);
  const T inv_v = T(1) / static_cast<T>(v);
  const T cap = static_cast<T>(p.softcap);
  const T inv_cap = cap > T(0) ? T(1) / cap : T(0);
  const bool capped = cap > T(0);
  const T lam = static_cast<T>(p.z_loss);
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, r, rows_grain(v), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* row = z + i * v;
      const int64_t label = y[i];
      const bool counted = label != ignore_index;
      if (counted && !ce_label_valid(label, v)) {
        note_bad(bad, i);
        lse[i] = loss[i] = T(0);
        if (zl != nullptr) zl[i] = T(0);
        continue;
      }
      // with the softcap the row becomes the final logits z here (kept for the gradient)
      const T m = capped ? row_softcap_max(row, v, cap, inv_cap) : row_max(row, v);
      const T sum_z = eps != T(0) ? row_sum(row, v) : T(0);
      const T z_y = counted ? row[label] : T(0);
      const T c = coef != nullptr ? coef[i] : T(0);
      const bool write = coef != nullptr;
      const bool store = write && c != T(0) && !capped;
      const T s = store ? row_exp_store(row, v, m) : row_exp_sum(row, v, m);
      const T l = m + std::log(s);
      lse[i] = l;
      loss[i] = counted ? ce_token_loss<T>(l, z_y, sum_z, eps, v) : T(0);
      if (zl != nullptr) zl[i] = counted ? ce_z_loss<T>(l, lam) : T(0);
      if (!write) continue;
      if (c == T(0)) {  // ignored token (or zero upstream gradient): no gradient
        std::fill(row, row + v, T(0));
        continue;
      }
      const T pc = ce_prob_coef<T>(l, lam);
      if (capped) {  // row holds z: du = (c pc exp(z - lse) - c eps / V - target) softcap'(z)
        row_exp_affine_softcap(row, v, l, c * pc, c * eps * inv_v, cap, inv_cap);
        if (counted) row[label] -= c * (T(1) - eps) * ce_softcap_grad<T>(z_y, cap, inv_cap);
        continue;
      }
      // row holds exp(z - m); softmax = that / s
      row_affine(row, v, c * pc / s, c * eps * inv_v);
      if (counted) row[label] -= c * (T(1) - eps);
    }
  });
  const int64_t b = bad.load();
  TORCH_CHECK(b < 0, "mixkernels.linear_cross_entropy: labels[", row_offset + b, "] = ", y[b],
              " is out of range [0, ", v, ") and is not ignore_index = ", ignore_index);
  if (!groups.defined()) return;
  // Serial, in row order: G-sized accumulators, O(R) work, reproducible bits.
  const int64_t* gid = groups.data_ptr<int64_t>();
  double* gacc = group_acc.data_ptr<double>();
  int64_t* gcnt = group_cnt.data_ptr<int64_t>();
  const int64_t num_groups = group_acc.size(0);
  for (int64_t i = 0; i < r; ++i) {
    if (y[i] == ignore_index) continue;
    TORCH_CHECK(gid[i] >= 0 && gid[i] < num_groups, "mixkernels.linear_cross_entropy: group_ids[", row_offset + i,
                "] = ", gid[i], " is out of range [0, ", num_groups, ")");
    gacc[gid[i]] += static_cast<double>(loss[i]);
    gcnt[gid[i]] += 1;
  }
}

template <typename T>
void grad_rows_cpu(at::Tensor& z_t, const at::Tensor& labels, const CeParams& p, const at::Tensor& lse_t,
                   const at::Tensor& coef_t) {
  const int64_t r = z_t.size(0), v = z_t.size(1);
  T* z = z_t.data_ptr<T>();
  const int64_t* y = labels.data_ptr<int64_t>();
  const T* lse = lse_t.data_ptr<T>();
  const T* coef = coef_t.data_ptr<T>();
  const T eps = static_cast<T>(p.eps);
  const T inv_v = T(1) / static_cast<T>(v);
  const T cap = static_cast<T>(p.softcap);
  const T inv_cap = cap > T(0) ? T(1) / cap : T(0);
  const T lam = static_cast<T>(p.z_loss);
  at::parallel_for(0, r, rows_grain(v), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* row = z + i * v;
      const int64_t label = y[i];
      const bool counted = label != p.ignore_index && ce_label_valid(label, v);
      const T c = counted ? coef[i] : T(0);
      if (c == T(0)) {
        std::fill(row, row + v, T(0));
        continue;
      }
      const T pc = ce_prob_coef<T>(lse[i], lam);
      if (cap > T(0)) {
        const T z_y = ce_softcap<T>(row[label], cap, inv_cap);
        row_softcap_exp_affine(row, v, lse[i], c * pc, c * eps * inv_v, cap, inv_cap);
        row[label] -= c * (T(1) - eps) * ce_softcap_grad<T>(z_y, cap, inv_cap);
        continue;
      }
      row_exp_affine(row, v, lse[i], c * pc, c * eps * inv_v);
      row[label] -= c * (T(1) - eps);
    }
  });
}

void forward_cpu(at::Tensor& z, const at::Tensor& labels, const CeParams& p, const at::Tensor& coef, at::Tensor& lse,
                 at::Tensor& loss, at::Tensor& zl, const at::Tensor& groups, at::Tensor& group_acc,
                 at::Tensor& group_cnt, int64_t row_offset) {
  if (z.scalar_type() == at::kDouble) {
    forward_rows_cpu<double>(z, labels, p, coef, lse, loss, zl, groups, group_acc, group_cnt, row_offset);
  } else {
    forward_rows_cpu<float>(z, labels, p, coef, lse, loss, zl, groups, group_acc, group_cnt, row_offset);
  }
}

void grad_cpu(at::Tensor& z, const at::Tensor& labels, const CeParams& p, const at::Tensor& lse,
              const at::Tensor& coef) {
  if (z.scalar_type() == at::kDouble) {
    grad_rows_cpu<double>(z, labels, p, lse, coef);
  } else {
    grad_rows_cpu<float>(z, labels, p, lse, coef);
  }
}

constexpr CeKernels kCpuKernels{&forward_cpu, &grad_cpu, /*gemm_in_input_dtype=*/false};

LinearCeOut linear_ce_cpu(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                          const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& group_ids,
                          int64_t num_groups, int64_t ignore_index, double label_smoothing, int64_t reduction,
                          int64_t chunk_size, bool compute_grad, bool weight_grad, double softcap, double logit_scale,
                          double z_loss) {
  return linear_ce_driver(hidden, weight, labels, bias, group_ids, num_groups, ignore_index, label_smoothing,
                          reduction, chunk_size, compute_grad, weight_grad, {softcap, logit_scale, z_loss},
                          kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_backward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, const std::optional<at::Tensor>& bias,
    const at::Tensor& lse, const at::Tensor& grad_token, int64_t ignore_index, double label_smoothing,
    int64_t chunk_size, double softcap, double logit_scale, double z_loss) {
  return linear_ce_backward_driver(hidden, weight, labels, bias, lse, grad_token, ignore_index, label_smoothing,
                                   chunk_size, {softcap, logit_scale, z_loss}, kCpuKernels);
}

CeOut cross_entropy_cpu(const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& group_ids,
                        int64_t num_groups, int64_t ignore_index, double label_smoothing, int64_t reduction,
                        double softcap, double logit_scale, double z_loss) {
  return cross_entropy_driver(logits, labels, group_ids, num_groups, ignore_index, label_smoothing, reduction,
                              {softcap, logit_scale, z_loss}, kCpuKernels);
}

at::Tensor cross_entropy_backward_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                      const at::Tensor& grad_token, int64_t ignore_index, double label_smoothing,
                                      double softcap, double logit_scale, double z_loss) {
  return cross_entropy_backward_driver(logits, labels, lse, grad_token, ignore_index, label_smoothing,
                                       {softcap, logit_scale, z_loss}, kCpuKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(mixkernels, CPU, m) {
  m.impl("linear_ce", &linear_ce_cpu);
  m.impl("linear_ce_backward", &linear_ce_backward_cpu);
  m.impl("cross_entropy", &cross_entropy_cpu);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cpu);
}

}  // namespace mixkernels
