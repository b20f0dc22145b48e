"""The reference against hand computations and independent formulations of the loss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from adaptive_cl import adaptive_info_nce
from helpers import SOFT_KINK_MARGIN, safe_threshold, similarity, soft_membership_sums, views

REF = dict(backend="reference")


def angles_views(degrees):
    """Unit vectors at the given angles: rows [0..B) are z, [B..N) are z_aug."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    rows = torch.stack([torch.cos(rad), torch.sin(rad)], dim=1)
    b = len(degrees) // 2
    return rows[:b].clone(), rows[b:].clone()


def cosd(deg: float) -> float:
    return math.cos(math.radians(deg))


# Rows at 0, 60 | 10, 90 degrees: partners (0, 10) and (60, 90). With k = 0.6 row 1 (60 deg)
# gains row 2 (cos 50 = 0.643) as an extra positive and vice versa; rows 0 and 3 gain nothing.
HAND_Z, HAND_Z_AUG = angles_views([0, 60, 10, 90])


def hand_rows(weighting: str, denominator: str, alpha: float = 0.5):
    e = math.exp
    c01, c02, c03, c12, c13, c23 = 0.5, cosd(10), 0.0, cosd(50), cosd(30), cosd(80)
    if denominator == "negatives":
        lse = [
            math.log(e(c02) + e(c01) + e(c03)),
            math.log(e(c13) + e(c01)),
            math.log(e(c02) + e(c23)),
            math.log(e(c13) + e(c03) + e(c23)),
        ]
    else:
        lse = [
            math.log(e(c02) + e(c01) + e(c03)),
            math.log(e(c13) + e(c01) + e(c12)),
            math.log(e(c02) + e(c12) + e(c23)),
            math.log(e(c13) + e(c03) + e(c23)),
        ]
    partner = [c02, c13, c02, c13]
    extra = [None, c12, c12, None]  # the single extra positive's similarity, if any
    rows = []
    for i in range(4):
        if weighting == "normalized":
            value = alpha * (lse[i] - partner[i])
            if extra[i] is not None:
                value += (1 - alpha) * (lse[i] - extra[i])
        else:
            value = (lse[i] - partner[i]) - math.log(alpha)
            if extra[i] is not None:
                value += lse[i] - extra[i] - math.log(1 - alpha)
        rows.append(value)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("weighting", ["normalized", "unit"])
@pytest.mark.parametrize("denominator", ["negatives", "all"])
def test_hand_computed_rows(weighting, denominator):
    got = adaptive_info_nce(
        HAND_Z, HAND_Z_AUG, 0.6, weighting=weighting, denominator=denominator, reduction="none", **REF
    )
    torch.testing.assert_close(got, hand_rows(weighting, denominator), rtol=1e-12, atol=1e-12)


def test_hand_computed_no_threshold():
    # Orthogonal pairs, identical partners: every row has LSE = log(e + 2) and partner logit 1.
    z = torch.eye(2, dtype=torch.float64)
    got = adaptive_info_nce(z, z.clone(), positive_weight=1.0, reduction="none", **REF)
    torch.testing.assert_close(got, torch.full((4,), math.log(math.e + 2) - 1, dtype=torch.float64))


