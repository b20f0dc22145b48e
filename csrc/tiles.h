// Tiling constants and the two register-blocked micro-kernels of the fused CPU loss.
//
// Layouts (both O(N D), built once per call by normalize.h; nothing N x N exists):
//   zhat    (N_pad, D_pad) row-major, rows and columns zero-padded (D_pad: a multiple of the
//           vector width, N_pad: a multiple of BN);
//   panels  N_pad / NR column panels, each [D][NR]: panel p holds rows p*NR .. p*NR+NR-1 of
//           zhat transposed, so the similarity kernel loads NR columns with NV vector loads.
//
// Symmetry: every similarity c_ij is one fused multiply-add chain over d = 0..D-1 in the same
// kernel, fma(zhat_i[d], zhat_j[d], acc), and fma is commutative in its product, so c_ij and
// c_ji have the same bits. The backward builds row j's gradient of entry (i, j) from c_ij
// (the symmetric one-pass backward, csrc/README.md); equal bits make its threshold decisions the
// forward's. Edge tiles are padded rather than handled by a second kernel for the same reason.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace adaptive_cl_cpu {

using at::vec::Vectorized;

template <typename T>
struct Tiling {
  using Vec = Vectorized<T>;
  static constexpr int64_t V = Vec::size();
#if defined(CPU_CAPABILITY_AVX2)
  static constexpr int NV = 2;  // 16 ymm registers: 4 x 2 accumulators + 2 loads + 1 broadcast
#else
  static constexpr int NV = 4;  // 32 registers (AVX-512, NEON): 4 x 4 accumulators
#endif
  static constexpr int MR = 4;           // rows per micro-kernel
  static constexpr int64_t NR = NV * V;  // columns per micro-kernel
  static constexpr int64_t BM = 32;      // rows a task owns (its rows of every output)
  static constexpr int64_t BN = sizeof(T) == 4 ? 256 : 128;  // columns per tile: BM x BN in L1/L2
  static_assert(BN % NR == 0 && BM % MR == 0, "tile sizes must be multiples of the micro-kernel");
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// out[r][0..NR) = sum_d a[r][d] * panel[d][0..NR) for r < MR (one fma chain per entry).
template <typename T>
inline void dot_micro(const T* a, int64_t lda, const T* panel, int64_t d, T* out, int64_t ldo) {
  using C = Tiling<T>;
  using Vec = typename C::Vec;
  Vec acc[C::MR][C::NV];
  for (int r = 0; r < C::MR; ++r)
    for (int v = 0; v < C::NV; ++v) acc[r][v] = Vec(T(0));
  for (int64_t k = 0; k < d; ++k) {
    Vec b[C::NV];
    for (int v = 0; v < C::NV; ++v) b[v] = Vec::loadu(panel + k * C::NR + v * C::V);
    for (int r = 0; r < C::MR; ++r) {
      const Vec ar(a[r * lda + k]);
      for (int v = 0; v < C::NV; ++v) acc[r][v] = at::vec::fmadd(ar, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < C::MR; ++r)
    for (int v = 0; v < C::NV; ++v) acc[r][v].store(out + r * ldo + v * C::V);
}

// tile[BM][BN] = zhat[i0 .. i0+BM) . zhat[j0 .. j0+BN)^T (raw dot products, before any clamp).
template <typename T>
void similarity_tile(const T* zhat, int64_t dp, const T* panels, int64_t d, int64_t i0, int64_t j0,
                     T* tile) {
  using C = Tiling<T>;
  for (int64_t t = 0; t < C::BN / C::NR; ++t) {
    const T* panel = panels + (j0 / C::NR + t) * d * C::NR;  // stays in L1 across the row groups
    for (int64_t r = 0; r < C::BM; r += C::MR)
      dot_micro<T>(zhat + (i0 + r) * dp, dp, panel, d, tile + r * C::BN + t * C::NR, C::BN);
  }
}

// acc[r][0..NVV*V) += sum_j h[r][j] * z[j][0..NVV*V) for r < MR, j < ncols (fixed order in j).
template <typename T, int NVV>
inline void axpy_micro(const T* h, int64_t ldh, const T* z, int64_t ldz, int64_t ncols, T* acc_out,
                       int64_t ldacc) {
  using C = Tiling<T>;
  using Vec = typename C::Vec;
  Vec acc[C::MR][NVV];
  for (int r = 0; r < C::MR; ++r)
    for (int v = 0; v < NVV; ++v) acc[r][v] = Vec::loadu(acc_out + r * ldacc + v * C::V);
  for (int64_t j = 0; j < ncols; ++j) {
    Vec b[NVV];
    for (int v = 0; v < NVV; ++v) b[v] = Vec::loadu(z + j * ldz + v * C::V);
    for (int r = 0; r < C::MR; ++r) {
      const Vec hr(h[r * ldh + j]);
      for (int v = 0; v < NVV; ++v) acc[r][v] = at::vec::fmadd(hr, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < C::MR; ++r)
    for (int v = 0; v < NVV; ++v) acc[r][v].store(acc_out + r * ldacc + v * C::V);
}

// dacc[BM][D_pad] += h[BM][BN] . zhat[j0 .. j0+BN)[0 .. D_pad): the backward's second product.
template <typename T>
void accumulate_tile(const T* h, const T* zhat, int64_t dp, int64_t j0, T* dacc) {
  using C = Tiling<T>;
  const T* zj = zhat + j0 * dp;
  for (int64_t r = 0; r < C::BM; r += C::MR) {
    for (int64_t dc = 0; dc < dp; dc += C::NR) {
      const int64_t nv = std::min<int64_t>(C::NV, (dp - dc) / C::V);
      const T* hr = h + r * C::BN;
      T* out = dacc + r * dp + dc;
      switch (nv) {
        case 1: axpy_micro<T, 1>(hr, C::BN, zj + dc, dp, C::BN, out, dp); break;
        case 2: axpy_micro<T, 2>(hr, C::BN, zj + dc, dp, C::BN, out, dp); break;
        case 3: axpy_micro<T, 3>(hr, C::BN, zj + dc, dp, C::BN, out, dp); break;
        default: axpy_micro<T, C::NV>(hr, C::BN, zj + dc, dp, C::BN, out, dp); break;
      }
    }
  }
}

}  // namespace adaptive_cl_cpu
