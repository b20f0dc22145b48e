"""Fused CPU backend: a C++ extension (``csrc/``) built on first use, one autograd Function.

``unsupported_reason(p)`` says why these inputs cannot run here (None when they can; asking
builds the extension once per machine); ``adaptive_info_nce_cpu(p)`` computes the loss (and with
``p.stats`` its statistics in the same pass); ``histogram_cpu(p)`` the statistics' histogram alone.
Every option of the AdaptiveRec loss is covered; the issue-24 setups (``contract.extended_options``:
the cross layout, a queue, logQ, exclusion, a mask, a tensor temperature) are not yet
(``option_reason``), and ``backend="auto"`` gives them to the reference. float16/bfloat16 inputs are computed in float32 (the
accumulation dtype the contract asks for) and their gradients come back in the input dtype.
"""

from __future__ import annotations

import torch

from ..contract import Prepared, extended_options
from . import build
from .build import disabled, load_error
from .function import AdaptiveInfoNCECPUFunction, compute_inputs

__all__ = ["AdaptiveInfoNCECPUFunction", "adaptive_info_nce_cpu", "build", "disabled", "histogram_cpu",
           "load_error", "option_reason", "unsupported_reason"]


def option_reason(p: Prepared) -> str | None:
    """Why the extension cannot compute these options (None when it can); builds nothing."""
    if extended_options(p):
        return (f"the C++ extension does not implement {', '.join(extended_options(p))} yet; "
                "use backend='reference' (backend='auto' does)")
    return None


def unsupported_reason(p: Prepared) -> str | None:
    """None when the extension can compute these inputs; else a short reason."""
    if p.z.device.type != "cpu":
        return f"tensors are on {p.z.device}; backend='cpu' takes CPU tensors"
    return option_reason(p) or load_error()


def adaptive_info_nce_cpu(p: Prepared):
    """The loss of :mod:`adaptive_cl.reference` via the fused C++ kernels; gradients to z, z_aug and k.
    With ``p.stats``: (loss, LossStats), counted in the forward pass (nothing N x N)."""
    z, z_aug = compute_inputs(p.z, p.z_aug)  # half types accumulate in float32
    if p.stats is None:
        return AdaptiveInfoNCECPUFunction.apply(z, z_aug, p.k_rows, p.labels_rows, p.options)
    from ..stats import LossStats

    loss, m, counts = AdaptiveInfoNCECPUFunction.apply(z, z_aug, p.k_rows, p.labels_rows, p.options, p.stats)
    return loss, LossStats(m=m, histogram=counts, range=p.stats.range)


def histogram_cpu(p: Prepared) -> torch.Tensor:
    """The (bins,) int64 histogram of ``p``'s candidate similarities alone (``p.stats`` set; no
    loss, no graph): only the pairs j > i are computed, no exponentials."""
    z, z_aug = compute_inputs(p.z.detach(), p.z_aug.detach())
    return build.extension().similarity_histogram(z, z_aug, p.options.normalize, p.stats.bins, *p.stats.range)


#: This backend returns (loss, LossStats) itself when p.stats is set (adaptive_cl.functional),
#: and counts the histogram alone without the loss (adaptive_cl.stats.similarity_histogram).
adaptive_info_nce_cpu.fused_stats = True
adaptive_info_nce_cpu.histogram_only = histogram_cpu
