"""Full-ranking metrics, the popularity baseline, and representation alignment / uniformity.

Ranking follows RecBole's full-sort protocol: every item is a candidate, the padding column 0
never is, and history items stay candidates unless masking is asked for (ICLRec-style code
masks them). Ties rank pessimistically by default (an item scoring as high as the target counts
as above it), so tied or NaN scores can only lower the metrics. Ranks stay on the device until
one final transfer, so evaluation on a GPU costs a single synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .data import ItemHistory, LeaveOneOutSplit

KS = (5, 10, 20)
TIES = ("pessimistic", "optimistic")


def ranks_from_scores(
    scores: torch.Tensor,
    targets: torch.Tensor,
    exclude: torch.Tensor | None = None,
    *,
    ties: str = "pessimistic",
) -> torch.Tensor:
    """0-based rank of each target among the items ``1..num_items`` of ``scores``.

    ``scores``: ``(b, num_items + 1)``; column 0 (padding) is never ranked. ``exclude``: optional
    boolean mask of the same shape of items to drop (history masking); the target itself is
    never dropped.

    Tie rule: ``ties="pessimistic"`` (the default) counts every other item scoring *at least*
    as high as the target, so a tie never helps the target: a constant scorer ranks every
    target last, and no model can raise its metrics by emitting tied scores. ``"optimistic"``
    counts only items scoring *strictly* higher (the target wins every tie, so a constant
    scorer would get perfect metrics); it is kept for comparison only. With float32 scores of
    a trained model ties are rare and both rules agree; with integer scores such as popularity
    counts they differ.

    NaN scores count as ``-inf``: a NaN target score ranks behind every candidate (a NaN model
    gets zero metrics, never perfect ones), and a NaN candidate never outranks a real score.
    Returns int64 ``(b,)`` on the scores' device.
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    if scores.dim() != 2 or targets.shape != scores.shape[:1]:
        raise ValueError(
            f"scores must be (b, num_items + 1) and targets (b,), got {tuple(scores.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if exclude is not None and exclude.shape != scores.shape:
        raise ValueError(f"exclude must have the scores' shape {tuple(scores.shape)}, "
                         f"got {tuple(exclude.shape)}")
    targets = targets.to(scores.device, torch.int64)
    scores = torch.where(scores.isnan(), -math.inf, scores)
    target_scores = scores.gather(1, targets[:, None])
    above = scores > target_scores if ties == "optimistic" else scores >= target_scores
    if ties == "pessimistic":
        above.scatter_(1, targets[:, None], False)
    if exclude is not None:
        # The target's own column is never "above" itself, so excluding it cannot matter.
        above &= ~exclude.to(scores.device)
    return above[:, 1:].sum(1)


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """NDCG@k = 1/log2(rank + 2), Recall@k (= HR with one target) = 1 and MRR@k = 1/(rank + 1)
    when ``rank < k``, else 0; each averaged over the rows (one host transfer)."""
    ks = _check_ks(ks)
    if ranks.numel() == 0:
        raise ValueError("ranks is empty")
    r = ranks.reshape(-1).double()
    hits = torch.stack([r < k for k in ks]).double()  # (len(ks), n)
    values = torch.cat(
        [
            (hits * torch.log2(r + 2).reciprocal()).mean(1),
            hits.mean(1),
            (hits * (r + 1).reciprocal()).mean(1),
        ]
    ).tolist()
    names = [f"{m}@{k}" for m in ("NDCG", "Recall", "MRR") for k in ks]
    return dict(zip(names, values))


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of integers >= 1, got {ks!r}")
    return ks


@torch.no_grad()
def evaluate_full_ranking(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    ks: Sequence[int] = KS,
    history: ItemHistory | None = None,
    ties: str = "pessimistic",
) -> dict[str, float]:
    """Full-ranking metrics of ``score_fn`` (a batch of inputs -> ``(b, num_items + 1)``
    scores) over ``inputs``/``targets``, moved to ``device`` (default: ``inputs``' device) once
    and scored in batches of ``batch_size``; ``ties`` as :func:`ranks_from_scores`
    (pessimistic by default).

    ``history``: an :class:`ItemHistory` aligned with the rows of ``inputs`` (``split.
    valid_history`` or ``split.test_history``) whose items are excluded from the ranking; off
    by default, as in RecBole.
    """
    ks = _check_ks(ks)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if inputs.dim() != 2 or targets.shape != inputs.shape[:1] or len(inputs) == 0:
        raise ValueError(
            f"inputs must be a non-empty (n, max_len) and targets (n,), got "
            f"{tuple(inputs.shape)} and {tuple(targets.shape)}"
        )
    if history is not None and len(history) != len(inputs):
        raise ValueError(f"history has {len(history)} rows for {len(inputs)} inputs")
    device = inputs.device if device is None else torch.device(device)
    if history is not None:
        history = history.to(device)
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    # One transfer each, not one per batch.
    inputs, targets = inputs.to(device), targets.to(device)
    ranks = torch.empty(len(inputs), dtype=torch.int64, device=device)
    for start in range(0, len(inputs), batch_size):
        stop = min(start + batch_size, len(inputs))
        scores = score_fn(inputs[start:stop])
        exclude = None
        if history is not None:
            exclude = history.mask(slice(start, stop), scores.shape[1], scores.device)
        ranks[start:stop] = ranks_from_scores(
            scores, targets[start:stop], exclude, ties=ties
        )
    return metrics_from_ranks(ranks, ks)


def popularity_scores(
    train_targets_or_split: torch.Tensor | LeaveOneOutSplit, num_items: int | None = None
) -> torch.Tensor:
    """Item frequency as a ``(num_items + 1,)`` float score, padding ``-inf``.

    Given a split, counts every interaction of the training parts (the first item of each
    user included, which no training target covers); given a tensor of item ids, counts those.
    """
    if isinstance(train_targets_or_split, LeaveOneOutSplit):
        items = train_targets_or_split.valid_history.items
        num_items = train_targets_or_split.num_items if num_items is None else num_items
    else:
        items = train_targets_or_split.reshape(-1)
        if num_items is None:
            raise ValueError("num_items is required when counting a tensor of item ids")
    counts = torch.bincount(items.to(torch.int64), minlength=num_items + 1)
    if len(counts) != num_items + 1:
        raise ValueError(f"item ids exceed num_items={num_items}")
    scores = counts.double()
    scores[0] = -math.inf
    return scores


def evaluate_popularity(split: LeaveOneOutSplit, which: str = "test", **kw) -> dict[str, float]:
    """Metrics of recommending the most popular training items to everyone; ``kw`` goes to
    :func:`evaluate_full_ranking` (pass ``history=split.history(which)`` to mask; the many
    equal counts rank pessimistically unless ``ties="optimistic"``)."""
    inputs, targets = split.eval_tensors(which)
    scores = popularity_scores(split)
    return evaluate_full_ranking(
        lambda batch: scores.to(batch.device).expand(len(batch), -1), inputs, targets, **kw
    )


def uniformity(
    x: torch.Tensor, t: float = 2.0, *, squared: bool = True, normalize: bool = True
) -> torch.Tensor:
    """Wang & Isola's uniformity ``log E_{i<j} exp(-t ||x_i - x_j||^2)`` of the L2-normalised
    rows (lower is more uniform), computed with a stable log-sum-exp.

    AdaptiveRec's (and DuoRec's) released ``decompose`` uses *unsquared* distances of the raw
    representations: ``uniformity(x, 2.0, squared=False, normalize=False)`` reproduces it.
    """
    if x.dim() != 2 or len(x) < 2:
        raise ValueError(f"x must be (n, d) with n >= 2, got {tuple(x.shape)}")
    z = F.normalize(x, dim=1) if normalize else x
    d = torch.pdist(z)
    if squared:
        d = d.square()
    return torch.logsumexp(-t * d, 0) - math.log(d.numel())


def alignment(
    x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0, *, normalize: bool = True
) -> torch.Tensor:
    """Wang & Isola's alignment ``E ||x_i - y_i||^alpha`` of positive pairs (rows), after L2
    normalisation; ``alpha=2`` (squared distance) by default.

    The released ``decompose`` averages unsquared distances of raw representations:
    ``alignment(x, y, alpha=1.0, normalize=False)``.
    """
    if x.dim() != 2 or x.shape != y.shape or len(x) == 0:
        raise ValueError(f"x and y must be equal non-empty (n, d), got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if normalize:
        x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    return torch.linalg.vector_norm(x - y, dim=1).pow(alpha).mean()
