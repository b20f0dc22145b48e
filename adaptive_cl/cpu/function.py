"""``AdaptiveInfoNCECPUFunction``: the autograd wrapper around the C++ forward and backward.

Forward: one extension call returns the reduced loss and seven O(N) statistics per row (the
log-sum-exp's shift and log, |A(i)|, sum_A (LSE - s), and what dL/dtau reads: the E-weighted mean
cosine, the partner's cosine, sum_A c); the Function saves those and its inputs, never an N x N
tensor. The issue-24 setups travel as a ``Setup`` (the queue, log_q as per-column offsets, the
layout, exclusion, a tensor temperature); a mask is applied by the caller (cpu/__init__.py). With a ``StatsSpec`` (return_stats) the same pass also counts the
candidate similarities into the histogram, and m_i is the third of those row statistics.
Backward: one extension call; the reduction's factor and the upstream gradient become one (N,)
vector of per-row weights.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from dataclasses import dataclass

from ..contract import LossOptions, StatsSpec
from .build import extension

_REDUCTION_CODE = {"mean": 0, "sum": 1, "none": 2}

#: The rows of the extension's per-row statistics (csrc/loss_terms.h, Stat).
STATS_ROWS = 7


@dataclass(frozen=True)
class Setup:
    """What the extension's ``forward_setup`` / ``backward_setup`` take beyond the plain loss:
    ``queue`` (M, D) in z's dtype or None; ``offsets`` (N + M,) column offsets (log_q on z_aug's
    columns and the queue's) or None; ``layout`` 0 views, 1 cross, 2 cross symmetric; ``exclude``
    (same_label="exclude"); ``tau_grad`` (the forward keeps what dL/dtau needs)."""

    queue: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    layout: int = 0
    exclude: bool = False
    tau_grad: bool = False

    def args(self) -> tuple:
        return self.queue, self.offsets, self.layout, self.exclude, self.tau_grad

    def loss_rows(self, b: int) -> int:
        return b if self.layout == 1 else 2 * b


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


def _option_args(o: LossOptions, tau: float | None = None) -> tuple:
    return (o.temperature if tau is None else tau, o.normalize, o.denominator == "all", o.weighting == "unit",
            o.positive_weight, o.threshold == "soft", o.threshold_scale)


class AdaptiveInfoNCECPUFunction(torch.autograd.Function):
    """apply(z, z_aug, k_rows, labels_rows, options, stats=None, setup=None, tau=None) -> the loss
    in z's dtype (float32/float64), or with ``stats`` (a contract.StatsSpec) (loss, m,
    histogram): m (loss rows,) in z's dtype (NaN when an input is not finite) and the (bins,)
    int64 counts, neither differentiable.

    ``k_rows``: None or the (N,) thresholds in z's dtype (zero gradient for the hard threshold,
    the reference's soft gradient for ``threshold="soft"``); ``labels_rows``: None or (N,) int64
    ((N + M,) with a queue: the columns' labels). ``setup``: a ``Setup`` (None: the plain loss).
    ``tau``: a 0-d tensor temperature in z's dtype (its value replaces options.temperature; its
    gradient is dL/dtau). Rows without a loss (the cross layout's z_aug rows) have k 0. The
    reduction runs over the loss's rows. Differentiable once."""

    @staticmethod
    def forward(ctx, z, z_aug, k_rows, labels_rows, options: LossOptions, stats: StatsSpec | None = None,
                setup: Setup | None = None, tau: torch.Tensor | None = None):
        ext = extension()
        setup = Setup() if setup is None else setup
        tau_value = None if tau is None else float(tau)  # a CPU tensor: no device to wait for
        opts = (*_option_args(options, tau_value), _REDUCTION_CODE[options.reduction])
        bins = (stats.bins, *stats.range) if stats is not None else (0, 0.0, 1.0)
        out = ext.forward_setup(z, z_aug, k_rows, labels_rows, *setup.args(), *opts, *bins)
        loss, rows = out[0], out[1]
        ctx.save_for_backward(z, z_aug, k_rows, labels_rows, rows, tau)
        ctx.options, ctx.setup, ctx.tau_value = options, setup, tau_value
        if stats is None:
            return loss
        m = rows[2, :setup.loss_rows(z.shape[0])].clone()  # a copy: the backward reads the saved rows
        ctx.mark_non_differentiable(m, out[2])
        return loss, m, out[2]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, *_stats_grads):
        z, z_aug, k_rows, labels_rows, stats, tau = ctx.saved_tensors
        o, setup = ctx.options, ctx.setup
        b = z.shape[0]
        rows = setup.loss_rows(b)
        u = upstream_rows(grad, o.reduction, rows, z.dtype)
        if rows < 2 * b:  # the cross layout's z_aug rows have no loss
            u = torch.cat([u, u.new_zeros(2 * b - rows)])
        need_zs = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        need_k = ctx.needs_input_grad[2]
        need_tau = tau is not None and ctx.needs_input_grad[7]
        dz = dza = dk = dtau = None
        if need_zs or need_tau or (need_k and o.threshold == "soft"):
            dz, dza, dk, dtau = extension().backward_setup(
                z, z_aug, k_rows, labels_rows, *setup.args(), stats, u, *_option_args(o, ctx.tau_value), need_k)
        if need_k and o.threshold == "hard":
            dk = torch.zeros_like(k_rows)  # the hard threshold is flat in k (adaptive_cl.reference)
        return (dz if ctx.needs_input_grad[0] else None, dza if ctx.needs_input_grad[1] else None,
                dk if need_k else None, None, None, None, None, dtau.to(tau.dtype) if need_tau else None)
