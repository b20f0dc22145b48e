"""``AdaptiveInfoNCECPUFunction``: the autograd wrapper around the C++ forward and backward.

Forward: one extension call returns the reduced loss and four O(N) statistics per row (the
log-sum-exp's shift and log, |A(i)|, and sum_A (LSE - s)); the Function saves those and its
inputs, never an N x N tensor. With a ``StatsSpec`` (return_stats) the same pass also counts the
candidate similarities into the histogram, and m_i is the third of those row statistics.
Backward: one extension call; the reduction's factor and the upstream gradient become one (N,)
vector of per-row weights.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..contract import LossOptions, StatsSpec
from .build import extension

_REDUCTION_CODE = {"mean": 0, "sum": 1, "none": 2}


def upstream_rows(grad: torch.Tensor, reduction: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The (N,) per-row weights u_i = dL/dl_i the backward takes: the upstream gradient times
    the reduction's factor (1/N for "mean"), or the (N,) upstream gradient itself ("none")."""
    grad = grad.to(dtype)
    if reduction == "none":
        return grad.contiguous()
    return (grad / n if reduction == "mean" else grad).reshape(1).expand(n).contiguous()


def compute_inputs(z: torch.Tensor, z_aug: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The views as the extension takes them: float32/float64 as they are, half types in
    float32 (the contract's accumulation dtype)."""
    if z.dtype in (torch.float32, torch.float64):
        return z, z_aug
    return z.float(), z_aug.float()


def _option_args(o: LossOptions) -> tuple:
    return (o.temperature, o.normalize, o.denominator == "all", o.weighting == "unit",
            o.positive_weight, o.threshold == "soft", o.threshold_scale)


class AdaptiveInfoNCECPUFunction(torch.autograd.Function):
    """apply(z, z_aug, k_rows, labels_rows, options, stats=None) -> the loss in z's dtype
    (float32/float64), or with ``stats`` (a contract.StatsSpec) (loss, m, histogram): m (N,) in
    z's dtype (NaN when an input is not finite) and the (bins,) int64 counts, neither
    differentiable.

    ``k_rows``: None or the (N,) thresholds in z's dtype (zero gradient for the hard threshold,
    the reference's soft gradient for ``threshold="soft"``); ``labels_rows``: None or (N,) int64.
    Differentiable once."""

    @staticmethod
    def forward(ctx, z, z_aug, k_rows, labels_rows, options: LossOptions, stats: StatsSpec | None = None):
        ext = extension()
        args = (z, z_aug, k_rows, labels_rows, *_option_args(options), _REDUCTION_CODE[options.reduction])
        if stats is None:
            loss, rows = ext.forward(*args)
        else:
            loss, rows, counts = ext.forward_with_histogram(*args, stats.bins, *stats.range)
        ctx.save_for_backward(z, z_aug, k_rows, labels_rows, rows)
        ctx.options = options
        if stats is None:
            return loss
        m = rows[2].clone()  # a copy: the caller may write to it, the backward reads the saved rows
        ctx.mark_non_differentiable(m, counts)
        return loss, m, counts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, *_stats_grads):
        z, z_aug, k_rows, labels_rows, stats = ctx.saved_tensors
        o = ctx.options
        u = upstream_rows(grad, o.reduction, 2 * z.shape[0], z.dtype)
        need_zs = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        need_k = ctx.needs_input_grad[2]
        dz = dza = dk = None
        if need_zs or (need_k and o.threshold == "soft"):
            dz, dza, dk = extension().backward(z, z_aug, k_rows, labels_rows, stats, u,
                                               *_option_args(o), need_k)
        if need_k and o.threshold == "hard":
            dk = torch.zeros_like(k_rows)  # the hard threshold is flat in k (adaptive_cl.reference)
        return (dz if ctx.needs_input_grad[0] else None, dza if ctx.needs_input_grad[1] else None,
                dk if need_k else None, None, None, None)
