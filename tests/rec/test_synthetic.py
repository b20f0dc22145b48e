"""The synthetic dataset: determinism, shape, and planted structure a Markov model can find."""

import numpy as np
import pytest
import torch

from adaptive_cl.rec.data import LeaveOneOutSplit, leave_one_out
from adaptive_cl.rec.metrics import evaluate_full_ranking, evaluate_popularity, popularity_scores
from adaptive_cl.rec.synthetic import make_synthetic


def markov_baseline(split: LeaveOneOutSplit, which: str = "test") -> dict[str, float]:
    """First-order Markov counts (last input item -> target) over the training samples;
    popularity breaks the ties so that unseen transitions fall back to it."""
    n = split.num_items + 1
    transitions = torch.zeros(n, n)
    transitions.index_put_(
        (split.train_inputs[:, -1], split.train_targets),
        torch.ones(len(split.train_targets)),
        accumulate=True,
    )
    popularity = popularity_scores(split).float()
    tie_break = 1e-3 * popularity / popularity[1:].max()
    inputs, targets = split.eval_tensors(which)
    return evaluate_full_ranking(lambda b: transitions[b[:, -1]] + tie_break, inputs, targets)


def test_deterministic_for_a_seed():
    a, b, c = make_synthetic(seed=3), make_synthetic(seed=3), make_synthetic(seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences))
    assert not all(np.array_equal(x, y) for x, y in zip(a.sequences, c.sequences))


def test_shape_and_lengths():
    data = make_synthetic()
    lengths = np.array([len(s) for s in data.sequences])
    assert data.num_users == 2000 and data.num_items == 500
    assert lengths.min() >= 5
    assert abs(lengths.mean() - 12.0) < 0.5
    items = np.concatenate(data.sequences)
    assert items.min() >= 1 and items.max() <= 500
    assert len(data.item_ids) == 501 and data.item_ids[0] == "<pad>"
    split = leave_one_out(data)
    assert split.num_train == lengths.sum() - 3 * data.num_users
    small = make_synthetic(num_users=30, num_items=40, mean_length=6.0, num_clusters=3)
    assert small.num_users == 30 and min(len(s) for s in small.sequences) >= 5


def test_markov_counts_beat_popularity_by_a_wide_margin():
    split = leave_one_out(make_synthetic())
    popularity = evaluate_popularity(split)["NDCG@10"]
    markov = markov_baseline(split)["NDCG@10"]
    assert popularity > 0.02  # skewed item frequencies: a non-trivial baseline
    assert markov > 0.4
    assert markov > 5 * popularity


def test_successor_rule_carries_signal_beyond_the_cluster():
    # Without successors the last item still reveals the user's cluster, but the order-specific
    # gain of the planted successor cycle is gone.
    with_successors = markov_baseline(leave_one_out(make_synthetic()))["NDCG@10"]
    clusters_only = markov_baseline(leave_one_out(make_synthetic(p_successor=0.0)))["NDCG@10"]
    assert with_successors > clusters_only + 0.15


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"num_users": 0}, "num_users"),
        ({"num_items": 5, "num_clusters": 10}, "num_items"),
        ({"mean_length": 3.0}, "mean_length"),
        ({"p_successor": 0.8, "p_noise": 0.3}, "p_successor"),
        ({"zipf": -1.0}, "zipf"),
    ],
)
def test_validates_knobs(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        make_synthetic(**kwargs)
