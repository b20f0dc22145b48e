// The per-entry mathematics of the loss (adaptive_cl/reference.py), one vector of columns of one row at a time.
//
// Notation: c the (clamped) cosine or dot, s = c / tau - o_j (o_j: column j's log_q, zero
// without it), a the extra-positive membership (0/1 hard, a sigmoid soft, 1 for same-label
// pairs, 0 for excluded ones), q the denominator weight (1 - a with "negatives", 1 with "all",
// 1 for the partner, 0 for an excluded same-label pair), E = exp(s - LSE_i), W_i the row's total
// target weight, a' = da/dc.
//
// Which columns are row i's candidates (special_masks): not i, not p(i), below n_cols (the
// queue included), outside the row's excluded range (the cross layout: the row's own half of
// [z; z_aug]) and, with same_label="exclude", not sharing its label.
//
// Two ways to keep exp() in range, chosen per call (template FIXED):
//   FIXED (normalize and tau large enough): |c| <= 1, so 1/tau bounds s and exp(s - 1/tau) is in
//     [exp(-2/tau), 1]; no running max, and in the backward one exponential serves both rows.
//   otherwise: an online row max over the denominator's effective logits s + log q, so the soft
//     weight q = sigmoid(-x) enters as -softplus(x) and never underflows into a wrong max.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "tiles.h"

