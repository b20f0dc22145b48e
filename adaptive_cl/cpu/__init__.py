"""Fused CPU backend: a C++ extension (``csrc/``) built on first use, one autograd Function.

``unsupported_reason(p)`` says why these inputs cannot run here (None when they can; asking
builds the extension once per machine); ``adaptive_info_nce_cpu(p)`` computes the loss.
Every option of the contract is covered. float16/bfloat16 inputs are computed in float32 (the
accumulation dtype the contract asks for) and their gradients come back in the input dtype.
"""

from __future__ import annotations

import torch

from ..contract import Prepared
from . import build
from .build import disabled, load_error
from .function import AdaptiveInfoNCECPUFunction, compute_inputs

__all__ = ["AdaptiveInfoNCECPUFunction", "adaptive_info_nce_cpu", "build", "disabled", "load_error",
           "unsupported_reason"]


def unsupported_reason(p: Prepared) -> str | None:
    """None when the extension can compute these inputs; else a short reason."""
    if p.z.device.type != "cpu":
        return f"tensors are on {p.z.device}; backend='cpu' takes CPU tensors"
    return load_error()


def adaptive_info_nce_cpu(p: Prepared) -> torch.Tensor:
    """The loss of :mod:`adaptive_cl.reference` via the fused C++ kernels; gradients to z, z_aug and k."""
    z, z_aug = compute_inputs(p.z, p.z_aug)  # half types accumulate in float32
    return AdaptiveInfoNCECPUFunction.apply(z, z_aug, p.k_rows, p.labels_rows, p.options)
