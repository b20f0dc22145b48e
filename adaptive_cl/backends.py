"""Backend registry: which implementations exist and which one ``backend="auto"`` picks.

A backend is a function ``Prepared -> Tensor`` computing the reduced loss. ``"auto"`` takes the
fused Triton kernel for CUDA tensors whose options the kernel covers, and the reference
otherwise (on CPU the reference's dense matmuls beat Triton's interpreter by far).
"""

from __future__ import annotations

import functools
from typing import Callable

from .contract import Prepared
from .reference import adaptive_info_nce_reference

Backend = Callable[[Prepared], "torch.Tensor"]  # noqa: F821

BACKENDS = ("auto", "reference", "compiled", "triton")


@functools.lru_cache(maxsize=None)
def _compiled_reference() -> Backend:
    import torch

    return torch.compile(adaptive_info_nce_reference, dynamic=False)


def _triton_module():
    """The kernel package, or the reason it cannot be used here."""
    try:
        from . import kernels
    except ImportError as err:  # triton not installed (e.g. macOS/Windows wheels of torch)
        return None, f"the Triton kernels could not be imported ({err})"
    return kernels, None


def triton_unavailable_reason(p: Prepared) -> str | None:
    """Why ``backend="triton"`` cannot run these inputs, or None when it can."""
    kernels, reason = _triton_module()
    if kernels is None:
        return reason
    return kernels.unsupported_reason(p)


def check_name(name: object) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {name!r}")
    return name


def resolve(name: str, p: Prepared) -> Backend:
    """Map a backend name to its implementation for these inputs, or raise a clear error."""
    check_name(name)
    if name == "reference":
        return adaptive_info_nce_reference
    if name == "compiled":
        return _compiled_reference()
    if name == "triton":
        reason = triton_unavailable_reason(p)
        if reason is not None:
            raise ValueError(f"backend='triton' is not available: {reason}")
        from .kernels import adaptive_info_nce_triton

        return adaptive_info_nce_triton
    # auto: the fused kernel on CUDA when it covers the options, else the exact reference.
    if p.z.is_cuda and triton_unavailable_reason(p) is None:
        from .kernels import adaptive_info_nce_triton

        return adaptive_info_nce_triton
    return adaptive_info_nce_reference
