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

from .adaptive_info_nce_fwd import cosine, label_threshold, left_operand, load_tile, s_tile, sigmoid2, special_tile
from .row_stats import round_tf32

#: S maps max_i |u_i| W_i into [2^G_TARGET, 2^(G_TARGET + 1)) (see the module docstring).
G_TARGET: tl.constexpr = tl.constexpr(13)


@triton.jit(do_not_specialize=["N"])
def _bwd_rows_kernel(u_ptr, cnt_ptr, rs_ptr, wx_ptr, hin_ptr, inv_ptr, a_ptr, bx_ptr, bp_ptr, uu_ptr, ha_ptr,
                     post_ptr, N, u_scale, alpha, inv_tau, kappa,
                     PER_ROW_U: tl.constexpr, FIXED_SHIFT: tl.constexpr, UNIT: tl.constexpr,
                     SOFT: tl.constexpr, NORMALIZE: tl.constexpr, DEN_ALL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    u0 = 0.0
    if not PER_ROW_U:
        u0 = tl.load(u_ptr) * u_scale
    zmax = 1.0
    if SOFT and not NORMALIZE:
        # |c_ij| <= |z_i| max_j |z_j| (raw dot products): the largest row norm (inv = 1 / |z|)
        topn = tl.zeros([BLOCK], dtype=tl.float32)
        for n0 in range(0, N, BLOCK):
            r = n0 + offs
            topn = tl.maximum(topn, 1.0 / tl.load(inv_ptr + r, mask=r < N, other=1.0))
        zmax = tl.max(topn, axis=0)
    if PER_ROW_U or UNIT or SOFT:
        # big = max_i |u_i| bound_i, bound_i >= |dl_i/ds_ij| (hard: W_i; soft: also the
        # membership term (tau/beta) a(1 - a) |dl_i/da_ij|, dl_i/da_ij = A_i - B_i c - [negatives] W_i E_ij:
        # a(1 - a) <= 1/4 bounds the first two, but E_ij is not <= 1 with denominator="negatives"
        # (only (1 - a) E_ij <= 1: the pair's weight in its own denominator), so that term's
        # bound is a(1 - a) W E <= a W <= W, not W/4 (issue 23: the float16 scale was 4x low)
        top = tl.zeros([BLOCK], dtype=tl.float32)
        for n0 in range(0, N, BLOCK):
            r = n0 + offs
            ok = r < N
            if PER_ROW_U:
                u = tl.load(u_ptr + r, mask=ok, other=0.0) * u_scale
            else:
                u = tl.zeros([BLOCK], dtype=tl.float32) + u0
            cnt = tl.load(cnt_ptr + r, mask=ok, other=0.0)
            if UNIT:
                w_tot = 1.0 + cnt
            elif SOFT:
                w_tot = alpha + tl.load(wx_ptr + r, mask=ok, other=0.0) * cnt
            else:
                w_tot = tl.where(cnt > 0.0, 1.0, alpha)
            bound = w_tot
            if SOFT:
                wx = tl.load(wx_ptr + r, mask=ok, other=0.0)
                h_a = tl.load(hin_ptr + r, mask=ok, other=0.0)
                cmax = 1.001
                if not NORMALIZE:
                    cmax = zmax / tl.load(inv_ptr + r, mask=ok, other=1.0)
                if DEN_ALL:  # no W E term in dl/da
                    bound = w_tot + wx + 0.25 * kappa * (tl.abs(h_a) + wx * cmax * inv_tau)
                else:
                    bound = w_tot + wx + kappa * (0.25 * (tl.abs(h_a) + wx * cmax * inv_tau) + w_tot)
            top = tl.maximum(top, tl.abs(u) * bound)
        big = tl.max(top, axis=0)
    else:
        big = tl.abs(u0)  # normalized weighting, hard threshold: W_i <= 1
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
        wx = tl.load(wx_ptr + r, mask=ok, other=0.0)
        tl.store(bx_ptr + r, su * wx, mask=ok)
        tl.store(bp_ptr + r, su * w_p, mask=ok)
        if SOFT:  # (tau/beta) S u_i A_i / ln2 (see _soft_side)
            tl.store(ha_ptr + r, su * (kappa * 1.4426950408889634) * tl.load(hin_ptr + r, mask=ok, other=0.0),
                     mask=ok)


@triton.jit
def _soft_side(cb, g, s, r, bx, ha, kappa2, DEN_ALL: tl.constexpr):
    """One row's soft-threshold gradient on the tile, in S u tau dl/dc units, and its membership
    term's share of the k gradient. g: S u W P (the softmax part), s: a_ij, r: 1 - a_ij,
    cb = c log2(e)/beta. With D = (tau/beta) S u dl/da = ha - hb c - [negatives] kappa g and
    hb = bx / beta: D = ln2 D2, D2 = ha/ln2 - bx cb - [negatives] (kappa/ln2) g (``ha`` arrives
    divided by ln2, ``kappa2`` = kappa/ln2), so no row factor hb is loaded. Returns
    (main + ln2 a(1 - a) D2, a(1 - a) D2)."""
    if DEN_ALL:
        main = g - bx * s
        d = ha - bx * cb
    else:
        main = g * r - bx * s
        d = ha - bx * cb - kappa2 * g
    q = (s * r) * d
    return main + 0.6931471805599453 * q, q


@triton.jit
def _soft_membership(cb, kk, cand, MASKED: tl.constexpr):
    """(a, 1 - a): a = sigmoid((c - k)/beta) (k and cb = c pre-scaled by log2(e)/beta; a shared
    label has k = -inf: a = 1), 0 off N(i) (the partner: weight 1 in the denominator)."""
    a, q = sigmoid2(kk - cb)
    if MASKED:
        a = tl.where(cand, a, 0.0)
        q = tl.where(cand, q, 1.0)
    return a, q


@triton.jit
def _grad_tile(c, rows, cols, prow, N, k_i, k_j, lab_i, lab_j, a_i, bx_i, bp_i, uu_i, ha_i,
               a_j, bx_j, bp_j, uu_j, ha_j, dk_acc, qk_scale, nlb, kappa,
               MASKED: tl.constexpr, FIXED_SHIFT: tl.constexpr, K_MODE: tl.constexpr,
               DEN_ALL: tl.constexpr, LABELS: tl.constexpr, SOFT: tl.constexpr, K_GRAD: tl.constexpr):
    """G'_IJ + G'_JI^T of one tile: row i's and row j's S u dl/ds (soft: S u tau dl/dc) on the
    same entries, and (K_GRAD) the row sums of the k gradient's terms for rows I.
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
    cand = None
    valid = None
    partner = None
    if MASKED:
        valid = (cols[None, :] != rows[:, None]) & (cols < N)[None, :]
        partner = cols[None, :] == prow[:, None]
        cand = valid & (~partner)
        if SOFT and not FIXED_SHIFT:
            # the self / padding entries' exponentials may overflow (raw dot products); a zero
            # membership weight must not meet an inf
            g_i = tl.where(valid, g_i, 0.0)
            g_j = tl.where(valid, g_j, 0.0)
    # K_MODE 0 / 1: one threshold (+inf / k) for every row, so the same decisions both ways.
    kk_i = k_i[:, None]
    kk_j = kk_i
    if K_MODE == 2:
        kk_j = k_j[None, :]
    if LABELS:  # a shared label: k = -inf for both rows (label_threshold)
        same = lab_i[:, None] == lab_j[None, :]
        kk_i = tl.where(same, float("-inf"), kk_i)
        if K_MODE == 2:
            kk_j = tl.where(same, float("-inf"), kk_j)
        else:
            kk_j = kk_i
    if SOFT:
        cb = c * nlb
        s_i, r_i = _soft_membership(cb, kk_i, cand, MASKED)
        if K_MODE != 2:
            s_j = s_i  # one k for every row: the same membership both ways
            r_j = r_i
        else:
            s_j, r_j = _soft_membership(cb, kk_j, cand, MASKED)
        if not FIXED_SHIFT and not DEN_ALL:
            # weight 1 - a = 0 exactly: outside the denominator, so the forward's shift did not
            # bound its exponential
            g_i = tl.where(r_i > 0.0, g_i, 0.0)
            g_j = tl.where(r_j > 0.0, g_j, 0.0)
        g_i, q_i = _soft_side(cb, g_i, s_i, r_i, bx_i[:, None], ha_i[:, None], kappa, DEN_ALL)
        g_j, q_j = _soft_side(cb, g_j, s_j, r_j, bx_j[None, :], ha_j[None, :], kappa, DEN_ALL)
        if K_GRAD:
            dk_acc += tl.sum(q_i, axis=1)
    elif K_MODE != 0 or LABELS:
        ex_i = c > kk_i
        if K_MODE != 2:
            ex_j = ex_i  # one k for every row: the same decision both ways
        else:
            ex_j = c > kk_j
        if MASKED:
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
    return g_i + g_j, dk_acc


# As _fwd_kernel: B unspecialised; N, the row range and s_k specialised (see there).
@triton.jit(do_not_specialize=["B"])
def _bwd_kernel(zs_ptr, zh_ptr, inv_ptr, jac_ptr, big_ptr, k_ptr, lab_ptr, flag_ptr,
                a_ptr, bx_ptr, bp_ptr, uu_ptr, ha_ptr, post_ptr, dz_ptr, dk_ptr,
                B, N, D, ld, row_start, row_stop, s_k, k_scalar, qk_scale, nlb, kappa, one,
                NORMALIZE: tl.constexpr, FIXED_SHIFT: tl.constexpr, K_MODE: tl.constexpr,
                DEN_ALL: tl.constexpr, DOT_PREC: tl.constexpr,
                LABELS: tl.constexpr, SOFT: tl.constexpr, K_GRAD: tl.constexpr, ROUND_TF32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                K_CHUNK: tl.constexpr, ONE_CHUNK: tl.constexpr, SPLIT_D: tl.constexpr):
    # dz_ptr: (row_stop - row_start, D) contiguous, float32 or the input dtype. SOFT: thresholds
    # pre-multiplied by log2(e)/beta (= nlb); K_GRAD: dk_ptr gets dL/dk_i of rows
    # [row_start, row_stop), a row reduction in a fixed order (deterministic).
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
    ha_i = a_i
    if SOFT:
        ha_i = tl.load(ha_ptr + rows, mask=row_ok, other=0.0)
    inv_i = tl.load(inv_ptr + rows, mask=row_ok, other=0.0) if NORMALIZE else one
    k_i = tl.full([BLOCK_M], 0.0, tl.float32) + k_scalar
    if K_MODE == 0:  # no threshold (labels alone): nothing is above +inf
        k_i = tl.full([BLOCK_M], float("inf"), tl.float32)
    if K_MODE == 2:
        k_i = tl.load(k_ptr + rows.to(tl.int64) * s_k, mask=row_ok, other=0.0).to(tl.float32)
    lab_i = rows
    if LABELS:
        lab_i = tl.load(lab_ptr + rows, mask=row_ok, other=0)
    zi = tl.zeros([BLOCK_M, K_CHUNK], dtype=zs_ptr.dtype.element_ty)
    if ONE_CHUNK:
        zi = load_tile(zs_ptr, rows, tl.arange(0, K_CHUNK), N, D, ld)
    zi, zi_lo = left_operand(zi, DOT_PREC)
    rad = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_j G'_ij c_ij (wide D only)
    dk_acc = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_j a'_ij S u_i tau dl_i/da_ij (K_GRAD)
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
        ha_j = a_j
        if SOFT:
            ha_j = tl.load(ha_ptr + cols, mask=col_ok, other=0.0)
        k_j = k_i
        if K_MODE == 2:
            k_j = tl.load(k_ptr + cols.to(tl.int64) * s_k, mask=col_ok, other=0.0).to(tl.float32)
        lab_j = cols
        if LABELS:
            lab_j = tl.load(lab_ptr + cols, mask=col_ok, other=0)
        s_raw = s_tile(zs_ptr, zi, zi_lo, rows, cols, N, D, ld, BLOCK_M, BLOCK_N, K_CHUNK, ONE_CHUNK, DOT_PREC)
        inv_j = tl.load(inv_ptr + cols, mask=col_ok, other=0.0) if NORMALIZE else one
        c = cosine(s_raw, inv_i, inv_j, NORMALIZE)
        if special_tile(n0, r0, B, N, BLOCK_M, BLOCK_N):
            bp_j = tl.load(bp_ptr + cols, mask=col_ok, other=0.0)
            p, dk_acc = _grad_tile(c, rows, cols, prow, N, k_i, k_j, lab_i, lab_j, a_i, bx_i, bp_i, uu_i, ha_i,
                                   a_j, bx_j, bp_j, uu_j, ha_j, dk_acc, qk_scale, nlb, kappa,
                                   True, FIXED_SHIFT, K_MODE, DEN_ALL, LABELS, SOFT, K_GRAD)
        else:
            p, dk_acc = _grad_tile(c, rows, cols, prow, N, k_i, k_j, lab_i, lab_j, a_i, bx_i, bp_i, uu_i, ha_i,
                                   a_j, bx_j, bx_j, uu_j, ha_j, dk_acc, qk_scale, nlb, kappa,
                                   False, FIXED_SHIFT, K_MODE, DEN_ALL, LABELS, SOFT, K_GRAD)
        if NORMALIZE and SPLIT_D:
            rad += tl.sum(p * c, axis=1)
        vj = load_tile(opnd, cols, dv, N, D, ld)
        if DOT_PREC == "3xtf32":
            # float32 G' and Z^_J: lo*hi + hi*lo + hi*hi, one chain onto acc. Unlike the S tile
            # (dot_nt: c_ij must equal c_ji), this product has no transposed twin, so a fixed
            # order is all determinism needs; two independent accumulators here cost 11 registers
            # and spilled (compile_check, float32 3xtf32 D = 64).
            p_hi, p_lo = left_operand(p, DOT_PREC)
            v_hi, v_lo = left_operand(vj, DOT_PREC)
            acc = tl.dot(p_lo, v_hi, acc, input_precision="tf32")
            acc = tl.dot(p_hi, v_lo, acc, input_precision="tf32")
            acc = tl.dot(p_hi, v_hi, acc, input_precision="tf32")
        elif ROUND_TF32:
            # round G' to tf32 (Z^_J was rounded by the row-stats pass): the wgmma truncates
            acc = tl.dot(round_tf32(p), vj, acc, input_precision="tf32")
        else:
            acc = tl.dot(p.to(vj.dtype), vj, acc, input_precision=DOT_PREC)

    post = tl.load(post_ptr)  # 1 / (S tau)
    flagged = tl.load(flag_ptr) != 0
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
    dz = tl.where(flagged, float("nan"), dz)
    out = (rows - row_start).to(tl.int64)
    m = row_ok[:, None] & (dv < D)[None, :]
    tl.store(dz_ptr + out[:, None] * D + dv[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m)
    if K_GRAD:
        # dL/dk_i = -sum_j u_i a'_ij dl_i/da_ij = -(1 / (S tau)) sum_j a(1 - a) D_ij, D = ln2 D2.
        dk = tl.where(flagged, float("nan"), (-0.6931471805599453 * post) * dk_acc)
        if pid_d == 0:  # every output chunk's program has the same sums: the first writes them
            tl.store(dk_ptr + out, dk, mask=row_ok)
