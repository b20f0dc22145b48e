"""Ranking metrics against hand-computed ranks; alignment and uniformity against O(n^2) loops."""

import math

import numpy as np
import pytest
import torch

from adaptive_cl.rec.data import SequenceData, leave_one_out
from adaptive_cl.rec.metrics import (
    KS,
    alignment,
    evaluate_full_ranking,
    evaluate_popularity,
    metrics_from_ranks,
    popularity_scores,
    ranks_from_scores,
    uniformity,
)

# Column 0 is padding: its huge score must never count.
SCORES = torch.tensor(
    [
        [100.0, 0.1, 0.5, 0.3, 0.5],
        [100.0, 0.1, 0.5, 0.3, 0.5],
        [-1.0, 0.2, 0.2, 0.2, 0.2],
    ]
)
TARGETS = torch.tensor([3, 2, 1])


def make_split(sequences: list[list[int]], num_items: int, max_len: int = 50):
    data = SequenceData(
        "hand",
        [np.array(s, np.int64) for s in sequences],
        num_items,
        [str(u) for u in range(len(sequences))],
        ["<pad>", *(str(i) for i in range(1, num_items + 1))],
    )
    return leave_one_out(data, max_len=max_len)


def test_optimistic_ranks_count_strictly_higher_items_ignoring_padding():
    assert ranks_from_scores(SCORES, TARGETS, ties="optimistic").tolist() == [2, 0, 0]


def test_default_ties_are_pessimistic_equal_items_count_except_the_target():
    assert ranks_from_scores(SCORES, TARGETS).tolist() == [2, 1, 3]
    assert ranks_from_scores(SCORES, TARGETS, ties="pessimistic").tolist() == [2, 1, 3]


def test_ties_and_nans_cannot_inflate_the_default_metrics():
    num_items = 50
    targets = torch.arange(1, 21)
    constant = torch.zeros(20, num_items + 1)
    assert ranks_from_scores(constant, targets).tolist() == [num_items - 1] * 20
    assert metrics_from_ranks(ranks_from_scores(constant, targets))["Recall@20"] == 0
    # The optimistic rule is what a constant scorer would exploit.
    assert metrics_from_ranks(ranks_from_scores(constant, targets, ties="optimistic"))[
        "NDCG@5"] == 1
    nan = torch.full((20, num_items + 1), math.nan)
    assert ranks_from_scores(nan, targets).tolist() == [num_items - 1] * 20
    # A NaN target ranks behind every finite candidate under either rule; a NaN candidate
    # never outranks a finite target.
    scores = torch.arange(num_items + 1.0).expand(2, -1).clone()
    scores[0, 7] = math.nan
    scores[1, 30] = math.nan
    for ties in ("pessimistic", "optimistic"):
        ranks = ranks_from_scores(scores, torch.tensor([7, 20]), ties=ties).tolist()
        assert ranks == [num_items - 1, num_items - 20 - 1]
    with pytest.raises(ValueError, match="ties"):
        evaluate_full_ranking(lambda b: constant[: len(b)], targets[:, None], targets,
                              ties="mid")


def test_exclusion_drops_items_but_never_the_target():
    exclude = torch.zeros_like(SCORES, dtype=torch.bool)
    exclude[0, [2, 3]] = True  # row 0: item 2 (higher) and the target itself
    exclude[2, :] = True  # row 2: everything, target included
    assert ranks_from_scores(SCORES, TARGETS, exclude, ties="optimistic").tolist() == [1, 0, 0]
    assert ranks_from_scores(SCORES, TARGETS, exclude).tolist() == [1, 1, 0]


def test_ranks_validate_shapes_and_tie_rule():
    with pytest.raises(ValueError, match="targets"):
        ranks_from_scores(SCORES, TARGETS[:2])
    with pytest.raises(ValueError, match="exclude"):
        ranks_from_scores(SCORES, TARGETS, torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="ties"):
        ranks_from_scores(SCORES, TARGETS, ties="average")


def test_metrics_from_ranks_by_hand():
    m = metrics_from_ranks(torch.tensor([0, 4, 9, 25]))
    assert list(m) == [
        "NDCG@5", "NDCG@10", "NDCG@20", "Recall@5", "Recall@10", "Recall@20",
        "MRR@5", "MRR@10", "MRR@20",
    ]
    expected = {
        "NDCG@5": (1 + 1 / math.log2(6)) / 4,
        "NDCG@10": (1 + 1 / math.log2(6) + 1 / math.log2(11)) / 4,
        "NDCG@20": (1 + 1 / math.log2(6) + 1 / math.log2(11)) / 4,
        "Recall@5": 2 / 4,
        "Recall@10": 3 / 4,
        "Recall@20": 3 / 4,
        "MRR@5": (1 + 1 / 5) / 4,
        "MRR@10": (1 + 1 / 5 + 1 / 10) / 4,
        "MRR@20": (1 + 1 / 5 + 1 / 10) / 4,
    }
    assert m == pytest.approx(expected, abs=1e-12)
    assert list(metrics_from_ranks(torch.tensor([0]), ks=(1, 50))) == [
        "NDCG@1", "NDCG@50", "Recall@1", "Recall@50", "MRR@1", "MRR@50",
    ]
    for bad in ((), (0,), (5.0,)):
        with pytest.raises(ValueError, match="ks"):
            metrics_from_ranks(torch.tensor([0]), ks=bad)


