"""The autocast rule (adaptive_cl.functional.autocast_inputs, README "Mixed precision"): under an
enabled autocast region the loss casts z and z_aug to the region's dtype, as
torch.amp.custom_fwd(cast_inputs=...) does, and runs with autocast off."""

from __future__ import annotations

import pytest
import torch

from adaptive_cl import AdaptiveInfoNCE, adaptive_info_nce
from helpers import views


def _grads(fn, z, za):
    z, za = z.detach().clone().requires_grad_(), za.detach().clone().requires_grad_()
    loss = fn(z, za)
    loss.backward()
    return loss.detach(), z.grad, za.grad


@pytest.mark.parametrize("backend,half", [("reference", torch.bfloat16), ("cpu", torch.bfloat16),
                                          ("triton", torch.float16)])
def test_autocast_casts_mixed_inputs_like_custom_fwd(backend, half, request):
    """float32 z with a half-precision z_aug under CPU autocast: the same loss bits as both
    inputs cast to the autocast dtype by hand outside autocast (the rule), gradients in each
    input's own dtype; the same mix outside autocast is a TypeError naming both dtypes. (The
    Triton interpreter has no correct bfloat16 dot: float16 autocast there.)"""
    if backend == "cpu":
        request.getfixturevalue("ext")
    if backend == "triton":
        pytest.importorskip("triton")
        from adaptive_cl.kernels import adaptive_info_nce_fwd as fwd

        if not fwd.INTERPRET and not torch.cuda.is_available():
            pytest.skip("the kernels need a GPU or TRITON_INTERPRET=1")
    z, za = views(6, 8, dtype=torch.float32, seed=2)
    za = za.to(half)
    opts = dict(temperature=0.5, backend=backend)

    def under_autocast(a, b):
        with torch.autocast("cpu", dtype=half):
            return adaptive_info_nce(a, b, 0.2, **opts)

    got = _grads(under_autocast, z, za)
    want = _grads(lambda a, b: adaptive_info_nce(a.to(half), b.to(half), 0.2, **opts), z, za)
    assert got[0].dtype == torch.float32 and torch.equal(got[0], want[0])
    assert got[1].dtype == torch.float32 and got[2].dtype == half
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    with pytest.raises(TypeError, match="same dtype"):
        adaptive_info_nce(z, za, 0.2, **opts)


def test_module_follows_the_rule_and_float64_is_kept():
    z, za = views(5, 4, dtype=torch.float64, seed=3)
    loss_fn = AdaptiveInfoNCE(temperature=0.5, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = loss_fn(z, za)
        cast = loss_fn(z.float(), za.float())
    assert kept.dtype == torch.float64  # float64 is not autocast's to lower
    assert torch.equal(kept, loss_fn(z, za))
    assert torch.equal(cast, loss_fn(z.bfloat16(), za.bfloat16()))
    # a disabled region changes nothing
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert torch.equal(loss_fn(z.float(), za.float()), loss_fn(z.float(), za.float()))
