"""return_stats on the reference backend and the percentile helper (no kernels: CPU, float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_cl import adaptive_info_nce, histogram_percentile, similarity_histogram
from adaptive_cl.contract import make_stats_spec
from adaptive_cl.stats import bin_indices
from helpers import safe_threshold, views


def _candidates(z, za):
    s = F.normalize(torch.cat([z, za]).double(), dim=1)
    c = s @ s.T
    n = c.shape[0]
    keep = ~torch.eye(n, dtype=torch.bool)
    keep[torch.arange(n), (torch.arange(n) + n // 2) % n] = False
    return c, keep


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=1, max_size=300),
       log_bins=st.integers(1, 12), q=st.floats(0.0, 1.0))
def test_percentile_within_three_quarters_of_a_bin(values, log_bins, q):
    """Any values in the range, any bin count, any q: at most 3/4 of a bin width from
    torch.quantile of the counted values (both order statistics are placed inside their bins)."""
    x = torch.tensor(values, dtype=torch.float64)
    spec = make_stats_spec(2**log_bins)
    counts = torch.bincount(bin_indices(x, spec), minlength=spec.bins)
    got = float(histogram_percentile(counts, q))
    assert abs(got - float(torch.quantile(x, q))) <= 0.75 * spec.width + 1e-12


def test_reference_stats_are_the_dense_counts():
    """m_i: the row sums of the memberships (threshold and label positives, the soft count);
    the histogram: the bins of c over every row's candidates; nothing else counted."""
    z, za = views(11, 6, seed=4)
    labels = torch.tensor([0, 1, 2, 0, 1, 5, 6, 7, 8, 0, 2])
    k, _ = safe_threshold(z, za, "N")
    c, keep = _candidates(z, za)
    spec = make_stats_spec(128)
    want_hist = torch.bincount(bin_indices(c[keep], spec), minlength=128)
    lab = torch.cat([labels, labels])
    hard = ((c > k[:, None]) | (lab[:, None] == lab[None, :])) & keep
    loss, stats = adaptive_info_nce(z, za, k, labels=labels, backend="reference", return_stats=True, stats_bins=128)
    assert torch.equal(stats.histogram, want_hist) and int(stats.histogram.sum()) == 22 * 20
    assert torch.equal(stats.m, hard.sum(dim=1).double())
    assert torch.equal(loss, adaptive_info_nce(z, za, k, labels=labels, backend="reference"))
    soft = torch.sigmoid((c - k[:, None]) / 0.1)
    soft = torch.where(lab[:, None] == lab[None, :], 1.0, soft) * keep
    _, stats = adaptive_info_nce(z, za, k, labels=labels, threshold="soft", threshold_scale=0.1,
                                 backend="reference", return_stats=True, stats_bins=128)
    torch.testing.assert_close(stats.m, soft.sum(dim=1), rtol=1e-12, atol=1e-12)
    assert torch.equal(similarity_histogram(z, za, bins=128), want_hist)


def test_stats_range_and_edge_bins():
    """normalize=False: bins on a given range, values outside in the edge bins."""
    z, za = views(7, 5, seed=2)
    s = torch.cat([z, za]).double()
    c = s @ s.T
    n = 14
    keep = ~torch.eye(n, dtype=torch.bool)
    keep[torch.arange(n), (torch.arange(n) + 7) % n] = False
    _, stats = adaptive_info_nce(z, za, normalize=False, backend="reference", return_stats=True, stats_bins=16,
                                 stats_range=(-2.0, 2.0))
    vals = c[keep]
    assert int(stats.histogram[0]) == int((vals < -2.0 + 0.25).sum())
    assert int(stats.histogram[-1]) == int((vals >= 2.0 - 0.25).sum())
    assert stats.range == (-2.0, 2.0) and stats.width == 0.25


def test_compiled_backend_gets_the_reference_stats(monkeypatch):
    """A backend without its own statistics (no ``fused_stats``) returns the reference's."""
    from adaptive_cl import backends

    calls = []

    def plain(p):
        calls.append(p.stats)
        return torch.zeros((), dtype=torch.float64)

    monkeypatch.setattr(backends, "_compiled_reference", lambda: plain)
    z, za = views(5, 4, seed=1)
    loss, stats = adaptive_info_nce(z, za, 0.2, backend="compiled", return_stats=True, stats_bins=64)
    _, ref = adaptive_info_nce(z, za, 0.2, backend="reference", return_stats=True, stats_bins=64)
    assert calls == [None] and torch.equal(stats.histogram, ref.histogram) and torch.equal(stats.m, ref.m)


@pytest.mark.parametrize("bad,err", [(dict(stats_bins=3), ValueError), (dict(stats_bins=8192), ValueError),
                                     (dict(stats_bins=2.0), TypeError), (dict(stats_range=(0.0, 0.0)), ValueError),
                                     (dict(stats_range=(0.0,)), TypeError), (dict(stats_range=(0.0, float("inf"))), ValueError)])
def test_stats_options_are_checked(bad, err):
    z, za = views(3, 4, seed=0)
    with pytest.raises(err, match="stats_"):
        adaptive_info_nce(z, za, return_stats=True, **bad)


def test_percentile_input_checks():
    with pytest.raises(TypeError, match="counts must be a 1-D integer tensor"):
        histogram_percentile(torch.ones(4), 0.5)
    with pytest.raises(ValueError, match="q must be a number in"):
        histogram_percentile(torch.ones(4, dtype=torch.int64), -0.1)
    with pytest.raises(ValueError, match="range"):
        histogram_percentile(torch.ones(4, dtype=torch.int64), 0.5, (1.0, 1.0))