def nt_xent(z, z_aug, temperature, normalize=True):
    stacked = torch.cat([z, z_aug])
    if normalize:
        stacked = F.normalize(stacked, dim=1)
    logits = stacked @ stacked.T / temperature
    logits = logits.masked_fill(torch.eye(len(logits), dtype=torch.bool), float("-inf"))
    n = len(logits)
    return F.cross_entropy(logits, (torch.arange(n) + n // 2) % n, reduction="none")


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("temperature", [0.07, 0.5, 1.0, 3.0])
def test_no_threshold_is_nt_xent(normalize, temperature):
    z, z_aug = views(9, 5, seed=1)
    expected = nt_xent(z, z_aug, temperature, normalize)
    got = adaptive_info_nce(z, z_aug, temperature=temperature, normalize=normalize, positive_weight=1.0,
                            reduction="none", **REF)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # Default alpha: rows without extra positives keep only the partner weight alpha.
    half = adaptive_info_nce(z, z_aug, temperature=temperature, normalize=normalize, reduction="none", **REF)
    torch.testing.assert_close(half, 0.5 * expected, rtol=1e-12, atol=1e-12)


def soft_label_targets(c, k_rows, labels_rows, alpha):
    """Target distribution of the released code, built row by row (independently of the reference)."""
    n = c.shape[0]
    targets = torch.zeros_like(c)
    for i in range(n):
        p = (i + n // 2) % n
        extra = [
            j for j in range(n)
            if j not in (i, p) and ((k_rows is not None and c[i, j] > k_rows[i])
                                    or (labels_rows is not None and labels_rows[i] == labels_rows[j]))
        ]
        targets[i, p] = alpha
        for j in extra:
            targets[i, j] = (1 - alpha) / len(extra)
    return targets


@pytest.mark.parametrize("alpha", [0.5, 0.8, 1.0])
@pytest.mark.parametrize("with_labels", [False, True])
def test_all_normalized_is_soft_label_cross_entropy(alpha, with_labels):
    z, z_aug = views(11, 6, seed=2)
    k, _ = safe_threshold(z, z_aug, "B", seed=3)
    labels = torch.tensor([0, 1, 2, 0, 3, 1, 4, 5, 6, 0, 7]) if with_labels else None
    c = similarity(z, z_aug)
    k_rows = torch.cat([k, k])
    labels_rows = torch.cat([labels, labels]) if with_labels else None
    tau = 0.3
    # The self logit: a large finite negative (exp underflows to exactly 0; -inf would give 0 * inf).
    logits = (c / tau).masked_fill(torch.eye(22, dtype=torch.bool), -1e4)
    targets = soft_label_targets(c, k_rows, labels_rows, alpha)
    expected = F.cross_entropy(logits, targets, reduction="none")
    got = adaptive_info_nce(z, z_aug, k, labels=labels, temperature=tau, denominator="all",
                            positive_weight=alpha, reduction="none", **REF)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("denominator", ["negatives", "all"])
@pytest.mark.parametrize("weighting", ["normalized", "unit"])
def test_threshold_at_or_above_one_adds_no_positives(denominator, weighting):
    z, z_aug = views(7, 4, seed=4)
    z_aug[0] = z[1]  # an exact duplicate: cosine 1 (up to rounding, clamped) is not above k = 1
    base = adaptive_info_nce(z, z_aug, None, denominator=denominator, weighting=weighting, **REF)
    for k in (1.0, 1.5, torch.full((7,), 1.0, dtype=torch.float64)):
        got = adaptive_info_nce(z, z_aug, k, denominator=denominator, weighting=weighting, **REF)
        torch.testing.assert_close(got, base, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("denominator", ["negatives", "all"])
@pytest.mark.parametrize("weighting", ["normalized", "unit"])
def test_soft_threshold_converges_to_hard(denominator, weighting):
    z, z_aug = views(8, 5, seed=5)
    k, margin = safe_threshold(z, z_aug, "N", seed=6)
    opts = dict(denominator=denominator, weighting=weighting, reduction="none", **REF)
    hard = adaptive_info_nce(z, z_aug, k, **opts)
    errors = []
    for scale in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        soft = adaptive_info_nce(z, z_aug, k, threshold="soft", threshold_scale=scale, **opts)
        errors.append(float((soft - hard).abs().max()))
    # Monotone down to rounding level (below it the order of two tiny errors is the CPU's).
    assert all(b <= a or b < 1e-13 for a, b in zip(errors, errors[1:])), errors
    # Once the scale is far below every gap the sigmoid is 0/1 to double precision.
    assert margin / 1e-6 > 40
    assert errors[-1] < 1e-12


def test_labels_join_extra_positives_without_threshold():
    z, z_aug = views(6, 4, seed=7)
    labels = torch.tensor([3, 1, 3, 2, 1, 5])
    c = similarity(z, z_aug)
    targets = soft_label_targets(c, None, torch.cat([labels, labels]), 0.5)
    logits = c.masked_fill(torch.eye(12, dtype=torch.bool), -1e4)
    expected = F.cross_entropy(logits, targets, reduction="none")
    got = adaptive_info_nce(z, z_aug, labels=labels, denominator="all", reduction="none", **REF)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_negatives_denominator_excludes_extra_positives():
    # Every candidate above k leaves the denominator: with k below all similarities only the
    # partner is left, so LSE_i = s_ip and the partner term vanishes.
    z, z_aug = views(5, 3, seed=8)
    got = adaptive_info_nce(z, z_aug, -2.0, positive_weight=1.0, reduction="none", **REF)
    torch.testing.assert_close(got, torch.zeros(10, dtype=torch.float64), rtol=0, atol=1e-12)


def test_reductions_agree():
    z, z_aug = views(6, 3, seed=9)
    k, _ = safe_threshold(z, z_aug, "scalar", seed=1)
    rows = adaptive_info_nce(z, z_aug, k, reduction="none", **REF)
    assert rows.shape == (12,)
    torch.testing.assert_close(adaptive_info_nce(z, z_aug, k, reduction="sum", **REF), rows.sum())
    torch.testing.assert_close(adaptive_info_nce(z, z_aug, k, **REF), rows.mean())


def test_threshold_shapes_agree():
    z, z_aug = views(6, 3, seed=10)
    k, _ = safe_threshold(z, z_aug, "scalar", seed=2)
    expected = adaptive_info_nce(z, z_aug, k, reduction="none", **REF)
    for same in (torch.tensor(k, dtype=torch.float64), torch.full((6,), k, dtype=torch.float64),
                 torch.full((12,), k, dtype=torch.float32)):
        torch.testing.assert_close(adaptive_info_nce(z, z_aug, same, reduction="none", **REF), expected)


def _gradcheck_cases():
    for k_shape, labels, denominator, weighting, threshold, normalize in itertools.product(
        [None, "scalar", "0d", "B", "N"], [False, True], ["negatives", "all"], ["normalized", "unit"],
        ["hard", "soft"], [True, False],
    ):
        if threshold == "soft" and k_shape in (None, "scalar"):
            continue  # soft needs k; a Python float has no gradient to check (still valid input)
        yield k_shape, labels, denominator, weighting, threshold, normalize


@pytest.mark.filterwarnings("ignore:normalize=False")
@pytest.mark.parametrize("k_shape,labels,denominator,weighting,threshold,normalize", list(_gradcheck_cases()))
def test_gradcheck_every_option(k_shape, labels, denominator, weighting, threshold, normalize):
    # Finite differences must not straddle a kink of the loss: every hard decision c_ij > k_i
    # has a margin, and with the soft threshold every m_i stays away from 1 (max(m_i, 1)).
    z, z_aug = views(3, 4, seed=11)
    label_tensor = torch.tensor([1, 0, 1]) if labels else None
    inputs = [z.requires_grad_(True), z_aug.requires_grad_(True)]
    k = None
    if k_shape is not None:
        scale = 0.05 if threshold == "soft" else None
        k, margin = safe_threshold(z.detach(), z_aug.detach(), k_shape, normalize=normalize, seed=12,
                                   soft_scale=scale, labels=label_tensor)
        assert margin >= 1e-4
        if threshold == "soft":
            k_rows = torch.as_tensor(k, dtype=torch.float64).expand(6) if k_shape != "B" else torch.cat([k, k])
            m = soft_membership_sums(z.detach(), z_aug.detach(), k_rows, scale, normalize=normalize,
                                     labels=label_tensor)
            assert (m - 1).abs().min() >= SOFT_KINK_MARGIN, m
        if isinstance(k, torch.Tensor):
            k = k.clone().requires_grad_(True)
            inputs.append(k)

    def fn(*args):
        kk = args[2] if len(args) > 2 else k
        return adaptive_info_nce(args[0], args[1], kk, labels=label_tensor, denominator=denominator,
                                 weighting=weighting, threshold=threshold, normalize=normalize,
                                 temperature=0.7, positive_weight=0.6, reduction="none", **REF)

    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-6)
    if threshold == "hard" and len(inputs) == 3:
        fn(*inputs).sum().backward()
        assert torch.equal(inputs[2].grad, torch.zeros_like(inputs[2]))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck_reductions(reduction):
    z, z_aug = views(4, 3, seed=13)
    k, _ = safe_threshold(z, z_aug, "B", seed=14, soft_scale=0.05)
    k.requires_grad_(True)
    z.requires_grad_(True)
    z_aug.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b, kk: adaptive_info_nce(a, b, kk, threshold="soft", reduction=reduction, **REF),
        (z, z_aug, k),
    )


def test_soft_threshold_gradient_in_k_matches_spec_formula():
    """A closed form of dl/dk_i (normalized, negatives) against autograd: with E_ij =
    exp(s_ij - LSE_i), g_i = max(m_i, 1), W_i = alpha + (1 - alpha) m_i / g_i and
    T_i = sum_l a_il (LSE_i - s_il),
    dl/da_ij = -W_i E_ij + (1 - alpha) / g_i (LSE_i - s_ij - [m_i > 1] T_i / m_i) and
    dl/dk_i = -sum_j a_ij (1 - a_ij) / beta * dl/da_ij."""
    z, z_aug = views(4, 3, seed=15)
    k = torch.tensor([0.1, -0.2, 0.3, 0.0, 0.2, 0.1, -0.1, 0.4], dtype=torch.float64, requires_grad=True)
    alpha, beta = 0.5, 0.2
    # The closed form's [m_i > 1] and autograd's max(m_i, 1) agree only away from m_i = 1.
    assert (soft_membership_sums(z, z_aug, k.detach(), beta) - 1).abs().min() >= SOFT_KINK_MARGIN
    adaptive_info_nce(z, z_aug, k, threshold="soft", threshold_scale=beta, reduction="sum", **REF).backward()

    c = similarity(z, z_aug)
    n = len(c)
    s = c
    eye = torch.eye(n, dtype=torch.bool)
    partner = torch.zeros(n, n, dtype=torch.bool)
    partner[torch.arange(n), (torch.arange(n) + n // 2) % n] = True
    cand = ~(eye | partner)
    a = torch.sigmoid((c - k.detach()[:, None]) / beta) * cand
    q = partner.double() + (1 - a) * cand
    lse = torch.log((q * torch.exp(s)).sum(1))
    m = a.sum(1)
    g = m.clamp(min=1)
    big_w = alpha + (1 - alpha) * m / g
    e = torch.exp(s - lse[:, None])
    t = (a * (lse[:, None] - s)).sum(1)
    dl_da = -big_w[:, None] * e + (1 - alpha) / g[:, None] * (
        lse[:, None] - s - (m > 1).double()[:, None] * t[:, None] / m[:, None])
    a_prime = a * (1 - a) / beta
    expected = -(a_prime * dl_da * cand).sum(1)
    torch.testing.assert_close(k.grad, expected, rtol=1e-10, atol=1e-12)


def test_zero_row_is_finite():
    z, z_aug = views(4, 3, seed=16)
    z[1] = 0.0
    z.requires_grad_(True)
    loss = adaptive_info_nce(z, z_aug, 0.2, **REF)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_nan_threshold_row_has_no_extra_positives():
    z, z_aug = views(4, 3, seed=18)
    k = torch.full((8,), -2.0, dtype=torch.float64)
    k[0] = float("nan")
    rows = adaptive_info_nce(z, z_aug, k, reduction="none", **REF)
    no_threshold = adaptive_info_nce(z, z_aug, None, reduction="none", **REF)
    torch.testing.assert_close(rows[0], no_threshold[0])
    assert torch.isfinite(rows).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    z, z_aug = views(8, 16, seed=19)
    # The margin must hold for the rounded values both sides compute with.
    k, _ = safe_threshold(z.to(dtype).double(), z_aug.to(dtype).double(), "B", seed=20)
    expected = adaptive_info_nce(z.to(dtype).double(), z_aug.to(dtype).double(), k, **REF)
    zl = z.to(dtype).requires_grad_(True)
    loss = adaptive_info_nce(zl, z_aug.to(dtype), k.float(), **REF)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert zl.grad.dtype == dtype
