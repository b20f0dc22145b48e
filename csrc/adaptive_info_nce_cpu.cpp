// Fused CPU forward and backward of the AdaptiveRec InfoNCE (the loss of adaptive_cl/reference.py;
// options and inputs checked in adaptive_cl/contract.py).
//
// Work is split into blocks of BM rows; a task owns its rows and walks every column tile of BN
// columns in order, so nothing N x N is stored (per task: one BM x BN tile), each output row is
// written by one task only, and every row's reductions run over the columns in the same fixed
// order whatever the number of threads: 1 and 2 threads give the same bits.
//   forward : tile = Zhat_I Zhat_J^T, then per row the log-sum-exp, |A(i)|, sum_A and the partner
//             (loss_terms.h), then the row's loss from those four numbers.
//   backward: S is symmetric, so dL/dzhat_I = sum_J (G_IJ + G_JI^T) Zhat_J (reference.py, "Gradient in the logits"): the
//             same tile gives row I's gradient entries and, with the column rows' statistics,
//             row J's; one pass, two products per tile, then F.normalize's Jacobian per row.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "histogram.h"
#include "loss_terms.h"
#include "normalize.h"
#include "tiles.h"

namespace adaptive_cl_cpu {

struct Options {
  double tau, alpha, beta;
  bool normalize, den_all, unit, soft;
};

// Which rows and columns (adaptive_cl/reference.py, "Setups beyond the two views"). The packed
// rows are [z; z_aug; queue]: rows 0..n (n = 2b) are the loss's rows, every packed row a column.
//   views  (0): rows 0..n, each against every column but itself and its partner.
//   cross  (1): rows 0..b (z) against the columns of the other half and the queue; rows b..n
//               have no loss, but the backward walks them to collect z_aug's gradient.
//   cross symmetric (2): both halves are rows, each against the other half.
struct Setup {
  int64_t layout = 0;
  bool exclude = false, tau_grad = false;
  bool cross() const { return layout != 0; }
  int64_t loss_rows(int64_t b) const { return layout == 1 ? b : 2 * b; }
};

// exp(s - 1/tau) >= exp(-2/tau) must stay a normal number for the fixed shift (loss_terms.h).
template <typename T>
bool fixed_shift(const Options& o) {
  return o.normalize && o.tau >= (sizeof(T) == 4 ? 0.03 : 0.004);
}

template <typename T>
Consts<T> make_consts(const Options& o, bool has_labels, const Setup& su = Setup{}) {
  Consts<T> cs;
  cs.invtau = static_cast<T>(1.0 / o.tau);
  cs.alpha = static_cast<T>(o.alpha);
  cs.inv_beta = static_cast<T>(1.0 / o.beta);
  cs.log_alpha = static_cast<T>(std::log(o.alpha));
  cs.log1m_alpha = static_cast<T>(o.alpha < 1.0 ? std::log1p(-o.alpha) : 0.0);  // "unit" has alpha < 1
  cs.den_all = o.den_all;
  cs.unit = o.unit;
  cs.has_labels = has_labels;
  cs.exclude = su.exclude && has_labels;
  cs.tau_grad = su.tau_grad;
  return cs;
}

// k (per row), labels and offsets (per column) padded to n_pad, so tiles read column values
// without bounds checks.
template <typename T>
struct RowInputs {
  std::vector<T> k;
  std::vector<int64_t> labels;
  std::vector<T> off;  // o_j (log_q) per column, empty without offsets
  bool cross = false;
};

template <typename T>
RowInputs<T> row_inputs(const c10::optional<at::Tensor>& k_rows, const c10::optional<at::Tensor>& labels,
                        int64_t n, int64_t n_pad, int64_t n_cols = -1,
                        const c10::optional<at::Tensor>& off = c10::nullopt, bool cross = false) {
  if (n_cols < 0) n_cols = n;
  RowInputs<T> in;
  in.cross = cross;
  in.k.assign(n_pad, T(0));
  if (k_rows.has_value()) {
    const T* kp = k_rows->data_ptr<T>();
    const int64_t sk = k_rows->stride(0);
    for (int64_t i = 0; i < n; ++i) in.k[i] = kp[i * sk];
  }
  if (labels.has_value()) {
    in.labels.assign(n_pad, 0);
    const int64_t* lp = labels->data_ptr<int64_t>();
    const int64_t sl = labels->stride(0);
    for (int64_t i = 0; i < n_cols; ++i) in.labels[i] = lp[i * sl];
  }
  if (off.has_value()) {
    in.off.assign(n_pad, T(0));
    const T* op = off->data_ptr<T>();
    const int64_t so = off->stride(0);
    for (int64_t i = 0; i < n_cols; ++i) in.off[i] = op[i * so];
  }
  return in;
}

inline int64_t partner_of(int64_t i, int64_t b) { return i < b ? i + b : i - b; }

// A tile needs the masked code when it holds a row's own column, its partner's, padding, or (cross)
// columns of a row's own half.
inline bool tile_is_special(int64_t i0, int64_t rows, int64_t j0, int64_t bn, int64_t n_cols, int64_t b,
                            bool cross = false) {
  if (j0 + bn > n_cols) return true;
  if (cross) {
    const bool has_h0 = i0 < b, has_h1 = i0 + rows > b;
    if ((has_h0 && j0 < b) || (has_h1 && j0 < 2 * b && j0 + bn > b)) return true;
  }
  for (int64_t i = i0; i < i0 + rows; ++i) {
    const int64_t p = partner_of(i, b);
    if ((i >= j0 && i < j0 + bn) || (p >= j0 && p < j0 + bn)) return true;
  }
  return false;
}

// Cross layout: a tile that holds no candidate and no partner of any row of the block (all in the
// rows' own half; or queue columns of rows without a loss) is skipped, in both passes: half the
// views layout's tiles.
inline bool tile_is_skipped(int64_t i0, int64_t rows, int64_t j0, int64_t bn, int64_t b, const Setup& su) {
  if (!su.cross()) return false;
  const bool all_h0 = i0 + rows <= b, all_h1 = i0 >= b;
  if (all_h0 && j0 + bn <= b) return true;
  if (all_h1 && j0 >= b && j0 + bn <= 2 * b) return true;
  return all_h1 && su.loss_rows(b) == b && j0 >= 2 * b;
}

template <typename T>
RowIn<T> row_in(const RowInputs<T>& in, int64_t i, int64_t j0, int64_t n_cols, int64_t b, bool special,
                MaskInt<T>* lmask) {
  using C = Tiling<T>;
  RowIn<T> ri;
  ri.k = in.k[i];
  ri.nvalid = std::min<int64_t>(C::BN, n_cols - j0);
  if (special) {
    const int64_t p = partner_of(i, b);
    ri.self = (i >= j0 && i < j0 + C::BN) ? i - j0 : -1;
    ri.partner = (p >= j0 && p < j0 + C::BN) ? p - j0 : -1;
  }
  if (in.cross) {  // the row's own half [lo, lo + b) is never a candidate
    const int64_t lo = i < b ? 0 : b;
    auto rel = [&](int64_t x) { return std::min<int64_t>(std::max<int64_t>(x - j0, -1), C::BN + 1); };
    ri.excl_lo = rel(lo);
    ri.excl_hi = rel(lo + b);
  }
  if (!in.off.empty()) {
    ri.off = in.off.data() + j0;
    ri.off_row = in.off[i];
  }
  if (!in.labels.empty()) {
    const int64_t li = in.labels[i];
    const int64_t* lj = in.labels.data() + j0;
    for (int64_t j = 0; j < C::BN; ++j) lmask[j] = lj[j] == li ? MaskInt<T>(-1) : MaskInt<T>(0);
    ri.labels = lmask;
  }
  return ri;
}

// Runs fn(NORM, FIXED, KIND) with the options as compile-time constants (9 specialisations).
template <typename Fn>
void dispatch_options(bool norm, bool fixed, int kind, Fn&& fn) {
  auto with_kind = [&](auto nc, auto fc) {
    switch (kind) {
      case kNone: fn(nc, fc, std::integral_constant<int, kNone>{}); break;
      case kHard: fn(nc, fc, std::integral_constant<int, kHard>{}); break;
      default: fn(nc, fc, std::integral_constant<int, kSoft>{}); break;
    }
  };
  if (!norm) {
    with_kind(std::false_type{}, std::false_type{});
  } else if (!fixed) {
    with_kind(std::true_type{}, std::false_type{});
  } else {
    with_kind(std::true_type{}, std::true_type{});
  }
}

template <typename T, bool NORM, bool FIXED, int KIND>
void forward_blocks(const Packed<T>& pk, const RowInputs<T>& in, const Consts<T>& cs, T* loss, T* stats,
                    const HistRequest<T>& hist, const Setup& su) {
  using C = Tiling<T>;
  const int64_t n = pk.n, b = pk.b, n_cols = pk.n_cols, loss_rows = su.loss_rows(b);
  const int64_t nblocks = (loss_rows + C::BM - 1) / C::BM;
  at::parallel_for(0, nblocks, 1, [&](int64_t blk0, int64_t blk1) {
    std::vector<T> tile(C::BM * C::BN), l(C::BM * C::V), m(C::BM * C::V), p(C::BM * C::V);
    std::vector<T> lc(C::BM * C::V), ao(C::BM * C::V);
    std::vector<T> mx(C::BM), cp(C::BM);
    std::vector<MaskInt<T>> lmask(C::BN);
    std::unique_ptr<TaskHistogram<T>> counts;
    if (hist.total != nullptr) counts = std::make_unique<TaskHistogram<T>>(*hist.binner, hist.bins);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t i0 = blk * C::BM;
      const int64_t rows = std::min<int64_t>(C::BM, loss_rows - i0);
      for (auto* v : {&l, &m, &p, &lc, &ao}) std::fill(v->begin(), v->end(), T(0));
      std::fill(mx.begin(), mx.end(), -std::numeric_limits<T>::infinity());
      std::fill(cp.begin(), cp.end(), T(0));
      for (int64_t j0 = 0; j0 < pk.n_pad; j0 += C::BN) {
        if (tile_is_skipped(i0, rows, j0, C::BN, b, su)) continue;
        similarity_tile<T>(pk.zhat, pk.dp, pk.panels, pk.d, i0, j0, tile.data());
        const bool special = tile_is_special(i0, rows, j0, C::BN, n_cols, b, su.cross());
        for (int64_t r = 0; r < rows; ++r) {
          const RowIn<T> ri = row_in(in, i0 + r, j0, n_cols, b, special, lmask.data());
          FwdRow<T> acc{&l[r * C::V], &m[r * C::V], &p[r * C::V], &lc[r * C::V], &ao[r * C::V], mx[r], cp[r]};
          if (special)
            forward_row_tile<T, NORM, FIXED, KIND, true>(tile.data() + r * C::BN, ri, cs, acc);
          else
            forward_row_tile<T, NORM, FIXED, KIND, false>(tile.data() + r * C::BN, ri, cs, acc);
          mx[r] = acc.max;
          cp[r] = acc.c_partner;
          if (counts && hist.per_row) counts->count_candidates(tile.data() + r * C::BN, ri, cs.exclude, NORM);
        }
        if (counts && !hist.per_row && j0 + C::BN > i0 + 1) {  // the tile holds pairs j > i (the rest are counted from j)
          for (int64_t r = 0; r < rows; ++r)
            counts->count_row(tile.data() + r * C::BN, i0 + r, partner_of(i0 + r, b), j0,
                              std::min<int64_t>(C::BN, n - j0), NORM);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        FwdRow<T> acc{&l[r * C::V], &m[r * C::V], &p[r * C::V], &lc[r * C::V], &ao[r * C::V], mx[r], cp[r]};
        const T off_p = in.off.empty() ? T(0) : in.off[partner_of(i, b)];
        loss[i] = finish_row<T, FIXED>(acc, cs, off_p, stats + i, n);
      }
    }
    if (counts) counts->merge_into(hist.total, *hist.lock, hist.per_row ? 1 : 2);
  });
}

// The histogram alone (similarity_histogram): only the tiles that hold pairs j > i, no loss terms.
// Block t's upper triangle shrinks with t, so a task takes blocks in pairs (t, last - t) of equal
// total work and two threads share the call evenly.
template <typename T, bool NORM>
void histogram_blocks(const Packed<T>& pk, const HistRequest<T>& hist) {
  using C = Tiling<T>;
  const int64_t n = pk.n, b = pk.b;
  const int64_t nblocks = (n + C::BM - 1) / C::BM;
  at::parallel_for(0, (nblocks + 1) / 2, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> tile(C::BM * C::BN);
    TaskHistogram<T> counts(*hist.binner, hist.bins);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t pair[2] = {t, nblocks - 1 - t};
      for (int64_t k = 0; k < (pair[0] == pair[1] ? 1 : 2); ++k) {  // the middle of an odd count: once
        const int64_t blk = pair[k];
        const int64_t i0 = blk * C::BM;
        const int64_t rows = std::min<int64_t>(C::BM, n - i0);
        for (int64_t j0 = i0 / C::BN * C::BN; j0 < n; j0 += C::BN) {
          similarity_tile<T>(pk.zhat, pk.dp, pk.panels, pk.d, i0, j0, tile.data());
          for (int64_t r = 0; r < rows; ++r)
            counts.count_row(tile.data() + r * C::BN, i0 + r, partner_of(i0 + r, b), j0,
                             std::min<int64_t>(C::BN, n - j0), NORM);
        }
      }
    }
    counts.merge_into(hist.total, *hist.lock);
  });
}

