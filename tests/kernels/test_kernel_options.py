"""Issue 15 in the fused kernels: same-label positives, the soft threshold with its gradient in k,
and the in-kernel statistics (return_stats), under Triton's CPU interpreter (or on the GPU when
there is one), against the float64 reference (autograd through adaptive_cl.reference, an
independent formulation: dense, no kernel code).

Thresholds keep a margin from every kink: hard thresholds sit in the middle of the widest gap
between candidate similarities (pick_k); soft thresholds keep every row's membership sum m_i at
least SOFT_KINK_MARGIN from 1, the kink of max(m_i, 1) (labels included).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

triton = pytest.importorskip("triton")

from adaptive_cl import AdaptiveInfoNCE, adaptive_info_nce, histogram_percentile, similarity_histogram  # noqa: E402
from adaptive_cl import backends  # noqa: E402
from adaptive_cl.contract import make_options, make_stats_spec, prepare  # noqa: E402
from adaptive_cl.kernels import adaptive_info_nce_fwd as fwd  # noqa: E402
from adaptive_cl.kernels import function as kfunc  # noqa: E402

from helpers import SOFT_KINK_MARGIN, soft_membership_sums  # noqa: E402
from ._cases import case_id, covers_all_pairs, make_views, pairwise_cases, pick_k, rel_err, similarity64  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

FACTORS = {
    "shape": [(2, 1), (3, 7), (17, 32), (40, 70)],
    "dtype": [torch.float32, torch.float16],
    "threshold": ["hard", "soft"],
    "k": ["none", "scalar", "0d", "B", "N"],
    "labels": ["none", "B", "N"],
    "denominator": ["negatives", "all"],
    "weighting": ["normalized", "unit"],
    "alpha": [0.5, 0.3, 1.0],
    # 0.02 < FIXED_SHIFT_MIN_TAU: the online-max path with normalize=True.
    "tau": [1.0, 0.1, 0.02],
    "beta": [0.05, 0.3],
    "normalize": [True, False],
    "reduction": ["mean", "sum", "none"],
    "layout": ["contiguous", "noncontig"],
    # True: MAX_BLOCK_D lowered to 16 (chunked-D forward, D-split backward grid).
    "dchunk": [False, True],
}


def _allowed(case):
    if case["weighting"] == "unit" and case["alpha"] == 1.0:
        return False
    return not (case["threshold"] == "soft" and case["k"] == "none")


CASES = pairwise_cases(FACTORS, _allowed, seed=3)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 5e-3)}


def test_design_covers_every_pair():
    assert covers_all_pairs(CASES, FACTORS, _allowed) == []
    assert len(CASES) <= 40


# ------------------------------------------------------------------------------- inputs
def make_labels(kind, batch, seed):
    """(B,) int64 or (N,) int32 labels with a few repeats (so same-label pairs exist)."""
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    n = batch if kind == "B" else 2 * batch
    lab = torch.randint(0, max(2, n // 3), (n,), generator=g)
    return lab if kind == "B" else (lab * 1_000_003 - 7).to(torch.int64)  # large, negative ids too


def soft_k(z, za, kind, beta, normalize, labels, seed):
    """A soft threshold of the given kind with every row's m_i at least SOFT_KINK_MARGIN from 1:
    values drawn from the candidates' similarity range, per group of rows sharing k."""
    c = similarity64(z.cpu(), za.cpu(), normalize)
    n = c.shape[0]
    b = n // 2
    off = ~torch.eye(n, dtype=torch.bool)
    off[torch.arange(n), (torch.arange(n) + b) % n] = False
    vals = c[off]
    lo, hi = float(vals.min()) - 2 * beta, float(vals.max()) + 2 * beta
    g = torch.Generator().manual_seed(seed)
    lab_cpu = None if labels is None else labels.cpu()
    groups = {"scalar": [list(range(n))], "0d": [list(range(n))],
              "B": [[i, i + b] for i in range(b)], "N": [[i] for i in range(n)]}[kind]
    ks = torch.empty(n, dtype=torch.float64)
    for rows in groups:
        for _ in range(400):
            value = lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))
            trial = ks.clone()
            trial[rows] = value
            m = soft_membership_sums(z.cpu().double(), za.cpu().double(), trial, beta, normalize=normalize,
                                     labels=lab_cpu)[rows]
            if bool(((m - 1).abs() >= SOFT_KINK_MARGIN).all()):
                ks[rows] = value
                break
        else:
            raise AssertionError(f"no soft threshold keeps m_i away from 1 for rows {rows}")
    if kind == "scalar":
        return float(ks[0])
    if kind == "0d":
        return ks[0].float()
    return ks[:b].float() if kind == "B" else ks.float()