def test_full_ranking_is_independent_of_batch_size():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(31, 31, generator=g)
    inputs = torch.randint(1, 31, (50, 4), generator=g)
    targets = torch.randint(1, 31, (50,), generator=g)
    score_fn = lambda batch: table[batch[:, -1]]  # noqa: E731
    expected = metrics_from_ranks(ranks_from_scores(table[inputs[:, -1]], targets))
    for batch_size in (1, 7, 1024):
        got = evaluate_full_ranking(score_fn, inputs, targets, batch_size=batch_size, device="cpu")
        assert got == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_full_ranking(score_fn, inputs, targets, batch_size=0)


def test_history_masking_is_optional_and_matches_the_dense_mask():
    split = make_split([[1, 2, 3, 4, 5], [5, 4, 3, 2], [2, 2, 6, 1]], num_items=6)
    # A scorer that favours seen items: masking them must lift the targets.
    def score_fn(batch: torch.Tensor) -> torch.Tensor:
        scores = torch.zeros(len(batch), 7).scatter_(1, batch, 1.0)
        return scores + torch.arange(7) * 0.01

    inputs, targets = split.test_inputs, split.test_targets
    plain = evaluate_full_ranking(score_fn, inputs, targets, batch_size=2)
    masked = evaluate_full_ranking(
        score_fn, inputs, targets, batch_size=2, history=split.test_history
    )
    scores = score_fn(inputs)
    dense = split.history_mask("test", slice(0, 3))
    assert plain == pytest.approx(metrics_from_ranks(ranks_from_scores(scores, targets)))
    assert masked == pytest.approx(metrics_from_ranks(ranks_from_scores(scores, targets, dense)))
    assert masked["MRR@20"] > plain["MRR@20"]
    with pytest.raises(ValueError, match="history"):
        evaluate_full_ranking(score_fn, inputs[:2], targets[:2], history=split.test_history)


def test_popularity_counts_training_parts():
    # Training parts: [1, 2, 3], [2, 3], [3]; the first item of each user counts too.
    split = make_split([[1, 2, 3, 4, 5], [2, 3, 1, 4], [3, 1, 4]], num_items=5)
    scores = popularity_scores(split)
    assert scores[0] == -math.inf
    assert scores[1:].tolist() == [1, 2, 3, 0, 0]
    from_targets = popularity_scores(split.train_targets, split.num_items)
    assert from_targets[1:].tolist() == [0, 1, 2, 0, 0]
    with pytest.raises(ValueError, match="num_items"):
        popularity_scores(split.train_targets)

    # Test targets 5, 4, 4: items 3, 2, 1 score higher, 4 and 5 tie at zero; the tie ranks
    # each target behind the other (pessimistic, the default) or ahead (optimistic).
    m = evaluate_popularity(split, "test", ks=(3, 4))
    assert m["Recall@3"] == 0 and m["Recall@4"] == 0
    assert evaluate_popularity(split, "test", ks=(4,), ties="optimistic")["Recall@4"] == 1
    # Validation targets 4, 1, 1: ranks 3, 2, 2.
    assert evaluate_popularity(split, "valid", ks=(3,))["MRR@3"] == pytest.approx(1 / 3 * 2 / 3)


def test_uniformity_and_alignment_match_direct_loops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = x + 0.3 * torch.randn(12, 5, generator=g, dtype=torch.float64)
    zx = x / x.norm(dim=1, keepdim=True)
    zy = y / y.norm(dim=1, keepdim=True)
    pairs = [(i, j) for i in range(12) for j in range(i + 1, 12)]

    def direct_uniformity(z, power):
        return math.log(sum(math.exp(-2.0 * float((z[i] - z[j]).norm()) ** power)
                            for i, j in pairs) / len(pairs))

    assert uniformity(x).item() == pytest.approx(direct_uniformity(zx, 2), rel=1e-10)
    assert uniformity(x, squared=False, normalize=False).item() == pytest.approx(
        direct_uniformity(x, 1), rel=1e-10
    )
    assert alignment(x, y).item() == pytest.approx(
        sum(float((zx[i] - zy[i]).norm()) ** 2 for i in range(12)) / 12, rel=1e-10
    )
    assert alignment(x, y, alpha=1.0, normalize=False).item() == pytest.approx(
        sum(float((x[i] - y[i]).norm()) for i in range(12)) / 12, rel=1e-10
    )


def test_uniformity_and_alignment_are_differentiable_and_validate():
    x = torch.randn(6, 3, requires_grad=True)
    (uniformity(x) + alignment(x, x.detach().flip(0))).backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="n >= 2"):
        uniformity(x[:1])
    with pytest.raises(ValueError, match="equal"):
        alignment(x, x[:3])


def test_default_ks():
    assert KS == (5, 10, 20)
