"""What a loss call's statistics are (``return_stats=True``): the value type, the binning rule and
the SimThres percentile from histograms (no backend here: the backends produce these values).

``adaptive_info_nce(..., return_stats=True)`` returns ``(loss, LossStats)``, the same on every
backend (the fused backends, the Triton kernel and the C++ extension, count in the forward
pass; the reference reads the similarities of its loss; the compiled backend, and every backend
under torch.compile, count from the dense similarities, N x N memory):

- ``m``: (N,) per-row m_i, the number of extra positives |A(i)| (threshold and label
  positives; with ``threshold="soft"`` the soft count sum_j a_ij), in the loss's accumulation
  dtype; NaN in every row when an element of z or z_aug is not finite (and in row i for the
  soft threshold with a NaN k_i);
- ``histogram``: (bins,) int64 counts of the candidate similarities c_ij, over every row i and
  every j in N(i) (j != i, j != partner; labels and thresholds do not matter), in ``bins`` equal
  bins on ``range`` (default (-1, 1), the cosine's range with ``normalize=True``): c goes to bin
  floor((c - lo) * bins / (hi - lo)), values outside the range to the edge bins. The counts sum
  to N (N - 2). Integer counts, so they do not depend on the order the kernel adds them in. All
  zero when an input is not finite (the loss is NaN; there is nothing to count).

``histogram_percentile(counts, q)`` turns counts (one batch's, or summed over an epoch's
batches) into the q-quantile of the counted values, with ``torch.quantile``'s linear
interpolation between order statistics: each of the two order statistics is placed inside its
bin by linear interpolation of its rank (clamped to the middle half of the bin), so the answer
is at most 3/4 of a bin width from the exact percentile of the counted values. The kernels'
c_ij differ from float64 by rounding (about 1e-6 in float32), so the answer is within one bin
width of ``torch.quantile`` / ``kthvalue`` on the float64 similarities (2048 bins on [-1, 1]:
width 2/2048, about 1e-3). Everything stays on the counts' device (no host synchronisation).

``similarity_histogram`` (the histogram alone, counted by a backend) is in :mod:`adaptive_cl.stats`,
above the backends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .contract import StatsSpec, check_stats_range

__all__ = ["LossStats", "histogram_percentile", "bin_indices"]


@dataclass(frozen=True)
class LossStats:
    """What ``return_stats=True`` returns beside the loss (see the module docstring)."""

    m: torch.Tensor
    histogram: torch.Tensor
    range: tuple[float, float]

    @property
    def bins(self) -> int:
        return self.histogram.shape[0]

    @property
    def width(self) -> float:
        return (self.range[1] - self.range[0]) / self.bins

    def percentile(self, q: float) -> torch.Tensor:
        """The q-quantile of this call's candidate similarities (see histogram_percentile)."""
        return histogram_percentile(self.histogram, q, self.range)


def bin_indices(c: torch.Tensor, spec: StatsSpec) -> torch.Tensor:
    """The bin of each value: floor((c - lo) * bins / (hi - lo)), clamped to [0, bins - 1]
    (the kernels' rule; NaN goes to bin 0, but non-finite inputs zero the whole histogram)."""
    lo, hi = spec.range
    b = torch.floor((c - lo) * (spec.bins / (hi - lo)))
    return torch.nan_to_num(b, nan=0.0).clamp(0, spec.bins - 1).long()


def _order_statistic(counts: torch.Tensor, cum: torch.Tensor, rank: torch.Tensor, lo: float, width: float):
    """Estimate of the value of 0-based rank ``rank``: its bin, and inside the bin linearly by
    rank (the bin's k values assumed at (i + 0.5) / k of its width), clamped to [1/4, 3/4]."""
    # index_select, not counts[b]: indexing with a 0-d tensor reads it on the host (a sync)
    b = torch.searchsorted(cum, rank.reshape(1), right=True).clamp(max=counts.numel() - 1)
    inside = counts.index_select(0, b)[0]
    before = cum.index_select(0, b)[0] - inside
    frac = ((rank - before + 0.5) / inside.clamp(min=1)).clamp(0.25, 0.75)
    return lo + (b[0] + frac) * width


def histogram_percentile(counts: torch.Tensor, q: float, range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """The q-quantile (0 <= q <= 1, ``torch.quantile``'s linear interpolation) of the values
    counted in ``counts`` ((bins,) integer, equal bins on ``range``), as a 0-d float64 tensor on
    the counts' device, without a host synchronisation. At most 3/4 of a bin width from the
    exact quantile of the counted values; NaN when the counts are all zero."""
    if not isinstance(counts, torch.Tensor) or counts.dim() != 1 or counts.is_floating_point() \
            or counts.is_complex() or counts.dtype == torch.bool:
        raise TypeError("counts must be a 1-D integer tensor (a histogram)")
    lo, hi = check_stats_range(range, "range")
    if counts.numel() == 0:
        raise ValueError("counts is empty")
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= float(q) <= 1.0 or math.isnan(q):
        raise ValueError(f"q must be a number in [0, 1]; got {q!r}")
    width = (hi - lo) / counts.numel()
    c = counts.to(torch.float64)
    cum = c.cumsum(0)
    total = cum[-1]
    pos = float(q) * (total - 1).clamp(min=0)
    r_lo = pos.floor()
    r_hi = torch.minimum(r_lo + 1, (total - 1).clamp(min=0))
    v_lo = _order_statistic(c, cum, r_lo, lo, width)
    v_hi = _order_statistic(c, cum, r_hi, lo, width)
    out = v_lo + (pos - r_lo) * (v_hi - v_lo)
    return torch.where(total > 0, out, torch.full_like(out, float("nan")))
