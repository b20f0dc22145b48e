// Row normalisation (the prologue of both passes) and its Jacobian (the backward's epilogue).
//
// zhat_r = z_r / max(||z_r||, eps), F.normalize's convention (eps = 1e-12). ||z_r|| must neither
// overflow nor underflow for any finite row: the sum of squares is used directly when it is a
// normal number comfortably above underflow, otherwise the row is rescaled by the power of two
// 2^-e nearest its largest |z_rd| (exact), so rows of size 1e30 normalise like unit rows. The
// norm is then nrm * 2^e. Both passes call the same code, so the backward sees the forward's
// zhat bit for bit.
#pragma once

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "tiles.h"

namespace adaptive_cl_cpu {

constexpr double kNormEps = 1e-12;

template <typename T>
struct RowNorms {
  std::vector<T> nrm;       // ||z_r|| = nrm * 2^ex
  std::vector<int> ex;
  std::vector<uint8_t> tiny;  // ||z_r|| < eps: zhat_r = z_r / eps
  bool finite = true;         // every element of z, z_aug (and the queue) is finite
};

template <typename T>
struct Packed {
  at::Tensor zhat_t, panels_t;  // owners of the buffers below
  const T* zhat = nullptr;      // (n_pad, dp) row-major
  const T* panels = nullptr;    // n_pad / NR panels of [d][NR]
  // rows 0..n are [z; z_aug] (n = 2b), rows n..n_cols the queue of extra columns (never rows)
  int64_t b = 0, n = 0, n_cols = 0, d = 0, dp = 0, n_pad = 0;
  RowNorms<T> norms;
};

// Normalises row `x` (d elements, stride sx) into out[0..d); returns false if a value is not finite.
// The row is copied first and every loop runs on the contiguous copy, so the compiler's code (and
// the bits) cannot depend on the caller's strides.
template <typename T>
bool normalize_row(const T* x, int64_t sx, int64_t d, bool normalize, T* out, T& nrm, int& ex,
                   uint8_t& tiny) {
  for (int64_t k = 0; k < d; ++k) out[k] = x[k * sx];
  T maxabs = 0;
  bool finite = true;
  for (int64_t k = 0; k < d; ++k) {
    finite = finite && std::isfinite(out[k]);
    maxabs = std::max(maxabs, std::abs(out[k]));
  }
  nrm = 1;
  ex = 0;
  tiny = 0;
  if (!finite) std::fill(out, out + d, T(0));
  if (!finite || !normalize) return finite;
  T ss = 0;
  for (int64_t k = 0; k < d; ++k) ss += out[k] * out[k];
  const T safe_min = std::ldexp(T(1), -100);  // far above where squares of a row's terms vanish
  if (std::isfinite(ss) && ss >= safe_min) {
    nrm = std::sqrt(ss);
  } else if (maxabs == 0) {
    nrm = 0;
  } else {
    std::frexp(maxabs, &ex);  // maxabs in [2^(ex-1), 2^ex)
    ss = 0;
    for (int64_t k = 0; k < d; ++k) {
      const T y = std::ldexp(out[k], -ex);
      ss += y * y;
    }
    nrm = std::sqrt(ss);
  }
  tiny = std::ldexp(static_cast<double>(nrm), ex) < kNormEps;
  if (tiny) {
    const T eps = static_cast<T>(kNormEps);
    for (int64_t k = 0; k < d; ++k) out[k] = out[k] / eps;
  } else if (ex == 0) {
    for (int64_t k = 0; k < d; ++k) out[k] = out[k] / nrm;
  } else {
    for (int64_t k = 0; k < d; ++k) out[k] = std::ldexp(out[k], -ex) / nrm;
  }
  return true;
}

// zhat and its panels for [z; z_aug] (compute dtype T; any strides).
template <typename T>
Packed<T> pack_rows(const at::Tensor& z, const at::Tensor& z_aug, bool normalize,
                    const c10::optional<at::Tensor>& queue = c10::nullopt) {
  using C = Tiling<T>;
  Packed<T> p;
  p.b = z.size(0);
  p.n = 2 * p.b;
  p.n_cols = p.n + (queue.has_value() ? queue->size(0) : 0);
  p.d = z.size(1);
  p.dp = round_up(p.d, C::V);
  p.n_pad = round_up(p.n_cols, C::BN);
  const auto opts = z.options().dtype(c10::CppTypeToScalarType<T>::value);
  p.zhat_t = at::zeros({p.n_pad, p.dp}, opts);
  p.panels_t = at::zeros({p.n_pad * p.d}, opts);
  T* zhat = p.zhat_t.template data_ptr<T>();
  T* panels = p.panels_t.template data_ptr<T>();
  p.zhat = zhat;
  p.panels = panels;
  auto& nm = p.norms;
  nm.nrm.assign(p.n_cols, T(1));
  nm.ex.assign(p.n_cols, 0);
  nm.tiny.assign(p.n_cols, 0);
  std::vector<uint8_t> ok(p.n_cols, 1);
  const T* zp = z.data_ptr<T>();
  const T* ap = z_aug.data_ptr<T>();
  const T* qp = queue.has_value() ? queue->data_ptr<T>() : nullptr;
  const int64_t d = p.d, dp = p.dp, b = p.b, n = p.n;
  const int64_t sz0 = z.stride(0), sz1 = z.stride(1), sa0 = z_aug.stride(0), sa1 = z_aug.stride(1);
  const int64_t sq0 = queue.has_value() ? queue->stride(0) : 0, sq1 = queue.has_value() ? queue->stride(1) : 0;
  at::parallel_for(0, p.n_cols, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* x = r < b ? zp + r * sz0 : (r < n ? ap + (r - b) * sa0 : qp + (r - n) * sq0);
      const int64_t sx = r < b ? sz1 : (r < n ? sa1 : sq1);
      T* out = zhat + r * dp;
      ok[r] = normalize_row<T>(x, sx, d, normalize, out, nm.nrm[r], nm.ex[r], nm.tiny[r]);
      T* panel = panels + (r / C::NR) * d * C::NR + r % C::NR;
      for (int64_t k = 0; k < d; ++k) panel[k * C::NR] = out[k];
    }
  });
  for (int64_t r = 0; r < p.n_cols; ++r) nm.finite = nm.finite && ok[r];
  return p;
}

// dz_r from dL/dzhat_r (g, length d): through F.normalize's Jacobian when normalize.
template <typename T>
void normalize_backward_row(const T* zhat_r, const T* g, int64_t d, bool normalize, T nrm, int ex,
                            bool tiny, T* out) {
  if (!normalize) {
    for (int64_t k = 0; k < d; ++k) out[k] = g[k];
    return;
  }
  if (tiny) {  // zhat = z / eps: the clamp of the norm passes no gradient to the norm
    const T eps = static_cast<T>(kNormEps);
    for (int64_t k = 0; k < d; ++k) out[k] = g[k] / eps;
    return;
  }
  T radial = 0;
  for (int64_t k = 0; k < d; ++k) radial += zhat_r[k] * g[k];
  for (int64_t k = 0; k < d; ++k) {
    const T v = (g[k] - zhat_r[k] * radial) / nrm;
    out[k] = ex == 0 ? v : std::ldexp(v, -ex);
  }
}

}  // namespace adaptive_cl_cpu
