"""Inputs for the CPU backend's tests: thresholds away from every kink, per-case tolerances."""

from __future__ import annotations

import torch

from adaptive_cl.contract import make_options, prepare
from adaptive_cl.cpu import adaptive_info_nce_cpu
from adaptive_cl.reference import adaptive_info_nce_reference

from kernels._cases import make_views, pick_k, similarity64

SOFT_SCALE = 0.1


def soft_counts(z, za, k, labels, normalize, scale=SOFT_SCALE):
    """m_i = sum_j a_ij of the soft threshold (float64), to keep every m_i away from the kink at 1."""
    p = prepare(z.double(), za.double(), k if not isinstance(k, torch.Tensor) else k.double(), labels,
                make_options(threshold="soft", threshold_scale=scale))
    c = similarity64(z, za, normalize)
    n = c.shape[0]
    idx = torch.arange(n)
    cand = torch.ones(n, n, dtype=torch.bool)
    cand[idx, idx] = False
    cand[idx, (idx + n // 2) % n] = False
    a = torch.sigmoid((c - p.k_rows[:, None]) / scale)
    if p.labels_rows is not None:
        a = torch.where(p.labels_rows[:, None] == p.labels_rows[None, :], 1.0, a)
    return torch.where(cand, a, 0.0).sum(dim=1)


def threshold(z, za, kind, normalize, *, soft=False, labels=None, dtype=torch.float64):
    """k of kind "none"/"scalar"/"0d"/"B"/"N" in the widest gap between candidate similarities;
    for the soft threshold also nudged until every m_i is >= 0.02 away from 1 (the guard's kink).
    Returns (k, margin): the smallest distance from a c_ij to its row's k."""
    k, margin = pick_k(z, za, kind, normalize, dtype=dtype)
    if not soft or k is None:
        return k, margin
    for _ in range(60):
        m = soft_counts(z, za, k, labels, normalize)
        if bool(((m - 1).abs() > 0.02).all()):
            return k, margin
        k = k + 0.021
    raise AssertionError("no soft threshold keeps every m_i away from 1")


def loss_and_grads(fn, z, za, k, labels, options, upstream_seed=0):
    """(loss, dz, dz_aug, dk or None) of backend ``fn`` for a random upstream gradient."""
    z = z.detach().clone().requires_grad_(True)
    za = za.detach().clone().requires_grad_(True)
    k_in = k.detach().clone().requires_grad_(True) if isinstance(k, torch.Tensor) else k
    out = fn(prepare(z, za, k_in, labels, options))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=torch.float64)
    inputs = [z, za] + ([k_in] if isinstance(k_in, torch.Tensor) else [])
    grads = torch.autograd.grad(out, inputs, g.to(out.dtype))
    return (out.detach(),) + tuple(grads) + ((None,) if len(grads) == 2 else ())


def reference64(z, za, k, labels, options, upstream_seed=0):
    """The reference on float64 copies of the same values (the ground truth)."""
    k64 = k.double() if isinstance(k, torch.Tensor) else k
    return loss_and_grads(adaptive_info_nce_reference, z.double(), za.double(), k64, labels, options, upstream_seed)


def cpu(z, za, k, labels, options, upstream_seed=0):
    return loss_and_grads(adaptive_info_nce_cpu, z, za, k, labels, options, upstream_seed)


__all__ = ["cpu", "make_views", "reference64", "soft_counts", "threshold"]
