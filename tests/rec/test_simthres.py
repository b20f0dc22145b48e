"""SimThres: similarity statistics, percentiles, threshold networks, the regularizer."""

import pytest
import torch
import torch.nn.functional as F

from adaptive_cl.rec.simthres import (
    THRESHOLD_RANGE,
    FlattenedThresholdNet,
    LearnableSimThres,
    SimilarityStats,
    StatisticalSimThres,
    KSTAT_METHODS,
    ThresholdNet,
    candidate_similarities,
    exact_percentile,
)


def views(seed: int, b: int = 32, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, d, generator=g)
    return z, z + 0.5 * torch.randn(b, d, generator=g)


def test_candidate_set_excludes_self_and_partner():
    z, za = views(0, b=5)
    c = candidate_similarities(z, za)
    zn = F.normalize(torch.cat([z, za]), dim=1)
    full = zn @ zn.T
    n = 10
    for i in range(n):
        expected = [full[i, j].item() for j in range(n) if j not in (i, (i + 5) % n)]
        torch.testing.assert_close(c[i].sort().values, torch.tensor(expected).sort().values)


def test_exact_percentile_matches_quantile():
    x = torch.randn(1001)
    for q in (0.0, 0.25, 0.9, 1.0):
        torch.testing.assert_close(exact_percentile(x, q), torch.quantile(x, q))


def test_pooled_histogram_percentile_within_one_bin_of_exact():
    stats = SimilarityStats(q=0.9, bins=2048)
    pooled = []
    for seed in range(6):
        z, za = views(seed, b=20 + seed)  # batch sizes differ, as with a partial last batch
        stats.update(z, za)
        pooled.append(candidate_similarities(z, za).reshape(-1))
    exact = exact_percentile(torch.cat(pooled), 0.9).item()
    assert abs(stats.percentile("pooled") - exact) <= 2.0 / 2048


def test_batch_mean_rule_is_the_mean_of_per_batch_percentiles():
    """Each batch's percentile comes from its own histogram (within one bin width of exact)."""
    stats = SimilarityStats(q=0.9)
    per_batch = []
    for seed in range(4):
        z, za = views(seed)
        stats.update(z, za)
        per_batch.append(torch.quantile(candidate_similarities(z, za).reshape(-1), 0.9).item())
    assert stats.percentile("batch_mean") == pytest.approx(sum(per_batch) / 4, abs=2.0 / 2048)


def test_update_materialises_no_similarity_matrix(monkeypatch):
    """SimilarityStats counts through adaptive_cl.similarity_histogram (the fused kernel's
    histogram on CUDA), not through the (N, N - 2) candidate matrix; the counts are the
    histogram of the float64 similarities up to values within rounding of a bin edge."""
    import adaptive_cl.rec.simthres as simthres_mod

    def refuse(*args, **kwargs):
        raise AssertionError("candidate_similarities must not be called by update")

    monkeypatch.setattr(simthres_mod, "candidate_similarities", refuse)
    stats = SimilarityStats(q=0.9, bins=256)
    z, za = views(3, b=17, d=6)
    stats.update(z, za)
    monkeypatch.undo()
    c = candidate_similarities(z.double(), za.double()).reshape(-1)
    want = torch.bincount(((c + 1) * 128).floor().long().clamp(0, 255), minlength=256)
    assert int(stats.counts.sum()) == 34 * 32
    assert int((stats.counts - want).abs().sum()) <= 2


def test_bins_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="bins must be a power of two"):
        SimilarityStats(bins=1000)


def test_stats_state_round_trip_and_reset():
    stats = SimilarityStats()
    stats.update(*views(0))
    other = SimilarityStats()
    other.load_state_dict(stats.state_dict())
    assert other.percentile() == stats.percentile()
    assert sum(other.histogram(64)) == 64 * 62
    stats.reset()
    with pytest.raises(ValueError, match="no batch"):
        stats.percentile()
    with pytest.raises(ValueError, match="method"):
        other.percentile("median")


