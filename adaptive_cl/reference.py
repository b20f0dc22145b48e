"""Pure-PyTorch reference of the AdaptiveRec loss: the specification, written out and as code.

It materialises the N x N similarity matrix, so it is the readable specification and the
ground truth for tests (exact in float64), not the fast path. Every option is covered and the
whole computation is differentiable by autograd, including the soft threshold's gradient in k.
Every backend computes what this module computes (to float32 rounding).

Rows and sets
    Z = [z; z_aug] has N = 2B rows; row i's view partner is p(i) = (i + B) mod N. With
    ``normalize`` (default) z^_i = z_i / max(||z_i||_2, 1e-12) and c_ij = <z^_i, z^_j>, clamped to
    [-1, 1]; otherwise c_ij = <z_i, z_j>. The logits are s_ij = c_ij / tau.
    Candidates N(i) = {j : j != i, j != p(i)}. Extra positives A(i) = {j in N(i) : c_ij > k_i}
    (the threshold compares the similarity c, not s), plus every j in N(i) with the same label
    as i when ``labels`` are given; none when k is None and there are no labels. Negatives
    R(i) = N(i) minus A(i).

Per-row loss (soft-label cross-entropy)
    Den(i) = {p(i)} + R(i) for ``denominator="negatives"`` (the paper's Eq. 9), {p(i)} + N(i)
    for ``"all"`` (the authors' released code). LSE_i = log sum_{j in Den(i)} exp(s_ij),
    m_i = |A(i)|, alpha = ``positive_weight``.

    ``weighting="normalized"``: weight alpha on the partner, (1 - alpha) / m_i on each extra
    positive (a row without extra positives keeps only alpha):
        l_i = alpha (LSE_i - s_i,p(i)) + (1 - alpha) / max(m_i, 1) * sum_{j in A(i)} (LSE_i - s_ij)
    ``weighting="unit"`` (Eq. 9 read literally, alpha < 1):
        l_i = (LSE_i - s_i,p(i)) - log alpha
              + sum_{j in A(i)} (LSE_i - s_ij - log((1 - alpha) / m_i))

    With "negatives" the extra positives sit outside the LSE, so a row's loss can be negative,
    and with normalize=False unbounded below as ||z|| grows (a warning says so). The reduction
    is the mean (default) or sum over the N rows, or the N values ("none"). With k = None and
    alpha = 1 the loss is exactly NT-Xent over the 2B views.

Soft threshold (``threshold="soft"``, scale beta = ``threshold_scale``)
    Membership becomes a_ij = sigmoid((c_ij - k_i) / beta) on N(i) (label pairs stay 1), the
    denominator weight of a candidate 1 - a_ij ("negatives") or 1 ("all"), m_i = sum_j a_ij,
    and both weightings are written with the guard max(m_i, 1), which is the hard rule when a is
    0/1:
        normalized: l_i = alpha (LSE_i - s_i,p(i))
                          + (1 - alpha) / max(m_i, 1) * sum_j a_ij (LSE_i - s_ij)
        unit:       l_i = (LSE_i - s_i,p(i)) - log alpha
                          + sum_j a_ij (LSE_i - s_ij - log((1 - alpha) / max(m_i, 1)))
    It is differentiable in k and tends to the hard loss as beta -> 0. The hard threshold has
    gradient zero in k.

Setups beyond the two views (issue 24; every one combines with every option above)
    Columns. ``layout="views"`` (the default): the rows are Z's N rows and the columns Z's N
    rows followed by the M rows of ``negatives`` (a queue); N(i) gains every queue column.
    ``layout="cross"``: the rows are the B rows of z, the columns the B rows of z_aug followed
    by the queue; row i's positive is p(i) = i and N(i) = every other column; c_ij compares z_i
    with z_aug_j. ``symmetric=True`` (cross, no queue) adds a second direction: rows z_aug_i,
    columns z_j, p(i) = i. Thresholds and labels apply to every candidate exactly as above (k
    has one entry per row: (B,) in cross, shared by both directions, or (2B,) with
    ``symmetric``; a queue column carries the label given for it after Z's, else none).
    Queue rows are normalised like z and receive no gradient; they are never rows.

    Logits. s_ij = c_ij / tau - log_q_j, with ``log_q`` (cross, not symmetric) one log sampling
    probability per column ((B,), or (B + M,) with a queue), subtracted from every logit of
    that column, the positive's included (logQ correction). tau may be a 0-d tensor: the loss
    is then differentiable in tau (dL/dtau = -sum_ij (dL/ds_ij) c_ij / tau^2).

    ``same_label="exclude"`` (needs labels): candidates sharing row i's label leave N(i)
    altogether, so they are neither in its log-sum-exp (either denominator) nor positives (the
    "remove accidental hits" of retrieval); ``"positive"`` (default) is the rule above.

    ``mask`` (B,) bool: pair b with mask[b] False is padding: its rows (i = b and b + B in the
    views layout; b in each direction of cross) have loss 0 and their columns leave every
    N(i); its inputs are replaced by zeros first, so they get zero gradient and non-finite
    values there poison nothing.

    Reduction. The row losses l_i (2B values with ``symmetric``: direction 1, then 2; masked rows
    0) reduce to sum_i l_i / V over the V valid rows ("mean"; 0 when V = 0), sum_i l_i ("sum"),
    or the values ("none"). With ``symmetric`` the "sum" is halved, so "mean" and "sum" are the
    mean of the two directions' losses (CLIP's form).

Gradient in the logits
    With W_i the row's total target weight (normalized: 1 if m_i > 0 else alpha; unit: 1 + m_i)
    and w_ij the target weight of column j: dl_i/ds_ij = W_i exp(s_ij - LSE_i) [j in Den(i)] - w_ij.
    S = Z^ Z^T / tau is symmetric, so dL/dz^_r = (1/tau) sum_j (G_rj + G_jr) z^_j with
    G_ij = u_i dl_i/ds_ij (u_i the upstream gradient of row i), then through the normalisation.

Numerics (every backend)
    - Accumulation in float32 for float16/bfloat16/float32 inputs, float64 for float64; the loss
      in that dtype, gradients in the input dtype.
    - Non-finite inputs: one NaN or +-inf anywhere in z, z_aug or the queue (masked rows aside)
      makes every row's loss NaN (so
      "mean" and "sum" are NaN) and every element of both gradients NaN, never a plausible
      finite loss. A NaN threshold k_i: hard, row i has no threshold positives (c > NaN is
      false); soft, row i's loss is NaN. Neither is checked on the host (no synchronisation): a
      device-side flag is folded into the result.
    - normalize=True: the norm is that of the row scaled by its largest magnitude, so any finite
      row normalises without overflow or underflow (rows of 1e30 give the unit rows' loss; a row
      whose true norm is below 1e-12 is divided by 1e-12, as float64 ``F.normalize`` would).
    - LSE_i is shifted by the largest logit among the columns with nonzero denominator weight, so
      every temperature the options accept (tau >= 1e-30) gives a finite loss for finite inputs
      with normalize=True (with normalize=False the logits c / tau must themselves be finite).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .contract import NORM_EPS, LossOptions, Prepared, compute_dtype
from .histogram import LossStats, bin_indices


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||_2, NORM_EPS) per row (``F.normalize``'s convention), with the norm taken of
    the row scaled by its largest magnitude, so it neither overflows nor underflows for any
    finite row: a row of 1e30s normalises like the same row at unit size, and a row whose true
    norm is below NORM_EPS is divided by NORM_EPS (nearly the zero row), as float64 would."""
    # The scale is detached: x / ||x|| does not depend on it, so the gradient is F.normalize's
    # (I - x^ x^T) / ||x||, and NORM_EPS^-1 on the tiny branch.
    scale = x.detach().abs().amax(dim=1, keepdim=True)
    y = x / torch.where(scale > 0, scale, 1.0)  # max |y| = 1 (or the zero row)
    norm_y = torch.linalg.vector_norm(y, dim=1, keepdim=True)  # in [1, sqrt(D)], or 0
    # ||x|| = scale * norm_y may overflow to inf, which still compares correctly with NORM_EPS.
    unit = scale * norm_y.detach() >= NORM_EPS
    # Each branch divides by something safe, so the branch not taken has a zero, not a NaN,
    # gradient.
    return torch.where(unit, y / torch.where(unit, norm_y, 1.0), x / NORM_EPS)


