"""adaptive_cl.testing.chunked_loss_and_grads against the dense reference and autograd."""

from __future__ import annotations

import itertools

import pytest
import torch

from adaptive_cl import adaptive_info_nce
from adaptive_cl.testing import chunked_loss_and_grads
from helpers import assert_close_normwise, safe_threshold, views

#: float64 both ways, summed in other chunks: the suite's policy (helpers.tolerance) with N + D
#: <= 40 and the logits' scale (1/tau, 1/beta <= 20 in these cases) as condition.
TOL = dict(dtype=torch.float64, length=40, cond=20.0)


def dense(z, z_aug, k, labels, upstream, **options):
    """Row losses and autograd gradients of sum(upstream * l) from the dense reference."""
    z = z.clone().requires_grad_(True)
    z_aug = z_aug.clone().requires_grad_(True)
    rows = adaptive_info_nce(z, z_aug, k, labels=labels, reduction="none", backend="reference", **options)
    dz, dz_aug = torch.autograd.grad((rows * upstream).sum(), (z, z_aug))
    return rows.detach(), dz, dz_aug


def check(z, z_aug, k=None, labels=None, chunk=3, seed=0, **options):
    n = 2 * z.shape[0]
    upstream = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(z.device) + 0.5
    want = dense(z, z_aug, k, labels, upstream, **options)
    got = chunked_loss_and_grads(z, z_aug, k, labels=labels, upstream=upstream, chunk=chunk, reduction="none", **options)
    for name, g, w in zip(("row losses", "dz", "dz_aug"), got, want):
        assert g.dtype == torch.float64
        assert_close_normwise(g, w, **TOL, what=name)


OPTION_GRID = list(
    itertools.product(
        (True, False),  # normalize
        ("negatives", "all"),  # denominator
        ("normalized", "unit"),  # weighting
        ("none", "scalar", "B", "N"),  # threshold shape
    )
)


@pytest.mark.parametrize("normalize, denominator, weighting, k_shape", OPTION_GRID)
def test_matches_dense_reference(normalize, denominator, weighting, k_shape):
    z, z_aug = views(7, 5, seed=3)
    k = None
    if k_shape != "none":
        k, _ = safe_threshold(z, z_aug, k_shape, normalize=normalize, seed=1)
    options = dict(normalize=normalize, denominator=denominator, weighting=weighting, positive_weight=0.3)
    with pytest.warns(UserWarning) if (not normalize and denominator == "negatives" and k is not None) else _nothing():
        check(z, z_aug, k, temperature=0.7, **options)


@pytest.mark.parametrize("label_shape", ["B", "N"])
@pytest.mark.parametrize("with_k", [False, True])
@pytest.mark.parametrize("denominator", ["negatives", "all"])
def test_labels(label_shape, with_k, denominator):
    z, z_aug = views(9, 4, seed=5)
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 3, (9 if label_shape == "B" else 18,), generator=g)
    k = safe_threshold(z, z_aug, "B", seed=4)[0] if with_k else None
    for weighting in ("normalized", "unit"):
        check(z, z_aug, k, labels=labels, denominator=denominator, weighting=weighting, temperature=0.3)


@pytest.mark.parametrize("chunk", [1, 4, 5, 64])
def test_chunk_size_does_not_matter(chunk):
    z, z_aug = views(5, 3, seed=7)
    k, _ = safe_threshold(z, z_aug, "N", seed=2)
    check(z, z_aug, k, chunk=chunk)


