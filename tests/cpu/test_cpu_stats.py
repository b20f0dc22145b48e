"""return_stats on the C++ backend: m_i and the histogram counted in the forward pass, and the
histogram alone (similarity_histogram), against the reference's dense statistics.

Equality of counts needs equal similarities: a value on a bin edge goes to one bin or the other
by its last bit. The exact tests therefore use inputs whose every c_ij is exactly representable
and computed without rounding in any summation order (dyadic rows, see ``dyadic_views``), and
compare with the reference run in the same dtype; random inputs are checked against float64
with bounds that allow only the values within rounding of an edge to move."""

from __future__ import annotations

import warnings

import pytest
import torch

from adaptive_cl import adaptive_info_nce, histogram_percentile, similarity_histogram
from adaptive_cl.contract import make_stats_spec
from kernels._cases import case_id, covers_all_pairs, make_views, pairwise_cases, pick_k, similarity64

FACTORS = {
    "shape": [(2, 1), (3, 7), (17, 32), (40, 70)],
    "dtype": [torch.float64, torch.float32],
    "k": ["none", "scalar", "B", "N"],
    "threshold": ["hard", "soft"],
    "labels": [None, "B", "N"],
    "normalize": [True, False],
    "bins": [2, 16, 512, 4096],
    "reduction": ["mean", "none"],
}


def _allowed(case):
    return not (case["threshold"] == "soft" and case["k"] == "none")


CASES = pairwise_cases(FACTORS, _allowed, seed=5)