namespace adaptive_cl_cpu {

enum Kind : int { kNone = 0, kHard = 1, kSoft = 2 };

template <typename T>
using MaskInt = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

template <typename T>
struct Consts {
  T invtau, alpha, inv_beta, log_alpha, log1m_alpha;  // log1m_alpha = log(1 - alpha) ("unit")
  bool den_all, unit, has_labels;
  bool exclude = false;   // same_label="exclude": a same-label pair is no candidate at all
  bool tau_grad = false;  // accumulate what dL/dtau needs (the E-weighted mean cosine)
};

// What one tile row needs to know about its row i and the tile's special columns.
template <typename T>
struct RowIn {
  T k = 0;                              // k_i
  const MaskInt<T>* labels = nullptr;   // same-label mask of the tile's columns, or null
  int64_t self = -1, partner = -1;      // column of i and of p(i) within the tile, or -1
  int64_t nvalid = 0;                   // columns < n_cols within the tile
  int64_t excl_lo = 0, excl_hi = 0;     // tile-relative columns [lo, hi) that are never candidates
  const T* off = nullptr;               // the tile's column offsets o_j (log_q), or null
  T off_row = 0;                        // o_i: row i's offset where it is a column (backward)
};

// Membership terms of one vector of entries for one row's threshold kv.
template <typename T>
struct Entry {
  Vectorized<T> a, q, da, s_eff;  // da = a' (soft); s_eff = s + log q (online-max path)
};

template <typename T, int KIND, bool WANT_SEFF>
inline Entry<T> entry_terms(const Vectorized<T>& c, const Vectorized<T>& s, const Vectorized<T>& kv,
                            const MaskInt<T>* labels, const Consts<T>& cs) {
  using Vec = Vectorized<T>;
  const Vec zero(T(0)), one(T(1)), ninf(-std::numeric_limits<T>::infinity());
  Entry<T> e{zero, one, zero, s};
  if constexpr (KIND == kHard) {
    const Vec above = c > kv;  // NaN k: never above
    e.a = above & one;
    if (!cs.den_all) {
      e.q = one - e.a;
      if constexpr (WANT_SEFF) e.s_eff = Vec::blendv(s, ninf, above);
    }
  } else if constexpr (KIND == kSoft) {
    // sigmoid(x) and sigmoid(-x) from u = exp(-|x|) <= 1: no overflow, no cancellation in 1 - a.
    const Vec x = (c - kv) * Vec(cs.inv_beta);
    const Vec u = (zero - x.abs()).exp();
    const Vec big = one / (one + u);
    const Vec small = u * big;
    const Vec pos = x >= zero;
    e.a = Vec::blendv(small, big, pos);
    const Vec na = Vec::blendv(big, small, pos);
    e.da = e.a * na * Vec(cs.inv_beta);
    if (!cs.den_all) {
      e.q = na;
      if constexpr (WANT_SEFF) e.s_eff = s - (at::vec::maximum(x, zero) + u.log1p());  // log q = -softplus(x)
    }
  }
  if (labels != nullptr) {
    const Vec same = Vec::loadu(labels);
    e.a = Vec::blendv(e.a, cs.exclude ? zero : one, same);
    if constexpr (KIND == kSoft) e.da = Vec::blendv(e.da, zero, same);
    if (!cs.den_all || cs.exclude) {
      e.q = Vec::blendv(e.q, zero, same);
      if constexpr (WANT_SEFF) e.s_eff = Vec::blendv(e.s_eff, ninf, same);
    }
  }
  return e;
}

// Masks of the tile's special columns for one row: candidates N(i) (not i, not p(i), < N) and p(i).
template <typename T>
inline void special_masks(int64_t jj, const RowIn<T>& ri, Vectorized<T>& cand, Vectorized<T>& partner) {
  using Vec = Vectorized<T>;
  const Vec idx = Vec::arange(static_cast<T>(jj), 1);  // tile-relative: < BN, exact in T
  partner = idx == Vec(static_cast<T>(ri.partner));
  cand = (idx != Vec(static_cast<T>(ri.self))) & (idx < Vec(static_cast<T>(ri.nvalid))) &
         (idx != Vec(static_cast<T>(ri.partner)));
  if (ri.excl_hi > ri.excl_lo)  // bounds clamped to [-1, BN + 1] by the caller: exact in T
    cand = cand & ((idx < Vec(static_cast<T>(ri.excl_lo))) | (idx >= Vec(static_cast<T>(ri.excl_hi))));
}

// s = c / tau - o_j for the tile's columns jj.. (o = 0 without offsets).
template <typename T>
inline Vectorized<T> logits(const Vectorized<T>& c, const Vectorized<T>& invtau, const T* off, int64_t jj) {
  return off == nullptr ? c * invtau : c * invtau - Vectorized<T>::loadu(off + jj);
}

template <typename T>
inline Vectorized<T> cosine(const Vectorized<T>& raw, bool norm) {
  using Vec = Vectorized<T>;
  return norm ? at::vec::clamp(raw, Vec(T(-1)), Vec(T(1))) : raw;
}

// Lane sums and maxima in a fixed order (the result must not depend on anything but the data).
template <typename T>
inline T lane_sum(const T* lanes) {
  T acc = 0;
  for (int64_t v = 0; v < Tiling<T>::V; ++v) acc += lanes[v];
  return acc;
}

template <typename T>
inline T lane_max(const Vectorized<T>& x) {  // propagates NaN
  T lanes[Tiling<T>::V];
  x.store(lanes);
  T acc = -std::numeric_limits<T>::infinity();
  for (int64_t v = 0; v < Tiling<T>::V; ++v) acc = (std::isnan(lanes[v]) || lanes[v] > acc) ? lanes[v] : acc;
  for (int64_t v = 0; v < Tiling<T>::V; ++v)
    if (std::isnan(lanes[v])) return lanes[v];
  return acc;
}

// ---------------------------------------------------------------------------------------------
// Forward: per row the lane accumulators of l = sum q exp(s - shift), m = sum a and
// P = sum a (1 - c) (FIXED) or sum a c (online max), the running max and the partner's cosine;
// with offsets O = sum a o_j, and for dL/dtau L_c = sum q exp(s - shift) c.
template <typename T>
struct FwdRow {
  T* l;
  T* m;
  T* p;
  T* lc;
  T* ao;
  T max;
  T c_partner;
};

template <typename T, bool NORM, bool FIXED, int KIND, bool SPECIAL>
inline void forward_row_tile(const T* srow, const RowIn<T>& ri, const Consts<T>& cs, FwdRow<T>& acc) {
  using C = Tiling<T>;
  using Vec = Vectorized<T>;
  const Vec zero(T(0)), one(T(1)), invtau(cs.invtau), kv(ri.k);
  const Vec ninf(-std::numeric_limits<T>::infinity());
  const MaskInt<T>* lab = ri.labels;
  Vec cand(T(0)), partner(T(0));
  if constexpr (!FIXED) {  // raise the running max first: one rescale per tile, not per vector
    Vec mx = ninf;
    for (int64_t jj = 0; jj < C::BN; jj += C::V) {
      const Vec c = cosine(Vec::loadu(srow + jj), NORM);
      const Vec s = logits(c, invtau, ri.off, jj);
      const Entry<T> e = entry_terms<T, KIND, true>(c, s, kv, lab ? lab + jj : nullptr, cs);
      Vec se = e.s_eff;
      if constexpr (SPECIAL) {
        special_masks(jj, ri, cand, partner);
        se = Vec::blendv(Vec::blendv(ninf, se, cand), s, partner);
      }
      mx = at::vec::maximum(mx, se);
    }
    const T tmax = lane_max(mx);
    if (std::isnan(tmax) || tmax > acc.max) {
      const Vec scale(std::exp(acc.max - tmax));
      (Vec::loadu(acc.l) * scale).store(acc.l);
      if (cs.tau_grad) (Vec::loadu(acc.lc) * scale).store(acc.lc);
      acc.max = tmax;
    }
  }
  Vec l = Vec::loadu(acc.l), m = Vec::loadu(acc.m), p = Vec::loadu(acc.p);
  Vec lc = Vec::loadu(acc.lc), ao = Vec::loadu(acc.ao);
  // No denominator entry seen yet (max = -inf): this tile's are all -inf too and add exp(-inf) = 0.
  const T none_yet = -std::numeric_limits<T>::infinity();
  const Vec shift(FIXED ? cs.invtau : (acc.max == none_yet ? T(0) : acc.max));
  for (int64_t jj = 0; jj < C::BN; jj += C::V) {
    const Vec c = cosine(Vec::loadu(srow + jj), NORM);
    const Vec s = logits(c, invtau, ri.off, jj);
    const Entry<T> e = entry_terms<T, KIND, !FIXED>(c, s, kv, lab ? lab + jj : nullptr, cs);
    Vec a = e.a, term;
    if constexpr (SPECIAL) {
      special_masks(jj, ri, cand, partner);
      a = Vec::blendv(zero, a, cand);
    }
    if constexpr (FIXED) {
      Vec q = e.q;
      if constexpr (SPECIAL) q = Vec::blendv(Vec::blendv(zero, q, cand), one, partner);
      term = q * (s - shift).exp();
    } else {
      Vec se = e.s_eff;
      if constexpr (SPECIAL) se = Vec::blendv(Vec::blendv(ninf, se, cand), s, partner);
      term = (se - shift).exp();  // se <= max: in [0, 1]
    }
    l = l + term;
    m = m + a;
    p = at::vec::fmadd(a, FIXED ? one - c : c, p);
    if (cs.tau_grad) lc = at::vec::fmadd(term, c, lc);
    if (ri.off != nullptr) ao = at::vec::fmadd(a, Vec::loadu(ri.off + jj), ao);
  }
  l.store(acc.l);
  m.store(acc.m);
  p.store(acc.p);
  lc.store(acc.lc);
  ao.store(acc.ao);
  if (SPECIAL && ri.partner >= 0) {
    const T raw = srow[ri.partner];
    acc.c_partner = NORM ? std::min(std::max(raw, T(-1)), T(1)) : raw;
  }
}

// The rows of the per-row statistics (a (kStats, N) tensor): LSE = shift + log l,
// T = sum_j a_ij (LSE - s_ij); for dL/dtau the E-weighted mean cosine over the denominator
// (partner included), the partner's cosine and sum_j a_ij c_ij.
enum Stat : int { kShift = 0, kLogL, kM, kT, kEC, kCP, kAC, kStats };

// Row i's loss from its accumulators (off_p: o_p(i), the partner column's offset); writes its
// statistics to st[k * n] for each Stat k.
template <typename T, bool FIXED>
inline T finish_row(const FwdRow<T>& acc, const Consts<T>& cs, T off_p, T* st, int64_t n) {
  const T l = lane_sum(acc.l), m = lane_sum(acc.m), p = lane_sum(acc.p), ao = lane_sum(acc.ao);
  const T logl = std::log(l);
  const T shift = FIXED ? cs.invtau : acc.max;
  // LSE - s_p and T; with FIXED, LSE - s = log l + (1 - c) / tau (no cancellation of 1/tau;
  // FIXED never has offsets).
  const T x = FIXED ? logl + (T(1) - acc.c_partner) * cs.invtau
                    : (shift + logl) - acc.c_partner * cs.invtau + off_p;
  const T t = FIXED ? m * logl + p * cs.invtau : m * (shift + logl) - p * cs.invtau + ao;
  const T g = std::max(m, T(1));
  st[kShift * n] = shift;
  st[kLogL * n] = logl;
  st[kM * n] = m;
  st[kT * n] = t;
  st[kEC * n] = cs.tau_grad ? lane_sum(acc.lc) / l : T(0);
  st[kCP * n] = acc.c_partner;
  st[kAC * n] = FIXED ? m - p : p;
  if (cs.unit) return x - cs.log_alpha + t - m * (cs.log1m_alpha - std::log(g));
  return cs.alpha * x + (T(1) - cs.alpha) / g * t;
}

// ---------------------------------------------------------------------------------------------
// Backward: G_ij = u_i dl_i/dc_ij. Per-row coefficients (arrays over rows, so a tile loads the
// column rows' values as vectors): ut = u / tau, R = W exp(-log l) (FIXED) or LSE - log W
// (online), kappa = weight per unit of a, lambda (soft), and the forward's log l and shift.
//   hard/none:  G = ut (q W E - kappa a)
//   soft:       G = ut (q W E - kappa a) + u (a' (kappa (LSE - s) + lambda) - nu (a / beta) q W E)
// where a' q W E / (1 - a) = (a / beta) q W E keeps the "negatives" term finite for any q.
template <typename T>
struct Coefs {  // arrays over the n_pad rows
  const T *k, *u, *ut, *r, *kappa, *lambda, *logl, *shift;
};

template <typename T>
struct CoefVec {  // one row's coefficients broadcast, or a vector of column rows' loaded
  Vectorized<T> k, u, ut, r, kappa, lambda, logl, shift;
};

template <typename T>
inline CoefVec<T> row_coefs(const Coefs<T>& cf, int64_t i) {
  using Vec = Vectorized<T>;
  return {Vec(cf.k[i]), Vec(cf.u[i]), Vec(cf.ut[i]), Vec(cf.r[i]), Vec(cf.kappa[i]), Vec(cf.lambda[i]),
          Vec(cf.logl[i]), Vec(cf.shift[i])};
}

template <typename T, int KIND>
inline CoefVec<T> column_coefs(const Coefs<T>& cf, int64_t j, const CoefVec<T>& row) {
  using Vec = Vectorized<T>;
  CoefVec<T> v = row;  // fields a kind never reads keep the row's values, unused
  if constexpr (KIND != kNone) v.k = Vec::loadu(cf.k + j);
  v.ut = Vec::loadu(cf.ut + j);
  v.r = Vec::loadu(cf.r + j);
  v.kappa = Vec::loadu(cf.kappa + j);
  if constexpr (KIND == kSoft) {
    v.u = Vec::loadu(cf.u + j);
    v.lambda = Vec::loadu(cf.lambda + j);
    v.logl = Vec::loadu(cf.logl + j);
    v.shift = Vec::loadu(cf.shift + j);
  }
  return v;
}

// One row's G on a vector of entries; soft_part receives a' dl/da (its row sum is -dl/dk / u).
template <typename T, bool FIXED, int KIND>
inline Vectorized<T> grad_entry(const Vectorized<T>& s, const Vectorized<T>& ex, const Entry<T>& e,
                                const CoefVec<T>& cf, const Consts<T>& cs, Vectorized<T>* soft_part) {
  using Vec = Vectorized<T>;
  Vec qwe;
  if constexpr (FIXED) {
    qwe = e.q * ex * cf.r;  // ex = exp(s - 1/tau), shared by both rows
  } else {
    qwe = (e.s_eff - cf.r).exp();  // s_eff <= LSE on the denominator: at most W
  }
  Vec g = cf.ut * (qwe - cf.kappa * e.a);
  if constexpr (KIND == kSoft) {
    Vec part = e.da * at::vec::fmadd(cf.kappa, cf.logl + (cf.shift - s), cf.lambda);
    if (!cs.den_all) part = part - e.a * Vec(cs.inv_beta) * qwe;
    g = at::vec::fmadd(cf.u, part, g);
    *soft_part = part;
  }
  return g;
}

// Overwrites hrow (the row's raw similarities of this tile) with H_ij = G_ij + G_ji.
template <typename T, bool NORM, bool FIXED, int KIND, bool SPECIAL>
inline void backward_row_tile(T* hrow, const RowIn<T>& ri, const CoefVec<T>& ci, const Coefs<T>& cf,
                              int64_t j0, const Consts<T>& cs, T wp, Vectorized<T>& dk_acc) {
  using C = Tiling<T>;
  using Vec = Vectorized<T>;
  const Vec zero(T(0)), one(T(1)), invtau(cs.invtau), vwp(wp);
  const MaskInt<T>* lab = ri.labels;
  const Vec off_row(ri.off_row);
  Vec cand(T(0)), partner(T(0)), ex(T(0));
  for (int64_t jj = 0; jj < C::BN; jj += C::V) {
    const Vec raw = Vec::loadu(hrow + jj);
    const Vec c = cosine(raw, NORM);
    // row i's logits of the columns j (their offsets), and column rows j's logits of column i
    // (offset o_i); equal without offsets, and FIXED never has offsets
    const Vec s = logits(c, invtau, ri.off, jj);
    const Vec s_col = ri.off == nullptr ? s : c * invtau - off_row;
    if constexpr (FIXED) ex = (s - invtau).exp();
    const MaskInt<T>* lj = lab ? lab + jj : nullptr;
    const CoefVec<T> cj = column_coefs<T, KIND>(cf, j0 + jj, ci);
    const Entry<T> ei = entry_terms<T, KIND, !FIXED>(c, s, ci.k, lj, cs);
    const Entry<T> ej = entry_terms<T, KIND, !FIXED>(c, s_col, cj.k, lj, cs);
    Vec soft_i(T(0)), soft_j(T(0));
    Vec h = grad_entry<T, FIXED, KIND>(s, ex, ei, ci, cs, &soft_i) +
            grad_entry<T, FIXED, KIND>(s_col, ex, ej, cj, cs, &soft_j);
    if constexpr (SPECIAL) {
      special_masks(jj, ri, cand, partner);
      // the partner: q = 1, a = 0, weight wp in both rows' targets
      const Vec we_i = FIXED ? ex * ci.r : (s - ci.r).exp();
      const Vec we_j = FIXED ? ex * cj.r : (s_col - cj.r).exp();
      const Vec hp = ci.ut * (we_i - vwp) + cj.ut * (we_j - vwp);
      h = Vec::blendv(Vec::blendv(zero, h, cand), hp, partner);
      if constexpr (KIND == kSoft) soft_i = Vec::blendv(zero, soft_i, cand);
    }
    if constexpr (KIND == kSoft) dk_acc = dk_acc + soft_i;
    if constexpr (NORM) h = Vec::blendv(zero, h, (raw >= Vec(T(-1))) & (raw <= one));  // the clamp
    h.store(hrow + jj);
  }
}

}  // namespace adaptive_cl_cpu