def test_zero_row_and_float32_inputs():
    z, z_aug = views(6, 4, seed=11)
    z[2] = 0.0  # F.normalize maps it to zero: cosine 0 with everything, gradient through eps
    k, _ = safe_threshold(z, z_aug, "scalar", seed=3)
    check(z, z_aug, k)
    # float32 inputs are promoted: the result is float64 and matches the float64 computation.
    z32, za32 = z.float(), z_aug.float()
    got = chunked_loss_and_grads(z32, za32, k)
    want = chunked_loss_and_grads(z32.double(), za32.double(), k)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_default_upstream_is_the_reduced_loss(reduction):
    z, z_aug = views(8, 6, seed=13)
    k, _ = safe_threshold(z, z_aug, "B", seed=5)
    zr, zar = z.clone().requires_grad_(True), z_aug.clone().requires_grad_(True)
    loss = adaptive_info_nce(zr, zar, k, reduction=reduction, backend="reference", temperature=0.5)
    want = torch.autograd.grad(loss, (zr, zar))
    rows, dz, dz_aug = chunked_loss_and_grads(z, z_aug, k, chunk=5, reduction=reduction, temperature=0.5)
    reduced = rows.mean() if reduction == "mean" else rows.sum()
    assert_close_normwise(reduced, loss.detach(), **TOL)
    assert_close_normwise(dz, want[0], **TOL)
    assert_close_normwise(dz_aug, want[1], **TOL)
    # A scalar upstream scales the gradient.
    _, dz2, _ = chunked_loss_and_grads(z, z_aug, k, chunk=5, reduction=reduction, temperature=0.5, upstream=3.0)
    assert_close_normwise(dz2, 3.0 * want[0], **TOL)


def test_rejects_what_it_does_not_implement():
    z, z_aug = views(3, 2)
    with pytest.raises(ValueError, match="hard"):
        chunked_loss_and_grads(z, z_aug, 0.1, threshold="soft")
    with pytest.raises(ValueError, match="chunk"):
        chunked_loss_and_grads(z, z_aug, chunk=0)
    with pytest.raises(ValueError, match="upstream"):
        chunked_loss_and_grads(z, z_aug, upstream=torch.ones(6))  # (N,) needs reduction='none'
    with pytest.raises(ValueError, match="temperature"):
        chunked_loss_and_grads(z, z_aug, temperature=0.0)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------ on a GPU (pytest -m cuda)
@pytest.mark.cuda
def test_chunked_matches_dense_on_cuda():
    z, z_aug = views(1536, 48, seed=17, device="cuda")
    k, _ = safe_threshold(z.cpu(), z_aug.cpu(), "B", seed=6)
    labels = torch.randint(0, 50, (1536,), generator=torch.Generator().manual_seed(0)).cuda()
    check(z, z_aug, k.cuda(), labels=labels, chunk=1000, temperature=0.5)


# Large-N agreement of the fused kernel with the float64 chunked reference, on the benchmark's
# inputs (k near the 90th percentile of the cosines). Tolerances: float32 at the project's bound for
# the loss (1e-5 relative) and 1e-4 for the gradients' relative norm error; bfloat16 inputs
# against the float64 function of the same bf16 values: 1e-2 / 3e-2 (bf16 tensor-core operands,
# gradients returned in bf16).
LARGE = [(65536, 64, torch.float32, 1e-5, 1e-4), (32768, 128, torch.bfloat16, 1e-2, 3e-2),
         (8192, 256, torch.float32, 1e-5, 1e-4)]


@pytest.mark.cuda
@pytest.mark.parametrize("n, d, dtype, loss_tol, grad_tol", LARGE, ids=lambda v: str(v).replace("torch.", ""))
def test_fused_matches_chunked_reference_at_large_n(n, d, dtype, loss_tol, grad_tol):
    b = n // 2
    g = torch.Generator().manual_seed(n + d)
    z = torch.randn(b, d, generator=g)
    z_aug = z + 0.7 * torch.randn(b, d, generator=g)
    k = 1.2816 / d**0.5 * (1.0 + 0.1 * torch.rand(b, generator=g))
    z, z_aug, k = z.cuda().to(dtype).requires_grad_(True), z_aug.cuda().to(dtype).requires_grad_(True), k.cuda()
    loss = adaptive_info_nce(z, z_aug, k, backend="triton")
    dz, dz_aug = torch.autograd.grad(loss, (z, z_aug))
    assert dz.dtype == dtype
    rows, rz, rz_aug = chunked_loss_and_grads(z, z_aug, k, chunk=2048)
    want = rows.mean()
    loss_err = abs(loss.double().item() - want.item()) / abs(want.item())
    got_g, want_g = torch.cat([dz, dz_aug]).double(), torch.cat([rz, rz_aug])
    grad_err = ((got_g - want_g).norm() / want_g.norm()).item()
    assert loss_err <= loss_tol, f"loss relative error {loss_err:.3g} > {loss_tol:g}"
    assert grad_err <= grad_tol, f"gradient relative norm error {grad_err:.3g} > {grad_tol:g}"
