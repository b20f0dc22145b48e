"""Fused CPU backend: a C++ extension (``csrc/``) built on first use, one autograd Function.

``unsupported_reason(p)`` says why these inputs cannot run here (None when they can; asking
builds the extension once per machine); ``adaptive_info_nce_cpu(p)`` computes the loss (and with
``p.stats`` its statistics in the same pass); ``histogram_cpu(p)`` the statistics' histogram alone.
Every option of the contract is covered, the issue-24 setups included: the cross layout (and
symmetric), a queue of negatives, log_q (per-column offsets), same_label="exclude", a tensor
temperature (dL/dtau from the backward's per-row statistics, a fixed-order sum), and a mask,
applied here by selecting the valid pairs (on CPU reading the mask costs nothing) and scattering
the results back, which is what the mask means (reference.py); fewer than two valid pairs go to
the reference, which the extension's B >= 2 does not cover. float16/bfloat16 inputs are computed in float32 (the
accumulation dtype the contract asks for) and their gradients come back in the input dtype.
"""

from __future__ import annotations

import torch

import dataclasses

from ..contract import Prepared
from ..histogram import LossStats
from ..reference import adaptive_info_nce_reference
from . import build
from .build import disabled, load_error
from .function import AdaptiveInfoNCECPUFunction, Setup, compute_inputs

__all__ = ["AdaptiveInfoNCECPUFunction", "adaptive_info_nce_cpu", "build", "disabled", "histogram_cpu",
           "load_error", "unsupported_reason"]


def unsupported_reason(p: Prepared) -> str | None:
    """None when the extension can compute these inputs; else a short reason."""
    if p.z.device.type != "cpu":
        return f"tensors are on {p.z.device}; backend='cpu' takes CPU tensors"
    return load_error()


def adaptive_info_nce_cpu(p: Prepared):
    """The loss of :mod:`adaptive_cl.reference` via the fused C++ kernels; gradients to z, z_aug and k.
    With ``p.stats``: (loss, LossStats), counted in the forward pass (nothing N x N)."""
    if p.mask is not None:
        return _masked(p)
    z, z_aug, k_rows, labels, setup, tau = extension_inputs(p)
    o = p.options
    out = AdaptiveInfoNCECPUFunction.apply(z, z_aug, k_rows, labels, o, p.stats, setup, tau)
    loss = out if p.stats is None else out[0]
    if setup.layout == 2 and o.reduction == "sum":
        loss = loss / 2  # the mean of the two directions' sums (reference.reduce_rows)
    if p.stats is None:
        return loss
    return loss, LossStats(m=out[1], histogram=out[2], range=p.stats.range)


def extension_inputs(p: Prepared, tau_grad: bool | None = None):
    """(z, z_aug, k_rows, labels, Setup, tau): ``p`` (no mask) as the extension takes it: half
    types in float32, a threshold per row of [z; z_aug] (zeros for the cross layout's z_aug
    rows), labels per column, log_q as per-column offsets. ``tau_grad``: whether the forward
    keeps dL/dtau's statistics (default: the temperature requires grad)."""
    z, z_aug = compute_inputs(p.z, p.z_aug)  # half types accumulate in float32
    o = p.options
    b, m_queue = p.batch, p.queue
    layout = 0 if o.layout == "views" else (2 if o.symmetric else 1)
    k_rows, labels = p.k_rows, p.labels_rows
    if k_rows is not None and layout == 1:  # the extension takes a threshold per row of [z; z_aug]
        k_rows = torch.cat([k_rows, k_rows.new_zeros(b)])
    if labels is not None:
        labels = _column_labels(labels, b, m_queue, layout)
    offsets = None
    if p.log_q is not None:  # z's rows carry no offset; z_aug's columns and the queue's do
        offsets = torch.cat([p.log_q.new_zeros(b), p.log_q]).to(z.dtype)
        if offsets.shape[0] < 2 * b + m_queue:
            offsets = torch.cat([offsets, offsets.new_zeros(2 * b + m_queue - offsets.shape[0])])
    queue = None if p.negatives is None else compute_inputs(p.negatives, p.negatives)[0].detach()
    tau = None if p.temperature is None else p.temperature.to(z.dtype)
    if tau_grad is None:
        tau_grad = tau is not None and tau.requires_grad
    setup = Setup(queue, offsets, layout, o.same_label == "exclude", tau is not None and tau_grad)
    return z, z_aug, k_rows, labels, setup, tau