def stacked_rows(z: torch.Tensor, z_aug: torch.Tensor, normalize: bool, dtype: torch.dtype) -> torch.Tensor:
    """Z = [z; z_aug] in ``dtype``, rows normalised when ``normalize``.

    Non-finite inputs poison everything: if any element of z or z_aug is NaN or +-inf, Z is
    multiplied by NaN (by 1 otherwise), so every c, every row loss and every gradient element
    is NaN. The flag stays on the device (no host synchronisation)."""
    return poisoned_rows([z, z_aug], normalize, dtype)[0]


def poisoned_rows(parts: list[torch.Tensor], normalize: bool, dtype: torch.dtype):
    """(rows, finite): the concatenated ``parts`` in ``dtype``, multiplied by NaN unless every
    element is finite (``finite``, a 0-d bool tensor), rows normalised when ``normalize``."""
    stacked = torch.cat(parts).to(dtype)
    finite = torch.isfinite(stacked).all()
    stacked = stacked * torch.where(finite, 1.0, float("nan")).to(dtype)
    return (normalize_rows(stacked) if normalize else stacked), finite


def membership(
    c: torch.Tensor,
    k_rows: torch.Tensor | None,
    labels_rows: torch.Tensor | None,
    candidates: torch.Tensor,
    options: LossOptions,
    complement: bool = False,
    same: torch.Tensor | None = None,
):
    """a_ij: 1 for an extra positive, 0 for a negative (soft threshold: a sigmoid in between).

    Label-forced positives come from ``labels_rows`` (rows and columns the same N rows) or, for
    any other column set, from ``same`` (a (rows, columns) bool mask).

    ``complement``: also return 1 - a_ij on the candidates (0 elsewhere), the "negatives"
    denominator weight, computed as sigmoid((k_i - c_ij)/beta) rather than by subtraction: far
    above k, a_ij rounds to 1 even in float64 while its complement is a tiny number that still
    matters (times exp(c_ij/tau) when tau < beta)."""
    if k_rows is None:
        a = torch.zeros_like(c)
        rest = torch.ones_like(c)
    elif options.threshold == "hard":
        above = c > k_rows[:, None]
        a = above.to(c.dtype)
        rest = (~above).to(c.dtype)
    else:
        x = (c - k_rows[:, None]) / options.threshold_scale
        a = torch.sigmoid(x)
        rest = torch.sigmoid(-x)
    if labels_rows is not None:
        same = labels_rows[:, None] == labels_rows[None, :]
    if same is not None:
        a = torch.where(same, torch.ones_like(a), a)
        rest = torch.where(same, torch.zeros_like(rest), rest)
    a = torch.where(candidates, a, torch.zeros_like(a))
    if not complement:
        return a
    return a, torch.where(candidates, rest, torch.zeros_like(rest))


