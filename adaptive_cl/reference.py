"""Pure-PyTorch reference of the AdaptiveRec loss: SPEC.md written as code.

It materialises the N x N similarity matrix, so it is the readable specification and the
ground truth for tests (exact in float64), not the fast path. Every option is covered and the
whole computation is differentiable by autograd, including the soft threshold's gradient in k.

Written as a soft-label cross-entropy: each row i gets a denominator weight q_ij (which
columns enter its log-sum-exp) and a membership a_ij in [0, 1] (how much column j is an extra
positive; 0/1 for the hard threshold). The per-row loss then follows SPEC.md's guarded formulas,
which reduce to the hard rule when a is 0/1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .contract import NORM_EPS, LossOptions, Prepared, compute_dtype


def cosine_or_dot(z: torch.Tensor, z_aug: torch.Tensor, normalize: bool, dtype: torch.dtype) -> torch.Tensor:
    """c = Z Z^T for Z = [z; z_aug], cosine (clamped to [-1, 1]) when ``normalize``."""
    stacked = torch.cat([z, z_aug]).to(dtype)
    if normalize:
        stacked = F.normalize(stacked, dim=1, eps=NORM_EPS)
        return (stacked @ stacked.T).clamp(-1.0, 1.0)
    return stacked @ stacked.T


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
) -> torch.Tensor:
    """a_ij: 1 for an extra positive, 0 for a negative (soft threshold: a sigmoid in between)."""
    if k_rows is None:
        a = torch.zeros_like(c)
    elif options.threshold == "hard":
        a = (c > k_rows[:, None]).to(c.dtype)
    else:
        a = torch.sigmoid((c - k_rows[:, None]) / options.threshold_scale)
    if labels_rows is not None:
        a = torch.where(labels_rows[:, None] == labels_rows[None, :], torch.ones_like(a), a)
    return torch.where(candidates, a, torch.zeros_like(a))


def row_losses(p: Prepared) -> torch.Tensor:
    """The N per-row losses l_i of SPEC.md, in the compute dtype."""
    o = p.options
    c = cosine_or_dot(p.z, p.z_aug, o.normalize, p.compute_dtype)
    s = c / o.temperature
    n = s.shape[0]
    partner, candidates = candidate_masks(n, s.device)
    a = membership(c, p.k_rows, p.labels_rows, candidates, o)

    # Denominator: the partner always; N(i) all ("all") or weighted by how negative it is.
    in_den = partner | candidates
    q = torch.where(partner, torch.ones_like(s), a.new_zeros(()))
    q = q + (candidates.to(s.dtype) if o.denominator == "all" else torch.where(candidates, 1.0 - a, 0.0))
    shift = torch.where(in_den, s, float("-inf")).amax(dim=1, keepdim=True).detach()
    terms = q * torch.exp(torch.where(in_den, s - shift, float("-inf")))
    lse = shift.squeeze(1) + torch.log(terms.sum(dim=1))

    s_partner = s[partner]  # row i's partner logit; one True per row, in row order
    m = a.sum(dim=1)
    guard = m.clamp(min=1.0)
    alpha = o.positive_weight
    pos_ce = ((lse[:, None] - s) * a).sum(dim=1)  # sum over extra positives of (LSE_i - s_ij)
    if o.weighting == "normalized":
        loss = alpha * (lse - s_partner) + (1.0 - alpha) / guard * pos_ce
    else:
        loss = (lse - s_partner) - math.log(alpha) + pos_ce - m * torch.log((1.0 - alpha) / guard)

    if p.k_rows is not None and p.k_rows.requires_grad and o.threshold == "hard":
        # The hard threshold has gradient zero in k (SPEC.md); keep k in the graph so callers get
        # zeros rather than None. nan_to_num keeps an infinite k from turning 0 * k into NaN.
        loss = loss + (torch.nan_to_num(p.k_rows, nan=0.0, posinf=0.0, neginf=0.0) * 0.0).sum()
    return loss


def reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def adaptive_info_nce_reference(p: Prepared) -> torch.Tensor:
    """The loss as SPEC.md defines it, reduced as requested."""
    return reduce(row_losses(p), p.options.reduction)


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
    ``row_losses`` up to the summation order of the matmul. A NaN or infinity anywhere in z or
    z_aug makes every returned loss NaN (the contract's rule; no host synchronisation).
    """
    o = options
    b = z.shape[0]
    n = 2 * b
    stacked = torch.cat([z, z_aug]).to(compute_dtype(z.dtype))
    if o.normalize:
        stacked = F.normalize(stacked, dim=1, eps=NORM_EPS)
    c = stacked[rows] @ stacked.T
    if o.normalize:
        c = c.clamp(-1.0, 1.0)
    s = c / o.temperature

    cols = torch.arange(n, device=s.device)
    partner_col = (rows + b) % n
    partner = cols[None, :] == partner_col[:, None]
    candidates = ~(partner | (cols[None, :] == rows[:, None]))
    # Thresholds through the dense reference's membership; labels compare row with column here.
    a = membership(c, k_rows, None, candidates, o)
    if labels_rows is not None:
        same = labels_rows[rows][:, None] == labels_rows[None, :]
        a = torch.where(same & candidates, torch.ones_like(a), a)

    in_den = partner | candidates
    q = torch.where(partner, torch.ones_like(s), a.new_zeros(()))
    q = q + (candidates.to(s.dtype) if o.denominator == "all" else torch.where(candidates, 1.0 - a, 0.0))
    shift = torch.where(in_den, s, float("-inf")).amax(dim=1, keepdim=True).detach()
    terms = q * torch.exp(torch.where(in_den, s - shift, float("-inf")))
    lse = shift.squeeze(1) + torch.log(terms.sum(dim=1))

    s_partner = s.gather(1, partner_col[:, None]).squeeze(1)
    m = a.sum(dim=1)
    guard = m.clamp(min=1.0)
    alpha = o.positive_weight
    pos_ce = ((lse[:, None] - s) * a).sum(dim=1)
    if o.weighting == "normalized":
        loss = alpha * (lse - s_partner) + (1.0 - alpha) / guard * pos_ce
    else:
        loss = (lse - s_partner) - math.log(alpha) + pos_ce - m * torch.log((1.0 - alpha) / guard)

    if k_rows is not None and k_rows.requires_grad and o.threshold == "hard":
        # as in row_losses: zeros (not None) for the flat hard threshold's gradient in k
        loss = loss + (torch.nan_to_num(k_rows, nan=0.0, posinf=0.0, neginf=0.0) * 0.0).sum()
    finite = torch.isfinite(stacked).all()
    return torch.where(finite, loss, torch.full_like(loss, float("nan")))
