"""The contract's numeric rules on the reference, the C++ extension (``cpu_backend``) and the
compiled backend: non-finite inputs, small temperatures, rows of extreme magnitude under
normalize=True.

(The Triton kernel's side of the same rules is tested in tests/kernels.)
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from adaptive_cl import adaptive_info_nce
from adaptive_cl.contract import MIN_TEMPERATURE
from helpers import assert_close_normwise, safe_threshold, views

BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def rows_and_grads(z, z_aug, k, **options):
    z = z.clone().requires_grad_(True)
    z_aug = z_aug.clone().requires_grad_(True)
    rows = adaptive_info_nce(z, z_aug, k, reduction="none", **options)
    dz, dz_aug = torch.autograd.grad(rows.sum(), (z, z_aug))
    return rows.detach(), dz, dz_aug


# ---------------------------------------------------------------------- non-finite inputs

# A covering design over (value, which view, normalize, threshold, denominator, dtype): every
# pair of levels of the first four appears, instead of the full product.
NON_FINITE = [
    ("nan", "z", True, "hard", "negatives", torch.float64),
    ("nan", "z_aug", False, "soft", "all", torch.float32),
    ("inf", "z", False, "hard", "all", torch.float32),
    ("inf", "z_aug", True, "soft", "negatives", torch.float64),
    ("-inf", "z", True, "soft", "all", torch.float32),
    ("-inf", "z_aug", False, "hard", "negatives", torch.float64),
    ("inf", "z", True, "hard", "negatives", torch.bfloat16),
]


@pytest.mark.filterwarnings("ignore:normalize=False")
@pytest.mark.parametrize("value, where, normalize, threshold, denominator, dtype", NON_FINITE)
def test_one_non_finite_element_makes_every_row_and_gradient_nan(
        cpu_backend, value, where, normalize, threshold, denominator, dtype):
    z, z_aug = views(5, 4, seed=21)
    k, _ = safe_threshold(z, z_aug, "B", normalize=normalize, seed=22)
    z, z_aug = z.to(dtype), z_aug.to(dtype)
    (z if where == "z" else z_aug)[3, 1] = BAD[value]
    options = dict(normalize=normalize, threshold=threshold, denominator=denominator,
                   backend=cpu_backend)
    rows, dz, dz_aug = rows_and_grads(z, z_aug, k.to(dtype), **options)
    assert torch.isnan(rows).all(), rows
    assert torch.isnan(dz).all() and torch.isnan(dz_aug).all()
    assert dz.dtype == dtype
    for reduction in ("mean", "sum"):
        assert torch.isnan(adaptive_info_nce(z, z_aug, k.to(dtype), reduction=reduction,
                                             **options))


def test_nan_threshold_soft_makes_only_its_row_nan():
    z, z_aug = views(4, 3, seed=23)
    k, _ = safe_threshold(z, z_aug, "N", seed=24, soft_scale=0.05)
    k[5] = float("nan")
    rows = adaptive_info_nce(z, z_aug, k, threshold="soft", reduction="none", backend="reference")
    assert torch.isnan(rows[5]) and torch.isfinite(rows[torch.arange(8) != 5]).all()


# ---------------------------------------------------------------------- small temperatures

def test_small_temperature_float32_matches_float64(cpu_backend):
    # The case: B=4, D=8, k=0.4, tau=0.002. Some row's largest candidate is an extra
    # positive (weight 0 in the "negatives" LSE) far above the rest: a shift taken from it made
    # every weighted exp underflow in float32 and the row NaN.
    z, z_aug = views(4, 8, seed=0, dtype=torch.float32)
    z64, z_aug64 = z.double(), z_aug.double()
    k, margin = safe_threshold(z64, z_aug64, "scalar", seed=3)
    assert margin >= 1e-4  # so float32 rounding of c (~1e-7) cannot flip a decision
    for threshold, scale in (("hard", 0.05), ("soft", 1e-3)):
        options = dict(temperature=0.002, threshold=threshold, threshold_scale=scale,
                       reduction="none")
        got = adaptive_info_nce(z, z_aug, k, backend=cpu_backend, **options)
        want = adaptive_info_nce(z64, z_aug64, k, backend="reference", **options)
        # float32 cosines carry ~1e-7 of rounding, which 1/tau = 500 turns into ~5e-5 per logit.
        assert_close_normwise(got, want, dtype=torch.float32, length=z.shape[0] * 2 + z.shape[1], cond=1 / 0.002)
        assert want.abs().max() > 10  # a regime where the shift matters


@pytest.mark.parametrize("denominator, weighting, threshold", [
    ("negatives", "normalized", "hard"), ("negatives", "unit", "soft"),
    ("all", "normalized", "soft"), ("all", "unit", "hard"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_any_allowed_temperature_gives_a_finite_loss(cpu_backend, denominator, weighting,
                                                     threshold, dtype):
    z, z_aug = views(6, 5, seed=25, dtype=dtype)
    z_aug[0] = z[1]  # an exact duplicate: a cosine of 1, far above every other candidate
    options = dict(denominator=denominator, weighting=weighting, threshold=threshold,
                   backend=cpu_backend)
    for tau in (1e-2, 1e-4, 1e-8, 1e-20, MIN_TEMPERATURE):
        for k in (-0.3, 0.0, 0.5):
            rows, dz, dz_aug = rows_and_grads(z, z_aug, k, temperature=tau, **options)
            assert torch.isfinite(rows).all(), (tau, k, rows)
            assert torch.isfinite(dz).all() and torch.isfinite(dz_aug).all(), (tau, k)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        adaptive_info_nce(z, z_aug, 0.0, temperature=MIN_TEMPERATURE / 2)


# ---------------------------------------------------------------- magnitudes under normalize

def float64_normalize_rows(z, z_aug, k, **options):
    """Rows and gradients with the normalisation done by float64 F.normalize (exact for these
    magnitudes: squares of 1e30 and 1e-40 are ordinary float64 numbers)."""
    z64 = z.double().requires_grad_(True)
    z_aug64 = z_aug.double().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # normalize=False with a threshold warns
        rows = adaptive_info_nce(F.normalize(z64, dim=1, eps=1e-12),
                                 F.normalize(z_aug64, dim=1, eps=1e-12), k, normalize=False,
                                 reduction="none", backend="reference", **options)
    dz, dz_aug = torch.autograd.grad(rows.sum(), (z64, z_aug64))
    return rows.detach(), dz, dz_aug


# Rows whose squared norm overflows float32 (1e19, 1e30), underflows it (1e-20, 1e-25, a
# subnormal 1e-40), or is close to the 1e-12 clamp on either side.
MAGNITUDES = [1e19, 1e30, 1e-15, 1e-20, 1e-25, 1e-40, 3e-13, 1.0]


@pytest.mark.parametrize("denominator", ["negatives", "all"])
def test_extreme_rows_normalize_as_float64_f_normalize(cpu_backend, denominator):
    z, z_aug = views(len(MAGNITUDES), 6, seed=26)
    k, _ = safe_threshold(z, z_aug, "B", seed=27)
    scales = torch.tensor(MAGNITUDES, dtype=torch.float64)[:, None]
    z = (z / z.abs().amax(dim=1, keepdim=True) * scales).float()
    z_aug = (z_aug / z_aug.abs().amax(dim=1, keepdim=True)).float()
    want, want_dz, want_dz_aug = float64_normalize_rows(z, z_aug, k, denominator=denominator)
    got, dz, dz_aug = rows_and_grads(z, z_aug, k.float(), denominator=denominator,
                                     backend=cpu_backend)
    # Rows 0, 1 (huge) behave as unit rows, the others as (nearly) zero rows: none of the
    # decisions of k sits near a cosine the float32 rounding could flip (margin >= 1e-4).
    assert_close_normwise(got, want, dtype=torch.float32, length=2 * z.shape[0] + z.shape[1])
    # Gradients scale as 1/||z|| (1e-30 .. 1e12 here): compare relative to each row's size.
    for g, w in ((dz, want_dz), (dz_aug, want_dz_aug)):
        err = (g.double() - w).norm(dim=1) / w.norm(dim=1).clamp_min(1e-300)
        assert (err < 1e-4).all(), err


@pytest.mark.parametrize("dtype, big", [(torch.float32, 1e30), (torch.float64, 1e200)])
def test_huge_rows_give_the_unit_rows_loss(dtype, big):
    z, z_aug = views(5, 7, seed=28, dtype=dtype)
    k, _ = safe_threshold(z.double(), z_aug.double(), "N", seed=29)
    options = dict(reduction="none", backend="reference")
    unit = adaptive_info_nce(z, z_aug, k.to(dtype), **options)
    huge = adaptive_info_nce(z * big, z_aug, k.to(dtype), **options)
    assert_close_normwise(huge, unit, dtype=dtype, length=10 + 7)


# ------------------------------------------------------------------------ compiled backend

@pytest.mark.slow
def test_compiled_backend_follows_the_numeric_rules():
    # One compiled graph (shape, dtype and options fixed) serves all three checks.
    z, z_aug = views(6, 5, seed=30, dtype=torch.float32)
    k, _ = safe_threshold(z.double(), z_aug.double(), "B", seed=31)
    options = dict(temperature=0.002)
    z[2] *= 1e30  # huge row: normalises like the unit row
    got, *_ = rows_and_grads(z, z_aug, k.float(), backend="compiled", **options)
    want, *_ = rows_and_grads(z, z_aug, k.float(), backend="reference", **options)
    assert torch.isfinite(got).all()
    assert_close_normwise(got, want, dtype=torch.float32, length=12 + 5, cond=1 / 0.002)
    z[4, 0] = float("inf")
    rows, dz, dz_aug = rows_and_grads(z, z_aug, k.float(), backend="compiled", **options)
    assert torch.isnan(rows).all() and torch.isnan(dz).all() and torch.isnan(dz_aug).all()
