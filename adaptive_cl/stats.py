"""Statistics of a loss call (``return_stats=True``) and the SimThres percentile from histograms.

The values and the binning (``LossStats``, ``bin_indices``, ``histogram_percentile``, what
their fields mean) are defined in :mod:`adaptive_cl.histogram`, below the backends that
produce them, and importable from here too.

``similarity_histogram(z, z_aug)`` is the histogram alone (the pipeline's statistical
SimThres uses it instead of materialising and sorting the N^2 similarities).
"""

from __future__ import annotations

import torch

from . import backends
from .contract import make_options, make_stats_spec, prepare
from .histogram import LossStats, bin_indices, histogram_percentile
from .reference import similarity_stats

__all__ = ["LossStats", "histogram_percentile", "similarity_histogram", "bin_indices"]


def similarity_histogram(
    z: torch.Tensor,
    z_aug: torch.Tensor,
    *,
    bins: int = 2048,
    range: tuple[float, float] = (-1.0, 1.0),
    normalize: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """(bins,) int64 counts of the candidate similarities c_ij of the views [z; z_aug] (every
    row i, every j != i, partner), in equal bins on ``range``, without the gradient graph and
    with nothing N x N stored on the fused backends: the C++ extension on CPU counts them alone
    (no loss), the Triton kernel on CUDA in its forward pass; the reference (or a backend
    without statistics of its own) from its dense similarities."""
    spec = make_stats_spec(bins, range)
    with torch.no_grad():
        p = prepare(z.detach(), z_aug.detach(), None, None, make_options(normalize=normalize), spec)
        fn = backends.resolve(backend, p)
        histogram_only = getattr(fn, "histogram_only", None)
        if histogram_only is not None:
            return histogram_only(p)
        if fn is backends.adaptive_info_nce_reference or not getattr(fn, "fused_stats", False):
            return similarity_stats(p).histogram  # the similarities alone, no loss
        return fn(p)[1].histogram
