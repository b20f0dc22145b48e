"""The issue-24 setups on the reference: against the loop formulation of tests/setup_cases.py
over a covering design (new options x old ones), against PyTorch's cross-entropy where the
loss reduces to a textbook one, the mask's meaning, gradchecks of dL/dtau and dL/dk, and the
validation errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaptive_cl import AdaptiveInfoNCE, adaptive_info_nce
from adaptive_cl.stats import bin_indices
from kernels._cases import case_id, covers_all_pairs, rel_err
from setup_cases import FACTORS, allowed, covering_cases, loop_loss, loop_rows, make_case, normwise_bound

CASES = covering_cases()


def test_the_design_covers_every_pair():
    assert covers_all_pairs(CASES, FACTORS, allowed) == []
    assert len(CASES) < 40  # a covering design, not the product


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_reference_matches_the_loop_formulation(case):
    seed = CASES.index(case)
    z, z_aug, k, kw = make_case(case, seed)
    out, stats = adaptive_info_nce(z, z_aug, k, backend="reference", return_stats=True, stats_bins=64,
                                   stats_range=(-3.0, 3.0), **kw)
    want = loop_loss(z, z_aug, k, **kw)
    rows, m, sims = loop_rows(z, z_aug, k, **kw)
    length = z.shape[1] + 2 * z.shape[0] + case["queue"]
    scale = float(rows.abs().max())
    assert out.dtype == torch.float64 and out.shape == want.shape
    assert float((out - want).norm()) <= normwise_bound(length, scale * max(1, want.numel()) ** 0.5)
    assert torch.allclose(stats.m, m, rtol=0, atol=normwise_bound(length, 1.0))
    # the histogram counts the same candidate pairs (masked and excluded ones left out)
    c = torch.tensor(sims, dtype=torch.float64)
    from adaptive_cl.contract import make_stats_spec

    spec = make_stats_spec(64, (-3.0, 3.0))
    want_hist = torch.bincount(bin_indices(c, spec), minlength=64) if len(sims) else torch.zeros(64, dtype=torch.int64)
    assert torch.equal(stats.histogram, want_hist)


@pytest.mark.parametrize("case", CASES[:6], ids=[case_id(c) for c in CASES[:6]])
def test_float32_reference_is_within_float32_rounding(case):
    """The float32 path accumulates in float32: norm-wise error against float64 bounded by
    float32 eps times the reduction length."""
    seed = CASES.index(case)
    z, z_aug, k, kw = make_case(case, seed)
    want = adaptive_info_nce(z, z_aug, k, backend="reference", **kw)
    kw32 = {n: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for n, v in kw.items()}
    k32 = k.float() if isinstance(k, torch.Tensor) else k
    out = adaptive_info_nce(z.float(), z_aug.float(), k32, backend="reference", **kw32)
    length = z.shape[1] + 2 * z.shape[0] + case["queue"]
    bound = normwise_bound(length, float(want.abs().max()) / 0.3, eps=torch.finfo(torch.float32).eps)
    assert float((out.double() - want).norm()) <= bound * max(1, want.numel()) ** 0.5


# ------------------------------------------------------------------------- textbook special cases
def _unit(x):
    return F.normalize(x, dim=1)


def test_cross_is_the_two_tower_softmax():
    z, za = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    logits = _unit(z) @ _unit(za).T / 0.2
    target = torch.arange(6)
    got = adaptive_info_nce(z, za, layout="cross", temperature=0.2, positive_weight=1.0, backend="reference")
    assert rel_err(got, F.cross_entropy(logits, target)) < 1e-13


def test_symmetric_is_clip():
    z, za = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    logits = _unit(z) @ _unit(za).T / 0.1
    t = torch.arange(5)
    clip = (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t)) / 2
    got = adaptive_info_nce(z, za, layout="cross", symmetric=True, temperature=0.1, positive_weight=1.0,
                            backend="reference")
    assert rel_err(got, clip) < 1e-13
    rows = adaptive_info_nce(z, za, layout="cross", symmetric=True, temperature=0.1, positive_weight=1.0,
                             reduction="none", backend="reference")
    want = torch.cat([F.cross_entropy(logits, t, reduction="none"), F.cross_entropy(logits.T, t, reduction="none")])
    assert rel_err(rows, want) < 1e-13
    total = adaptive_info_nce(z, za, layout="cross", symmetric=True, temperature=0.1, positive_weight=1.0,
                              reduction="sum", backend="reference")
    assert rel_err(total, want.sum() / 2) < 1e-13


def test_log_q_and_a_queue_are_sampled_softmax_columns():
    b, m = 5, 4
    z, za, q = (torch.randn(n, 3, dtype=torch.float64) for n in (b, b, m))
    log_q = torch.log(torch.rand(b + m, dtype=torch.float64))
    logits = _unit(z) @ _unit(torch.cat([za, q])).T / 0.5 - log_q
    got = adaptive_info_nce(z, za, layout="cross", negatives=q, log_q=log_q, temperature=0.5,
                            positive_weight=1.0, backend="reference")
    assert rel_err(got, F.cross_entropy(logits, torch.arange(b))) < 1e-13


def test_views_with_a_queue_is_nt_xent_with_extra_columns():
    b, m = 4, 3
    z, za, q = (torch.randn(n, 3, dtype=torch.float64) for n in (b, b, m))
    zz = _unit(torch.cat([z, za]))
    logits = zz @ torch.cat([zz, _unit(q)]).T / 0.5
    logits[torch.arange(2 * b), torch.arange(2 * b)] = float("-inf")
    target = (torch.arange(2 * b) + b) % (2 * b)
    got = adaptive_info_nce(z, za, negatives=q, temperature=0.5, positive_weight=1.0, backend="reference")
    assert rel_err(got, F.cross_entropy(logits, target)) < 1e-13


def test_exclude_drops_accidental_hits():
    """Same-label columns leave the softmax: CE over logits with those set to -inf."""
    b = 6
    z, za = torch.randn(b, 3, dtype=torch.float64), torch.randn(b, 3, dtype=torch.float64)
    items = torch.tensor([3, 7, 3, 1, 7, 2])
    logits = _unit(z) @ _unit(za).T / 0.5
    hit = (items[:, None] == items[None, :]) & ~torch.eye(b, dtype=torch.bool)
    want = F.cross_entropy(logits.masked_fill(hit, float("-inf")), torch.arange(b))
    got = adaptive_info_nce(z, za, layout="cross", labels=items, same_label="exclude", temperature=0.5,
                            positive_weight=1.0, backend="reference")
    assert rel_err(got, want) < 1e-13


@pytest.mark.parametrize("layout", ["views", "cross", "cross-sym"])
def test_a_masked_pair_is_the_batch_without_it(layout):
    """Padding means absent: the masked batch's loss and gradients equal those of the batch with
    the padded pairs removed, whatever values (NaN included) the padding holds."""
    g = torch.Generator().manual_seed(3)
    z, za = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, False, True, True])
    z[1] = float("nan")
    za[4] = float("inf")
    k = torch.rand(7, generator=g, dtype=torch.float64) * 0.5
    kw = dict(layout="cross" if layout != "views" else "views", symmetric=layout == "cross-sym",
              threshold="soft", temperature=0.4)
    k[1] = float("nan")  # a padded row's threshold is never read either
    zl, zal, kl = z.clone().requires_grad_(), za.clone().requires_grad_(), k.clone().requires_grad_()
    loss = adaptive_info_nce(zl, zal, kl, mask=mask, backend="reference", **kw)
    loss.backward()
    zs, zas, ks = (t[mask].clone().requires_grad_() for t in (z, za, k))
    want = adaptive_info_nce(zs, zas, ks, backend="reference", **kw)
    want.backward()
    assert rel_err(loss, want) < 1e-13
    for full, small in ((zl, zs), (zal, zas), (kl, ks)):
        assert torch.all(full.grad[~mask] == 0)
        assert rel_err(full.grad[mask], small.grad) < 1e-12
    none = adaptive_info_nce(z, za, k, mask=mask, reduction="none", backend="reference", **kw)
    assert torch.all(none.reshape(-1, 7)[:, ~mask] == 0)


def test_a_fully_masked_batch_has_loss_zero():
    z, za = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    loss = adaptive_info_nce(z, za, 0.1, mask=torch.zeros(3, dtype=torch.bool), backend="reference")
    assert loss.item() == 0.0


def test_non_finite_queue_poisons_every_row():
    z, za, q = torch.randn(4, 3), torch.randn(4, 3), torch.randn(2, 3)
    q[1, 0] = float("nan")
    out = adaptive_info_nce(z, za, negatives=q, reduction="none", backend="reference")
    assert torch.isnan(out).all()


# ------------------------------------------------------------------------------------ gradients
GRAD_CASES = [
    dict(layout="cross", negatives=2, log_q=True),
    dict(layout="cross", symmetric=True, mask=True),
    dict(labels="exclude", negatives=3),
    dict(layout="cross", labels="positive", weighting="unit", denominator="all"),
]


@pytest.mark.parametrize("spec", GRAD_CASES, ids=lambda s: "-".join(f"{a}={b}" for a, b in s.items()))
def test_gradcheck_in_z_tau_and_soft_k(spec):
    from helpers import SOFT_KINK_MARGIN

    b, d = 3, 3
    for seed in range(20):  # the first seed whose soft m_i stay away from the kink max(m, 1)
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True)
        za = torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True)
        tau = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        rows = 2 * b if spec.get("layout") != "cross" or spec.get("symmetric") else b
        k = (torch.rand(rows, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
        kw = dict(layout=spec.get("layout", "views"), symmetric=spec.get("symmetric", False), threshold="soft",
                  threshold_scale=0.2, weighting=spec.get("weighting", "normalized"),
                  denominator=spec.get("denominator", "negatives"))
        mq = spec.get("negatives", 0)
        if mq:
            kw["negatives"] = torch.randn(mq, d, generator=g, dtype=torch.float64)
        if spec.get("log_q"):
            kw["log_q"] = torch.randn(b + mq, generator=g, dtype=torch.float64)
        if spec.get("mask"):
            kw["mask"] = torch.tensor([True, False, True])
        if "labels" in spec:
            kw["labels"] = torch.tensor([0, 1, 0])
            kw["same_label"] = spec["labels"]
        _, m, _ = loop_rows(z.detach(), za.detach(), k.detach(), **kw)
        if bool(((m - 1).abs() > SOFT_KINK_MARGIN).all()):
            break

    def f(z_, za_, tau_, k_):
        return adaptive_info_nce(z_, za_, k_, temperature=tau_, backend="reference", **kw)

    assert torch.autograd.gradcheck(f, (z, za, tau, k))
    # dL/dtau = -sum_ij dL/ds_ij c_ij / tau^2: the logits' gradient read through a float temperature
    loss = f(z, za, tau, k)
    (dtau,) = torch.autograd.grad(loss, tau)
    eps = 1e-6
    plus = adaptive_info_nce(z, za, k, temperature=0.5 + eps, backend="reference", **kw)
    minus = adaptive_info_nce(z, za, k, temperature=0.5 - eps, backend="reference", **kw)
    assert abs(float(dtau) - float(plus - minus) / (2 * eps)) < 1e-7


def test_module_learns_its_temperature():
    tau = torch.nn.Parameter(torch.tensor(0.5))
    loss_fn = AdaptiveInfoNCE(temperature=tau, layout="cross", symmetric=True)
    assert [p is tau for p in loss_fn.parameters()] == [True]
    z, za = torch.randn(4, 3), torch.randn(4, 3)
    loss_fn(z, za, 0.3).backward()
    assert tau.grad is not None and torch.isfinite(tau.grad)
    assert "temperature=learned" in repr(loss_fn)


def test_a_float_temperature_and_the_same_tensor_agree():
    z, za = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    a = adaptive_info_nce(z, za, 0.2, temperature=0.37, layout="cross", backend="reference")
    b = adaptive_info_nce(z, za, 0.2, temperature=torch.tensor(0.37, dtype=torch.float64), layout="cross",
                          backend="reference")
    assert a.item() == b.item()


# ----------------------------------------------------------------------------------- validation
def _bad(match, **kw):
    z, za = torch.randn(4, 3), torch.randn(4, 3)
    k = kw.pop("k", None)
    with pytest.raises((ValueError, TypeError), match=match):
        adaptive_info_nce(z, za, k, backend="reference", **kw)


def test_errors_name_the_arguments():
    q = torch.randn(2, 3)
    _bad("layout must be one of", layout="rows")
    _bad("symmetric=True needs layout='cross'", symmetric=True)
    _bad("symmetric must be a bool", layout="cross", symmetric=1)
    _bad("negatives cannot be combined with symmetric=True", layout="cross", symmetric=True, negatives=q)
    _bad("negatives must not require grad", negatives=q.clone().requires_grad_())
    _bad(r"negatives must have shape \(M, D\)", negatives=torch.randn(2, 4))
    _bad(r"negatives must have shape \(M, D\)", negatives=torch.randn(0, 3))
    _bad("negatives must have z's dtype", negatives=q.double())
    _bad("log_q needs layout='cross' and symmetric=False", log_q=torch.zeros(4))
    _bad("log_q needs layout='cross' and symmetric=False", layout="cross", symmetric=True, log_q=torch.zeros(4))
    _bad(r"log_q must have shape \(B \+ M,\)=\(6,\) with negatives", layout="cross", negatives=q, log_q=torch.zeros(4))
    _bad(r"log_q must have shape \(B,\)=\(4,\)", layout="cross", log_q=torch.zeros(5))
    _bad("log_q must not require grad", layout="cross", log_q=torch.zeros(4, requires_grad=True))
    _bad("log_q must be a floating-point tensor", layout="cross", log_q=torch.zeros(4, dtype=torch.int64))
    _bad("same_label must be one of", same_label="drop")
    _bad("same_label='exclude' needs labels", same_label="exclude")
    _bad("mask must be None or a bool tensor", mask=torch.ones(4))
    _bad(r"mask must have shape \(B,\)=\(4,\)", mask=torch.ones(8, dtype=torch.bool))
    _bad("temperature must be a 0-d tensor", temperature=torch.ones(1))
    _bad("temperature must be a float or a floating-point tensor", temperature=torch.tensor(1))
    _bad(r"k must have shape \(B,\)=\(4,\) with layout='cross'", layout="cross", k=torch.zeros(8))
    _bad(r"labels must have shape \(B,\)=\(4,\) with layout='cross'", layout="cross",
         labels=torch.zeros(8, dtype=torch.int64))
    _bad(r"labels must have shape .* or \(N \+ M,\)=\(10,\)", negatives=q, labels=torch.zeros(5, dtype=torch.int64))


def test_symmetric_k_takes_one_per_row_of_each_direction():
    z, za = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    k = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    a = adaptive_info_nce(z, za, k, layout="cross", symmetric=True, backend="reference")
    b = adaptive_info_nce(z, za, torch.cat([k, k]), layout="cross", symmetric=True, backend="reference")
    assert a.item() == b.item()