def test_statistical_simthres_uses_the_previous_epoch():
    h = torch.randn(4, 8)
    for start, first in (("none", 1.0), ("zero", 0.0)):
        simthres = StatisticalSimThres(start)
        assert simthres(h).item() == first
        simthres.update(0.42)
        assert simthres(h).item() == pytest.approx(0.42)
        again = StatisticalSimThres(start)
        again.load_state_dict(simthres.state_dict())
        assert again(h).item() == pytest.approx(0.42)
    with pytest.raises(ValueError, match="start"):
        StatisticalSimThres("first")
    with pytest.raises(ValueError, match="SimilarityStats"):
        StatisticalSimThres("running")


def test_running_start_follows_the_epoch_so_far_then_the_previous_epoch():
    """Before any k_stat: no extra positives for the first batch, then the statistic of the
    batches seen so far (pooled or mean of per-batch percentiles), on the device."""
    torch.manual_seed(0)
    for method in KSTAT_METHODS:
        stats = SimilarityStats(q=0.9, bins=2048)
        simthres = StatisticalSimThres("running", stats, method)
        h = torch.randn(6, 8)
        assert simthres(h).item() == 1.0
        pairs = [(torch.randn(16, 8), torch.randn(16, 8)) for _ in range(3)]
        for a, b in pairs:
            stats.update(a, b)
            k = simthres(h)
            assert k.dim() == 0 and k.item() == pytest.approx(stats.percentile(method), abs=1e-6)
        simthres.update(0.3)  # the epoch ended: its statistic from now on
        stats.reset()
        assert simthres(h).item() == pytest.approx(0.3)
        stats.update(*pairs[0])
        assert simthres(h).item() == pytest.approx(0.3)


@pytest.mark.parametrize("b", [1, 3, 17, 64])
def test_threshold_net_works_for_any_batch_size(b):
    torch.manual_seed(0)
    net = ThresholdNet(hidden=8)
    k = net(torch.randn(b, 8) * 100)
    assert k.shape == (b,)
    assert (k.abs() <= THRESHOLD_RANGE).all()


def test_threshold_net_sees_the_batch():
    torch.manual_seed(0)
    net = ThresholdNet(hidden=8)
    h = torch.randn(6, 8)
    other = torch.cat([h[:3], torch.randn(3, 8) + 3])
    assert not torch.allclose(net(h)[:3], net(other)[:3])


def test_flattened_net_fixed_batch_size():
    torch.manual_seed(0)
    net = FlattenedThresholdNet(batch_size=8, hidden=4)
    k = net(torch.randn(8, 4))
    assert k.shape == (8,) and (k.abs() <= THRESHOLD_RANGE).all()
    assert net.net[0].weight.shape == (8 * 4 // 8, 8 * 4)
    with pytest.raises(ValueError, match="drop_last"):
        net(torch.randn(5, 4))


@pytest.mark.parametrize("squared", [False, True])
def test_regularizer_only_from_the_second_epoch(squared):
    torch.manual_seed(0)
    learn = LearnableSimThres(ThresholdNet(8), weight=0.1, squared=squared)
    h = torch.randn(5, 8, requires_grad=True)
    k = learn(h)
    assert learn.regularizer(k).item() == 0.0  # first epoch: no k_stat yet
    learn.update(0.3)
    reg = learn.regularizer(k)
    d = torch.linalg.vector_norm(k - 0.3)
    assert reg.item() == pytest.approx(0.1 * (d.item() ** 2 if squared else d.item()), rel=1e-5)
    reg.backward()
    assert h.grad is None  # detached input: the regularizer trains g, not the encoder
    assert learn.net.mlp[0].weight.grad is not None
    fresh = LearnableSimThres(ThresholdNet(8))
    fresh.load_state_dict(learn.state_dict())
    assert fresh.regularizer(k.detach()).item() > 0  # the epoch count survives a checkpoint
