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

Gradient in the logits
    With W_i the row's total target weight (normalized: 1 if m_i > 0 else alpha; unit: 1 + m_i)
    and w_ij the target weight of column j: dl_i/ds_ij = W_i exp(s_ij - LSE_i) [j in Den(i)] - w_ij.
    S = Z^ Z^T / tau is symmetric, so dL/dz^_r = (1/tau) sum_j (G_rj + G_jr) z^_j with
    G_ij = u_i dl_i/ds_ij (u_i the upstream gradient of row i), then through the normalisation.

Numerics (every backend)
    - Accumulation in float32 for float16/bfloat16/float32 inputs, float64 for float64; the loss
      in that dtype, gradients in the input dtype.
    - Non-finite inputs: one NaN or +-inf anywhere in z or z_aug makes every row's loss NaN (so
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

import torch

from .contract import NORM_EPS, LossOptions, Prepared, compute_dtype


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
    stacked = torch.cat([z, z_aug]).to(dtype)
    poison = torch.where(torch.isfinite(stacked).all(), 1.0, float("nan")).to(dtype)
    stacked = stacked * poison
    return normalize_rows(stacked) if normalize else stacked


def cosine_or_dot(z: torch.Tensor, z_aug: torch.Tensor, normalize: bool, dtype: torch.dtype) -> torch.Tensor:
    """c = Z Z^T for Z = [z; z_aug], cosine (clamped to [-1, 1]) when ``normalize``."""
    stacked = stacked_rows(z, z_aug, normalize, dtype)
    c = stacked @ stacked.T
    return c.clamp(-1.0, 1.0) if normalize else c


def candidate_masks(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(partner, candidates): partner[i, (i + B) mod N] and N(i) = not self, not partner."""
    idx = torch.arange(n, device=device)
    partner = torch.zeros(n, n, dtype=torch.bool, device=device)
    partner[idx, (idx + n // 2) % n] = True
    candidates = ~(partner | torch.eye(n, dtype=torch.bool, device=device))
    return partner, candidates


def membership(
    c: torch.Tensor,
    k_rows: torch.Tensor | None,
    labels_rows: torch.Tensor | None,
    candidates: torch.Tensor,
    options: LossOptions,
    complement: bool = False,
):
    """a_ij: 1 for an extra positive, 0 for a negative (soft threshold: a sigmoid in between).

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
        a = torch.where(same, torch.ones_like(a), a)
        rest = torch.where(same, torch.zeros_like(rest), rest)
    a = torch.where(candidates, a, torch.zeros_like(a))
    if not complement:
        return a
    return a, torch.where(candidates, rest, torch.zeros_like(rest))


def row_losses(p: Prepared) -> torch.Tensor:
    """The N per-row losses l_i (the module docstring's formulas), in the compute dtype."""
    return _row_losses(p)[0]


def _row_losses(p: Prepared):
    """(row losses, c, a, candidates): the losses and what the statistics are read from."""
    o = p.options
    c = cosine_or_dot(p.z, p.z_aug, o.normalize, p.compute_dtype)
    partner, candidates = candidate_masks(c.shape[0], c.device)
    a, rest = membership(c, p.k_rows, p.labels_rows, candidates, o, complement=True)
    return losses_from_similarities(c, a, rest, partner, candidates, p.k_rows, o), c, a, candidates


def losses_from_similarities(
    c: torch.Tensor,
    a: torch.Tensor,
    rest: torch.Tensor,
    partner: torch.Tensor,
    candidates: torch.Tensor,
    k_rows: torch.Tensor | None,
    options: LossOptions,
) -> torch.Tensor:
    """The losses of the rows of ``c`` (similarities of some rows with every column), given their
    memberships ``a`` and complements ``rest`` (``membership(..., complement=True)``), partner
    and candidate masks and thresholds ``k_rows``."""
    o = options
    s = c / o.temperature
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


def _stats_from(p: Prepared, c: torch.Tensor, a: torch.Tensor | None, candidates: torch.Tensor):
    """LossStats from the materialised c and memberships a (see adaptive_cl.stats)."""
    finite = torch.isfinite(p.z).all() & torch.isfinite(p.z_aug).all()
    return block_stats(p.stats, finite, c, a, candidates)


@torch.no_grad()
def block_stats(spec, finite: torch.Tensor, c: torch.Tensor, a: torch.Tensor | None, candidates: torch.Tensor):
    """LossStats of the rows of ``c`` (similarities of some rows with every column) and their
    memberships ``a``: m_i = sum_j a_ij, and the histogram (``spec``: a StatsSpec) of c over
    the rows' candidates; NaN m and zero counts unless ``finite`` (a 0-d bool tensor: every
    input element finite). Histograms of a partition of the rows add up to the whole one's."""
    from .stats import LossStats, bin_indices

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
    c = cosine_or_dot(p.z.detach(), p.z_aug.detach(), p.options.normalize, p.compute_dtype)
    _, candidates = candidate_masks(c.shape[0], c.device)
    k_rows = None if p.k_rows is None else p.k_rows.detach()
    a = membership(c, k_rows, p.labels_rows, candidates, p.options)
    return _stats_from(p, c, a, candidates)


def reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def adaptive_info_nce_reference(p: Prepared):
    """The loss as this module's docstring defines it, reduced as requested; with ``p.stats``
    (``return_stats=True``) also its LossStats, read from the same similarities."""
    loss, c, a, candidates = _row_losses(p)
    out = reduce(loss, p.options.reduction)
    if p.stats is None:
        return out
    return out, _stats_from(p, c, a, candidates)


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
