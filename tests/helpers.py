"""Shared test utilities: the suite's tolerance policy, inputs with thresholds safely away from
ties, and sequence files."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------- tolerance policy
#: The suite's one rule for comparing a computed tensor with its reference (issue 23: elementwise
#: absolute tolerances tuned on one machine failed on another, twice). The error is measured
#: norm-wise: per row, ||a_r - e_r|| divided by the larger of ||e_r|| and the RMS row norm of the
#: whole reference, so a near-zero element (or row) is judged against the size of its
#: neighbours, not against an absolute constant. The bound is
#:
#:     C_TOL * eps(dtype) * sqrt(K) * cond
#:
#: with eps the machine epsilon of the dtype the result was computed in, K the reduction
#: length that produced it (for the loss: the D-long dot products plus the N-long sums, K = N + D)
#: and cond >= 1 the amplification the computation applies to its rounding (an error delta in a
#: similarity moves a logit by delta / tau: cond = max(1, 1/tau, |logit| scale)). sqrt(K) is the
#: typical (random-sign) growth of a sum's rounding error; C_TOL = 32 covers the few rounded
#: operations per term (exp/log, scaling, the two passes) and different CPUs' libm and BLAS
#: blockings with a margin, and stays orders of magnitude below a wrong term's O(1) error.
C_TOL = 32.0


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def tolerance(dtype: torch.dtype, length: int, cond: float = 1.0) -> float:
    """The policy's bound: C_TOL * eps(dtype) * sqrt(length) * max(cond, 1)."""
    return C_TOL * eps(dtype) * math.sqrt(max(int(length), 1)) * max(float(cond), 1.0)


def normwise_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max over rows r of ||a_r - e_r|| / max(||e_r||, RMS row norm of e) (0-d and 1-d tensors:
    one row); NaN positions must agree (they are then ignored). float64 arithmetic."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}")
    nan = torch.isnan(e)
    if not torch.equal(torch.isnan(a), nan):
        raise AssertionError("NaN positions differ")
    a, e = torch.where(nan, 0.0, a), torch.where(nan, 0.0, e)
    if e.numel() == 0:
        return 0.0
    a = a.reshape(1, -1) if a.dim() < 2 else a.reshape(a.shape[0], -1)
    e = e.reshape(1, -1) if e.dim() < 2 else e.reshape(e.shape[0], -1)
    row = e.norm(dim=1)
    rms = float(e.norm()) / math.sqrt(e.shape[0])
    den = torch.clamp(row, min=max(rms, torch.finfo(torch.float64).tiny))
    return float(((a - e).norm(dim=1) / den).max())


def assert_close_normwise(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype,
                          length: int, cond: float = 1.0, what: str = "") -> None:
    """Assert normwise_error(actual, expected) <= tolerance(dtype, length, cond)."""
    err, tol = normwise_error(actual, expected), tolerance(dtype, length, cond)
    assert err <= tol, f"{what + ': ' if what else ''}norm-wise error {err:.3e} > {tol:.3e} " \
                       f"(C_TOL * eps({dtype}) * sqrt({length}) * {max(cond, 1.0):g})"


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


#: Smallest distance of a soft membership sum m_i from 1, the kink of max(m_i, 1). A gradcheck
#: step of 1e-6 in z moves each c_ij by about 1e-6 and m_i by less than N * 1e-6 / (4 beta):
#: 3e-5 for the tests' N <= 12 and beta = 0.05, far inside this margin.
SOFT_KINK_MARGIN = 1e-3


def soft_membership_sums(
    z: torch.Tensor, z_aug: torch.Tensor, k_rows: torch.Tensor, scale: float, *,
    normalize: bool = True, labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """m_i = sum over candidates j of sigmoid((c_ij - k_i) / scale), label-forced pairs counting
    1 (the soft rule of adaptive_cl.reference), in float64."""
    c = similarity(z, z_aug, normalize)
    n = c.shape[0]
    idx = torch.arange(n)
    cand = ~torch.eye(n, dtype=torch.bool)
    cand[idx, (idx + n // 2) % n] = False
    a = torch.sigmoid((c - k_rows.double()[:, None]) / scale)
    if labels is not None:
        rows = labels if labels.numel() == n else torch.cat([labels, labels])
        a = torch.where(rows[:, None] == rows[None, :], torch.ones_like(a), a)
    return (a * cand).sum(dim=1)


def safe_threshold(
    z: torch.Tensor, z_aug: torch.Tensor, shape: str, *, normalize: bool = True, seed: int = 0,
    min_margin: float = 1e-4, soft_scale: float | None = None,
    labels: torch.Tensor | None = None,
):
    """A threshold of the given shape ("scalar", "0d", "B", "N") placed with a margin from every
    kink of the loss, so rounding (another CPU, another backend, float32 products) or
    gradcheck's steps never change which side of a kink an input is on:

    - hard decisions: it sits at the midpoint of a gap of at least ``2 * min_margin`` between
      the candidate similarities of every row it applies to (returned margin >= min_margin);
    - with ``soft_scale`` (the soft threshold's beta): every row's membership sum m_i, labels
      included, is at least ``SOFT_KINK_MARGIN`` away from 1, the kink of max(m_i, 1). (A
      midpoint between the only two nearby similarities gives m_i = 1 + tiny: those gaps are
      skipped.)

    Gaps are tried in a seeded random order. Returns (k, margin)."""
    c = similarity(z, z_aug, normalize)
    n = c.shape[0]
    b = n // 2
    g = torch.Generator().manual_seed(seed)

    def place(rows: list[int]) -> tuple[float, float]:
        v = torch.sort(torch.cat([candidate_values(c, i) for i in rows])).values
        half_gaps = (v[1:] - v[:-1]) / 2
        wide = torch.nonzero(half_gaps >= min_margin).squeeze(1)
        for j in wide[torch.randperm(len(wide), generator=g)].tolist():
            value = float((v[j] + v[j + 1]) / 2)
            if soft_scale is not None:
                m = soft_membership_sums(z, z_aug, torch.full((n,), value), soft_scale,
                                         normalize=normalize, labels=labels)[rows]
                if (m - 1).abs().min() < SOFT_KINK_MARGIN:
                    continue
            return value, float(half_gaps[j])
        raise ValueError(f"no threshold for rows {rows} keeps the margins: use other inputs")

    if shape in ("scalar", "0d"):
        value, margin = place(list(range(n)))
        return (value if shape == "scalar" else torch.tensor(value, dtype=z.dtype)), margin
    groups = [[i, i + b] for i in range(b)] if shape == "B" else [[i] for i in range(n)]
    ks, margins = [], []
    for rows in groups:
        value, margin = place(rows)
        ks.append(value)
        margins.append(margin)
    return torch.tensor(ks, dtype=z.dtype), min(margins)


def write_sequence_file(path, data):
    """Write ``data`` (a rec.data.SequenceData) in the one-line-per-user format
    ``user item item ...`` that the CLI reads; returns ``path``."""
    path.write_text("".join(f"{u} {' '.join(map(str, s))}\n" for u, s in zip(data.user_ids, data.sequences)))
    return path