def row_losses(p: Prepared) -> torch.Tensor:
    """The per-row losses l_i (the module docstring's formulas), in the compute dtype: N in the
    views layout, B in cross (2B with ``symmetric``), masked rows 0."""
    return _row_losses(p)[0]


@dataclass
class Block:
    """One direction's rows against its columns: c (R, C), the partner and candidate masks
    (masks and exclusions applied), the label-forced positives ``same`` (None when none), the
    rows' thresholds, the columns' logQ correction and the rows' validity (None: all valid)."""

    c: torch.Tensor
    partner: torch.Tensor
    candidates: torch.Tensor
    same: torch.Tensor | None
    k_rows: torch.Tensor | None
    log_q: torch.Tensor | None
    valid: torch.Tensor | None


def blocks(p: Prepared, detach: bool = False, pairs: torch.Tensor | None = None) -> tuple[list[Block], torch.Tensor]:
    """(the loss's blocks, finite): one block in the views layout and in cross, two with
    ``symmetric``; ``finite`` (0-d bool) says every element that is read is finite.

    ``pairs``: None, or (R,) int64 indices of the pairs whose rows alone are computed (each
    against every column: the distributed loss's own rows); then ``p.k_rows`` is read at those
    rows only, and the rows come in the order of reduction="none" restricted to them."""
    o = p.options
    b, m = p.batch, p.queue
    z, z_aug = p.z, p.z_aug
    if p.mask is not None:  # padding is never read: zeros instead, so no gradient and no poison
        keep = p.mask[:, None]
        z = torch.where(keep, z, torch.zeros((), dtype=z.dtype, device=z.device))
        z_aug = torch.where(keep, z_aug, torch.zeros((), dtype=z.dtype, device=z.device))
    parts = [z, z_aug] + ([p.negatives] if m else [])
    if detach:
        parts = [t.detach() for t in parts]
    rows, finite = poisoned_rows(parts, o.normalize, p.compute_dtype)
    dev = rows.device
    k = p.k_rows
    if k is not None and detach:
        k = k.detach()
    ones = torch.ones(m, dtype=torch.bool, device=dev)
    pair_valid = p.mask

    def make(r, cols, partner_of, row_valid, col_valid, k_rows, row_labels, col_labels, log_q, sel=None):
        if sel is not None:  # a subset of the rows
            r, partner_of = r[sel], partner_of[sel]
            row_valid = None if row_valid is None else row_valid[sel]
            k_rows = None if k_rows is None else k_rows[sel]
            row_labels = None if row_labels is None else row_labels[sel]
        c = r @ cols.T
        if o.normalize:
            c = c.clamp(-1.0, 1.0)
        col_idx = torch.arange(cols.shape[0], device=dev)
        row_idx = torch.arange(r.shape[0], device=dev) if sel is None else sel  # the rows' global indices
        partner = col_idx[None, :] == partner_of[:, None]
        candidates = ~partner
        if o.layout == "views":
            candidates &= col_idx[None, :] != row_idx[:, None]
        if row_valid is not None:
            candidates &= row_valid[:, None] & col_valid[None, :]
            if k_rows is not None:  # a padded row's threshold is never read (a NaN there stays out)
                k_rows = torch.where(row_valid, k_rows, torch.zeros((), dtype=k_rows.dtype, device=dev))
        same = None
        if row_labels is not None:
            same = torch.zeros(c.shape, dtype=torch.bool, device=dev)
            same[:, :col_labels.shape[0]] = row_labels[:, None] == col_labels[None, :]  # an unlabeled queue: no match
            if o.same_label == "exclude":
                candidates &= ~same
                same = None
        return Block(c, partner, candidates, same, k_rows, log_q, row_valid)

    labels = p.labels_rows
    if o.layout == "views":
        n = 2 * b
        valid = None if pair_valid is None else torch.cat([pair_valid, pair_valid])
        col_valid = None if valid is None else torch.cat([valid, ones])
        partner_of = (torch.arange(n, device=dev) + b) % n
        row_labels = None if labels is None else labels[:n]
        sel = None if pairs is None else torch.cat([pairs, pairs + b])
        return [make(rows[:n], rows, partner_of, valid, col_valid, k, row_labels, labels, None, sel)], finite
    zr, zc, queue = rows[:b], rows[b:2 * b], rows[2 * b:]
    col_valid = None if pair_valid is None else torch.cat([pair_valid, ones])
    diag = torch.arange(b, device=dev)
    row_labels = None if labels is None else labels[:b]
    out = [make(zr, torch.cat([zc, queue]), diag, pair_valid, col_valid, None if k is None else k[:b],
                row_labels, labels, p.log_q, pairs)]
    if o.symmetric:
        out.append(make(zc, zr, diag, pair_valid, pair_valid, None if k is None else k[b:],
                        row_labels, row_labels, None, pairs))
    return out, finite


