"""Public API: the Module, backend selection and the compiled backend."""

from __future__ import annotations

import pytest
import torch

import adaptive_cl
from adaptive_cl import AdaptiveInfoNCE, adaptive_info_nce
from adaptive_cl.backends import resolve
from adaptive_cl.contract import make_options, prepare
from adaptive_cl.reference import adaptive_info_nce_reference
from helpers import assert_close_normwise, safe_threshold, views


def test_public_names():
    assert set(adaptive_cl.__all__) >= {"adaptive_info_nce", "AdaptiveInfoNCE"}


def test_module_matches_functional():
    z, z_aug = views(5, 4, seed=1)
    k, _ = safe_threshold(z, z_aug, "B", seed=2)
    labels = torch.tensor([0, 1, 0, 2, 3])
    options = dict(temperature=0.5, denominator="all", weighting="unit", positive_weight=0.3, reduction="sum")
    module = AdaptiveInfoNCE(backend="reference", **options)
    torch.testing.assert_close(module(z, z_aug, k, labels),
                               adaptive_info_nce(z, z_aug, k, labels=labels, backend="reference", **options))
    assert "weighting='unit'" in repr(module)


def test_auto_on_cpu_uses_the_extension_or_the_reference():
    from adaptive_cl import cpu

    z, z_aug = views(4, 3)
    p = prepare(z.float(), z_aug.float(), 0.3, None, make_options())
    expected = cpu.adaptive_info_nce_cpu if cpu.load_error() is None else adaptive_info_nce_reference
    assert resolve("auto", p) is expected  # tests/cpu/ covers both branches


def test_gradients_reach_module_inputs():
    z, z_aug = views(6, 8, dtype=torch.float32)
    z.requires_grad_(True)
    z_aug.requires_grad_(True)
    AdaptiveInfoNCE()(z, z_aug, 0.2).backward()
    assert z.grad is not None and z_aug.grad is not None
    assert z.grad.abs().sum() > 0


@pytest.mark.slow
def test_compiled_backend_matches_reference():
    z, z_aug = views(6, 5, dtype=torch.float32)
    k, _ = safe_threshold(z.double(), z_aug.double(), "B", seed=3)
    z.requires_grad_(True)
    expected = adaptive_info_nce(z, z_aug, k.float(), backend="reference")
    (g_ref,) = torch.autograd.grad(expected, z)
    got = adaptive_info_nce(z, z_aug, k.float(), backend="compiled")
    (g_got,) = torch.autograd.grad(got, z)
    # float32 both, the compiler may reassociate: the suite's policy (N = 12 rows, D = 5)
    assert_close_normwise(got, expected, dtype=torch.float32, length=12 + 5)
    assert_close_normwise(g_got, g_ref, dtype=torch.float32, length=12 + 5)
