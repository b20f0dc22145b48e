"""torch.autograd.gradcheck of the CPU backend in float64: the analytic one-pass backward
against finite differences. Hard thresholds sit in the widest gap between similarities (margin
checked against the perturbation), soft thresholds keep every m_i away from the guard's kink
at m = 1, and the cosines of distinct random rows stay far from the clamp at +-1."""

from __future__ import annotations

import warnings

import pytest
import torch

from adaptive_cl import adaptive_info_nce

from ._inputs import SOFT_SCALE, make_views, threshold

CASES = [
    # (b, d, k kind, threshold, labels, options)
    (4, 5, "B", "hard", "B", dict(temperature=0.5, reduction="sum")),
    (3, 6, "N", "soft", None, dict(temperature=0.3, weighting="unit", positive_weight=0.4, reduction="none")),
    (4, 3, "0d", "soft", "N", dict(temperature=0.7, denominator="all", reduction="mean")),
    (3, 4, "scalar", "soft", "B", dict(temperature=0.003, positive_weight=0.6)),  # online max
    (4, 5, "N", "hard", None, dict(temperature=0.8, normalize=False, weighting="unit", positive_weight=0.3)),
    (3, 5, "B", "soft", None, dict(temperature=0.9, normalize=False, denominator="all", reduction="sum")),
    (5, 4, "none", "hard", "N", dict(temperature=0.25, denominator="all", weighting="unit", positive_weight=0.5)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-D{c[1]}-k{c[2]}-{c[3]}-lab{c[4]}")
def test_gradcheck_float64(ext, case):
    b, d, kind, thr, lab, options = case
    norm = options.get("normalize", True)
    z, za = make_views(b, d, torch.float64, seed=11 * b + d, normalize=norm)
    g = torch.Generator().manual_seed(b * d)
    labels = None if lab is None else torch.randint(0, 2, (b if lab == "B" else 2 * b,), generator=g)
    soft = thr == "soft"
    k, margin = threshold(z, za, kind, norm, soft=soft, labels=labels)
    if not soft and k is not None:
        assert margin > 1e-3  # >> what eps = 1e-6 on z can move a similarity
    z.requires_grad_(True)
    za.requires_grad_(True)
    inputs = [z, za]
    if isinstance(k, torch.Tensor) and soft:
        k.requires_grad_(True)
        inputs.append(k)

    def loss(*args):
        kk = args[2] if len(args) > 2 else k
        return adaptive_info_nce(args[0], args[1], kk, labels=labels, threshold=thr,
                                 threshold_scale=SOFT_SCALE, backend="cpu", **options)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # normalize=False with "negatives" warns
        assert torch.autograd.gradcheck(loss, tuple(inputs), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_hard_threshold_gradient_in_k_is_zero(ext):
    z, za = make_views(5, 4, torch.float64, seed=2)
    k, _ = threshold(z, za, "B", True)
    k.requires_grad_(True)
    (dk,) = torch.autograd.grad(adaptive_info_nce(z, za, k, backend="cpu"), k)
    assert torch.equal(dk, torch.zeros_like(k))