def run_backend(backend, z, za, k, labels, upstream, opts, dtype):
    """Loss, row losses, gradients of z, z_aug and k for one backend (inputs cast to dtype)."""
    zt = z.detach().to(dtype).requires_grad_()
    zat = za.detach().to(dtype).requires_grad_()
    kt = k.detach().to(dtype if dtype == torch.float64 else torch.float32).clone().requires_grad_() \
        if isinstance(k, torch.Tensor) else k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loss = adaptive_info_nce(zt, zat, kt, labels=labels, backend=backend, **opts)
        rows = adaptive_info_nce(zt.detach(), zat.detach(), kt.detach() if isinstance(kt, torch.Tensor) else kt,
                                 labels=labels, backend=backend, **dict(opts, reduction="none"))
    loss.backward(upstream)
    dk = kt.grad if isinstance(kt, torch.Tensor) else None
    return loss.detach(), rows.detach(), zt.grad, zat.grad, dk


def check(z, za, k, labels, opts, upstream, tol_loss, tol_grad):
    out, rows, dz, dza, dk = run_backend("triton", z, za, k, labels, upstream, opts, z.dtype)
    ref, ref_rows, rdz, rdza, rdk = run_backend("reference", z, za, k, labels, upstream, opts, torch.float64)
    assert out.dtype == torch.float32 and dz.dtype == z.dtype and dza.dtype == za.dtype
    n = rows.shape[0]
    logit = float(similarity64(z.cpu(), za.cpu(), opts["normalize"]).abs().max()) / opts["temperature"]
    err_rows = (rows.double().cpu() - ref_rows.cpu()).abs()
    assert bool((err_rows <= tol_loss * (ref_rows.abs().cpu() + logit)).all()), float(err_rows.max())
    if opts["reduction"] == "none":
        assert bool(((out.double() - ref).abs() <= tol_loss * (ref.abs() + logit)).all())
    else:
        bound = tol_loss * float(ref_rows.abs().sum() + n * logit) / (n if opts["reduction"] == "mean" else 1)
        assert float((out.double() - ref).abs()) <= bound
    got, want = torch.cat([dz, dza]).double(), torch.cat([rdz, rdza])
    floor = 0.0
    if opts["normalize"]:  # D = 1: z^ = sign(z) makes the exact gradient (nearly) 0
        norms = torch.cat([z, za]).double().norm(dim=1)
        u = 1.0 if upstream is None else float(upstream.detach().double().abs().max())
        floor = u / (n if opts["reduction"] == "mean" else 1) * logit * n ** 0.5 / float(norms.min())
    err = float((got - want).norm())
    assert err <= tol_grad * (float(want.norm()) + floor), (err, float(want.norm()), floor)
    assert torch.isfinite(got).all()
    if isinstance(k, torch.Tensor):
        assert dk is not None and dk.shape == k.shape and dk.dtype == torch.float32
        if opts.get("threshold", "hard") == "hard":
            assert not dk.any()
        else:
            # dL/dk_i, against autograd's through the reference (the same floor where the
            # gradient is small against the loss's scale)
            kfloor = logit / opts["threshold_scale"] * 1e-3 * (1.0 if opts["reduction"] != "mean" else 1.0 / n)
            assert float((dk.double() - rdk).norm()) <= tol_grad * (float(rdk.norm()) + kfloor), \
                (float((dk.double() - rdk).norm()), float(rdk.norm()))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case, monkeypatch):
    if case["dchunk"]:
        monkeypatch.setattr(fwd, "MAX_BLOCK_D", 16)
    b, d = case["shape"]
    seed = 31 * b + d
    z, za = make_views(b, d, case["dtype"], seed=seed, normalize=case["normalize"], layout=case["layout"],
                       device=DEVICE, noise=3.0 if case["tau"] < 0.05 else 0.7)
    labels = make_labels(case["labels"], b, seed)
    if case["threshold"] == "soft":
        k = soft_k(z, za, case["k"], case["beta"], case["normalize"], labels, seed)
    else:
        k, margin = pick_k(z.cpu(), za.cpu(), case["k"], case["normalize"])
        assert margin > 1e-4, "threshold too close to a similarity"
    if isinstance(k, torch.Tensor):
        k = k.to(DEVICE)
    if labels is not None:
        labels = labels.to(DEVICE)
    opts = dict(temperature=case["tau"], normalize=case["normalize"], denominator=case["denominator"],
                weighting=case["weighting"], positive_weight=case["alpha"], reduction=case["reduction"],
                threshold=case["threshold"], threshold_scale=case["beta"])
    g = torch.Generator().manual_seed(seed + 1)
    if case["reduction"] == "none":
        upstream = torch.randn(2 * b, generator=g).to(DEVICE)
    else:
        upstream = torch.tensor(-0.75 if seed % 2 else 1.3, device=DEVICE)
    check(z, za, k, labels, opts, upstream, *TOL[case["dtype"]])


