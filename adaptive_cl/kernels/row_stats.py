"""Per-row preparation shared by the forward and the backward kernels (one O(N D) launch).

``_row_stats_kernel`` reads the rows of Z = [z; z_aug] once by index and stride (no
concatenated input copy) and writes, for every row r of Z:

- ``zs[r]`` (input dtype, contiguous, row stride ``ld``): the row times a power of two
  2^-e_r that brings max|z_r| into [1, 4). The scaling is exact, so the raw tile Zs_I Zs_J^T
  has the same relative rounding as Z_I Z_J^T but can neither overflow (rows of 1e19 or 1e30:
  their products would exceed float32's range) nor underflow. normalize=False: no scaling.
- ``zh[r]`` (input dtype): z^_r = z_r / max(|z_r|, eps), F.normalize's convention, the second
  operand of the backward's (G_IJ + G_JI^T) Z^_J. normalize=False: not written (zs is used).
- ``inv[r]`` = 1 / max(|zs_r|, eps 2^-e_r): c_ij = (Zs_I Zs_J^T)_ij (inv_i inv_j);
  ``jac[r]`` = 1 / max(|z_r|, eps) = inv_r 2^-e_r, the normalisation's Jacobian factor;
  ``big[r]`` = 1.0 where |z_r| >= eps (the Jacobian's radial term applies), else 0.0.
- ``flag`` (one int32, zeroed before the launch): set to 1 when any element of z or z_aug is
  NaN or +-inf. The forward turns every row loss into NaN and the backward every gradient
  element, without a host synchronisation (the contract: never a plausible finite loss).
  An atomic max of 0/1 values: the result does not depend on the order, so it is deterministic.

ROUND_TF32 (float32 inputs on the one-pass "tf32" path): ``zs`` and ``zh`` are stored rounded to
tf32 (10 mantissa bits, round to nearest with ties away from zero, as PTX ``cvt.rna.tf32.f32``).
A tf32 ``tl.dot`` compiles to a wgmma that drops the low 13 mantissa bits of a float32 operand
(truncation: every product biased low by about 2^-11 per operand, and a loss / gradient error
of 3.6e-3 / 2.3e-3 at B = 257, D = 64, tau = 0.1 emulated in float64, over the 2e-3 bound); rounded
once here, the hardware's truncation is exact and the error is unbiased (cuBLAS rounds too).
The norms (``inv``, ``jac``, ``big``) come from the unrounded rows.

|z_r| is computed as 2^e_r |zs_r| from the scaled row (sum of squares in float32 of values in
[-4, 4]), so it neither overflows nor underflows for any finite row.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_tf32(x):
    """float32 x rounded to tf32 (low 13 mantissa bits zero), to nearest, ties away from zero:
    add half of the dropped range to the magnitude bits, then clear them (a carry into the
    exponent is the correct rounding up; +-inf stays +-inf)."""
    xi = x.to(tl.int32, bitcast=True)
    return ((xi + 4096) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def load_input_rows(z_ptr, za_ptr, rows, d_offs, B, N, D, s_z0, s_z1, s_a0, s_a1):
    """Rows ``rows`` (global indices into Z = [z; z_aug]) x columns ``d_offs``, zero-padded.

    Two masked loads (a row lives in exactly one input); offsets in int64 so row * stride may
    exceed 2**31."""
    r64 = rows.to(tl.int64)
    d64 = d_offs.to(tl.int64)
    dm = (d_offs < D)[None, :]
    in_z = (rows < B)[:, None]
    in_a = ((rows >= B) & (rows < N))[:, None]
    xz = tl.load(z_ptr + r64[:, None] * s_z0 + d64[None, :] * s_z1, mask=in_z & dm, other=0.0)
    xa = tl.load(za_ptr + (r64 - B)[:, None] * s_a0 + d64[None, :] * s_a1, mask=in_a & dm, other=0.0)
    return tl.where(in_z, xz, xa)


# B and N vary with the batch (a partial last batch must not recompile: issue 23); D, the
# prepared row stride ld and the input strides stay specialised (16-divisible strides and a unit
# column stride give vectorised loads, and they do not change between batches of one model).
@triton.jit(do_not_specialize=["B", "N"])
def _row_stats_kernel(z_ptr, za_ptr, zs_ptr, zh_ptr, inv_ptr, jac_ptr, big_ptr, flag_ptr,
                      B, N, D, ld, s_z0, s_z1, s_a0, s_a1,
                      NORMALIZE: tl.constexpr, ROUND_TF32: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < N
    r64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)

    # Pass 1: max |z_r| and finiteness (|x| < inf is False for NaN and +-inf).
    amax = tl.zeros([BLOCK_R], dtype=tl.float32)
    bad = tl.zeros([BLOCK_R], dtype=tl.int32)
    for d0 in range(0, D, BLOCK_D):
        x = load_input_rows(z_ptr, za_ptr, rows, d0 + offs_d, B, N, D, s_z0, s_z1, s_a0, s_a1).to(tl.float32)
        ax = tl.abs(x)
        bad = tl.maximum(bad, tl.max((ax < float("inf")).to(tl.int32) ^ 1, axis=1))
        amax = tl.maximum(amax, tl.max(tl.where(ax < float("inf"), ax, 0.0), axis=1))
    tl.atomic_max(flag_ptr, tl.max(tl.where(ok, bad, 0), axis=0))

    if NORMALIZE:
        # 2^-e with max|z_r| 2^-e in [1, 2) ([2, 4) for the largest exponent, whose inverse
        # 2^-127 is not a normal float): built from the exponent bits, so the scaling is exact.
        ebits = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
        scale = (tl.minimum(tl.maximum(254 - ebits, 1), 254) << 23).to(tl.float32, bitcast=True)
    else:
        scale = tl.full([BLOCK_R], 1.0, tl.float32)

    # Pass 2: |zs_r| from the scaled values (in [-4, 4]: no overflow, no underflow).
    ss = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x = load_input_rows(z_ptr, za_ptr, rows, d0 + offs_d, B, N, D, s_z0, s_z1, s_a0, s_a1).to(tl.float32)
        xs = x * scale[:, None]
        ss += tl.sum(xs * xs, axis=1)
    norm_s = tl.sqrt_rn(ss)
    floor_s = 1e-12 * scale  # eps in the scaled units
    inv = tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), tl.maximum(norm_s, floor_s))
    tl.store(inv_ptr + rows, inv, mask=ok)
    tl.store(jac_ptr + rows, inv * scale, mask=ok)
    tl.store(big_ptr + rows, tl.where(norm_s >= floor_s, 1.0, 0.0), mask=ok)

    # Pass 3: the scaled rows (exact) and the normalised rows, in the input dtype.
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        x = load_input_rows(z_ptr, za_ptr, rows, dd, B, N, D, s_z0, s_z1, s_a0, s_a1).to(tl.float32)
        xs = x * scale[:, None]
        m = ok[:, None] & (dd < D)[None, :]
        offs = r64[:, None] * ld + dd[None, :]
        if ROUND_TF32:
            tl.store(zs_ptr + offs, round_tf32(xs), mask=m)
        else:
            tl.store(zs_ptr + offs, xs.to(zs_ptr.dtype.element_ty), mask=m)
        if NORMALIZE:
            xh = xs * inv[:, None]
            if ROUND_TF32:
                xh = round_tf32(xh)
            tl.store(zh_ptr + offs, xh.to(zh_ptr.dtype.element_ty), mask=m)


def rows_per_program(block_d: int, interpret: bool) -> int:
    """At most ~4096 elements per program (registers), at least 16 rows."""
    return 16 if interpret else max(16, min(64, 4096 // block_d))
