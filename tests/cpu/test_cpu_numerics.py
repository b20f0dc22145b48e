"""The contract's numeric rules (tests/test_numerics.py, written for the reference) on the C++
backend: non-finite inputs, every allowed temperature, rows of extreme magnitude."""

from __future__ import annotations

import pytest
import torch

from adaptive_cl import adaptive_info_nce
from adaptive_cl.contract import MIN_TEMPERATURE
from helpers import safe_threshold, views
from test_numerics import BAD, MAGNITUDES, NON_FINITE, float64_normalize_rows, rows_and_grads


@pytest.mark.filterwarnings("ignore:normalize=False")
@pytest.mark.parametrize("value, where, normalize, threshold, denominator, dtype", NON_FINITE)
def test_non_finite_element_makes_every_row_and_gradient_nan(ext, value, where, normalize, threshold,
                                                            denominator, dtype):
    z, z_aug = views(5, 4, seed=21)
    k, _ = safe_threshold(z, z_aug, "B", normalize=normalize, seed=22)
    z, z_aug = z.to(dtype), z_aug.to(dtype)
    (z if where == "z" else z_aug)[3, 1] = BAD[value]
    options = dict(normalize=normalize, threshold=threshold, denominator=denominator, backend="cpu")
    rows, dz, dz_aug = rows_and_grads(z, z_aug, k.to(dtype), **options)
    assert torch.isnan(rows).all() and torch.isnan(dz).all() and torch.isnan(dz_aug).all()
    assert dz.dtype == dtype
    for reduction in ("mean", "sum"):
        assert torch.isnan(adaptive_info_nce(z, z_aug, k.to(dtype), reduction=reduction, **options))


@pytest.mark.parametrize("denominator, weighting, threshold", [
    ("negatives", "normalized", "hard"), ("negatives", "unit", "soft"),
    ("all", "normalized", "soft"), ("all", "unit", "hard"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_any_allowed_temperature_gives_a_finite_loss(ext, denominator, weighting, threshold, dtype):
    z, z_aug = views(6, 5, seed=25, dtype=dtype)
    z_aug[0] = z[1]  # an exact duplicate: a cosine of 1, far above every other candidate
    options = dict(denominator=denominator, weighting=weighting, threshold=threshold, backend="cpu")
    for tau in (1e-2, 1e-4, 1e-8, 1e-20, MIN_TEMPERATURE):
        for k in (-0.3, 0.0, 0.5):
            rows, dz, dz_aug = rows_and_grads(z, z_aug, k, temperature=tau, **options)
            assert torch.isfinite(rows).all(), (tau, k, rows)
            assert torch.isfinite(dz).all() and torch.isfinite(dz_aug).all(), (tau, k)


def test_small_temperature_float32_matches_float64_reference(ext):
    z, z_aug = views(4, 8, seed=0, dtype=torch.float32)
    z64, z_aug64 = z.double(), z_aug.double()
    k, margin = safe_threshold(z64, z_aug64, "scalar", seed=3)
    assert margin >= 1e-4
    for threshold, scale in (("hard", 0.05), ("soft", 1e-3)):
        options = dict(temperature=0.002, threshold=threshold, threshold_scale=scale, reduction="none")
        got = adaptive_info_nce(z, z_aug, k, backend="cpu", **options)
        want = adaptive_info_nce(z64, z_aug64, k, backend="reference", **options)
        # float32 cosines carry ~1e-7 of rounding, which 1/tau = 500 turns into ~5e-5 per logit
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)
        assert want.abs().max() > 10


@pytest.mark.parametrize("denominator", ["negatives", "all"])
def test_extreme_rows_normalize_as_float64_f_normalize(ext, denominator):
    z, z_aug = views(len(MAGNITUDES), 6, seed=26)
    k, _ = safe_threshold(z, z_aug, "B", seed=27)
    scales = torch.tensor(MAGNITUDES, dtype=torch.float64)[:, None]
    z = (z / z.abs().amax(dim=1, keepdim=True) * scales).float()
    z_aug = (z_aug / z_aug.abs().amax(dim=1, keepdim=True)).float()
    want, want_dz, want_dz_aug = float64_normalize_rows(z, z_aug, k, denominator=denominator)
    got, dz, dz_aug = rows_and_grads(z, z_aug, k.float(), denominator=denominator, backend="cpu")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for g, w in ((dz, want_dz), (dz_aug, want_dz_aug)):  # gradients scale as 1/||z||: per row
        err = (g.double() - w).norm(dim=1) / w.norm(dim=1).clamp_min(1e-300)
        assert (err < 1e-4).all(), err
