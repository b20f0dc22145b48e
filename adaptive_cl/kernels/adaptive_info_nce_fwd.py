"""Forward Triton kernels of the fused AdaptiveRec InfoNCE (SPEC.md), and shared tile helpers.

Launches (normalize=True): ``_row_norm_kernel`` (one pass over Z: inverse norms, O(N)) then
``_fwd_kernel``; normalize=False skips the first. The reduction (mean/sum) is one torch op.

``_fwd_kernel``: one program per block of BLOCK_M rows of Z = [z; z_aug] (rows are read from
the two inputs by index and stride: no concatenated copy). It walks every column tile J of Z
once, computing the raw tile Z_I Z_J^T with ``tl.dot`` (float32 accumulation; D looped in
BLOCK_D chunks when D is wide) and, per element:

- c = dot * (inv_i * inv_j), clamped to [-1, 1]  (inv_i * inv_j first, so c_ij and c_ji are
  the same bits: the backward re-evaluates row j's decisions on program I's c_ij);
- t = c * log2(e)/tau (base-2 logits, scale folded);
- membership of row i: valid (j != i, j < N), extra positive (j in N(i), c > k_i);
- FIXED_SHIFT (normalize and tau >= 0.03): p = exp2(t - log2(e)/tau), |c| <= 1 makes this a
  valid log-sum-exp shift, so no running max and no rescale; otherwise the online max.

Per row it writes lse2_i = log2 sum_{Den(i)} exp2(t_ij) (base 2), m_i = |A(i)| and the loss
l_i (SPEC.md's four numbers; the partner's c is read from the special tile that holds it, the
same value that enters the LSE, and with the fixed shift the loss is formed as
ln(l_i) + (1 - c_ip)/tau so a dominant partner does not cancel two terms of size 1/tau).
Extra memory: 3 floats per row.

Only the few column tiles (about 2 BLOCK_M / BLOCK_N + 3) of a row block that hold its diagonal, its partners or
columns >= N (``_special_tile``) build the self / partner / bounds masks; every other tile
knows all its entries are candidates.

Cost per tile element (BLOCK_M x BLOCK_N), interior tiles, FIXED_SHIFT: 1 exp2, D MACs in the
dot (3 tf32 passes with "3xtf32"), about 7 other FP32 ops without k (2 mul for c, 2 clamp, 1
FMA for the exponent, the row-sum add) and 6 more with k (compare, count, masked sum of c,
the denominator select). The online max adds a max-reduction and a rescale per row per tile.
Options are ``tl.constexpr``, so each combination compiles to its own kernel with no dead
work. Launch configuration (tile sizes, autotuning) lives in function.py.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

#: log2(e): logits are scaled into base 2 once, so every exponential is a bare ``exp2``.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
#: ``F.normalize``'s epsilon (contract.NORM_EPS).
NORM_EPS = 1e-12
#: Below this temperature use the online max. With the fixed shift, E = exp2(t - log2e/tau) >=
#: 2^(-2 log2e/tau) must stay a normal float32 (tau > 0.0226), and the backward's per-row
#: factor W exp2(log2e/tau - lse2) <= N 2^(2 log2e/tau) must not overflow (N <= 2^17: tau > 0.026).
FIXED_SHIFT_MIN_TAU = 0.03
#: Widest D chunk held in one tile. Wider D is looped (forward) or split over a second grid
#: axis (backward). Tests lower it to exercise the chunked path in the interpreter.
MAX_BLOCK_D = 256

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def block_d(d: int) -> int:
    """The D chunk, shared by the forward and the backward so both sum c_ij in the same order."""
    d_pad = max(16, triton.next_power_of_2(d))
    return min(d_pad, MAX_BLOCK_D)


# ----------------------------------------------------------------------------------- helpers
@triton.jit
def _load_rows(z_ptr, za_ptr, rows, d_offs, B, N, D, s_z0, s_z1, s_a0, s_a1):
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


@triton.jit
def _split_tf32(x):
    """x = hi + lo with hi exactly representable in tf32 (round half away on the 13 dropped
    mantissa bits) and lo = x - hi exact in float32."""
    xi = x.to(tl.int32, bitcast=True)
    hi = ((xi + 4096) & -8192).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def _dot3_nt(a_hi, a_lo, b_hi, b_lo):
    """a b^T to about float32 accuracy with three tf32 tensor-core products (the missing
    lo*lo term is <= 2^-22 |a||b|). The two cross terms are separate products added
    elementwise, so the (i, j) entry and the (j, i) entry of the swapped call are the same
    bits (Triton's built-in "tf32x3" chains them in operand order, which breaks that)."""
    small = tl.dot(a_hi, tl.trans(b_lo), input_precision="tf32") + tl.dot(a_lo, tl.trans(b_hi), input_precision="tf32")
    return tl.dot(a_hi, tl.trans(b_hi), small, input_precision="tf32")


@triton.jit
def _chunked_dot(z_ptr, za_ptr, rows, cols, B, N, D, s_z0, s_z1, s_a0, s_a1,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """Z_I Z_J^T for wide D: BLOCK_D chunks in increasing order, float32 accumulation (the
    same order in forward and backward, so both see the same c_ij)."""
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if DOT_PREC == "3xtf32":
        small = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        zi_c = _load_rows(z_ptr, za_ptr, rows, d0 + offs_d, B, N, D, s_z0, s_z1, s_a0, s_a1)
        zj_c = _load_rows(z_ptr, za_ptr, cols, d0 + offs_d, B, N, D, s_z0, s_z1, s_a0, s_a1)
        if DOT_PREC == "3xtf32":  # symmetric 3-pass (see _dot3_nt), accumulated per part
            i_hi, i_lo = _split_tf32(zi_c)
            j_hi, j_lo = _split_tf32(zj_c)
            small += tl.dot(i_hi, tl.trans(j_lo), input_precision="tf32") + tl.dot(i_lo, tl.trans(j_hi), input_precision="tf32")
            acc = tl.dot(i_hi, tl.trans(j_hi), acc, input_precision="tf32")
        else:
            acc = tl.dot(zi_c, tl.trans(zj_c), acc, input_precision=DOT_PREC)
    if DOT_PREC == "3xtf32":
        acc = acc + small
    return acc


@triton.jit
def _row_norm_kernel(z_ptr, za_ptr, stats_ptr, B, N, D, s_z0, s_z1, s_a0, s_a1,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """stats[0:N] = 1 / max(|z_r|, eps); stats[N:2N] = 1.0 where |z_r| >= eps else 0.0.

    Computed once and read by both passes, so every c_ij sees the same bits of inv_i and inv_j
    (recomputing norms per tile would depend on the tile's register layout)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    ss = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x = _load_rows(z_ptr, za_ptr, rows, d0 + offs_d, B, N, D, s_z0, s_z1, s_a0, s_a1).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    norm = tl.sqrt_rn(ss)
    inv = tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), tl.maximum(norm, 1e-12))
    ok = rows < N
    tl.store(stats_ptr + rows, inv, mask=ok)
    tl.store(stats_ptr + N + rows, tl.where(norm >= 1e-12, 1.0, 0.0), mask=ok)


@triton.jit
def _special_tile(n0, r0, B, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Does column tile [n0, n0 + BLOCK_N) hold, for some row of [r0, r0 + BLOCK_M), the row
    itself, its partner, or columns past N? Only such tiles (a few of the N / BLOCK_N per
    row block) pay for the self / partner / bounds masks."""
    hi = n0 + BLOCK_N
    self_hit = (n0 < r0 + BLOCK_M) & (hi > r0)
    a1 = r0 + B  # partners of the block's rows in z: [r0 + B, min(r0 + BM, B) + B)
    b1 = tl.minimum(r0 + BLOCK_M, B) + B
    a2 = tl.maximum(r0, B) - B  # partners of its rows in z_aug
    b2 = tl.minimum(r0 + BLOCK_M, N) - B
    p1 = (a1 < b1) & (n0 < b1) & (hi > a1)
    p2 = (a2 < b2) & (n0 < b2) & (hi > a2)
    return self_hit | p1 | p2 | (hi > N)


@triton.jit
def _fwd_tile(c, rows, cols, prow, N, k_i, m_run, l_run, cnt, sum_c, c_par, qk_scale,
              MASKED: tl.constexpr, FIXED_SHIFT: tl.constexpr, K_MODE: tl.constexpr,
              DEN_ALL: tl.constexpr):
    """Fold one tile of cosines (or dots) c into the row statistics. MASKED: the tile may
    contain the diagonal, partners or columns >= N; otherwise every entry is a candidate."""
    if MASKED:
        valid = (cols[None, :] != rows[:, None]) & (cols < N)[None, :]
        # The partner's c, taken from the tile that also feeds its exponential, so that
        # LSE_i - s_ip cancels consistently when the partner dominates.
        c_par += tl.sum(tl.where(cols[None, :] == prow[:, None], c, 0.0), axis=1)
    if K_MODE != 0:
        extra = c > k_i[:, None]
        if MASKED:
            extra = extra & valid & (cols[None, :] != prow[:, None])
        cnt += tl.sum(extra.to(tl.float32), axis=1)
        sum_c += tl.sum(tl.where(extra, c, 0.0), axis=1)
    t = c * qk_scale
    if FIXED_SHIFT:
        e = tl.exp2(t - qk_scale)
        if K_MODE != 0 and not DEN_ALL:
            e = tl.where(extra, 0.0, e)
        if MASKED:
            e = tl.where(valid, e, 0.0)
        l_run += tl.sum(e, axis=1)
    else:
        if K_MODE != 0 and not DEN_ALL:
            t = tl.where(extra, float("-inf"), t)
        if MASKED:
            t = tl.where(valid, t, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(t, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no Den entry yet: avoid inf-inf
        l_run = l_run * tl.exp2(m_run - m_use) + tl.sum(tl.exp2(t - m_use[:, None]), axis=1)
        m_run = m_new
    return m_run, l_run, cnt, sum_c, c_par


@triton.jit
def _fwd_kernel(z_ptr, za_ptr, inv_ptr, k_ptr, loss_ptr, lse2_ptr, m_ptr,
                B, N, D, s_z0, s_z1, s_a0, s_a1, s_k,
                k_scalar, qk_scale, inv_tau, alpha, log_alpha, log_1m_alpha,
                NORMALIZE: tl.constexpr, FIXED_SHIFT: tl.constexpr, K_MODE: tl.constexpr,
                DEN_ALL: tl.constexpr, UNIT: tl.constexpr, SINGLE_D: tl.constexpr,
                DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr):
    # K_MODE: 0 no threshold, 1 one scalar k (argument), 2 a k per row (vector load).
    r0 = tl.program_id(0) * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    prow = tl.where(rows < B, rows + B, rows - B)
    offs_d = tl.arange(0, BLOCK_D)

    if SINGLE_D:  # all of D fits one chunk: Z_I stays in registers for the whole row walk
        zi = _load_rows(z_ptr, za_ptr, rows, offs_d, B, N, D, s_z0, s_z1, s_a0, s_a1)
        if DOT_PREC == "3xtf32":
            zi_hi, zi_lo = _split_tf32(zi)
    if NORMALIZE:
        inv_i = tl.load(inv_ptr + rows, mask=row_ok, other=0.0)
    k_i = tl.full([BLOCK_M], 0.0, tl.float32) + k_scalar  # K_MODE 0: unused
    if K_MODE == 2:
        k_i = tl.load(k_ptr + rows.to(tl.int64) * s_k, mask=row_ok, other=0.0).to(tl.float32)

    shift2 = qk_scale  # log2(e)/tau: the fixed base-2 shift (max possible t)
    m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_run = tl.zeros([BLOCK_M], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_c = tl.zeros([BLOCK_M], dtype=tl.float32)
    dp = tl.zeros([BLOCK_M], dtype=tl.float32)  # c_{i, p(i)}

    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        if SINGLE_D:
            zj = _load_rows(z_ptr, za_ptr, cols, offs_d, B, N, D, s_z0, s_z1, s_a0, s_a1)
            if DOT_PREC == "3xtf32":
                zj_hi, zj_lo = _split_tf32(zj)
                acc = _dot3_nt(zi_hi, zi_lo, zj_hi, zj_lo)
            else:
                acc = tl.dot(zi, tl.trans(zj), input_precision=DOT_PREC)
        else:
            acc = _chunked_dot(z_ptr, za_ptr, rows, cols, B, N, D, s_z0, s_z1, s_a0, s_a1,
                               BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC)
        if NORMALIZE:
            inv_j = tl.load(inv_ptr + cols, mask=cols < N, other=0.0)
            c = acc * (inv_i[:, None] * inv_j[None, :])
            c = tl.minimum(tl.maximum(c, -1.0), 1.0)
        else:
            c = acc
        if _special_tile(n0, r0, B, N, BLOCK_M, BLOCK_N):
            m_run, l_run, cnt, sum_c, dp = _fwd_tile(c, rows, cols, prow, N, k_i, m_run, l_run, cnt,
                                                     sum_c, dp, qk_scale, True, FIXED_SHIFT, K_MODE, DEN_ALL)
        else:
            m_run, l_run, cnt, sum_c, dp = _fwd_tile(c, rows, cols, prow, N, k_i, m_run, l_run, cnt,
                                                     sum_c, dp, qk_scale, False, FIXED_SHIFT, K_MODE, DEN_ALL)

    l_run = tl.where(row_ok, l_run, 1.0)  # padding rows: keep log2 finite
    if FIXED_SHIFT:
        lse2 = shift2 + tl.log2(l_run)
    else:
        lse2 = tl.where(row_ok, m_run, 0.0) + tl.log2(l_run)

    if FIXED_SHIFT:
        # Written around the shift 1/tau, so a dominant partner (l ~ exp(s_p - 1/tau)) cancels
        # two terms of size (1 - c_p)/tau rather than two of size 1/tau:
        # LSE_i - s_ip = ln(l_i) + (1 - c_ip)/tau, sum_A (LSE_i - s_ij) = m ln(l_i) + sum_A (1 - c_ij)/tau.
        ln_l = tl.log(l_run)
        ce_p = ln_l + (1.0 - dp) * inv_tau
        pos = cnt * ln_l + (cnt - sum_c) * inv_tau
    else:
        lse = lse2 * 0.6931471805599453  # natural-log LSE_i
        ce_p = lse - dp * inv_tau
        pos = cnt * lse - sum_c * inv_tau  # sum over A(i) of (LSE_i - s_ij)
    if K_MODE != 0:
        guard = tl.maximum(cnt, 1.0)
        if UNIT:
            loss = ce_p - log_alpha + pos - cnt * (log_1m_alpha - tl.log(guard))
        else:
            loss = alpha * ce_p + (1.0 - alpha) / guard * pos
    else:
        if UNIT:
            loss = ce_p - log_alpha
        else:
            loss = alpha * ce_p
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(lse2_ptr + rows, lse2, mask=row_ok)
    tl.store(m_ptr + rows, cnt, mask=row_ok)
