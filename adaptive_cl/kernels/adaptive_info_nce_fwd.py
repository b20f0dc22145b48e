"""Forward Triton kernel of the fused AdaptiveRec InfoNCE (adaptive_cl.reference is the readable
specification), and the tile helpers it shares with the backward.

Launches: ``row_stats._row_stats_kernel`` (one pass over Z: scaled rows, inverse norms, the
all-finite flag), then ``_fwd_kernel``; the reduction (mean/sum) is one torch op.

``_fwd_kernel``: one program per block of BLOCK_M rows of Z = [z; z_aug], from a contiguous
range [row_start, row_stop) of global rows (all N by default; a distributed caller gives its
own rows and still walks every column). It walks every column tile J of Z once, computing the
raw tile Zs_I Zs_J^T with ``tl.dot`` (float32 accumulation; in K_CHUNK-wide pieces when
K_CHUNK < D, in a fixed order) and, per element:

- c = dot * (inv_i * inv_j) (inv_i * inv_j first, so c_ij and c_ji are the same bits: the
  backward re-evaluates row j's decisions on program I's c_ij); not clamped (see ``cosine``);
- extra positive: c > k_i (a NaN k_i: no extra positives, as the comparison c > k gives);
- FIXED_SHIFT (normalize and tau >= 0.03): e = exp2((c - 1) log2(e)/tau); |c| <= 1 makes 1/tau
  a valid log-sum-exp shift, so no running max and no rescale; otherwise the online max.

Per row it writes the loss l_i, m_i = |A(i)|, and what the backward needs so that it never
recomputes a per-row quantity per tile: ``rs_i`` (FIXED_SHIFT: W_i exp2(shift - lse2_i), the
factor that turns the shared e_ij into row i's W_i P_ij; online: lse2_i - log2 W_i, the base-2
offset) and ``wx_i`` (the weight of each extra positive). W_i is the row's total target weight
(normalized: 1 if m_i > 0 else alpha; unit: 1 + m_i). If the row-stats kernel flagged a
non-finite input, every row loss is NaN.

Only the few column tiles of a row block that hold its diagonal, its partners or columns >= N
(``special_tile``) build the self / partner / bounds masks; every other tile knows all its
entries are candidates. Cost per element on interior tiles (FIXED_SHIFT): the dot, 2 FMUL
(c), 1 FFMA + 1 MUFU.EX2 (the exponential), 1 FADD (row sum); with k 1 FSETP, 1 FSET and
2 FSEL + 2 FADD more (count, sum of c over A(i), the denominator select). Measured counts:
benchmarks/NOTES.md (from ``python -m adaptive_cl.kernels.compile_check``). Options are
``tl.constexpr``: each combination compiles to its own kernel and an unused option costs
nothing. Launch configurations: ``launch.py``.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from .row_stats import round_tf32

#: log2(e): logits are scaled into base 2 once, so every exponential is a bare ``exp2``.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
#: ``F.normalize``'s epsilon (contract.NORM_EPS).
NORM_EPS = 1e-12
#: Below this temperature use the online max. With the fixed shift, E = exp2(t - log2e/tau) >=
#: 2^(-2 log2e/tau) must stay a normal float32 (tau > 0.0226), and the backward's per-row
#: factor W exp2(log2e/tau - lse2) <= N 2^(2 log2e/tau) must not overflow (N <= 2^17: tau > 0.026).
FIXED_SHIFT_MIN_TAU = 0.03
#: Widest D chunk held in one tile. Wider D is looped (the S tile) and split over a second
#: grid axis (the backward's output). Tests lower it to exercise that path in the interpreter.
MAX_BLOCK_D = 256

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def block_d(d: int) -> int:
    """The width of a row chunk held in one tile (shared by both passes)."""
    d_pad = max(16, triton.next_power_of_2(d))
    return min(d_pad, MAX_BLOCK_D)


# ----------------------------------------------------------------------------------- helpers
@triton.jit
def load_tile(ptr, rows, d_offs, N, D, ld):
    """Rows x columns of a contiguous (N, ld) array (the row-stats kernel's outputs), zero-padded."""
    m = (rows < N)[:, None] & (d_offs < D)[None, :]
    return tl.load(ptr + rows.to(tl.int64)[:, None] * ld + d_offs[None, :], mask=m, other=0.0)


@triton.jit
def split_tf32(x):
    """x = hi + lo with hi exactly representable in tf32 (round half away on the 13 dropped
    mantissa bits) and lo = x - hi exact in float32."""
    hi = round_tf32(x)
    return hi, x - hi


@triton.jit
def sym_sum(x, y):
    """x + y rounded once, as an FMA x * 1 + y: the same bits as y + x, and not an ``arith.addf``,
    so Triton's combine pass cannot fold a zero-accumulator ``dot`` operand into an accumulating
    chain (``dot(a, b) + d`` -> ``dot(a, b, d)``), whose order would depend on which operand is
    which (issue 23)."""
    return tl.fma(x, 1.0, y)


@triton.jit
def dot_nt(a, a_lo, b, acc, DOT_PREC: tl.constexpr):
    """acc + a b^T in float32. "3xtf32": ``a`` and ``a_lo`` are the split_tf32 halves of the
    left operand (split once by the caller when it is reused), and three tf32 tensor-core
    products give about float32 accuracy (the missing lo*lo term is <= 2^-22 |a||b|); the two
    cross terms are independent products (zero accumulators) summed by ``sym_sum``, and the
    hi*hi product accumulates onto acc + that sum, so the (i, j) entry and the (j, i) entry of
    the swapped call are the same bits: hi_i.lo_j and lo_i.hi_j swap places, and their one
    rounded sum does not depend on the order (a chain hi.lo -> lo.hi, which Triton's combine
    pass made of ``dot + dot``, and its built-in "tf32x3", do). "ieee": float32 FMA; "tf32":
    one tensor-core pass on operands the row-stats pass rounded to tf32; half types: native
    MMA (``a_lo`` unused)."""
    if DOT_PREC == "3xtf32":
        b_hi, b_lo = split_tf32(b)
        hl = tl.dot(a, tl.trans(b_lo), input_precision="tf32")
        lh = tl.dot(a_lo, tl.trans(b_hi), input_precision="tf32")
        return tl.dot(a, tl.trans(b_hi), acc + sym_sum(hl, lh), input_precision="tf32")
    else:
        return tl.dot(a, tl.trans(b), acc, input_precision=DOT_PREC)


@triton.jit
def left_operand(x, DOT_PREC: tl.constexpr):
    """(a, a_lo) for dot_nt: the tf32 halves for "3xtf32", else (x, x)."""
    if DOT_PREC == "3xtf32":
        return split_tf32(x)
    else:
        return x, x


@triton.jit
def s_tile(zs_ptr, zi, zi_lo, rows, cols, N, D, ld,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K_CHUNK: tl.constexpr,
           ONE_CHUNK: tl.constexpr, DOT_PREC: tl.constexpr):
    """The raw tile Zs_I Zs_J^T, float32. ONE_CHUNK: all of D in one product with Zs_I held by
    the caller (``zi``, ``zi_lo`` from left_operand); otherwise K_CHUNK-wide pieces in
    increasing order (the float32 FMA path keeps its operands small enough not to spill; wide
    D fits registers). Forward and backward call this with the same arguments, so both see the
    same bits of c_ij."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if ONE_CHUNK:
        zj = load_tile(zs_ptr, cols, tl.arange(0, K_CHUNK), N, D, ld)
        acc = dot_nt(zi, zi_lo, zj, acc, DOT_PREC)
    else:
        offs_k = tl.arange(0, K_CHUNK)
        for d0 in range(0, D, K_CHUNK):
            a, a_lo = left_operand(load_tile(zs_ptr, rows, d0 + offs_k, N, D, ld), DOT_PREC)
            b = load_tile(zs_ptr, cols, d0 + offs_k, N, D, ld)
            acc = dot_nt(a, a_lo, b, acc, DOT_PREC)
    return acc


@triton.jit
def special_tile(n0, r0, B, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
def cosine(acc, inv_i, inv_j, NORMALIZE: tl.constexpr):
    """c = dot * (inv_i * inv_j) (inv_i * inv_j first: c_ij and c_ji are the same bits).

    Not clamped to [-1, 1]: in exact arithmetic |c| <= 1 and the reference's clamp is a no-op; the
    computed c exceeds 1 only by rounding (a few ulp), well inside the float32 tolerance, and
    nothing downstream needs the bound (e = exp2((c - 1) log2e/tau) stays <= 1 + 1e-6). This
    saves two instructions per element in each pass."""
    if NORMALIZE:
        return acc * (inv_i[:, None] * inv_j[None, :])
    else:
        # inv_i is the runtime scalar 1.0 (``one``): the raw dot times 1.0 (exact). Triton 3.6's
        # software pipeliner (num_stages >= 2) fails to compile a loop whose wgmma
        # accumulator feeds the elementwise code directly (PassManager::run failed in
        # TritonGPUPipeline, sm_90, bf16 D = 64, every normalize=False variant); a multiply by
        # a value it cannot fold avoids it, for one FMUL per element.
        return acc * inv_i


@triton.jit
def sigmoid2(x2):
    """(a, q) = (sigmoid(-x2 ln 2), 1 - a) = (1 / (1 + u), u / (1 + u)) with u = 2^x2: one exp2
    and one reciprocal. q is computed as u a, not 1 - a, so it keeps its relative precision
    as a -> 1 (a candidate far above k still enters the "negatives" denominator with its tiny
    weight, which matters when tau < beta). x2 is capped at 126 so that u stays finite (a is
    then 2^-126 instead of smaller: no effect on the loss); the cap drops a NaN (NaN thresholds
    are handled per row by the callers)."""
    u = tl.exp2(tl.minimum(x2, 126.0))
    a = 1.0 / (1.0 + u)
    return a, u * a


@triton.jit
def label_threshold(kk, lab_i, lab_j):
    """The threshold with same-label pairs moved to -inf (the backward's form): c > -inf always
    holds (hard), and 2^(-inf) = 0 gives a = 1, 1 - a = 0 (soft), so a shared label makes j an
    extra positive whatever k_i is (NaN and +-inf included). ``lab_i`` / ``lab_j``: the labels'
    ids (float32, exact) of a row block and a column tile: nothing N x N is built."""
    return tl.where(lab_i[:, None] == lab_j[None, :], float("-inf"), kk)


#: The forward's thresholds for label_shift: |k| beyond K_CLAMP acts as K_CLAMP (a hard
#: threshold of 1e38 already excludes every similarity but the absurd), so that subtracting
#: LABEL_SHIFT puts any threshold below every c.
K_CLAMP = tl.constexpr(1.0e38)
LABEL_SHIFT = tl.constexpr(3.0e38)


@triton.jit
def clamp_threshold(k):
    """Per row, for label_shift: NaN (no threshold positive) -> K_CLAMP, +-inf -> +-K_CLAMP."""
    k = tl.where(k != k, K_CLAMP, k)
    return tl.minimum(tl.maximum(k, -K_CLAMP), K_CLAMP)


@triton.jit
def label_shift(kk, lab_i, lab_j):
    """The forward's form of label_threshold, arithmetic: kk - LABEL_SHIFT [same label] (kk from
    clamp_threshold, so a shared label takes it to <= -2e38 or -inf, below every c; soft:
    2^(-2e38) = 0, a = 1, 1 - a = 0). A 0/1 float and an FMA, not a select: the compiler hoists
    the label compares above the tile's product, and 32 live predicates per thread then spill
    from the predicate registers and are unpacked again (~5 instructions per element, not 2)."""
    same = (lab_i[:, None] == lab_j[None, :]).to(tl.float32)
    return kk - same * LABEL_SHIFT


@triton.jit
def hist_tile(c, rows, cols, cand, row_ok, N, hist, hist_ptr, lo, bin_scale,
              MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              STATS: tl.constexpr, HIST_ATOMIC: tl.constexpr):
    """Count the tile's candidate pairs (i, j) with j > i into STATS bins of c on [lo, hi)
    (bin = floor((c - lo) bin_scale), clamped to the edge bins). Only j > i: c_ij = c_ji, so the
    caller doubles the counts (half the work). HIST_ATOMIC: an atomic increment per element into
    this program's row of the (programs, STATS) buffer; otherwise tl.histogram (shared-memory
    atomics on Triton >= 3.9) accumulated in ``hist``. Integer counts: the result does not
    depend on the order of the increments."""
    b = ((c - lo) * bin_scale).to(tl.int32)
    b = tl.minimum(tl.maximum(b, 0), STATS - 1)
    if MASKED:
        m = row_ok[:, None] & (cols[None, :] > rows[:, None]) & cand
    else:  # an unmasked tile above the diagonal: every j > i
        m = row_ok[:, None] & (cols < N)[None, :]
    if HIST_ATOMIC:
        tl.atomic_add(hist_ptr + b, 1, mask=m, sem="relaxed")
    else:
        flat_b = tl.reshape(b, [BLOCK_M * BLOCK_N])
        flat_m = tl.reshape(m, [BLOCK_M * BLOCK_N])
        hist += tl.histogram(flat_b, STATS, mask=flat_m)
    return hist


@triton.jit
def _fwd_tile(c, rows, cols, prow, N, k_i, lab_i, lab_j, m_run, l_run, cnt, sum_c, c_par, qk_scale, nlb,
              upper, row_ok, hist, hist_ptr, lo, bin_scale,
              MASKED: tl.constexpr, FIXED_SHIFT: tl.constexpr, K_MODE: tl.constexpr,
              DEN_ALL: tl.constexpr, LABELS: tl.constexpr, SOFT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STATS: tl.constexpr, HIST_ATOMIC: tl.constexpr):
    """Fold one tile of cosines (or dots) c into the row statistics. MASKED: the tile may
    contain the diagonal, partners or columns >= N; otherwise every entry is a candidate.
    Membership: hard, [c > k_i] or a shared label; SOFT, a = sigmoid((c - k_i)/beta) (``k_i``
    is then k_i log2(e)/beta and ``nlb`` = log2(e)/beta), 1 for a shared label. STATS: also
    count the tile's pairs j > i into the histogram (``upper``: an unmasked tile lies above the
    diagonal; unmasked tiles never straddle it, since they hold no diagonal entry)."""
    cand = None
    valid = None
    if MASKED:
        valid = (cols[None, :] != rows[:, None]) & (cols < N)[None, :]
        cand = valid & (cols[None, :] != prow[:, None])
        # The partner's c, taken from the tile that also feeds its exponential, so that
        # LSE_i - s_ip cancels consistently when the partner dominates.
        c_par += tl.sum(tl.where(cols[None, :] == prow[:, None], c, 0.0), axis=1)
    kk = k_i[:, None]
    if LABELS:  # k_i went through clamp_threshold
        kk = label_shift(kk, lab_i, lab_j)
    if SOFT:
        a, q = sigmoid2(kk - c * nlb)  # membership a, denominator weight q = 1 - a
        if MASKED:
            a = tl.where(cand, a, 0.0)
            q = tl.where(cand, q, 1.0)
        cnt += tl.sum(a, axis=1)
        sum_c += tl.sum(a * c, axis=1)
    elif K_MODE != 0 or LABELS:
        extra = c > kk
        if MASKED:
            extra = extra & cand
        if LABELS:
            # As a 0/1 float used arithmetically (predicates: see label_shift).
            ex_f = extra.to(tl.float32)
            cnt += tl.sum(ex_f, axis=1)
            sum_c += tl.sum(ex_f * c, axis=1)
        else:
            cnt += tl.sum(extra.to(tl.float32), axis=1)
            sum_c += tl.sum(tl.where(extra, c, 0.0), axis=1)
    if FIXED_SHIFT:
        e = tl.exp2(c * qk_scale - qk_scale)
        if not DEN_ALL:
            if SOFT:  # denominator weight q = 1 - a
                e = e * q
            elif LABELS:
                e = e - e * ex_f
            elif K_MODE != 0:
                e = tl.where(extra, 0.0, e)
        if MASKED:
            e = tl.where(valid, e, 0.0)
        l_run += tl.sum(e, axis=1)
    else:
        t = c * qk_scale
        if not DEN_ALL:
            if SOFT:  # every column with weight q > 0 takes part in the shift
                t = tl.where(q > 0.0, t, float("-inf"))
            elif K_MODE != 0 or LABELS:
                t = tl.where(extra, float("-inf"), t)
        if MASKED:
            t = tl.where(valid, t, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(t, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no Den entry yet: avoid inf-inf
        p = tl.exp2(t - m_use[:, None])
        if SOFT and not DEN_ALL:
            p = p * q
        l_run = l_run * tl.exp2(m_run - m_use) + tl.sum(p, axis=1)
        m_run = m_new
    if STATS > 0:
        if MASKED:
            hist = hist_tile(c, rows, cols, cand, row_ok, N, hist, hist_ptr, lo, bin_scale,
                             True, BLOCK_M, BLOCK_N, STATS, HIST_ATOMIC)
        elif upper:
            hist = hist_tile(c, rows, cols, cand, row_ok, N, hist, hist_ptr, lo, bin_scale,
                             False, BLOCK_M, BLOCK_N, STATS, HIST_ATOMIC)
    return m_run, l_run, cnt, sum_c, c_par, hist


# Which integer arguments Triton specialises (== 1, divisible by 16) is chosen on purpose
# (issue 23, compile facts in benchmarks/NOTES.md). Not specialised: B (a partial last batch
# would otherwise compile new kernels, for no gain). Specialised: the row range (row_start is 0
# and row_stop is N in a single-process call, so they add no key there; unspecialised, the
# float32 "ieee" D = 64 kernels spill 8-16 B); D and ld (fixed per model; the tiles' loads
# vectorise on them); s_k (1 for any
# contiguous threshold tensor, whatever the batch: unspecialised, the threshold loads become
# gathers, +3.4 backward instructions per element on triton 3.6); and N, because the column
# loads' masks (cols < N) vectorise only when N is known to be a multiple of 16 (unspecialised:
# bfloat16 D = 64 backward 35.2 instead of 26.0 instructions per element on triton 3.6). So a
# batch whose N = 2B is not a multiple of 16 compiles this kernel and the backward once more per
# process (then cached), never more; the row-statistics and per-row kernels never.
@triton.jit(do_not_specialize=["B"])
def _fwd_kernel(zs_ptr, inv_ptr, k_ptr, lab_ptr, flag_ptr, loss_ptr, cnt_ptr, rs_ptr, wx_ptr, ha_ptr, hist_ptr,
                B, N, D, ld, row_start, row_stop, s_k,
                k_scalar, qk_scale, inv_tau, alpha, log_alpha, log_1m_alpha, nlb, lo, bin_scale, one,
                NORMALIZE: tl.constexpr, FIXED_SHIFT: tl.constexpr, K_MODE: tl.constexpr,
                DEN_ALL: tl.constexpr, UNIT: tl.constexpr, DOT_PREC: tl.constexpr,
                LABELS: tl.constexpr, SOFT: tl.constexpr, STATS: tl.constexpr, HIST_ATOMIC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K_CHUNK: tl.constexpr,
                ONE_CHUNK: tl.constexpr):
    # K_MODE: 0 no threshold, 1 one scalar k (argument), 2 a k per row (vector load). With SOFT
    # the thresholds (scalar and vector) come pre-multiplied by log2(e)/beta (= nlb).
    # LABELS: (N,) float32 label ids at lab_ptr (equal ids exactly for equal labels). STATS > 0: a histogram of c with STATS bins into
    # this program's row of hist_ptr ((programs, STATS) int32).
    pid = tl.program_id(0)
    r0 = row_start + pid * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_stop
    prow = tl.where(rows < B, rows + B, rows - B)

    zi = tl.zeros([BLOCK_M, K_CHUNK], dtype=zs_ptr.dtype.element_ty)
    if ONE_CHUNK:  # all of D in one product: Zs_I stays on chip for the whole row walk
        zi = load_tile(zs_ptr, rows, tl.arange(0, K_CHUNK), N, D, ld)
    zi, zi_lo = left_operand(zi, DOT_PREC)
    inv_i = tl.load(inv_ptr + rows, mask=row_ok, other=0.0) if NORMALIZE else one
    k_i = tl.full([BLOCK_M], 0.0, tl.float32) + k_scalar
    if K_MODE == 0:  # labels alone: no threshold positive
        k_i = tl.full([BLOCK_M], K_CLAMP, tl.float32)
    if K_MODE == 2:
        k_i = tl.load(k_ptr + rows.to(tl.int64) * s_k, mask=row_ok, other=0.0).to(tl.float32)
    k_row = k_i  # as given (a NaN soft threshold makes its row NaN)
    lab_i = rows
    if LABELS:
        lab_i = tl.load(lab_ptr + rows, mask=row_ok, other=0)
        k_i = clamp_threshold(k_i)
    hist_row = hist_ptr + pid * STATS

    m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_run = tl.zeros([BLOCK_M], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_c = tl.zeros([BLOCK_M], dtype=tl.float32)
    dp = tl.zeros([BLOCK_M], dtype=tl.float32)  # c_{i, p(i)}
    hist = tl.zeros([STATS if STATS > 0 else 1], dtype=tl.int32)

    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        acc = s_tile(zs_ptr, zi, zi_lo, rows, cols, N, D, ld, BLOCK_M, BLOCK_N, K_CHUNK, ONE_CHUNK, DOT_PREC)
        inv_j = tl.load(inv_ptr + cols, mask=cols < N, other=0.0) if NORMALIZE else one
        c = cosine(acc, inv_i, inv_j, NORMALIZE)
        lab_j = cols
        if LABELS:
            lab_j = tl.load(lab_ptr + cols, mask=cols < N, other=0)
        if special_tile(n0, r0, B, N, BLOCK_M, BLOCK_N):
            m_run, l_run, cnt, sum_c, dp, hist = _fwd_tile(
                c, rows, cols, prow, N, k_i, lab_i, lab_j, m_run, l_run, cnt, sum_c, dp, qk_scale, nlb,
                n0 > r0, row_ok, hist, hist_row, lo, bin_scale, True, FIXED_SHIFT, K_MODE, DEN_ALL, LABELS,
                SOFT, BLOCK_M, BLOCK_N, STATS, HIST_ATOMIC)
        else:
            m_run, l_run, cnt, sum_c, dp, hist = _fwd_tile(
                c, rows, cols, prow, N, k_i, lab_i, lab_j, m_run, l_run, cnt, sum_c, dp, qk_scale, nlb,
                n0 > r0, row_ok, hist, hist_row, lo, bin_scale, False, FIXED_SHIFT, K_MODE, DEN_ALL, LABELS,
                SOFT, BLOCK_M, BLOCK_N, STATS, HIST_ATOMIC)

    l_run = tl.where(row_ok, l_run, 1.0)  # padding rows: keep log2 finite
    if FIXED_SHIFT:
        lse2 = qk_scale + tl.log2(l_run)  # qk_scale = log2(e)/tau: the fixed base-2 shift
    else:
        lse2 = tl.where(row_ok, m_run, 0.0) + tl.log2(l_run)

    if FIXED_SHIFT:
        # Written around the shift 1/tau, so a dominant partner (l ~ exp(s_p - 1/tau)) cancels
        # two terms of size (1 - c_p)/tau rather than two of size 1/tau:
        # LSE_i - s_ip = ln(l_i) + (1 - c_ip)/tau, sum_A (LSE_i - s_ij) = m ln(l_i) + sum_A (1 - c_ij)/tau.
        ln_l = tl.log(l_run)
        lse = inv_tau + ln_l
        ce_p = ln_l + (1.0 - dp) * inv_tau
        pos = cnt * ln_l + (cnt - sum_c) * inv_tau
    else:
        lse = lse2 * 0.6931471805599453  # natural-log LSE_i
        ce_p = lse - dp * inv_tau
        pos = cnt * lse - sum_c * inv_tau  # sum over A(i) of (LSE_i - s_ij)
    guard = tl.maximum(cnt, 1.0)
    if UNIT:
        loss = ce_p - log_alpha
        if K_MODE != 0 or LABELS or SOFT:  # a row may have extra positives
            loss += pos - cnt * (log_1m_alpha - tl.log(guard))
        w_tot = 1.0 + cnt
        w_x = tl.full([BLOCK_M], 1.0, tl.float32)
    else:
        loss = alpha * ce_p
        if K_MODE != 0 or LABELS or SOFT:  # a row may have extra positives
            loss += (1.0 - alpha) / guard * pos
        w_x = (1.0 - alpha) / guard
        if SOFT:
            w_tot = alpha + w_x * cnt
        else:
            w_tot = tl.where(cnt > 0.0, 1.0, alpha)
    if FIXED_SHIFT:
        rs = w_tot * tl.exp2(qk_scale - lse2)
    else:
        rs = lse2 - tl.log2(w_tot)
    if SOFT:
        # A NaN threshold k_i: row i's loss and m_i are NaN (the contract), and so is its
        # backward factor rs_i, which makes every gradient it touches NaN (sigmoid2's cap drops
        # the NaN inside the tiles).
        nan_k = k_row != k_row
        loss = tl.where(nan_k, float("nan"), loss)
        cnt = tl.where(nan_k, float("nan"), cnt)
        rs = tl.where(nan_k, float("nan"), rs)
    # Any NaN / inf in z or z_aug: every row's loss is NaN (the backward does the same to the
    # gradients), instead of whatever the masked NaN left behind.
    loss = tl.where(tl.load(flag_ptr) != 0, float("nan"), loss)
    out = rows - row_start
    tl.store(loss_ptr + out, loss, mask=row_ok)
    tl.store(cnt_ptr + out, cnt, mask=row_ok)
    tl.store(rs_ptr + out, rs, mask=row_ok)
    tl.store(wx_ptr + out, w_x, mask=row_ok)
    if SOFT:
        # A_i of dl_i/da_ij = A_i - B_i c_ij - [negatives] W_i E_ij (B_i = w_x / tau):
        # normalized  A_i = w_x (LSE_i - [m_i > 1] T_i / m_i), and LSE_i - T_i / m_i is exactly
        #             sum_j a_ij c_ij / (m_i tau) (T_i = sum_j a_ij (LSE_i - s_ij));
        # unit        A_i = LSE_i - log(1 - alpha) + log max(m_i, 1) + [m_i > 1].
        if UNIT:
            h_a = lse - log_1m_alpha + tl.log(guard) + tl.where(cnt > 1.0, 1.0, 0.0)
        else:
            h_a = w_x * tl.where(cnt > 1.0, sum_c * inv_tau / guard, lse)
        tl.store(ha_ptr + out, h_a, mask=row_ok)
    if STATS > 0:
        if not HIST_ATOMIC:
            tl.store(hist_row + tl.arange(0, STATS), hist)