def dyadic_views(b, d, dtype, *, seed, normalize):
    """(z, z_aug) whose similarities every backend computes exactly. normalize: each row holds
    1, 4 or 16 entries +-2^e (e per row, -3..3), so its norm is 2^e times 1, 2 or 4, the
    normalised entries are +-1, 1/2 or 1/4 and every cosine is a multiple of 1/16 (many exactly
    on bin edges, the floor rule's hard case). normalize=False: entries in {-1, 0, 1}, integer
    dot products."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * b
    if normalize:
        x = torch.zeros(n, d, dtype=torch.float64)
        sizes = [s for s in (1, 4, 16) if s <= d]
        for r in range(n):
            size = sizes[int(torch.randint(len(sizes), (), generator=g))]
            cols = torch.randperm(d, generator=g)[:size]
            signs = torch.randint(0, 2, (size,), generator=g).double() * 2 - 1
            x[r, cols] = signs * 2.0 ** int(torch.randint(-3, 4, (), generator=g))
    else:
        x = torch.randint(-1, 2, (n, d), generator=g).double()
    return x[:b].to(dtype), x[b:].to(dtype)


def _stats_range(d, normalize):
    """(-1, 1) for cosines; for dot products a range narrower than the values (edge bins)."""
    return (-1.0, 1.0) if normalize else (-0.6 * d ** 0.5 - 0.3, 0.5 * d ** 0.5 + 0.7)


def _run(backend, z, za, k, labels, **opts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # normalize=False: the unbounded-loss warning
        return adaptive_info_nce(z, za, k, labels=labels, backend=backend, return_stats=True, **opts)


def _m_tolerance(dtype):
    # soft m_i: a sum of at most N sigmoids, added in another order (and sigmoid(x) evaluated
    # differently) by each backend; a wrong term would be off by O(1e-2) or more
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


def test_design_covers_every_pair():
    assert covers_all_pairs(CASES, FACTORS, _allowed) == []
    assert len(CASES) < 30


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_counts_and_m_equal_the_reference(ext, case):
    (b, d), dtype, norm, bins = case["shape"], case["dtype"], case["normalize"], case["bins"]
    z, za = dyadic_views(b, d, dtype, seed=b + d + bins, normalize=norm)
    k, _ = pick_k(z.double(), za.double(), case["k"], norm, dtype=dtype)
    labels = None
    if case["labels"] is not None:
        g = torch.Generator().manual_seed(b)
        labels = torch.randint(0, 3, (b if case["labels"] == "B" else 2 * b,), generator=g)
    opts = dict(normalize=norm, threshold=case["threshold"], threshold_scale=0.1, temperature=0.5,
                reduction=case["reduction"], stats_bins=bins, stats_range=_stats_range(d, norm))
    loss, st = _run("cpu", z, za, k, labels, **opts)
    _, ref = _run("reference", z, za, k, labels, **opts)
    n = 2 * b
    assert st.histogram.dtype == torch.int64 and st.histogram.shape == (bins,) and st.range == opts["stats_range"]
    assert int(st.histogram.sum()) == n * (n - 2)
    assert torch.equal(st.histogram, ref.histogram)
    assert st.m.dtype == dtype and st.m.shape == (n,)
    if case["threshold"] == "hard":
        assert torch.equal(st.m, ref.m)  # integer counts of the same decisions on the same c
    else:
        torch.testing.assert_close(st.m, ref.m, **_m_tolerance(dtype))
    # counting changes nothing else: the loss is the plain call's, bit for bit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plain = adaptive_info_nce(z, za, k, labels=labels, backend="cpu",
                                  **{key: v for key, v in opts.items() if not key.startswith("stats")})
    assert torch.equal(loss, plain)
    assert torch.equal(similarity_histogram(z, za, bins=bins, range=opts["stats_range"], normalize=norm,
                                            backend="cpu"), st.histogram)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [True, False])
def test_many_tiles_count_exactly(ext, dtype, normalize):
    """N = 600: 19 row blocks, 3 (float32) or 5 (float64) column tiles, partners and diagonals in
    the middle of tiles; the finest bins."""
    b, d = 300, 24
    z, za = dyadic_views(b, d, dtype, seed=3, normalize=normalize)
    labels = torch.arange(b) % 11
    rng = _stats_range(d, normalize)
    loss, st = _run("cpu", z, za, 0.25, labels, normalize=normalize, stats_bins=4096, stats_range=rng)
    _, ref = _run("reference", z, za, 0.25, labels, normalize=normalize, stats_bins=4096, stats_range=rng)
    assert torch.equal(st.histogram, ref.histogram) and torch.equal(st.m, ref.m)
    assert torch.equal(similarity_histogram(z, za, bins=4096, range=rng, normalize=normalize, backend="cpu"),
                       st.histogram)


def _candidates64(z, za, normalize):
    c = similarity64(z, za, normalize)
    n = c.shape[0]
    keep = ~torch.eye(n, dtype=torch.bool)
    keep[torch.arange(n), (torch.arange(n) + n // 2) % n] = False
    return c[keep]


@pytest.mark.parametrize("dtype,eps", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_random_inputs_move_only_values_at_an_edge(ext, dtype, eps):
    """Random rows, N = 1000 (4 column tiles in float32): below every bin edge e the kernel
    counts at least the float64 values below e - eps and at most those below e + eps (eps: far
    above the rounding of a cosine, ~1e-6 in float32, and far below a bin width, 5e-4); m_i
    equals the float64 m_i exactly (the thresholds keep 1e-5 from every c)."""
    b, d = 500, 48
    z, za = make_views(b, d, dtype, seed=21)
    k, margin = pick_k(z.double(), za.double(), "B", True, dtype=dtype)
    assert margin > 1e-5
    loss, st = _run("cpu", z, za, k, None, stats_bins=4096)
    _, ref64 = _run("reference", z.double(), za.double(), k.double(), None, stats_bins=4096)
    assert torch.equal(st.m.double(), ref64.m)
    values = _candidates64(z, za, True)
    spec = make_stats_spec(4096)
    edges = torch.linspace(-1.0, 1.0, 4097, dtype=torch.float64)[1:-1]
    below = st.histogram.cumsum(0)[:-1]  # counts in the bins left of each edge
    lower = torch.searchsorted(values.sort().values, edges - eps)
    upper = torch.searchsorted(values.sort().values, edges + eps)
    assert bool(((below >= lower) & (below <= upper)).all())
    assert int(st.histogram.sum()) == values.numel() and spec.bins == st.bins
    assert torch.equal(similarity_histogram(z, za, bins=4096, backend="cpu"), st.histogram)


def test_pooled_percentile_within_one_bin_of_quantile(ext):
    """Counts summed over batches of different sizes (an epoch), from the forward pass and from
    similarity_histogram: k_stat within one bin width of torch.quantile of the float64 values."""
    from_loss = torch.zeros(2048, dtype=torch.int64)
    alone = torch.zeros(2048, dtype=torch.int64)
    values = []
    for i, (b, d) in enumerate(((17, 32), (40, 70), (23, 7), (3, 7), (130, 64))):
        z, za = make_views(b, d, torch.float32, seed=50 + i)
        _, st = adaptive_info_nce(z, za, 0.3, backend="cpu", return_stats=True)
        from_loss += st.histogram
        alone += similarity_histogram(z, za)  # "auto": the extension on CPU
        values.append(_candidates64(z, za, True))
    values = torch.cat(values)
    assert torch.equal(from_loss, alone)
    for q in (0.0, 0.1, 0.5, 0.9, 0.97, 1.0):
        got = float(histogram_percentile(alone, q))
        assert abs(got - float(torch.quantile(values, q))) <= 2.0 / 2048, q


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("where", ["z-nan", "z_aug-inf"])
def test_non_finite_inputs_count_nothing(ext, dtype, where):
    z, za = make_views(6, 5, dtype, seed=1)
    (z if where == "z-nan" else za)[3, 2] = float("nan") if where == "z-nan" else float("inf")
    for normalize in (True, False):
        loss, st = adaptive_info_nce(z, za, torch.full((6,), 0.3, dtype=dtype), backend="cpu", normalize=normalize,
                                     denominator="all", threshold="soft", reduction="none", return_stats=True, stats_bins=64)
        assert torch.isnan(loss).all() and torch.isnan(st.m).all()
        assert st.histogram.shape == (64,) and not st.histogram.any()
        assert torch.isnan(st.percentile(0.9))
        assert not similarity_histogram(z, za, bins=64, normalize=normalize, backend="cpu").any()


def test_statistics_never_go_dense_on_cpu(ext, monkeypatch):
    """return_stats and similarity_histogram on CPU tensors ("auto" and "cpu") run the extension
    alone: the reference's dense statistics are never called. Half inputs count in float32; the
    backward through a call with statistics is the plain call's."""
    import adaptive_cl.functional as functional
    import adaptive_cl.reference as reference

    def refuse(*args, **kwargs):
        raise AssertionError("the dense N x N statistics were computed")

    monkeypatch.setattr(reference, "similarity_stats", refuse)
    monkeypatch.setattr(functional, "_dense_stats", refuse)
    z, za = make_views(9, 12, torch.float32, seed=4)
    k = torch.full((9,), 0.2, requires_grad=True)
    zs, zas = z.clone().requires_grad_(True), za.clone().requires_grad_(True)
    loss, st = adaptive_info_nce(zs, zas, k, threshold="soft", return_stats=True, stats_bins=256)
    grads = torch.autograd.grad(loss, (zs, zas, k))
    plain = adaptive_info_nce(zs, zas, k, threshold="soft", backend="cpu")
    assert torch.equal(loss.detach(), plain.detach())
    for g, want in zip(grads, torch.autograd.grad(plain, (zs, zas, k))):
        assert torch.equal(g, want)
    assert not st.m.requires_grad and not st.histogram.requires_grad
    st.m.zero_()  # the caller's copy: the saved statistics of the graph are untouched
    assert torch.equal(similarity_histogram(z, za, bins=256), st.histogram)
    _, half = adaptive_info_nce(z.half(), za.half(), 0.2, return_stats=True, stats_bins=256)
    _, single = adaptive_info_nce(z.half().float(), za.half().float(), 0.2, return_stats=True, stats_bins=256)
    assert half.m.dtype == torch.float32 and torch.equal(half.m, single.m)
    assert torch.equal(half.histogram, single.histogram)


def test_extension_rejects_bad_histogram_arguments(ext):
    z, za = torch.randn(4, 3), torch.randn(4, 3)
    args = (1.0, True, False, False, 0.5, False, 0.05, 0)
    with pytest.raises(RuntimeError, match=r"stats_bins must be in \[1, 2\^24\]"):
        ext.forward_with_histogram(z, za, None, None, *args, 0, -1.0, 1.0)
    with pytest.raises(RuntimeError, match="stats_range must be finite with lo < hi"):
        ext.forward_with_histogram(z, za, None, None, *args, 8, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="stats_range must be finite with lo < hi"):
        ext.similarity_histogram(z, za, True, 8, 0.0, float("inf"))
    with pytest.raises(RuntimeError, match="z and z_aug must both have shape"):
        ext.similarity_histogram(z, za[:, :2], True, 8, -1.0, 1.0)
