"""Every bad input gets a clear error naming the argument."""

from __future__ import annotations

import warnings

import pytest
import torch

from adaptive_cl import AdaptiveInfoNCE, adaptive_info_nce

Z = torch.randn(4, 3)
ZA = torch.randn(4, 3)

CASES = [
    # (z, z_aug, k, options, error type, message fragment)
    ([[1.0, 2.0]] * 2, ZA, None, {}, TypeError, "z must be a torch.Tensor"),
    (Z, "x", None, {}, TypeError, "z_aug must be a torch.Tensor"),
    (torch.ones(4, 3, dtype=torch.int64), torch.ones(4, 3, dtype=torch.int64), None, {}, TypeError,
     "z must be a floating-point tensor"),
    (torch.randn(4), torch.randn(4), None, {}, ValueError, "z must have shape (B, D)"),
    (Z, torch.randn(5, 3), None, {}, ValueError, "same shape"),
    (Z, torch.randn(4, 3, dtype=torch.float64), None, {}, TypeError, "same dtype"),
    (torch.randn(1, 3), torch.randn(1, 3), None, {}, ValueError, "B=2"),
    (torch.randn(4, 0), torch.randn(4, 0), None, {}, ValueError, "D=0"),
    (Z, ZA, "0.5", {}, TypeError, "k must be None, a float"),
    (Z, ZA, torch.tensor([1, 2, 3, 4]), {}, TypeError, "k must be a floating-point tensor"),
    (Z, ZA, torch.zeros(5), {}, ValueError, "k must have shape (B,)=(4,) or (N,)=(8,)"),
    (Z, ZA, torch.zeros(4, 1), {}, ValueError, "k must have shape"),
    (Z, ZA, None, {"labels": torch.zeros(4)}, TypeError, "labels must be an integer tensor"),
    (Z, ZA, None, {"labels": [0, 1, 2, 3]}, TypeError, "labels must be None or an integer tensor"),
    (Z, ZA, None, {"labels": torch.zeros(3, dtype=torch.int64)}, ValueError, "labels must have shape"),
    (Z, ZA, None, {"temperature": 0.0}, ValueError, "temperature must be > 0"),
    (Z, ZA, None, {"temperature": -1}, ValueError, "temperature must be > 0"),
    (Z, ZA, None, {"temperature": float("nan")}, ValueError, "temperature must be finite"),
    (Z, ZA, None, {"temperature": 1e-31}, ValueError, "temperature must be > 0 (and >= 1e-30)"),
    (Z, ZA, None, {"temperature": "1"}, TypeError, "temperature must be a real number"),
    (Z, ZA, None, {"positive_weight": 0.0}, ValueError, "positive_weight must be in (0, 1]"),
    (Z, ZA, None, {"positive_weight": 1.5}, ValueError, "positive_weight must be in (0, 1]"),
    (Z, ZA, None, {"weighting": "unit", "positive_weight": 1.0}, ValueError, "positive_weight must be < 1"),
    (Z, ZA, None, {"denominator": "positives"}, ValueError, "denominator must be one of"),
    (Z, ZA, None, {"weighting": "uniform"}, ValueError, "weighting must be one of"),
    (Z, ZA, None, {"threshold": "sigmoid"}, ValueError, "threshold must be one of"),
    (Z, ZA, None, {"reduction": "avg"}, ValueError, "reduction must be one of"),
    (Z, ZA, None, {"backend": "cuda"}, ValueError, "backend must be one of"),
    (Z, ZA, 0.5, {"threshold": "soft", "threshold_scale": 0.0}, ValueError, "threshold_scale must be > 0"),
    (Z, ZA, None, {"threshold": "soft"}, ValueError, "threshold='soft' needs a threshold k"),
    (Z, ZA, None, {"normalize": 1}, TypeError, "normalize must be a bool"),
    (Z, ZA, True, {}, TypeError, "k must be None, a float"),
]


@pytest.mark.parametrize("z,z_aug,k,options,error,fragment", CASES)
def test_functional_errors(z, z_aug, k, options, error, fragment):
    with pytest.raises(error) as info:
        adaptive_info_nce(z, z_aug, k, **options)
    assert fragment in str(info.value)


@pytest.mark.parametrize("options,fragment", [
    ({"temperature": 0}, "temperature"),
    ({"reduction": "max"}, "reduction"),
    ({"backend": "numpy"}, "backend"),
    ({"positive_weight": 2}, "positive_weight"),
])
def test_module_checks_options_at_construction(options, fragment):
    with pytest.raises(ValueError, match=fragment):
        AdaptiveInfoNCE(**options)


def test_device_mismatch_is_named():
    # A meta tensor stands in for another device without needing one.
    with pytest.raises(ValueError, match="z and z_aug must be on the same device"):
        adaptive_info_nce(Z, ZA.to("meta"))
    with pytest.raises(ValueError, match="k must be on the same device as z"):
        adaptive_info_nce(Z, ZA, torch.zeros(4, device="meta"))
    with pytest.raises(ValueError, match="labels must be on the same device as z"):
        adaptive_info_nce(Z, ZA, labels=torch.zeros(4, dtype=torch.int64, device="meta"))


def test_unbounded_combination_warns():
    with pytest.warns(UserWarning, match="unbounded below"):
        adaptive_info_nce(Z, ZA, 0.5, normalize=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adaptive_info_nce(Z, ZA, 0.5, normalize=False, denominator="all")
        adaptive_info_nce(Z, ZA, None, normalize=False)
        adaptive_info_nce(Z, ZA, 0.5)