def _row_losses(p: Prepared, pairs: torch.Tensor | None = None):
    """(row losses, blocks, memberships, finite): the losses and what the statistics are read
    from; ``pairs``: only those pairs' rows (``blocks``)."""
    o = p.options
    bs, finite = blocks(p, pairs=pairs)
    losses, memberships = [], []
    for blk in bs:
        a, rest = membership(blk.c, blk.k_rows, None, blk.candidates, o, complement=True, same=blk.same)
        loss = losses_from_similarities(blk.c, a, rest, blk.partner, blk.candidates, blk.k_rows, o,
                                        temperature=p.temperature, log_q=blk.log_q)
        if blk.valid is not None:
            loss = torch.where(blk.valid, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
        losses.append(loss)
        memberships.append(a)
    return torch.cat(losses) if len(losses) > 1 else losses[0], bs, memberships, finite


def losses_from_similarities(
    c: torch.Tensor,
    a: torch.Tensor,
    rest: torch.Tensor,
    partner: torch.Tensor,
    candidates: torch.Tensor,
    k_rows: torch.Tensor | None,
    options: LossOptions,
    temperature: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """The losses of the rows of ``c`` (similarities of some rows with every column), given their
    memberships ``a`` and complements ``rest`` (``membership(..., complement=True)``), partner
    and candidate masks and thresholds ``k_rows``; ``temperature`` a 0-d tensor in place of
    ``options.temperature``, ``log_q`` the per-column logQ correction."""
    o = options
    s = c / (o.temperature if temperature is None else temperature)
    if log_q is not None:
        s = s - log_q[None, :]
    # Denominator weights q_ij: the partner 1; N(i) 1 ("all") or 1 - a_ij, how negative it is.
    q = torch.where(partner, torch.ones_like(s), a.new_zeros(()))
    q = q + (candidates.to(s.dtype) if o.denominator == "all" else rest)
    # LSE_i = log sum_j q_ij exp(s_ij), shifted by the largest logit among the columns that
    # enter it (q_ij > 0, the partner always). A zero-weight extra positive above them must not
    # set the shift: at small tau every weighted exp would underflow to 0 and log(0) * 0 = NaN.
    # Masking the exponent (not the product) keeps exp from overflowing on the excluded columns
    # and their gradient zero. A NaN q_ij (soft threshold, NaN k_i) is excluded from the shift
    # but still enters the sum as NaN * 0 = NaN: that row's loss is NaN, as documented.
    weighted = q > 0
    shift = torch.where(weighted, s, float("-inf")).amax(dim=1, keepdim=True).detach()
    terms = q * torch.exp(torch.where(weighted, s - shift, float("-inf")))
    lse = shift.squeeze(1) + torch.log(terms.sum(dim=1))

    s_partner = torch.where(partner, s, 0.0).sum(dim=1)  # row i's partner logit (one per row)
    m = a.sum(dim=1)
    guard = m.clamp(min=1.0)
    alpha = o.positive_weight
    pos_ce = ((lse[:, None] - s) * a).sum(dim=1)  # sum over extra positives of (LSE_i - s_ij)
    if o.weighting == "normalized":
        loss = alpha * (lse - s_partner) + (1.0 - alpha) / guard * pos_ce
    else:
        loss = (lse - s_partner) - math.log(alpha) + pos_ce - m * torch.log((1.0 - alpha) / guard)

    if k_rows is not None and k_rows.requires_grad and o.threshold == "hard":
        # The hard threshold has gradient zero in k; keep k in the graph so callers get
        # zeros rather than None. nan_to_num keeps an infinite k from turning 0 * k into NaN.
        loss = loss + (torch.nan_to_num(k_rows, nan=0.0, posinf=0.0, neginf=0.0) * 0.0).sum()
    return loss


def pair_rows(p: Prepared, pairs: torch.Tensor):
    """(losses, LossStats or None) of the rows of the pairs ``pairs`` alone, each against every
    column, in O(R x columns) memory: the distributed loss's reference path for the issue-24
    setups. Stats (with ``p.stats``): m of those rows, the histogram of their candidates."""
    losses, bs, memberships, finite = _row_losses(p, pairs)
    return losses, (None if p.stats is None else _stats_from(p, bs, memberships, finite))


def _stats_from(p: Prepared, bs: list[Block], memberships: list, finite: torch.Tensor):
    """LossStats from the blocks' similarities and memberships (see adaptive_cl.histogram): m of
    every row in order, the histogram over every block's candidates."""
    parts = [block_stats(p.stats, finite, blk.c, a, blk.candidates) for blk, a in zip(bs, memberships)]
    if len(parts) == 1:
        return parts[0]
    return LossStats(m=torch.cat([s.m for s in parts]), histogram=sum(s.histogram for s in parts),
                     range=p.stats.range)


@torch.no_grad()
def block_stats(spec, finite: torch.Tensor, c: torch.Tensor, a: torch.Tensor | None, candidates: torch.Tensor):
    """LossStats of the rows of ``c`` (similarities of some rows with every column) and their
    memberships ``a``: m_i = sum_j a_ij, and the histogram (``spec``: a StatsSpec) of c over
    the rows' candidates; NaN m and zero counts unless ``finite`` (a 0-d bool tensor: every
    input element finite). Histograms of a partition of the rows add up to the whole one's."""
    # scatter_add over every pair, candidates weighted 1: a fixed-size result (a boolean-mask
    # index or bincount would make the host wait for a CUDA device)
    counts = torch.zeros(spec.bins, dtype=torch.int64, device=c.device).scatter_add_(
        0, bin_indices(c.detach(), spec).reshape(-1), candidates.reshape(-1).to(torch.int64))
    counts = torch.where(finite, counts, torch.zeros_like(counts))
    m = None
    if a is not None:
        m = torch.where(finite, a.detach().sum(dim=1), float("nan"))
    return LossStats(m=m, histogram=counts, range=spec.range)


def similarity_stats(p: Prepared):
    """LossStats of ``p`` (``p.stats`` set) computed densely: what every backend returns with
    the loss (m_i from the loss's memberships, the histogram of the candidate similarities)."""
    with torch.no_grad():
        bs, finite = blocks(p, detach=True)
        memberships = [membership(blk.c, blk.k_rows, None, blk.candidates, p.options, same=blk.same)
                       for blk in bs]
        return _stats_from(p, bs, memberships, finite)


def reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def reduce_rows(losses: torch.Tensor, p: Prepared) -> torch.Tensor:
    """The row losses reduced as ``p`` asks: over the valid rows with a ``mask``, the "sum"
    halved with ``symmetric`` (the mean of the two directions' sums)."""
    o = p.options
    if o.reduction == "none":
        return losses
    if p.mask is None and not o.symmetric:
        return reduce(losses, o.reduction)
    total = losses.sum()
    if o.reduction == "sum":
        return total / 2 if o.symmetric else total
    if p.mask is None:
        return total / losses.shape[0]
    valid = p.mask.sum() * (losses.shape[0] // p.batch)  # a pair's rows: 2 (views, symmetric) or 1
    return total / valid.clamp(min=1).to(total.dtype)


def adaptive_info_nce_reference(p: Prepared):
    """The loss as this module's docstring defines it, reduced as requested; with ``p.stats``
    (``return_stats=True``) also its LossStats, read from the same similarities."""
    loss, bs, memberships, finite = _row_losses(p)
    out = reduce_rows(loss, p)
    if p.stats is None:
        return out
    return out, _stats_from(p, bs, memberships, finite)


#: This backend returns (loss, LossStats) itself when p.stats is set (adaptive_cl.functional).
adaptive_info_nce_reference.fused_stats = True


# ------------------------------------------------------------------------------ row subsets
def row_block_losses(
    z: torch.Tensor,
    z_aug: torch.Tensor,
    rows: torch.Tensor,
    k_rows: torch.Tensor | None,
    labels_rows: torch.Tensor | None,
    options: LossOptions,
) -> torch.Tensor:
    """The losses l_i of the rows ``rows`` of Z = [z; z_aug], each against every column.

    ``row_losses`` restricted to a subset of rows, in O(R x N) memory for R rows instead of
    N x N: the reference path of the distributed loss, where each rank owns a few rows of the
    global batch. ``rows``: (R,) int64 indices into Z; ``k_rows``: None or the (R,) thresholds
    of those rows (compute dtype); ``labels_rows``: None or the (N,) int64 labels of *all* rows
    (membership compares a row's label with every column's). With every row, this equals
    ``row_losses`` up to the summation order of the matmul; the numerics are the same (non-finite
    inputs anywhere poison every row).
    """
    return row_block(z, z_aug, rows, k_rows, labels_rows, options)[0]


def row_block(z, z_aug, rows, k_rows, labels_rows, options):
    """``row_block_losses``' (losses, c, a, candidates): with what the statistics are read from."""
    b = z.shape[0]
    n = 2 * b
    stacked = stacked_rows(z, z_aug, options.normalize, compute_dtype(z.dtype))
    c = stacked[rows] @ stacked.T
    if options.normalize:
        c = c.clamp(-1.0, 1.0)
    cols = torch.arange(n, device=c.device)
    partner = cols[None, :] == ((rows + b) % n)[:, None]
    candidates = ~(partner | (cols[None, :] == rows[:, None]))
    # Thresholds through the dense reference's membership; labels compare row with column here.
    a, rest = membership(c, k_rows, None, candidates, options, complement=True)
    if labels_rows is not None:
        same = (labels_rows[rows][:, None] == labels_rows[None, :]) & candidates
        a = torch.where(same, torch.ones_like(a), a)
        rest = torch.where(same, torch.zeros_like(rest), rest)
    return losses_from_similarities(c, a, rest, partner, candidates, k_rows, options), c, a, candidates
