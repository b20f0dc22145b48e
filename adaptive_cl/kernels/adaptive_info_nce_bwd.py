"""Backward Triton kernel of the fused AdaptiveRec InfoNCE: one launch, no atomics.

S = Z^ Z^T / tau is symmetric, so (KERNEL-NOTES §1)

    dL/dz^_i = (1/tau) sum_j (G_ij + G_ji) z^_j,   G_ij = u_i (W_i P_ij [j in Den(i)] - w_ij)

(u_i the upstream gradient of row i, P the softmax over Den(i), W_i the row's total target
weight, w_ij its target weight on j). A program owns BLOCK_M rows I and walks every column
tile J once: it recomputes the raw tile exactly as the forward did (same D chunks, same
c = dot * (inv_i * inv_j), so the same threshold decisions), builds G_IJ from row I's
statistics and G_JI^T from the same tile with row J's statistics loaded as column vectors,
then accumulates (G_IJ + G_JI^T) Z^_J with a second ``tl.dot``. Each program writes only its
own rows of dz / dz_aug: bitwise deterministic.

Exponentials per tile element: 1 with FIXED_SHIFT (E_ij = exp2(t_ij - log2e/tau) is shared by
rows i and j, each scaled by r = W exp2(shift - lse2) per row), 2 with the online max
(normalize=False or tau < 0.03). Dots per tile: 2 (recompute S, then G Z^_J; 3 tf32 passes
each with "3xtf32"). Other FP32 ops per element on interior tiles (see _special_tile): about
10 without k (c, clamp and its gradient mask, exponent, the two row scalings, the sum, the
cast), 4 more with k (two thresholds, two selects), 3 more with per-row upstream gradients.

Numerics of the second dot: G is scaled by 1/max|u| (u_i / max|u| in [-1, 1]) before it is
cast to the input dtype, and the product by max|u|/tau is applied to the float32 result, so a
mean over 65k rows (u = 1/N) does not underflow float16. Z^_J is normalised in float32 then
cast (values in [-1, 1]); multiplying G by inv_j instead would overflow float16 for tiny rows.

Wide D (block_d(D) < D): the grid gets a second axis over BLOCK_D chunks of the output; each
program recomputes the whole S tile (all chunks) and accumulates its chunk of dZ^. The
normalisation's radial term <z^_i, dz^_i> is then sum_j G'_ij c~_ij (c~ = the unclamped
cosine), accumulated in the row walk, since no program holds the full row of dz^_i.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .adaptive_info_nce_fwd import _chunked_dot, _dot3_nt, _load_rows, _special_tile, _split_tf32


@triton.jit
def _row_weights(lse2, cnt, alpha, shift2, FIXED_SHIFT: tl.constexpr, UNIT: tl.constexpr):
    """Per row: (scale of exp2(t) or of E = exp2(t - shift2) in G, weight per extra positive,
    weight of the partner). With FIXED_SHIFT the first is r = W exp2(shift2 - lse2), else the
    base-2 offset lse2 - log2(W) to subtract from t inside the exponential."""
    if UNIT:
        w_tot = 1.0 + cnt
        w_x = tl.zeros_like(cnt) + 1.0
        w_p = tl.zeros_like(cnt) + 1.0
    else:
        w_tot = tl.where(cnt > 0.0, 1.0, alpha)
        w_x = (1.0 - alpha) / tl.maximum(cnt, 1.0)
        w_p = tl.zeros_like(cnt) + alpha
    if FIXED_SHIFT:
        soft = w_tot * tl.exp2(shift2 - lse2)
    else:
        soft = lse2 - tl.log2(w_tot)
    return soft, w_x, w_p


@triton.jit
def _store_rows(dz_ptr, dza_ptr, rows, d_offs, vals, B, N, D, s_d0, s_d1, s_e0, s_e1):
    r64 = rows.to(tl.int64)
    d64 = d_offs.to(tl.int64)
    dm = (d_offs < D)[None, :]
    in_z = (rows < B)[:, None]
    in_a = ((rows >= B) & (rows < N))[:, None]
    v = vals.to(dz_ptr.dtype.element_ty)
    tl.store(dz_ptr + r64[:, None] * s_d0 + d64[None, :] * s_d1, v, mask=in_z & dm)
    tl.store(dza_ptr + (r64 - B)[:, None] * s_e0 + d64[None, :] * s_e1, v, mask=in_a & dm)


@triton.jit
def _grad_tile(c, rows, cols, prow, N, k_i, k_j, soft_i, wx_i, wp_i, soft_j, wx_j, wp_j, qk_scale,
               MASKED: tl.constexpr, FIXED_SHIFT: tl.constexpr, K_MODE: tl.constexpr,
               DEN_ALL: tl.constexpr):
    """(G_IJ, G_JI^T) of one tile without the upstream factors: row i's and row j's
    dl/ds on the same entries. MASKED: the tile may hold the diagonal, partners or columns >= N
    (see _special_tile); otherwise every entry is a candidate of both rows."""
    t = c * qk_scale
    if FIXED_SHIFT:
        e = tl.exp2(t - qk_scale)  # one exponential serves both rows
        a_i = e * soft_i[:, None]
        a_j = e * soft_j[None, :]
    else:
        a_i = tl.exp2(t - soft_i[:, None])
        a_j = tl.exp2(t - soft_j[None, :])
    if MASKED:
        valid = (cols[None, :] != rows[:, None]) & (cols < N)[None, :]
        partner = cols[None, :] == prow[:, None]
    if K_MODE != 0:
        ex_i = c > k_i[:, None]
        if K_MODE == 1:
            ex_j = ex_i  # one k for every row: the same decision both ways
        else:
            ex_j = c > k_j[None, :]
        if MASKED:
            cand = valid & (~partner)
            ex_i = ex_i & cand
            ex_j = ex_j & cand
        if DEN_ALL:  # extra positives stay in the denominator
            g_i = a_i - tl.where(ex_i, wx_i[:, None], 0.0)
            g_j = a_j - tl.where(ex_j, wx_j[None, :], 0.0)
        else:  # an extra positive leaves the denominator
            g_i = tl.where(ex_i, -wx_i[:, None], a_i)
            g_j = tl.where(ex_j, -wx_j[None, :], a_j)
    else:
        g_i = a_i
        g_j = a_j
    if MASKED:
        g_i = tl.where(valid, g_i, 0.0) - tl.where(partner, wp_i[:, None], 0.0)
        g_j = tl.where(valid, g_j, 0.0) - tl.where(partner, wp_j[None, :], 0.0)
    return g_i, g_j


@triton.jit
def _bwd_kernel(z_ptr, za_ptr, stats_ptr, k_ptr, lse2_ptr, m_ptr, u_ptr, g_ptr, dz_ptr, dza_ptr,
                B, N, D, s_z0, s_z1, s_a0, s_a1, s_k, s_d0, s_d1, s_e0, s_e1,
                k_scalar, qk_scale, alpha, post_scale,
                NORMALIZE: tl.constexpr, FIXED_SHIFT: tl.constexpr, K_MODE: tl.constexpr,
                DEN_ALL: tl.constexpr, UNIT: tl.constexpr, PER_ROW_U: tl.constexpr,
                SINGLE_D: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    r0 = tl.program_id(0) * BLOCK_M
    pid_d = tl.program_id(1)
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    prow = tl.where(rows < B, rows + B, rows - B)
    offs_d = tl.arange(0, BLOCK_D)
    dv = pid_d * BLOCK_D + offs_d  # this program's chunk of output columns
    shift2 = qk_scale

    # Upstream: uniform (mean/sum: g = the scalar gradient times 1/N or 1) or per row
    # (reduction none: g = max|u|, rows carry u / max|u|).
    g = tl.load(g_ptr)
    if PER_ROW_U:
        g_div = tl.where(g > 0.0, g, 1.0)
        u_i = tl.load(u_ptr + rows, mask=row_ok, other=0.0) / g_div

    lse2_i = tl.load(lse2_ptr + rows, mask=row_ok, other=0.0)
    cnt_i = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
    soft_i, wx_i, wp_i = _row_weights(lse2_i, cnt_i, alpha, shift2, FIXED_SHIFT, UNIT)
    if NORMALIZE:
        inv_i = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
    k_i = tl.full([BLOCK_M], 0.0, tl.float32) + k_scalar  # K_MODE 0: unused
    if K_MODE == 2:
        k_i = tl.load(k_ptr + rows.to(tl.int64) * s_k, mask=row_ok, other=0.0).to(tl.float32)
    if SINGLE_D:
        zi = _load_rows(z_ptr, za_ptr, rows, offs_d, B, N, D, s_z0, s_z1, s_a0, s_a1)
        if DOT_PREC == "3xtf32":
            zi_hi, zi_lo = _split_tf32(zi)
    else:
        rad = tl.zeros([BLOCK_M], dtype=tl.float32)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        # Row J's statistics, as column vectors, for the transposed term G_JI^T.
        lse2_j = tl.load(lse2_ptr + cols, mask=col_ok, other=0.0)
        cnt_j = tl.load(m_ptr + cols, mask=col_ok, other=0.0)
        soft_j, wx_j, wp_j = _row_weights(lse2_j, cnt_j, alpha, shift2, FIXED_SHIFT, UNIT)

        if SINGLE_D:
            zj = _load_rows(z_ptr, za_ptr, cols, offs_d, B, N, D, s_z0, s_z1, s_a0, s_a1)
            if DOT_PREC == "3xtf32":
                zj_hi, zj_lo = _split_tf32(zj)
                s_raw = _dot3_nt(zi_hi, zi_lo, zj_hi, zj_lo)
            else:
                s_raw = tl.dot(zi, tl.trans(zj), input_precision=DOT_PREC)
        else:
            s_raw = _chunked_dot(z_ptr, za_ptr, rows, cols, B, N, D, s_z0, s_z1, s_a0, s_a1,
                                 BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC)
            zj = _load_rows(z_ptr, za_ptr, cols, dv, B, N, D, s_z0, s_z1, s_a0, s_a1)
        if NORMALIZE:
            inv_j = tl.load(stats_ptr + cols, mask=col_ok, other=0.0)
            c_raw = s_raw * (inv_i[:, None] * inv_j[None, :])
            c = tl.minimum(tl.maximum(c_raw, -1.0), 1.0)
        else:
            c = s_raw
        if K_MODE == 2:
            k_j = tl.load(k_ptr + cols.to(tl.int64) * s_k, mask=col_ok, other=0.0).to(tl.float32)
        else:
            k_j = k_i  # unused
        if _special_tile(n0, r0, B, N, BLOCK_M, BLOCK_N):
            gi, gj = _grad_tile(c, rows, cols, prow, N, k_i, k_j, soft_i, wx_i, wp_i, soft_j, wx_j,
                                wp_j, qk_scale, True, FIXED_SHIFT, K_MODE, DEN_ALL)
        else:
            gi, gj = _grad_tile(c, rows, cols, prow, N, k_i, k_j, soft_i, wx_i, wp_i, soft_j, wx_j,
                                wp_j, qk_scale, False, FIXED_SHIFT, K_MODE, DEN_ALL)
        if PER_ROW_U:
            u_j = tl.load(u_ptr + cols, mask=col_ok, other=0.0) / g_div
            p = gi * u_i[:, None] + gj * u_j[None, :]
        else:
            p = gi + gj
        if NORMALIZE:
            p = tl.where(c == c_raw, p, 0.0)  # clamp's gradient: c_raw within [-1, 1]
            if not SINGLE_D:
                rad += tl.sum(p * c_raw, axis=1)
            vj = (zj.to(tl.float32) * inv_j[:, None]).to(zj.dtype)  # z^_J, values in [-1, 1]
        else:
            vj = zj
        if vj.dtype == tl.float16:
            # |G'| <= max(W) + 1 <= N: only "unit" with nearly every candidate positive gets
            # near float16's max; saturate rather than produce inf.
            p = tl.minimum(tl.maximum(p, -65504.0), 65504.0)
        if DOT_PREC == "3xtf32":  # float32 G and z^_J: lo*hi + hi*lo + hi*hi, one chain
            p_hi, p_lo = _split_tf32(p)
            v_hi, v_lo = _split_tf32(vj)
            acc = tl.dot(p_lo, v_hi, acc, input_precision="tf32")
            acc = tl.dot(p_hi, v_lo, acc, input_precision="tf32")
            acc = tl.dot(p_hi, v_hi, acc, input_precision="tf32")
        else:
            acc = tl.dot(p.to(vj.dtype), vj, acc, input_precision=DOT_PREC)

    scale = g * post_scale
    dzh = acc * scale  # dL/dz^ for this program's rows and column chunk
    if NORMALIZE:
        big = tl.load(stats_ptr + N + rows, mask=row_ok, other=0.0)
        if SINGLE_D:
            zhat = zi.to(tl.float32) * inv_i[:, None]
            rad = tl.sum(zhat * dzh, axis=1)
        else:
            zhat = _load_rows(z_ptr, za_ptr, rows, dv, B, N, D, s_z0, s_z1, s_a0, s_a1).to(tl.float32)
            zhat = zhat * inv_i[:, None]
            rad = rad * scale
        # F.normalize's Jacobian: (dz^ - z^ <z^, dz^>) / |z| where |z| >= eps, dz^ / eps below.
        dz = (dzh - zhat * (rad * big)[:, None]) * inv_i[:, None]
    else:
        dz = dzh
    _store_rows(dz_ptr, dza_ptr, rows, dv, dz, B, N, D, s_d0, s_d1, s_e0, s_e1)