# Every combination of the option values that change the new per-element code (membership kind,
# labels, k layout, denominator, exponent path), on one small odd shape.
CORE = [(thr, lab, kind, den, path) for thr in ("hard", "soft") for lab in ("none", "N")
        for kind in ("scalar", "N") for den in ("negatives", "all") for path in ("fixed", "online", "dot")]


@pytest.mark.parametrize("thr,lab,kind,den,path", CORE, ids=["-".join(c) for c in CORE])
def test_core_option_product(thr, lab, kind, den, path):
    normalize = path != "dot"
    tau = {"fixed": 0.2, "online": 0.02, "dot": 0.5}[path]
    z, za = make_views(17, 7, torch.float32, seed=29, normalize=normalize, device=DEVICE)
    labels = make_labels(lab, 17, 5)
    if thr == "soft":
        k = soft_k(z, za, kind, 0.1, normalize, labels, 4)
    else:
        k, margin = pick_k(z.cpu(), za.cpu(), kind, normalize)
        assert margin > 1e-4
    k = k.to(DEVICE) if isinstance(k, torch.Tensor) else k
    opts = dict(temperature=tau, normalize=normalize, denominator=den, weighting="unit" if kind == "N" else "normalized",
                positive_weight=0.4, reduction="none", threshold=thr, threshold_scale=0.1)
    u = torch.randn(34, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    check(z, za, k, None if labels is None else labels.to(DEVICE), opts, u, 1e-5, 1e-5)


def test_soft_k_gradient_shapes_sum_over_views():
    """dL/dk for k of shape () and (B,) is the sum over the rows sharing it (contract.prepare's
    differentiable expansion), (N,) per row; all against the reference."""
    z, za = make_views(13, 9, torch.float32, seed=41, device=DEVICE)
    labels = make_labels("B", 13, 2).to(DEVICE)
    for kind in ("0d", "B", "N"):
        k = soft_k(z, za, kind, 0.05, True, labels, 6).to(DEVICE)
        opts = dict(temperature=0.3, normalize=True, denominator="negatives", weighting="normalized",
                    positive_weight=0.5, reduction="mean", threshold="soft", threshold_scale=0.05)
        check(z, za, k, labels, opts, None, 1e-5, 1e-5)


def test_deterministic_bitwise_with_every_option():
    z, za = make_views(40, 70, torch.float32, seed=5, device=DEVICE)
    labels = make_labels("N", 40, 3).to(DEVICE)
    k = soft_k(z, za, "N", 0.05, True, labels, 9).to(DEVICE)
    u = torch.randn(80, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    outs = []
    for _ in range(2):
        zt, zat, kt = z.clone().requires_grad_(), za.clone().requires_grad_(), k.clone().requires_grad_()
        loss, st = adaptive_info_nce(zt, zat, kt, labels=labels, threshold="soft", temperature=0.2, reduction="none",
                                     backend="triton", return_stats=True)
        loss.backward(u)
        outs.append((loss.detach(), zt.grad, zat.grad, kt.grad, st.m, st.histogram))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_nan_threshold_soft_row_is_nan_and_hard_row_keeps_label_positives():
    """A NaN k_i: soft, row i's loss is NaN (the others finite and right); hard, row i keeps only
    its label positives."""
    z, za = make_views(11, 13, torch.float32, seed=3, device=DEVICE)
    labels = make_labels("B", 11, 8).to(DEVICE)
    ks = soft_k(z, za, "N", 0.1, True, labels, 2)
    ks[4] = float("nan")
    opts = dict(temperature=0.3, reduction="none", threshold="soft", threshold_scale=0.1)
    rows = adaptive_info_nce(z, za, ks.to(DEVICE), labels=labels, backend="triton", **opts)
    ref = adaptive_info_nce(z.double(), za.double(), ks.double(), labels=labels, backend="reference", **opts)
    assert torch.isnan(rows[4]) and torch.isnan(ref[4])
    keep = torch.ones(22, dtype=torch.bool)
    keep[4] = False
    assert torch.isfinite(rows[keep.to(DEVICE)]).all()
    assert rel_err(rows[keep.to(DEVICE)].cpu(), ref[keep]) <= 1e-5
    kh, _ = pick_k(z.cpu(), za.cpu(), "N", True)
    kh[7] = float("nan")
    opts = dict(temperature=0.3, reduction="none")
    rows = adaptive_info_nce(z, za, kh.to(DEVICE), labels=labels, backend="triton", **opts)
    ref = adaptive_info_nce(z.double(), za.double(), kh.double(), labels=labels, backend="reference", **opts)
    assert torch.isfinite(rows).all() and rel_err(rows.cpu(), ref) <= 1e-5


def test_labels_are_compared_as_values():
    """Labels are compared by value whatever their dtype or range (int8 to int64, negative,
    beyond 2^31): the same loss as small dense ids with the same equalities."""
    z, za = make_views(9, 12, torch.float32, seed=4, device=DEVICE)
    ids = torch.tensor([0, 1, 0, 2, 1, 3, 3, 0, 4])
    want = adaptive_info_nce(z, za, 0.4, labels=ids.to(DEVICE), backend="triton", reduction="none")
    for lab in (ids.to(torch.int8) - 5, ids * (2**40) - 2**41, (ids * 7).to(torch.int32)):
        got = adaptive_info_nce(z, za, 0.4, labels=lab.to(DEVICE), backend="triton", reduction="none")
        assert torch.equal(got, want)
    ref = adaptive_info_nce(z.double(), za.double(), 0.4, labels=ids, backend="reference", reduction="none")
    assert rel_err(want.cpu(), ref) <= 1e-5


# ----------------------------------------------------------------------------- statistics
def _near_edges(c, spec, eps=1e-5):
    pos = (c - spec.range[0]) * (spec.bins / (spec.range[1] - spec.range[0]))
    return int(((pos - pos.round()).abs() < eps * spec.bins).sum())


def _candidate_values(z, za, normalize):
    c = similarity64(z.cpu(), za.cpu(), normalize)
    n = c.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    off[torch.arange(n), (torch.arange(n) + n // 2) % n] = False
    return c[off]


@pytest.mark.parametrize("mode", ["shared", "atomic"])
@pytest.mark.parametrize("threshold,normalize,bins,rng", [
    ("hard", True, 2048, (-1.0, 1.0)), ("soft", True, 64, (-1.0, 1.0)), ("hard", False, 256, (-0.6, 0.9))])
def test_stats_match_reference(mode, threshold, normalize, bins, rng, monkeypatch):
    """m_i and the histogram against the reference's dense values: m to float32 rounding, the
    counts exactly but for similarities within rounding of a bin edge; both ways the kernel
    counts ("shared": tl.histogram, "atomic": global atomics)."""
    monkeypatch.setenv("ADAPTIVE_CL_HIST", mode)
    z, za = make_views(17, 7, torch.float32, seed=8, normalize=normalize, device=DEVICE)
    labels = make_labels("B", 17, 1).to(DEVICE)
    if threshold == "soft":
        k = soft_k(z, za, "N", 0.1, normalize, labels, 3).to(DEVICE)
    else:
        k, _ = pick_k(z.cpu(), za.cpu(), "B", normalize)
        k = k.to(DEVICE)
    opts = dict(threshold=threshold, threshold_scale=0.1, normalize=normalize, temperature=0.5,
                return_stats=True, stats_bins=bins, stats_range=rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loss, st = adaptive_info_nce(z, za, k, labels=labels, backend="triton", **opts)
        ref_loss, ref = adaptive_info_nce(z.double(), za.double(), k.double(), labels=labels, backend="reference",
                                          **opts)
    n = 34
    assert st.m.shape == (n,) and st.m.dtype == torch.float32 and st.histogram.dtype == torch.int64
    assert st.histogram.shape == (bins,) and st.range == rng and int(st.histogram.sum()) == n * (n - 2)
    assert rel_err(st.m.cpu(), ref.m) <= 1e-6
    spec = make_stats_spec(bins, rng)
    slack = _near_edges(_candidate_values(z, za, normalize), spec)
    assert int((st.histogram.cpu() - ref.histogram).abs().sum()) <= 2 * slack
    if threshold == "hard":
        assert torch.equal(st.m.cpu(), ref.m.float())  # integer counts


def test_stats_of_a_row_partition_add_up():
    """forward_rows' histograms over a partition of the rows (a distributed caller's ranks) sum
    to the whole call's: each program counts its rows' pairs j > i."""
    z, za = make_views(21, 19, torch.float32, seed=10, device=DEVICE)
    o = make_options(temperature=0.3)
    pr = kfunc.prepare_rows(z, za, None, 0.2, o)
    full = kfunc.hist_buffer(pr, 512)
    kfunc.forward_rows(pr, o, hist=full)
    parts = []
    for a, b in ((0, 7), (7, 30), (30, 42)):
        h = kfunc.hist_buffer(pr, 512, a, b)
        kfunc.forward_rows(pr, o, a, b, hist=h)
        parts.append(kfunc.finish_histogram(pr, h))
    assert torch.equal(sum(parts), kfunc.finish_histogram(pr, full))
    assert int(sum(parts).sum()) == 42 * 40


def test_stats_non_finite_inputs_count_nothing():
    z, za = make_views(9, 8, torch.float32, seed=11, device=DEVICE)
    za[3, 2] = float("nan")
    for backend in ("triton", "reference"):
        loss, st = adaptive_info_nce(z, za, 0.2, backend=backend, return_stats=True)
        assert torch.isnan(loss) and torch.isnan(st.m).all() and not st.histogram.any()
        assert torch.isnan(st.percentile(0.9))


def test_pooled_percentile_within_one_bin_of_quantile():
    """Histograms from the kernel summed over batches of different sizes (an epoch) give
    k_stat within one bin width of torch.quantile / kthvalue of the float64 similarities."""
    total = torch.zeros(2048, dtype=torch.int64)
    values = []
    for i, (b, d) in enumerate(((17, 32), (40, 70), (23, 7), (3, 7))):
        z, za = make_views(b, d, torch.float32, seed=50 + i, device=DEVICE)
        total += similarity_histogram(z, za, backend="triton").cpu()
        values.append(_candidate_values(z, za, True))
    values = torch.cat(values)
    for q in (0.0, 0.1, 0.5, 0.9, 0.97, 1.0):
        got = float(histogram_percentile(total, q))
        assert abs(got - float(torch.quantile(values, q))) <= 2.0 / 2048, q


def test_percentile_across_gaps():
    """Consecutive order statistics far apart (a bin in between is empty): the estimate is
    interpolated between their bins, not placed inside one of them."""
    for vals, q in (([0.0] * 3 + [0.9] * 2, 0.5), ([-0.95, 0.95], 0.5), ([0.2], 0.9), ([0.1, 0.1, 0.3], 0.75),
                    ([-1.0, 1.0, 0.999999], 1.0)):
        x = torch.tensor(vals, dtype=torch.float64)
        spec = make_stats_spec(64)
        from adaptive_cl.stats import bin_indices

        counts = torch.bincount(bin_indices(x, spec), minlength=64)
        assert abs(float(histogram_percentile(counts, q)) - float(torch.quantile(x, q))) <= 0.75 * spec.width, vals
    assert torch.isnan(histogram_percentile(torch.zeros(8, dtype=torch.int64), 0.5))


def test_stats_api_every_backend_and_module():
    z, za = make_views(6, 5, torch.float32, seed=12, device=DEVICE)
    m = AdaptiveInfoNCE(threshold="soft", stats_bins=128)
    k = torch.full((6,), 0.2, device=DEVICE)
    loss, st = m(z, za, k, return_stats=True)
    assert st.bins == 128 and st.m.shape == (12,) and st.width == pytest.approx(2 / 128)
    assert torch.is_tensor(m(z, za, k))
    outs = {}
    for backend in ("reference", "triton"):
        outs[backend] = adaptive_info_nce(z, za, k, threshold="soft", backend=backend, return_stats=True,
                                          stats_bins=128)
    assert rel_err(outs["triton"][1].m.cpu(), outs["reference"][1].m.cpu()) <= 1e-6
    assert float(outs["triton"][0]) == pytest.approx(float(outs["reference"][0]), rel=1e-5)
    with pytest.raises(ValueError, match="stats_bins must be a power of two"):
        adaptive_info_nce(z, za, return_stats=True, stats_bins=100)
    with pytest.raises(ValueError, match="stats_range must have lo < hi"):
        adaptive_info_nce(z, za, return_stats=True, stats_range=(1.0, -1.0))
    with pytest.raises(TypeError, match="return_stats must be a bool"):
        adaptive_info_nce(z, za, return_stats=1)
    with pytest.raises(ValueError, match="q must be a number in"):
        histogram_percentile(st.histogram, 1.5)


# ---------------------------------------------------------------------- routing
def test_triton_accepts_every_option():
    z, za = make_views(5, 4, torch.float32, seed=0, device=DEVICE)
    for extra in (dict(labels=torch.arange(5, device=DEVICE)), dict(threshold="soft"),
                  dict(labels=torch.arange(10, device=DEVICE), threshold="soft", denominator="all")):
        p = prepare(z, za, 0.3, extra.pop("labels", None), make_options(**extra))
        assert backends.triton_unavailable_reason(p) is None or not (fwd.INTERPRET or z.is_cuda)
        if z.is_cuda:
            from adaptive_cl.kernels import adaptive_info_nce_triton

            assert backends.resolve("auto", p) is adaptive_info_nce_triton


def test_dense_label_ids():
    lab = torch.tensor([5, -3, 5, 2**40, -3, 7, 2**40])
    ids = kfunc.dense_label_ids(lab.to(DEVICE)).cpu()
    assert ids.dtype == torch.int32
    assert torch.equal(ids[:, None] == ids[None, :], lab[:, None] == lab[None, :])
    assert int(ids.max()) == len(set(lab.tolist())) - 1


@pytest.mark.parametrize("bins", [2, 4096])
def test_histogram_bin_limits(bins):
    z, za = make_views(5, 3, torch.float32, seed=13, device=DEVICE)
    _, st = adaptive_info_nce(z, za, backend="triton", return_stats=True, stats_bins=bins)
    _, ref = adaptive_info_nce(z.double(), za.double(), backend="reference", return_stats=True, stats_bins=bins)
    slack = _near_edges(_candidate_values(z, za, True), make_stats_spec(bins))
    assert int((st.histogram.cpu() - ref.histogram).abs().sum()) <= 2 * slack
    assert math.isclose(st.width, 2.0 / bins)
