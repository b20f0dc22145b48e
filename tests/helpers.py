"""Shared test utilities: inputs with thresholds safely away from ties."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def views(batch: int, dim: int, *, dtype=torch.float64, seed: int = 0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    # Correlated second view, as real augmentations give, so partners are the most similar.
    z_aug = z + 0.7 * torch.randn(batch, dim, generator=g, dtype=torch.float64)
    return z.to(device=device, dtype=dtype), z_aug.to(device=device, dtype=dtype)


def similarity(z: torch.Tensor, z_aug: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    stacked = torch.cat([z, z_aug]).double()
    if normalize:
        stacked = F.normalize(stacked, dim=1)
    return stacked @ stacked.T


def candidate_values(c: torch.Tensor, row: int) -> torch.Tensor:
    n = c.shape[0]
    keep = [j for j in range(n) if j != row and j != (row + n // 2) % n]
    return c[row, keep]


def safe_threshold(
    z: torch.Tensor, z_aug: torch.Tensor, shape: str, *, normalize: bool = True, seed: int = 0
):
    """A threshold of the given shape ("scalar", "0d", "B", "N") that sits at the midpoint of a
    gap between candidate similarities of every row it applies to, so small perturbations (as in
    gradcheck) never flip a hard decision. Returns (k, margin)."""
    c = similarity(z, z_aug, normalize)
    n = c.shape[0]
    b = n // 2
    g = torch.Generator().manual_seed(seed)

    def midpoint(values: torch.Tensor) -> tuple[float, float]:
        v = torch.unique(values)  # sorted; c is symmetric, so pooled rows repeat values
        j = int(torch.randint(0, v.numel() - 1, (1,), generator=g))
        return float((v[j] + v[j + 1]) / 2), float((v[j + 1] - v[j]) / 2)

    if shape in ("scalar", "0d"):
        value, margin = midpoint(torch.cat([candidate_values(c, i) for i in range(n)]))
        return (value if shape == "scalar" else torch.tensor(value, dtype=z.dtype)), margin
    groups = [[i, i + b] for i in range(b)] if shape == "B" else [[i] for i in range(n)]
    ks, margins = [], []
    for rows in groups:
        value, margin = midpoint(torch.cat([candidate_values(c, i) for i in rows]))
        ks.append(value)
        margins.append(margin)
    return torch.tensor(ks, dtype=z.dtype), min(margins)
