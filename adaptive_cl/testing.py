"""Tools for validating a backend: a float64 chunked reference with an analytic backward.

:func:`chunked_loss_and_grads` computes the per-row losses of :mod:`adaptive_cl.reference` and
the gradients with respect to ``z`` and ``z_aug`` for the *hard* threshold, in float64,
processing ``chunk`` rows at a time. It never holds more than a few ``(chunk, N)`` blocks, so it runs where the dense
reference cannot: at N = 65536 the dense float64 N x N matrix alone is 34 GB, while this
holds about three float64 ``(chunk, N)`` blocks and a few boolean ones at a time, roughly
``4 * chunk * N * 8`` bytes (chunk = 4096 at N = 65536: about 9 GB; a smaller chunk uses less).

The backward is the closed-form logit gradient, not autograd. With G_ij = u_i dl_i/ds_ij (u_i
the upstream gradient of row i's loss),

    dl_i/ds_ij = W_i exp(s_ij - LSE_i) [j in Den(i)] - w_ij,
    dL/dZhat_r = (1/tau) sum_j (G_rj + G_jr) Zhat_j        (S is symmetric)

followed by the clamp of the cosine to [-1, 1] (no gradient where it clips, as in autograd)
and the ``F.normalize`` Jacobian. A row block I contributes G_IJ Zhat to its own rows and
G_IJ^T Zhat_I to every row, so one pass over the blocks suffices.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .contract import NORM_EPS, make_options, prepare

__all__ = ["chunked_loss_and_grads"]


def _upstream_rows(upstream, reduction: str, n: int, device) -> torch.Tensor:
    """u_i = dL/dl_i for the reduced loss L, as an (N,) float64 tensor."""
    scale = 1.0 / n if reduction == "mean" else 1.0
    if upstream is None:
        return torch.full((n,), scale, dtype=torch.float64, device=device)
    u = torch.as_tensor(upstream, dtype=torch.float64, device=device)
    if u.dim() == 0:
        return torch.full((n,), float(u) * scale, dtype=torch.float64, device=device)
    if reduction != "none" or u.shape != (n,):
        raise ValueError(
            "upstream must be None, a scalar, or (with reduction='none') an (N,) tensor; "
            f"got shape {tuple(u.shape)} with reduction={reduction!r}"
        )
    return u


@torch.no_grad()
def chunked_loss_and_grads(
    z: torch.Tensor,
    z_aug: torch.Tensor,
    k=None,
    *,
    upstream=None,
    chunk: int = 4096,
    labels: torch.Tensor | None = None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hard-threshold loss in float64, row block by row block.

    Args:
        z, z_aug: the two views (B, D), any floating dtype, same device; promoted to float64.
        k: None, a float, a 0-d tensor, or a (B,) / (N,) tensor (as ``adaptive_info_nce``).
        upstream: the gradient of the output. None: that of the reduced loss (``reduction``
            "mean": 1/N per row; "sum" and "none": 1 per row). A scalar multiplies that. With
            ``reduction="none"`` an (N,) tensor gives each row's weight.
        chunk: rows per block (memory is O(chunk * N)).
        labels: optional integer (B,) / (N,) labels (same-label candidates are extra positives).
        **options: ``temperature``, ``normalize``, ``denominator``, ``weighting``,
            ``positive_weight``, ``reduction`` (only shapes the default upstream) and
            ``threshold`` (must be "hard").

    Returns:
        ``(row_losses, dz, dz_aug)``: the N per-row losses l_i and dL/dz, dL/dz_aug, all float64.
    """
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int; got {chunk!r}")
    opts = make_options(**options)
    if opts.threshold != "hard":
        raise ValueError("chunked_loss_and_grads implements threshold='hard' only")
    z64, za64 = z.detach().to(torch.float64), z_aug.detach().to(torch.float64)
    if isinstance(k, torch.Tensor):
        k = k.detach()
    p = prepare(z64, za64, k, labels, opts)

    b = z64.shape[0]
    n = 2 * b
    dev = z64.device
    tau = opts.temperature
    alpha = opts.positive_weight
    raw = torch.cat([z64, za64])
    if opts.normalize:
        norms = raw.norm(dim=1)
        zn = F.normalize(raw, dim=1, eps=NORM_EPS)
    else:
        zn = raw
    k_rows = None if p.k_rows is None else p.k_rows.to(torch.float64)
    lab = p.labels_rows
    u_all = _upstream_rows(upstream, opts.reduction, n, dev)

    losses = torch.empty(n, dtype=torch.float64, device=dev)
    dzn = torch.zeros_like(zn)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = torch.arange(start, stop, device=dev)
        local = torch.arange(stop - start, device=dev)
        pcol = (rows + b) % n  # each row's partner column
        c = zn[start:stop] @ zn.T  # (chunk, N); the float64 blocks alive at once are c, s, e/g
        inside = None
        if opts.normalize:
            inside = (c >= -1.0) & (c <= 1.0)  # the clamp passes gradient only here (as autograd)
            c.clamp_(-1.0, 1.0)
        partner = torch.zeros_like(c, dtype=torch.bool)
        partner[local, pcol] = True
        cand = ~partner
        cand[local, rows] = False
        if k_rows is not None:
            extra = c > k_rows[start:stop, None]
        else:
            extra = torch.zeros_like(cand)
        if lab is not None:
            extra |= lab[start:stop, None] == lab[None, :]
        extra &= cand
        s = c.div_(tau)  # c is not needed any more: s takes its storage
        den = cand if opts.denominator == "all" else cand & ~extra
        den |= partner
        del cand

        e = torch.where(den, s, float("-inf"))
        del den
        shift = e.amax(dim=1, keepdim=True)
        e.sub_(shift).exp_()  # exp(s - shift) on Den(i), 0 elsewhere
        lse = shift.squeeze(1) + torch.log(e.sum(dim=1))
        s_p = s[local, pcol]
        m = extra.sum(dim=1).to(torch.float64)
        guard = m.clamp(min=1.0)
        sum_a = (s * extra).sum(dim=1)
        del s
        if opts.weighting == "normalized":
            loss = alpha * (lse - s_p) + (1.0 - alpha) / guard * (m * lse - sum_a)
            w_extra = (1.0 - alpha) / guard
            w_partner = torch.full_like(m, alpha)
            total = alpha + (1.0 - alpha) * m / guard
        else:
            loss = (lse - s_p) - math.log(alpha) + (m * lse - sum_a) - m * torch.log((1.0 - alpha) / guard)
            w_extra = torch.ones_like(m)
            w_partner = torch.ones_like(m)
            total = 1.0 + m
        losses[start:stop] = loss

        # G = u_i (W_i softmax_Den(i) - w_ij), then through s = c / tau and the clamp.
        g = e.mul_((total * torch.exp(shift.squeeze(1) - lse))[:, None])
        g.sub_(extra * w_extra[:, None])
        g[local, pcol] -= w_partner
        g.mul_((u_all[start:stop] / tau)[:, None])
        if inside is not None:
            g.mul_(inside)
        dzn[start:stop] += g @ zn  # row use of Zhat_I
        dzn += g.T @ zn[start:stop]  # column use: Zhat_j appears in row I's logits
        del g, e, extra, partner, inside

    if opts.normalize:
        # zhat = z / max(|z|, eps): Jacobian (dzhat - zhat <zhat, dzhat>) / |z| where |z| >= eps,
        # dzhat / eps where the clamp is active (as autograd differentiates F.normalize).
        radial = (zn * dzn).sum(dim=1, keepdim=True)
        big = (norms >= NORM_EPS)[:, None]
        dz_all = torch.where(big, (dzn - zn * radial) / norms.clamp(min=NORM_EPS)[:, None], dzn / NORM_EPS)
    else:
        dz_all = dzn
    return losses, dz_all[:b].clone(), dz_all[b:].clone()