template <typename T, bool NORM, bool FIXED, int KIND>
void backward_blocks(const Packed<T>& pk, const RowInputs<T>& in, const Coefs<T>& cf, const Consts<T>& cs,
                     T wp, T* dz, T* dza, T* dk, const Setup& su) {
  using C = Tiling<T>;
  using Vec = Vectorized<T>;
  const int64_t n = pk.n, b = pk.b, d = pk.d, dp = pk.dp, n_cols = pk.n_cols;
  const int64_t nblocks = (n + C::BM - 1) / C::BM;
  const auto& nm = pk.norms;
  at::parallel_for(0, nblocks, 1, [&](int64_t blk0, int64_t blk1) {
    std::vector<T> tile(C::BM * C::BN), dacc(C::BM * dp), dkl(C::BM * C::V);
    std::vector<MaskInt<T>> lmask(C::BN);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t i0 = blk * C::BM;
      const int64_t rows = std::min<int64_t>(C::BM, n - i0);
      std::fill(dacc.begin(), dacc.end(), T(0));
      std::fill(dkl.begin(), dkl.end(), T(0));
      for (int64_t j0 = 0; j0 < pk.n_pad; j0 += C::BN) {
        if (tile_is_skipped(i0, rows, j0, C::BN, b, su)) continue;
        similarity_tile<T>(pk.zhat, pk.dp, pk.panels, pk.d, i0, j0, tile.data());
        const bool special = tile_is_special(i0, rows, j0, C::BN, n_cols, b, su.cross());
        for (int64_t r = 0; r < C::BM; ++r) {
          T* hrow = tile.data() + r * C::BN;
          if (r >= rows) {  // padding rows of the last block: no gradient
            std::fill(hrow, hrow + C::BN, T(0));
            continue;
          }
          const int64_t i = i0 + r;
          const RowIn<T> ri = row_in(in, i, j0, n_cols, b, special, lmask.data());
          const CoefVec<T> ci = row_coefs(cf, i);
          Vec dkv = Vec::loadu(&dkl[r * C::V]);
          if (special)
            backward_row_tile<T, NORM, FIXED, KIND, true>(hrow, ri, ci, cf, j0, cs, wp, dkv);
          else
            backward_row_tile<T, NORM, FIXED, KIND, false>(hrow, ri, ci, cf, j0, cs, wp, dkv);
          dkv.store(&dkl[r * C::V]);
        }
        accumulate_tile<T>(tile.data(), pk.zhat, dp, j0, dacc.data());
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        T* out = i < b ? dz + i * d : dza + (i - b) * d;
        normalize_backward_row<T>(pk.zhat + i * dp, &dacc[r * dp], d, NORM, nm.nrm[i], nm.ex[i], nm.tiny[i], out);
        if (KIND == kSoft && dk != nullptr) dk[i] = -cf.u[i] * lane_sum(&dkl[r * C::V]);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Entry points: argument checks, then the dtype and option dispatch.

Options make_options(double tau, bool normalize, bool den_all, bool unit, double alpha, bool soft, double beta) {
  TORCH_CHECK(std::isfinite(tau) && tau > 0, "temperature must be finite and > 0; got ", tau);
  TORCH_CHECK(alpha > 0 && alpha <= 1, "positive_weight must be in (0, 1]; got ", alpha);
  TORCH_CHECK(!unit || alpha < 1, "positive_weight must be < 1 with weighting='unit'; got ", alpha);
  TORCH_CHECK(!soft || (std::isfinite(beta) && beta > 0), "threshold_scale must be finite and > 0; got ", beta);
  return Options{tau, alpha, beta, normalize, den_all, unit, soft};
}

void check_inputs(const at::Tensor& z, const at::Tensor& z_aug, const c10::optional<at::Tensor>& k_rows,
                  const c10::optional<at::Tensor>& labels, bool soft,
                  const c10::optional<at::Tensor>& queue = c10::nullopt,
                  const c10::optional<at::Tensor>& off = c10::nullopt) {
  TORCH_CHECK(z.device().is_cpu() && z_aug.device().is_cpu(), "z and z_aug must be CPU tensors; got ",
              z.device(), " and ", z_aug.device());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "z must be float32 or float64 (other dtypes are cast by the Python side); got ", z.scalar_type());
  TORCH_CHECK(z_aug.scalar_type() == z.scalar_type(), "z_aug must have z's dtype ", z.scalar_type(), "; got ",
              z_aug.scalar_type());
  TORCH_CHECK(z.dim() == 2 && z_aug.sizes() == z.sizes(), "z and z_aug must both have shape (B, D); got ",
              z.sizes(), " and ", z_aug.sizes());
  TORCH_CHECK(z.size(0) >= 2 && z.size(1) >= 1, "z must have B >= 2 rows and D >= 1 columns; got ", z.sizes());
  const int64_t n = 2 * z.size(0);
  int64_t n_cols = n;
  if (queue.has_value()) {
    TORCH_CHECK(queue->device().is_cpu() && queue->scalar_type() == z.scalar_type() && queue->dim() == 2 &&
                    queue->size(1) == z.size(1) && queue->size(0) >= 1,
                "negatives must be a CPU tensor of z's dtype and shape (M, D) with D = ", z.size(1), "; got ",
                queue->scalar_type(), " ", queue->sizes());
    n_cols += queue->size(0);
  }
  if (k_rows.has_value()) {
    TORCH_CHECK(k_rows->device().is_cpu() && k_rows->scalar_type() == z.scalar_type() && k_rows->dim() == 1 &&
                    k_rows->size(0) == n,
                "k_rows must be a CPU tensor of z's dtype and shape (N,)=(", n, ",); got ", k_rows->scalar_type(),
                " ", k_rows->sizes());
  }
  TORCH_CHECK(!soft || k_rows.has_value(), "threshold='soft' needs a threshold k");
  if (labels.has_value()) {
    TORCH_CHECK(labels->device().is_cpu() && labels->scalar_type() == at::kLong && labels->dim() == 1 &&
                    labels->size(0) == n_cols,
                "labels must be a CPU int64 tensor of shape (N + M,)=(", n_cols, ",); got ", labels->scalar_type(),
                " ", labels->sizes());
  }
  if (off.has_value()) {
    TORCH_CHECK(off->device().is_cpu() && off->scalar_type() == z.scalar_type() && off->dim() == 1 &&
                    off->size(0) == n_cols,
                "offsets must be a CPU tensor of z's dtype and shape (N + M,)=(", n_cols, ",); got ",
                off->scalar_type(), " ", off->sizes());
  }
}

int kind_of(const c10::optional<at::Tensor>& k_rows, bool soft) {
  if (!k_rows.has_value()) return kNone;
  return soft ? kSoft : kHard;
}

void check_histogram(int64_t bins, double lo, double hi) {
  TORCH_CHECK(bins >= 1 && bins <= (int64_t(1) << 24), "stats_bins must be in [1, 2^24]; got ", bins);
  TORCH_CHECK(std::isfinite(lo) && std::isfinite(hi) && lo < hi, "stats_range must be finite with lo < hi; got (",
              lo, ", ", hi, ")");
}

Setup make_setup(int64_t layout, bool exclude, bool tau_grad, bool has_queue, bool has_off) {
  TORCH_CHECK(layout >= 0 && layout <= 2, "layout code must be 0 (views), 1 (cross) or 2 (cross, symmetric); got ",
              layout);
  TORCH_CHECK(!(has_queue && layout == 2), "negatives cannot be combined with symmetric=True");
  TORCH_CHECK(!has_off || layout == 1, "offsets (log_q) need layout='cross' and symmetric=False");
  return Setup{layout, exclude, tau_grad};
}

// (loss, stats[, counts]): loss reduced over the loss's rows as asked (0 "mean", 1 "sum", 2
// "none": the rows' losses, N, or B for the cross layout), stats the (kStats, N) per-row
// statistics the backward reads (loss_terms.h's Stat; zero for rows without a loss); with
// bins > 0 also the (bins,) int64 histogram of the candidate similarities on (lo, hi), counted
// in the same pass. queue: the (M, D) extra columns; off: (N + M,) column offsets (log_q).
std::vector<at::Tensor> forward_impl(const at::Tensor& z, const at::Tensor& z_aug,
                                     const c10::optional<at::Tensor>& k_rows, const c10::optional<at::Tensor>& labels,
                                     const c10::optional<at::Tensor>& queue, const c10::optional<at::Tensor>& off,
                                     int64_t layout, bool exclude, bool tau_grad, double tau, bool normalize,
                                     bool den_all, bool unit, double alpha, bool soft, double beta, int64_t reduction,
                                     int64_t bins, double lo, double hi) {
  check_inputs(z, z_aug, k_rows, labels, soft, queue, off);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "reduction code must be 0 (mean), 1 (sum) or 2 (none); got ",
              reduction);
  const Options o = make_options(tau, normalize, den_all, unit, alpha, soft, beta);
  const Setup su = make_setup(layout, exclude, tau_grad, queue.has_value(), off.has_value());
  if (bins > 0) check_histogram(bins, lo, hi);
  const int64_t n = 2 * z.size(0), loss_rows = su.loss_rows(z.size(0));
  at::Tensor rows = at::zeros({n}, z.options());
  at::Tensor stats = at::zeros({kStats, n}, z.options());
  at::Tensor counts = at::zeros({std::max<int64_t>(bins, 0)}, z.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "adaptive_info_nce_cpu_forward", [&] {
    using T = scalar_t;
    const Packed<T> pk = pack_rows<T>(z, z_aug, o.normalize, queue);
    if (!pk.norms.finite) {  // the contract: any non-finite input makes every row (and m) NaN, counts 0
      rows.fill_(std::numeric_limits<double>::quiet_NaN());
      stats.fill_(std::numeric_limits<double>::quiet_NaN());
      return;
    }
    const RowInputs<T> in = row_inputs<T>(k_rows, labels, n, pk.n_pad, pk.n_cols, off, su.cross());
    const Consts<T> cs = make_consts<T>(o, labels.has_value(), su);
    std::mutex lock;
    const Binner<T> binner(std::max<int64_t>(bins, 1), lo, hi);
    HistRequest<T> hist;
    const bool plain = !su.cross() && !queue.has_value() && !cs.exclude;
    if (bins > 0) hist = HistRequest<T>{&binner, bins, counts.data_ptr<int64_t>(), &lock, !plain};
    // offsets can exceed the fixed shift's bound on s, so they take the online max
    const bool fixed = fixed_shift<T>(o) && !off.has_value();
    dispatch_options(o.normalize, fixed, kind_of(k_rows, soft), [&](auto nc, auto fc, auto kc) {
      forward_blocks<T, decltype(nc)::value, decltype(fc)::value, decltype(kc)::value>(
          pk, in, cs, rows.data_ptr<T>(), stats.data_ptr<T>(), hist, su);
    });
  });
  at::Tensor loss = rows.narrow(0, 0, loss_rows);
  if (reduction != 2) {
    // Fixed-order sum in float64 (torch's parallel sum could depend on the thread count).
    double total = 0;
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "adaptive_info_nce_cpu_reduce", [&] {
      const scalar_t* rp = rows.data_ptr<scalar_t>();
      for (int64_t i = 0; i < loss_rows; ++i) total += static_cast<double>(rp[i]);
    });
    if (reduction == 0) total /= static_cast<double>(loss_rows);
    loss = at::scalar_tensor(total, z.options());
  } else {
    loss = loss.clone();
  }
  if (bins > 0) return {loss, stats, counts};
  return {loss, stats};
}

std::vector<at::Tensor> forward(const at::Tensor& z, const at::Tensor& z_aug, const c10::optional<at::Tensor>& k_rows,
                                const c10::optional<at::Tensor>& labels, double tau, bool normalize, bool den_all,
                                bool unit, double alpha, bool soft, double beta, int64_t reduction) {
  return forward_impl(z, z_aug, k_rows, labels, c10::nullopt, c10::nullopt, 0, false, false, tau, normalize, den_all,
                      unit, alpha, soft, beta, reduction, 0, 0, 1);
}

std::vector<at::Tensor> forward_with_histogram(const at::Tensor& z, const at::Tensor& z_aug,
                                               const c10::optional<at::Tensor>& k_rows,
                                               const c10::optional<at::Tensor>& labels, double tau, bool normalize,
                                               bool den_all, bool unit, double alpha, bool soft, double beta,
                                               int64_t reduction, int64_t bins, double lo, double hi) {
  TORCH_CHECK(bins >= 1, "stats_bins must be in [1, 2^24]; got ", bins);
  return forward_impl(z, z_aug, k_rows, labels, c10::nullopt, c10::nullopt, 0, false, false, tau, normalize, den_all,
                      unit, alpha, soft, beta, reduction, bins, lo, hi);
}

// The general forward (adaptive_cl/cpu/function.py): bins = 0 for no histogram.
std::vector<at::Tensor> forward_setup(const at::Tensor& z, const at::Tensor& z_aug,
                                      const c10::optional<at::Tensor>& k_rows, const c10::optional<at::Tensor>& labels,
                                      const c10::optional<at::Tensor>& queue, const c10::optional<at::Tensor>& off,
                                      int64_t layout, bool exclude, bool tau_grad, double tau, bool normalize,
                                      bool den_all, bool unit, double alpha, bool soft, double beta, int64_t reduction,
                                      int64_t bins, double lo, double hi) {
  TORCH_CHECK(bins >= 0, "stats_bins must be 0 (none) or in [1, 2^24]; got ", bins);
  return forward_impl(z, z_aug, k_rows, labels, queue, off, layout, exclude, tau_grad, tau, normalize, den_all, unit,
                      alpha, soft, beta, reduction, bins, lo, hi);
}

// The (bins,) int64 histogram of the candidate similarities alone (no loss): half the forward's
// tiles, no exponentials. All zero when an input is not finite.
at::Tensor similarity_histogram(const at::Tensor& z, const at::Tensor& z_aug, bool normalize, int64_t bins, double lo,
                                double hi) {
  check_inputs(z, z_aug, c10::nullopt, c10::nullopt, false);
  check_histogram(bins, lo, hi);
  at::Tensor counts = at::zeros({bins}, z.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "adaptive_info_nce_cpu_histogram", [&] {
    using T = scalar_t;
    const Packed<T> pk = pack_rows<T>(z, z_aug, normalize);
    if (!pk.norms.finite) return;
    std::mutex lock;
    const Binner<T> binner(bins, lo, hi);
    const HistRequest<T> hist{&binner, bins, counts.data_ptr<int64_t>(), &lock};
    if (normalize)
      histogram_blocks<T, true>(pk, hist);
    else
      histogram_blocks<T, false>(pk, hist);
  });
  return counts;
}

// Returns (dz, dz_aug, dk_rows, dtau): dk_rows is (N,) for the soft threshold when need_dk, else
// empty; dtau a 0-d tensor when the forward ran with tau_grad, else empty: dL/dtau =
// -(1/tau^2) sum_i u_i (W_i EC_i - w_p CP_i - kappa_i AC_i), a fixed-order sum over the rows.
// u: the (N,) upstream gradient of each row's loss (the reduction's factor folded in; 0 for rows
// without a loss).
std::vector<at::Tensor> backward_impl(const at::Tensor& z, const at::Tensor& z_aug,
                                      const c10::optional<at::Tensor>& k_rows, const c10::optional<at::Tensor>& labels,
                                      const c10::optional<at::Tensor>& queue, const c10::optional<at::Tensor>& off,
                                      int64_t layout, bool exclude, bool tau_grad, const at::Tensor& stats,
                                      const at::Tensor& u, double tau, bool normalize, bool den_all, bool unit,
                                      double alpha, bool soft, double beta, bool need_dk) {
  check_inputs(z, z_aug, k_rows, labels, soft, queue, off);
  const Options o = make_options(tau, normalize, den_all, unit, alpha, soft, beta);
  const Setup su = make_setup(layout, exclude, tau_grad, queue.has_value(), off.has_value());
  const int64_t b = z.size(0), d = z.size(1), n = 2 * b, loss_rows = su.loss_rows(b);
  TORCH_CHECK(stats.scalar_type() == z.scalar_type() && stats.dim() == 2 && stats.size(0) == kStats &&
                  stats.size(1) == n && stats.is_contiguous(),
              "stats must be the forward's contiguous (", int(kStats), ", N) tensor; got ", stats.sizes());
  TORCH_CHECK(u.scalar_type() == z.scalar_type() && u.dim() == 1 && u.size(0) == n,
              "u must be an (N,) tensor of z's dtype; got ", u.scalar_type(), " ", u.sizes());
  at::Tensor dz = at::empty({b, d}, z.options());
  at::Tensor dza = at::empty({b, d}, z.options());
  const bool want_dk = need_dk && soft;
  at::Tensor dk = want_dk ? at::empty({n}, z.options()) : at::Tensor();
  at::Tensor dtau = tau_grad ? at::zeros({}, z.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "adaptive_info_nce_cpu_backward", [&] {
    using T = scalar_t;
    const Packed<T> pk = pack_rows<T>(z, z_aug, o.normalize, queue);
    if (!pk.norms.finite) {
      const double nan = std::numeric_limits<double>::quiet_NaN();
      dz.fill_(nan);
      dza.fill_(nan);
      if (want_dk) dk.fill_(nan);
      if (tau_grad) dtau.fill_(nan);
      return;
    }
    const RowInputs<T> in = row_inputs<T>(k_rows, labels, n, pk.n_pad, pk.n_cols, off, su.cross());
    const Consts<T> cs = make_consts<T>(o, labels.has_value(), su);
    const bool fixed = fixed_shift<T>(o) && !off.has_value();
    // Per-row coefficients of G (loss_terms.h), padded with zeros to n_pad. Rows without a loss
    // (the cross layout's z_aug rows, the queue, padding) keep zeros, with r = +inf on the
    // online-max path, so every G entry they contribute is exactly 0.
    const int64_t np = pk.n_pad;
    std::vector<T> ca(7 * np, T(0));
    Coefs<T> cf{in.k.data(), ca.data(), ca.data() + np, ca.data() + 2 * np, ca.data() + 3 * np,
                ca.data() + 4 * np, ca.data() + 5 * np, ca.data() + 6 * np};
    T* cu = ca.data();
    T* cut = cu + np;
    T* cr = cu + 2 * np;
    T* ckappa = cu + 3 * np;
    T* clambda = cu + 4 * np;
    T* clogl = cu + 5 * np;
    T* cshift = cu + 6 * np;
    if (!fixed) std::fill(cr + loss_rows, cr + np, std::numeric_limits<T>::infinity());
    const T* st = stats.data_ptr<T>();
    const T* up = u.data_ptr<T>();
    const int64_t su_ = u.stride(0);
    const T alpha_t = cs.alpha;
    const T wp = cs.unit ? T(1) : alpha_t;
    double dtau_sum = 0;  // fixed order over the rows
    for (int64_t i = 0; i < loss_rows; ++i) {
      const T shift = st[kShift * n + i], logl = st[kLogL * n + i], m = st[kM * n + i], t = st[kT * n + i];
      const T g = std::max(m, T(1));
      const T w = cs.unit ? T(1) + m : alpha_t + (T(1) - alpha_t) * m / g;
      cu[i] = up[i * su_];
      cut[i] = cu[i] * cs.invtau;
      cr[i] = fixed ? w * std::exp(-logl) : shift + logl - std::log(w);
      ckappa[i] = cs.unit ? T(1) : (T(1) - alpha_t) / g;
      if (cs.unit)
        clambda[i] = -(cs.log1m_alpha - std::log(g)) + (m > T(1) ? T(1) : T(0));
      else
        clambda[i] = m > T(1) ? -ckappa[i] * t / m : T(0);
      clogl[i] = logl;
      cshift[i] = shift;
      if (tau_grad)
        dtau_sum += static_cast<double>(cu[i]) *
                    static_cast<double>(w * st[kEC * n + i] - wp * st[kCP * n + i] - ckappa[i] * st[kAC * n + i]);
    }
    if (tau_grad) dtau.fill_(-dtau_sum / (tau * tau));
    T* dkp = want_dk ? dk.data_ptr<T>() : nullptr;
    dispatch_options(o.normalize, fixed, kind_of(k_rows, soft), [&](auto nc, auto fc, auto kc) {
      backward_blocks<T, decltype(nc)::value, decltype(fc)::value, decltype(kc)::value>(
          pk, in, cf, cs, wp, dz.data_ptr<T>(), dza.data_ptr<T>(), dkp, su);
    });
  });
  return {dz, dza, dk, dtau};
}

std::vector<at::Tensor> backward(const at::Tensor& z, const at::Tensor& z_aug, const c10::optional<at::Tensor>& k_rows,
                                 const c10::optional<at::Tensor>& labels, const at::Tensor& stats, const at::Tensor& u,
                                 double tau, bool normalize, bool den_all, bool unit, double alpha, bool soft,
                                 double beta, bool need_dk) {
  auto out = backward_impl(z, z_aug, k_rows, labels, c10::nullopt, c10::nullopt, 0, false, false, stats, u, tau,
                           normalize, den_all, unit, alpha, soft, beta, need_dk);
  return {out[0], out[1], out[2]};
}

std::string build_info() {
#if defined(CPU_CAPABILITY_AVX512)
  const char* isa = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  const char* isa = "avx2";
#elif defined(__aarch64__)
  const char* isa = "neon";
#else
  const char* isa = "generic";
#endif
  return std::string(isa) + " float32x" + std::to_string(Tiling<float>::V) + " float64x" +
         std::to_string(Tiling<double>::V);
}

}  // namespace adaptive_cl_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused CPU forward/backward of adaptive-cl's AdaptiveRec InfoNCE (see csrc/README.md)";
  m.def("forward", &adaptive_cl_cpu::forward, "loss (reduced) and per-row statistics");
  m.def("forward_with_histogram", &adaptive_cl_cpu::forward_with_histogram,
        "forward's (loss, stats) and the (bins,) histogram of the candidate similarities on (lo, hi)");
  m.def("similarity_histogram", &adaptive_cl_cpu::similarity_histogram,
        "the (bins,) histogram of the candidate similarities on (lo, hi) alone");
  m.def("backward", &adaptive_cl_cpu::backward, "dz, dz_aug and (soft) dk_rows");
  m.def("forward_setup", &adaptive_cl_cpu::forward_setup,
        "forward with a queue, column offsets, the cross layout, exclusion and dL/dtau's statistics");
  m.def("backward_setup", &adaptive_cl_cpu::backward_impl, "backward of forward_setup: dz, dz_aug, dk_rows, dtau");
  m.def("num_threads", [] { return at::get_num_threads(); }, "threads at::parallel_for uses here");
  m.def("build_info", &adaptive_cl_cpu::build_info, "vector ISA and widths this build uses");
}
