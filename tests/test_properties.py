"""Property tests over shapes and options (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_cl import adaptive_info_nce
from helpers import assert_close_normwise

OPTIONS = st.fixed_dictionaries({
    "denominator": st.sampled_from(["negatives", "all"]),
    "weighting": st.sampled_from(["normalized", "unit"]),
    "threshold": st.sampled_from(["hard", "soft"]),
    "temperature": st.floats(0.05, 5.0),
    "positive_weight": st.floats(0.05, 0.95),
    "threshold_scale": st.floats(0.01, 1.0),
})

#: float64, the same loss summed in another order: the suite's policy with N + D <= 18 + 6 and
#: the largest logit scale the strategies draw, 1/min(tau, beta) = 1/0.01, as condition.
TOL = dict(dtype=torch.float64, length=18 + 6, cond=100.0)


@st.composite
def problems(draw):
    batch = draw(st.integers(2, 9))
    dim = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    z_aug = z + torch.randn(batch, dim, generator=g, dtype=torch.float64)
    k = torch.rand(batch, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, 3, (batch,), generator=g) if draw(st.booleans()) else None
    return z, z_aug, k, labels, draw(OPTIONS)


def rows(z, z_aug, k, labels, options):
    return adaptive_info_nce(z, z_aug, k, labels=labels, reduction="none", backend="reference", **options)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_finite_and_reductions_consistent(problem):
    z, z_aug, k, labels, options = problem
    r = rows(z, z_aug, k, labels, options)
    assert r.shape == (2 * z.shape[0],) and torch.isfinite(r).all()
    mean = adaptive_info_nce(z, z_aug, k, labels=labels, backend="reference", **options)
    torch.testing.assert_close(mean, r.mean())


@settings(max_examples=60, deadline=None)
@given(problems())
def test_permuting_pairs_permutes_rows(problem):
    z, z_aug, k, labels, options = problem
    perm = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(0))
    expected = rows(z, z_aug, k, labels, options)
    got = rows(z[perm], z_aug[perm], k[perm], None if labels is None else labels[perm], options)
    assert_close_normwise(got, expected[torch.cat([perm, perm + z.shape[0]])], **TOL)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_swapping_views_rolls_rows(problem):
    z, z_aug, k, labels, options = problem
    expected = rows(z, z_aug, k, labels, options)
    got = rows(z_aug, z, k, labels, options)
    assert_close_normwise(got, expected.roll(z.shape[0]), **TOL)


@settings(max_examples=60, deadline=None)
@given(problems(), st.floats(0.1, 10.0))
def test_cosine_loss_is_scale_invariant(problem, scale):
    z, z_aug, k, labels, options = problem
    assert_close_normwise(rows(z * scale, z_aug, k, labels, options), rows(z, z_aug, k, labels, options), **TOL)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_normalized_all_loss_is_nonnegative(problem):
    # With "all" + "normalized" every row is a cross-entropy against non-negative target weights
    # over the columns of its own softmax, so no row can go below zero (unlike "negatives").
    z, z_aug, k, labels, options = problem
    options = dict(options, denominator="all", weighting="normalized", threshold="hard")
    r = rows(z, z_aug, k, labels, options)
    assert (r >= 0).all()