def _column_labels(labels: torch.Tensor, b: int, m_queue: int, layout: int) -> torch.Tensor:
    """The (N + M,) labels of every column of [z; z_aug; queue]: the views layout's row labels, or
    the cross layout's pair labels for both halves; a queue given no labels gets ids that match
    nothing (below every label)."""
    own = labels[:2 * b] if layout == 0 else torch.cat([labels[:b], labels[:b]])
    if not m_queue:
        return own
    given = 2 * b if layout == 0 else b
    if labels.shape[0] == given + m_queue:
        return torch.cat([own, labels[given:]])
    low = int(labels.min())  # CPU: no device to wait for
    if low - m_queue < torch.iinfo(torch.int64).min + 1:
        raise ValueError("labels this close to the int64 minimum leave no id for an unlabeled queue; give the "
                         "queue's labels too")
    return torch.cat([own, low - 1 - torch.arange(m_queue, dtype=torch.int64)])


def valid_pairs(p: Prepared):
    """(the problem of the valid pairs alone, their indices, their rows' indices among p's rows),
    or None with fewer than two valid pairs (the extension needs B >= 2)."""
    idx = p.mask.nonzero().squeeze(1)  # a CPU tensor: no device to wait for
    if idx.numel() < 2:
        return None
    b, o = p.batch, p.options
    both = torch.cat([idx, idx + b])  # a pair's two rows (views, symmetric)
    per_row = both if p.rows == 2 * b else idx

    def own_then_queue(t, own_len, own_idx):
        return None if t is None else torch.cat([t[own_idx], t[own_len:]])

    labels = None
    if p.labels_rows is not None:
        labels = own_then_queue(p.labels_rows, 2 * b if o.layout == "views" else b,
                                both if o.layout == "views" else idx)
    sub = dataclasses.replace(
        p, z=p.z[idx], z_aug=p.z_aug[idx], mask=None,
        k_rows=None if p.k_rows is None else p.k_rows[per_row], labels_rows=labels,
        log_q=own_then_queue(p.log_q, b, idx))
    return sub, idx, per_row


def _masked(p: Prepared):
    """The loss of the valid pairs alone, results scattered back to every row (masked rows 0):
    the mask's meaning (reference.py). Fewer than two valid pairs: the reference."""
    found = valid_pairs(p)
    if found is None:
        return adaptive_info_nce_reference(p)
    sub, _, per_row = found
    out = adaptive_info_nce_cpu(sub)
    loss = out if p.stats is None else out[0]
    if p.options.reduction == "none":
        loss = loss.new_zeros(p.rows).index_put((per_row,), loss)
    if p.stats is None:
        return loss
    stats = out[1]
    m = stats.m.new_zeros(p.rows).index_put((per_row,), stats.m)
    return loss, LossStats(m=m, histogram=stats.histogram, range=p.stats.range)


def histogram_cpu(p: Prepared) -> torch.Tensor:
    """The (bins,) int64 histogram of ``p``'s candidate similarities alone (``p.stats`` set; no
    loss, no graph): only the pairs j > i are computed, no exponentials."""
    z, z_aug = compute_inputs(p.z.detach(), p.z_aug.detach())
    return build.extension().similarity_histogram(z, z_aug, p.options.normalize, p.stats.bins, *p.stats.range)


#: This backend returns (loss, LossStats) itself when p.stats is set (adaptive_cl.functional),
#: and counts the histogram alone without the loss (adaptive_cl.stats.similarity_histogram).
adaptive_info_nce_cpu.fused_stats = True
adaptive_info_nce_cpu.histogram_only = histogram_cpu
