"""The fused CPU backend against the float64 reference over a pairwise covering design of every
option, at odd shapes (B in {2, 3, 17, 40}, D in {1, 7, 32, 70}), plus a multi-tile size
against the chunked float64 reference."""

from __future__ import annotations

import pytest
import torch

from adaptive_cl.contract import make_options
from adaptive_cl.testing import chunked_loss_and_grads
from kernels._cases import covers_all_pairs, pairwise_cases, rel_err

from ._inputs import SOFT_SCALE, cpu, make_views, reference64, threshold

FACTORS = {
    "b": [2, 3, 17, 40],
    "d": [1, 7, 32, 70],
    "dtype": [torch.float64, torch.float32],
    "k": ["none", "scalar", "0d", "B", "N"],
    "threshold": ["hard", "soft"],
    "labels": [None, "B", "N"],
    "denominator": ["negatives", "all"],
    "weighting": ["normalized", "unit"],
    "alpha": [0.5, 0.3, 1.0],
    # float32 takes the fixed shift for tau >= 0.03, float64 for tau >= 0.004 (else online max)
    "tau": [1.0, 0.1, 0.02, 0.003],
    "normalize": [True, False],
    "reduction": ["mean", "sum", "none"],
    "layout": ["contiguous", "noncontig"],
}


def _allowed(case):
    return not (case["weighting"] == "unit" and case["alpha"] == 1.0) and not (
        case["threshold"] == "soft" and case["k"] == "none")


CASES = pairwise_cases(FACTORS, _allowed, seed=3)


def _case_id(case):
    dt = "f64" if case["dtype"] == torch.float64 else "f32"
    return (f"B{case['b']}-D{case['d']}-{dt}-k{case['k']}-{case['threshold']}-lab{case['labels']}-"
            f"{case['denominator']}-{case['weighting']}-a{case['alpha']}-t{case['tau']}-"
            f"{'norm' if case['normalize'] else 'dot'}-{case['reduction']}-{case['layout']}")


def tolerance(dtype, logit_scale):
    """Norm-ratio bound against float64. An error delta in a similarity moves every logit by
    delta / tau, and the loss and its gradients inherit that relative error, so the bound grows
    with the largest |logit| L. Measured over this design: at most 0.04 x 2e-6 L (float32) and
    3e-4 x 1e-13 L (float64); the bounds below keep a 6x (float32) and 30x (float64) margin for
    other CPUs' exp/log and compilers, and stay far below what a wrong term would cost (O(1))."""
    per_unit = 5e-7 if dtype == torch.float32 else 1e-14
    return per_unit * max(10.0, logit_scale)


def test_design_covers_every_pair():
    assert covers_all_pairs(CASES, FACTORS, _allowed) == []
    assert len(CASES) < 45  # keep CI time bounded


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_float64_reference(ext, case):
    b, d, dtype, norm = case["b"], case["d"], case["dtype"], case["normalize"]
    z, za = make_views(b, d, dtype, seed=b * 100 + d, normalize=norm, layout=case["layout"])
    g = torch.Generator().manual_seed(b + d)
    labels = None
    if case["labels"] is not None:
        labels = torch.randint(0, 3, (b if case["labels"] == "B" else 2 * b,), generator=g)
    soft = case["threshold"] == "soft"
    k, margin = threshold(z.double(), za.double(), case["k"], norm, soft=soft, labels=labels, dtype=dtype)
    options = make_options(temperature=case["tau"], normalize=norm, denominator=case["denominator"],
                           weighting=case["weighting"], positive_weight=case["alpha"],
                           threshold=case["threshold"], threshold_scale=SOFT_SCALE,
                           reduction=case["reduction"])
    c = torch.cat([z, za]).double()
    scale = (c.norm(dim=1).max() ** 2 if not norm else torch.tensor(1.0)) / case["tau"]
    if not soft:  # a hard decision must not hinge on rounding: the margin dwarfs it
        assert margin > 1e-4 * float(scale * case["tau"]), margin
    with pytest.warns(UserWarning) if (not norm and case["denominator"] == "negatives"
                                       and (k is not None or labels is not None)) else _no_warning():
        got = cpu(z, za, k, labels, options)
        ref = reference64(z, za, k, labels, options)
    tol = tolerance(dtype, float(scale))
    for name, out, expected in zip(("loss", "dz", "dz_aug", "dk"), got, ref):
        if expected is None:
            assert out is None
            continue
        assert out.dtype == (dtype if name != "dk" else k.dtype)
        assert out.shape == expected.shape
        floor = 1.0 if name == "loss" else _grad_unit(z, za, got[0], case)
        assert _err(out, expected, floor) <= tol, (name, _err(out, expected, floor), tol)


def _grad_unit(z, za, loss, case):
    """The natural size of one gradient entry: the largest upstream weight per row times
    d(logit)/d(input), 1 / (tau ||z||) (cosine) or ||z|| / tau (dot)."""
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u = g.abs().max() / (2 * z.shape[0] if case["reduction"] == "mean" else 1)
    norm = torch.cat([z, za]).double().norm(dim=1).mean()
    return float(u / case["tau"] * (1 / norm if case["normalize"] else norm))


def _err(out, expected, unit):
    """||out - ref|| / max(||ref||, sqrt(numel) * unit): relative, but absolute below ``unit`` per
    entry. A loss near zero (the partner dominating) keeps the absolute error of its O(L) terms;
    a gradient that vanishes (D = 1 with normalize: every direction is radial) keeps rounding."""
    diff = (out.double() - expected.double()).norm()
    return float(diff / max(float(expected.double().norm()), expected.numel() ** 0.5 * unit))


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_many_tiles_match_chunked_reference(ext):
    """N = 1000: several row blocks and column tiles, special tiles in the middle of the matrix."""
    b, d = 500, 48
    z, za = make_views(b, d, torch.float32, seed=7)
    k, margin = threshold(z.double(), za.double(), "B", True, dtype=torch.float32)
    assert margin > 1e-5
    labels = torch.randint(0, 50, (b,), generator=torch.Generator().manual_seed(1))
    options = dict(temperature=0.2, denominator="negatives", weighting="normalized")
    got = cpu(z, za, k, labels, make_options(reduction="none", **options))
    rows, dz, dza = chunked_loss_and_grads(z, za, k, labels=labels, chunk=256, reduction="none",
                                           upstream=torch.randn(2 * b, generator=torch.Generator().manual_seed(0),
                                                                dtype=torch.float64), **options)
    for out, expected in zip(got[:3], (rows, dz, dza)):
        assert rel_err(out, expected) <= tolerance(torch.float32, 5.0)
