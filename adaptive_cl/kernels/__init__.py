"""Fused Triton kernels of the AdaptiveRec InfoNCE: every option of the loss (hard and soft
threshold, labels, both denominators and weightings) and its statistics (return_stats).

``unsupported_reason(p)`` says why these inputs cannot run here (None when they can);
``adaptive_info_nce_triton(p)`` computes the reduced loss through one autograd Function.
Importing needs ``triton`` (ImportError otherwise); nothing else happens at import.

Modules: ``row_stats`` (the per-row pre-pass), ``adaptive_info_nce_fwd`` / ``_bwd`` (the tile
kernels), ``function`` (entry points over row ranges, the autograd Function), ``launch`` (the
fixed launch table), and two tools: ``compile_check`` (compile every launch for sm_90 without a
GPU: registers, spills, instructions per element) and ``autotune`` (time candidates on a GPU,
print a table).
"""

from __future__ import annotations

import triton  # noqa: F401  (ImportError here tells backends.py the kernels are unavailable)
import torch

from ..contract import Prepared, extended_options
from ..histogram import LossStats
from . import adaptive_info_nce_fwd as _fwd
from .function import MAX_LABEL_ROWS, AdaptiveInfoNCEFunction

__all__ = ["unsupported_reason", "adaptive_info_nce_triton"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unsupported_reason(p: Prepared) -> str | None:
    """None when the fused kernels can compute these inputs; else a short reason."""
    z = p.z
    if extended_options(p):
        return (f"the Triton kernels do not implement {', '.join(extended_options(p))} yet; "
                "use backend='reference' (backend='auto' does)")
    if not z.is_cuda and not _fwd.INTERPRET:
        return (f"tensors are on {z.device.type}; the Triton kernels need CUDA tensors "
                "(or TRITON_INTERPRET=1 for Triton's CPU interpreter)")
    if z.dtype == torch.float64:
        return "float64 inputs are not supported (the kernels accumulate in float32); use backend='reference'"
    if z.dtype not in _DTYPES:
        return f"dtype {z.dtype} is not supported (float32, float16, bfloat16 are)"
    if _fwd.INTERPRET and not z.is_cuda and z.dtype == torch.bfloat16:
        return ("bfloat16 under Triton's CPU interpreter (its bfloat16 tl.dot is wrong); "
                "use a CUDA device or backend='reference'")
    if p.labels_rows is not None and 2 * p.batch > MAX_LABEL_ROWS:
        return (f"labels with N = {2 * p.batch} > {MAX_LABEL_ROWS} rows (the kernels compare label ids "
                "as float32, exact up to 2^24)")
    return None


def adaptive_info_nce_triton(p: Prepared):
    """The reduced loss (float32) via the fused kernels (adaptive_cl.reference is its readable
    specification); gradients to z, z_aug, k (dL/dk with the soft threshold, zero with the
    hard one). With ``p.stats``: (loss, LossStats), counted in the forward pass."""
    k_rows = None if p.k_scalar is not None else p.k_rows
    if p.stats is None:
        return AdaptiveInfoNCEFunction.apply(p.z, p.z_aug, k_rows, p.k_scalar, p.options, p.labels_rows)
    loss, m, counts = AdaptiveInfoNCEFunction.apply(p.z, p.z_aug, k_rows, p.k_scalar, p.options, p.labels_rows,
                                                    p.stats)
    return loss, LossStats(m=m, histogram=counts, range=p.stats.range)


#: This backend returns (loss, LossStats) itself when p.stats is set (adaptive_cl.functional).
adaptive_info_nce_triton.fused_stats = True
