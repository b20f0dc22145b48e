"""A small synthetic dataset with planted sequential structure, for demos and tests.

Real data cannot tell whether a pipeline learns *sequences*: popularity alone scores well on
it. Here the answer is known by construction, so a sequential model must clearly beat the
popularity baseline and a broken one cannot hide.
"""

from __future__ import annotations

import numpy as np

from .data import SequenceData


def make_synthetic(
    num_users: int = 2000,
    num_items: int = 500,
    mean_length: float = 12.0,
    seed: int = 0,
    *,
    num_clusters: int = 10,
    p_successor: float = 0.5,
    p_noise: float = 0.05,
    zipf: float = 1.0,
    min_length: int = 5,
) -> SequenceData:
    """Generate ``num_users`` sequences over ``num_items`` items; deterministic given ``seed``.

    The planted structure:

    * the items are shuffled and split into ``num_clusters`` clusters of (near) equal size;
      within a cluster the items have Zipf popularity ``1 / rank**zipf`` over a random ranking,
      and are linked in a hidden random cycle that defines each item's *successor*;
    * each user prefers one cluster, drawn uniformly;
    * the first item is a popularity draw from the user's cluster; every next item is, with
      probability ``p_successor``, the successor of the current item, with probability
      ``p_noise`` a uniformly random item of any cluster, and otherwise a fresh popularity draw
      from the user's cluster;
    * lengths are ``min_length + Poisson(mean_length - min_length)``, so every user keeps at
      least two training samples under leave-one-out when ``min_length >= 5``.

    A model that learns "successor of the last item" ranks the target first in about
    ``p_successor`` of the cases (a first-order Markov count model gets there), while
    popularity only knows the skewed item frequencies, which ignore both the user's cluster
    and the order.
    """
    _check_int("num_users", num_users, 1)
    _check_int("num_clusters", num_clusters, 1)
    _check_int("min_length", min_length, 1)
    _check_int("num_items", num_items, num_clusters)
    if not min_length <= mean_length < float("inf"):
        raise ValueError(f"mean_length must be finite and >= min_length={min_length}, "
                         f"got {mean_length!r}")
    if not (0 <= p_successor and 0 <= p_noise and p_successor + p_noise <= 1):
        raise ValueError(f"p_successor and p_noise must be >= 0 with a sum <= 1, got "
                         f"{p_successor!r} and {p_noise!r}")
    if not zipf >= 0:
        raise ValueError(f"zipf must be >= 0, got {zipf!r}")

    rng = np.random.default_rng(seed)
    clusters = np.array_split(rng.permutation(num_items) + 1, num_clusters)
    size = max(len(c) for c in clusters)
    # Per cluster: items in popularity order, padded with the last item (zero weight).
    members = np.stack([np.pad(c, (0, size - len(c)), mode="edge") for c in clusters])
    weights = np.zeros((num_clusters, size))
    for c, items in enumerate(clusters):
        weights[c, : len(items)] = 1.0 / np.arange(1, len(items) + 1) ** zipf
    cumulative = np.cumsum(weights / weights.sum(1, keepdims=True), axis=1)
    successor = np.zeros(num_items + 1, np.int64)
    for items in clusters:
        cycle = rng.permutation(items)
        successor[cycle] = np.roll(cycle, -1)

    def popular(cluster: np.ndarray) -> np.ndarray:
        u = rng.random(len(cluster))
        column = (cumulative[cluster] < u[:, None]).sum(1).clip(max=size - 1)
        return members[cluster, column]

    preferred = rng.integers(num_clusters, size=num_users)
    lengths = min_length + rng.poisson(mean_length - min_length, size=num_users)
    items = np.zeros((num_users, lengths.max()), np.int64)
    items[:, 0] = popular(preferred)
    for step in range(1, lengths.max()):
        u = rng.random(num_users)
        noise = rng.integers(1, num_items + 1, size=num_users)
        items[:, step] = np.where(
            u < p_successor,
            successor[items[:, step - 1]],
            np.where(u < p_successor + p_noise, noise, popular(preferred)),
        )
    return SequenceData(
        name="synthetic",
        sequences=[row[:n].copy() for row, n in zip(items, lengths)],
        num_items=num_items,
        user_ids=[str(u) for u in range(1, num_users + 1)],
        item_ids=["<pad>", *(str(i) for i in range(1, num_items + 1))],
    )


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
