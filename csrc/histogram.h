// The statistics' histogram (return_stats, similarity_histogram): counts of the candidate
// similarities c_ij in equal bins on (lo, hi), with adaptive_cl.stats.bin_indices' rule.
//
// The plain views layout counts each pair once, from the row i < j (c_ij and c_ji have the same
// bits, tiles.h), and doubles the counts at the end (count_row); every other setup (a queue, the
// cross layout, excluded labels) counts each row's candidates as its loss sees them
// (count_candidates), not doubled. Every task counts into its own int64 histogram; those are
// added when the task ends. Integer sums do not depend on their order, so the counts are the same
// for any number of threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

#include "loss_terms.h"  // MaskInt
#include "tiles.h"

namespace adaptive_cl_cpu {

// bin = floor((c - lo) * bins / (hi - lo)) clamped to [0, bins - 1], NaN to bin 0. The arithmetic
// is the reference's: c - lo and the product each rounded in T (torch does the same with Python
// scalars), so equal c give equal bins. Vectorised per lane with the same IEEE operations.
template <typename T>
struct Binner {
  using Vec = Vectorized<T>;
  using Int = MaskInt<T>;
  T lo = 0, scale = 0, last = 0;  // last = bins - 1, exact in T (bins <= 2^24)

  Binner(int64_t bins, double lo_, double hi_)
      : lo(static_cast<T>(lo_)),
        scale(static_cast<T>(static_cast<double>(bins) / (hi_ - lo_))),
        last(static_cast<T>(bins - 1)) {}

  // out[0..V) = the bins of V raw similarities (clamped to [-1, 1] first when norm, like the loss's c).
  void bins_of(const T* raw, bool norm, Int* out) const {
    Vec c = Vec::loadu(raw);
    if (norm) c = at::vec::clamp(c, Vec(T(-1)), Vec(T(1)));
    Vec x = (c - Vec(lo)) * Vec(scale);
    x = Vec::blendv(Vec(T(0)), x, x >= Vec(T(0)));  // below the range, or NaN: bin 0
    // clamp, then floor: an integer in [0, last] converts exactly whatever the ISA's rounding mode
    x = at::vec::minimum(x, Vec(last)).floor();
    at::vec::convert_to_int_of_same_size(x).store(out);
  }
};

// A task's counts (four interleaved copies, so increments of one bin in a row do not wait on each
// other), added into the call's total under a lock when the task ends.
template <typename T>
class TaskHistogram {
 public:
  static constexpr int kCopies = 4;

  TaskHistogram(const Binner<T>& binner, int64_t bins)
      : bn_(binner), bins_(bins), counts_(kCopies * bins, 0), idx_(Tiling<T>::BN) {}

  // Row i's candidates j > i among columns [j0, j0 + ncols) (ncols <= BN) of its raw tile row
  // srow, skipping i's partner p. srow holds BN values (the tile is padded).
  void count_row(const T* srow, int64_t i, int64_t p, int64_t j0, int64_t ncols, bool norm) {
    using C = Tiling<T>;
    const int64_t start = std::max<int64_t>(0, i + 1 - j0);
    if (start >= ncols) return;
    MaskInt<T>* idx = idx_.data();
    for (int64_t jj = start / C::V * C::V; jj < ncols; jj += C::V) bn_.bins_of(srow + jj, norm, idx + jj);
    int64_t* h = counts_.data();
    int64_t jj = start;
    for (; jj + kCopies <= ncols; jj += kCopies)
      for (int k = 0; k < kCopies; ++k) ++h[k * bins_ + idx[jj + k]];
    for (; jj < ncols; ++jj) ++h[idx[jj]];
    if (p - j0 >= start && p - j0 < ncols) --h[idx[p - j0]];  // the partner is no candidate
  }

  // Row ri's candidates among the tile's ri.nvalid columns: not its own column, not its partner,
  // outside its excluded range, and (exclude) not sharing its label.
  void count_candidates(const T* srow, const RowIn<T>& ri, bool exclude, bool norm) {
    using C = Tiling<T>;
    MaskInt<T>* idx = idx_.data();
    for (int64_t jj = 0; jj < ri.nvalid; jj += C::V) bn_.bins_of(srow + jj, norm, idx + jj);
    for (int64_t jj = 0; jj < ri.nvalid; ++jj) {
      if (jj == ri.self || jj == ri.partner || (jj >= ri.excl_lo && jj < ri.excl_hi)) continue;
      if (exclude && ri.labels != nullptr && ri.labels[jj] != 0) continue;
      ++counts_[idx[jj]];
    }
  }

  // Adds factor x these counts into total: 2 after count_row (each pair stands for c_ij and
  // c_ji), 1 after count_candidates.
  void merge_into(int64_t* total, std::mutex& lock, int64_t factor = 2) const {
    std::lock_guard<std::mutex> guard(lock);
    for (int64_t b = 0; b < bins_; ++b) {
      int64_t sum = 0;
      for (int k = 0; k < kCopies; ++k) sum += counts_[k * bins_ + b];
      total[b] += factor * sum;
    }
  }

 private:
  Binner<T> bn_;
  int64_t bins_;
  std::vector<int64_t> counts_;
  std::vector<MaskInt<T>> idx_;  // one tile row's bins
};

// What a forward pass needs to count: null total when the caller asked for no statistics.
template <typename T>
struct HistRequest {
  const Binner<T>* binner = nullptr;
  int64_t bins = 0;
  int64_t* total = nullptr;
  std::mutex* lock = nullptr;
  bool per_row = false;  // count_candidates (every setup but the plain views layout) instead of count_row
};

}  // namespace adaptive_cl_cpu
