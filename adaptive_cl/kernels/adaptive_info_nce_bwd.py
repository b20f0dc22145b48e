"""Backward Triton kernels of the fused AdaptiveRec InfoNCE: one small per-row launch, then one
tile launch with no atomics.

S = Z^ Z^T / tau is symmetric, so

    dL/dz^_i = (1/tau) sum_j (G_ij + G_ji) z^_j,   G_ij = u_i (W_i P_ij [j in Den(i)] - w_ij)

(u_i the upstream gradient of row i, P the softmax over Den(i), W_i the row's total target
weight, w_ij its target weight on j).

``_bwd_rows_kernel`` (one program, O(N)): folds the upstream gradient and a power-of-two scale
S into the forward's per-row factors: a_i = S u_i rs_i (FIXED_SHIFT; online: a_i = rs_i, the
base-2 offset, and uu_i = S u_i), bx_i = S u_i wx_i, bp_i = S u_i w_partner, and
post = 1 / (S tau). S is the power of two that puts S max_i |u_i| W_i in [2^13, 2^14): every
|G'_ij| = |S (G_ij + G_ji)| is below 2^15, so the float16 cast of G' cannot overflow, while a
term of size max|u| W / N stays >= 2^13 / N (a normal float16 up to N = 2^26: no subnormal at
N = 65536, where P ~ 1/N unscaled would be). Being a power of two, S changes no bit in float32 or bfloat16.

``_bwd_kernel``: a program owns BLOCK_M rows I (from [row_start, row_stop)) and walks every
column tile J once: it recomputes the raw tile exactly as the forward did (``s_tile``: same
chunks, same c = dot * (inv_i * inv_j), so the same threshold decisions), builds G'_IJ from
row I's factors and G'_JI^T from the same tile with row J's factors loaded as column vectors,
then accumulates G' Z^_J with a second ``tl.dot``. Each program writes only its own rows of
dz / dz_aug: bitwise deterministic. The per-row factors are loaded, never recomputed per tile.

Per element on interior tiles (FIXED_SHIFT): 2 FMUL (c, as the forward), 1 FFMA +
1 MUFU.EX2 (one exponential serves both rows: e_ij = exp2(t_ij - log2e/tau)), 2 FMUL (a_i e,
a_j e), 1 FADD, the half-precision pack; with k 2 FSETP + 2 FSEL more (one of each with a
scalar k). The online max (normalize=False or tau < 0.03) needs one exponential per row
(no shift is safe for both) and 2 more FMUL for the upstream factors.

c is not clamped (see ``cosine``), so there is no clamp gradient mask: the reference's clamp has
gradient 1 wherever |c| <= 1, which exact cosines always are.

Wide D (BLOCK_D < D): the grid gets a second axis over BLOCK_D chunks of the output; each
program recomputes the whole S tile (all chunks) and accumulates its chunk of dZ^. The
normalisation's radial term <z^_i, dz^_i> is then sum_j G'_ij c_ij, accumulated in the row
walk, since no program holds the full row of dz^_i.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .adaptive_info_nce_fwd import cosine, left_operand, load_tile, s_tile, special_tile

#: S maps max_i |u_i| W_i into [2^G_TARGET, 2^(G_TARGET + 1)) (see the module docstring).
G_TARGET: tl.constexpr = tl.constexpr(13)


@triton.jit
def _bwd_rows_kernel(u_ptr, cnt_ptr, rs_ptr, wx_ptr, a_ptr, bx_ptr, bp_ptr, uu_ptr, post_ptr,
                     N, u_scale, alpha, inv_tau,
                     PER_ROW_U: tl.constexpr, FIXED_SHIFT: tl.constexpr, UNIT: tl.constexpr,
                     BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if PER_ROW_U:
        top = tl.zeros([BLOCK], dtype=tl.float32)
        for n0 in range(0, N, BLOCK):
            r = n0 + offs
            u = tl.load(u_ptr + r, mask=r < N, other=0.0) * u_scale
            cnt = tl.load(cnt_ptr + r, mask=r < N, other=0.0)
            w_tot = 1.0 + cnt if UNIT else tl.where(cnt > 0.0, 1.0, alpha)
            top = tl.maximum(top, tl.abs(u) * w_tot)
        big = tl.max(top, axis=0)
    else:
        u0 = tl.load(u_ptr) * u_scale
        big = tl.abs(u0)  # normalized weighting: W_i <= 1
        if UNIT:
            top = tl.zeros([BLOCK], dtype=tl.float32)
            for n0 in range(0, N, BLOCK):
                r = n0 + offs
                top = tl.maximum(top, tl.load(cnt_ptr + r, mask=r < N, other=0.0))
            big = tl.abs(u0) * (1.0 + tl.max(top, axis=0))
    # S = 2^(G - exponent(big)), so S big is in [2^G, 2^(G+1)); from the exponent bits (exact);
    # 1 when big is 0 or not finite.
    ebits = (big.to(tl.int32, bitcast=True) >> 23) & 0xFF
    sbits = tl.minimum(tl.maximum(127 + G_TARGET - (ebits - 127), 1), 254)
    s = (sbits << 23).to(tl.float32, bitcast=True)
    s = tl.where((big > 0.0) & (big < float("inf")), s, 1.0)
    tl.store(post_ptr, inv_tau / s)
    w_p = 1.0 if UNIT else alpha
    for n0 in range(0, N, BLOCK):
        r = n0 + offs
        ok = r < N
        if PER_ROW_U:
            su = tl.load(u_ptr + r, mask=ok, other=0.0) * u_scale * s
        else:
            su = tl.zeros([BLOCK], dtype=tl.float32) + u0 * s
        rs = tl.load(rs_ptr + r, mask=ok, other=0.0)
        if FIXED_SHIFT:
            tl.store(a_ptr + r, su * rs, mask=ok)
        else:
            tl.store(a_ptr + r, rs, mask=ok)
            tl.store(uu_ptr + r, su, mask=ok)
        tl.store(bx_ptr + r, su * tl.load(wx_ptr + r, mask=ok, other=0.0), mask=ok)
        tl.store(bp_ptr + r, su * w_p, mask=ok)


@triton.jit
def _grad_tile(c, rows, cols, prow, N, k_i, k_j, a_i, bx_i, bp_i, uu_i, a_j, bx_j, bp_j, uu_j, qk_scale,
               MASKED: tl.constexpr, FIXED_SHIFT: tl.constexpr, K_MODE: tl.constexpr,
               DEN_ALL: tl.constexpr):
    """G'_IJ + G'_JI^T of one tile: row i's and row j's S u dl/ds on the same entries.
    MASKED: the tile may hold the diagonal, partners or columns >= N (see special_tile);
    otherwise every entry is a candidate of both rows."""
    if FIXED_SHIFT:
        e = tl.exp2(c * qk_scale - qk_scale)  # one exponential serves both rows
        g_i = e * a_i[:, None]
        g_j = e * a_j[None, :]
    else:
        t = c * qk_scale
        g_i = tl.exp2(t - a_i[:, None]) * uu_i[:, None]
        g_j = tl.exp2(t - a_j[None, :]) * uu_j[None, :]
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
            g_i = g_i - tl.where(ex_i, bx_i[:, None], 0.0)
            g_j = g_j - tl.where(ex_j, bx_j[None, :], 0.0)
        else:  # an extra positive leaves the denominator
            g_i = tl.where(ex_i, -bx_i[:, None], g_i)
            g_j = tl.where(ex_j, -bx_j[None, :], g_j)
    if MASKED:
        g_i = tl.where(valid, g_i, 0.0) - tl.where(partner, bp_i[:, None], 0.0)
        g_j = tl.where(valid, g_j, 0.0) - tl.where(partner, bp_j[None, :], 0.0)
    return g_i + g_j


@triton.jit
def _bwd_kernel(zs_ptr, zh_ptr, inv_ptr, jac_ptr, big_ptr, k_ptr, flag_ptr,
                a_ptr, bx_ptr, bp_ptr, uu_ptr, post_ptr, dz_ptr,
                B, N, D, ld, row_start, row_stop, s_k, k_scalar, qk_scale,
                NORMALIZE: tl.constexpr, FIXED_SHIFT: tl.constexpr, K_MODE: tl.constexpr,
                DEN_ALL: tl.constexpr, DOT_PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                K_CHUNK: tl.constexpr, ONE_CHUNK: tl.constexpr, SPLIT_D: tl.constexpr):
    # dz_ptr: (row_stop - row_start, D) contiguous, float32 or the input dtype.
    r0 = row_start + tl.program_id(0) * BLOCK_M
    pid_d = tl.program_id(1)
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_stop
    prow = tl.where(rows < B, rows + B, rows - B)
    dv = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # this program's chunk of output columns

    a_i = tl.load(a_ptr + rows, mask=row_ok, other=0.0)
    bx_i = tl.load(bx_ptr + rows, mask=row_ok, other=0.0)
    bp_i = tl.load(bp_ptr + rows, mask=row_ok, other=0.0)
    uu_i = a_i
    if not FIXED_SHIFT:
        uu_i = tl.load(uu_ptr + rows, mask=row_ok, other=0.0)
    inv_i = tl.load(inv_ptr + rows, mask=row_ok, other=0.0) if NORMALIZE else qk_scale
    k_i = tl.full([BLOCK_M], 0.0, tl.float32) + k_scalar  # K_MODE 0: unused
    if K_MODE == 2:
        k_i = tl.load(k_ptr + rows.to(tl.int64) * s_k, mask=row_ok, other=0.0).to(tl.float32)
    zi = tl.zeros([BLOCK_M, K_CHUNK], dtype=zs_ptr.dtype.element_ty)
    if ONE_CHUNK:
        zi = load_tile(zs_ptr, rows, tl.arange(0, K_CHUNK), N, D, ld)
    zi, zi_lo = left_operand(zi, DOT_PREC)
    rad = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_j G'_ij c_ij (wide D only)
    opnd = zh_ptr if NORMALIZE else zs_ptr  # the second product's right operand: Z^ (or Z)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        a_j = tl.load(a_ptr + cols, mask=col_ok, other=0.0)
        bx_j = tl.load(bx_ptr + cols, mask=col_ok, other=0.0)
        uu_j = a_j
        if not FIXED_SHIFT:
            uu_j = tl.load(uu_ptr + cols, mask=col_ok, other=0.0)
        k_j = k_i
        if K_MODE == 2:
            k_j = tl.load(k_ptr + cols.to(tl.int64) * s_k, mask=col_ok, other=0.0).to(tl.float32)
        s_raw = s_tile(zs_ptr, zi, zi_lo, rows, cols, N, D, ld, BLOCK_M, BLOCK_N, K_CHUNK, ONE_CHUNK, DOT_PREC)
        inv_j = tl.load(inv_ptr + cols, mask=col_ok, other=0.0) if NORMALIZE else qk_scale
        c = cosine(s_raw, inv_i, inv_j, NORMALIZE)
        if special_tile(n0, r0, B, N, BLOCK_M, BLOCK_N):
            bp_j = tl.load(bp_ptr + cols, mask=col_ok, other=0.0)
            p = _grad_tile(c, rows, cols, prow, N, k_i, k_j, a_i, bx_i, bp_i, uu_i, a_j, bx_j, bp_j, uu_j,
                           qk_scale, True, FIXED_SHIFT, K_MODE, DEN_ALL)
        else:
            p = _grad_tile(c, rows, cols, prow, N, k_i, k_j, a_i, bx_i, bp_i, uu_i, a_j, bx_j, bx_j, uu_j,
                           qk_scale, False, FIXED_SHIFT, K_MODE, DEN_ALL)
        if NORMALIZE and SPLIT_D:
            rad += tl.sum(p * c, axis=1)
        vj = load_tile(opnd, cols, dv, N, D, ld)
        if DOT_PREC == "3xtf32":  # float32 G' and Z^_J: lo*hi + hi*lo + hi*hi, one chain
            p_hi, p_lo = left_operand(p, DOT_PREC)
            v_hi, v_lo = left_operand(vj, DOT_PREC)
            acc = tl.dot(p_lo, v_hi, acc, input_precision="tf32")
            acc = tl.dot(p_hi, v_lo, acc, input_precision="tf32")
            acc = tl.dot(p_hi, v_hi, acc, input_precision="tf32")
        else:
            acc = tl.dot(p.to(vj.dtype), vj, acc, input_precision=DOT_PREC)

    post = tl.load(post_ptr)  # 1 / (S tau)
    dzh = acc * post  # dL/dz^ for this program's rows and column chunk
    if NORMALIZE:
        jac_i = tl.load(jac_ptr + rows, mask=row_ok, other=0.0)
        big_i = tl.load(big_ptr + rows, mask=row_ok, other=0.0)
        zhat = load_tile(zs_ptr, rows, dv, N, D, ld).to(tl.float32) * inv_i[:, None]
        if SPLIT_D:
            rad = rad * post
        else:
            rad = tl.sum(zhat * dzh, axis=1)
        # F.normalize's Jacobian: (dz^ - z^ <z^, dz^>) / |z| where |z| >= eps, dz^ / eps below.
        dz = (dzh - zhat * (rad * big_i)[:, None]) * jac_i[:, None]
    else:
        dz = dzh
    # Any NaN / inf in z or z_aug: every gradient element is NaN (contract).
    dz = tl.where(tl.load(flag_ptr) != 0, float("nan"), dz)
    out = (rows - row_start).to(tl.int64)
    m = row_ok[:, None] & (dv < D)[None, :]
    tl.store(dz_ptr + out[:, None] * D + dv[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m)
