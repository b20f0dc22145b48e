"""Backend registry: which implementations exist and which one ``backend="auto"`` picks.

A backend is a function ``Prepared -> Tensor`` computing the reduced loss. ``"auto"`` takes the
fused Triton kernel for CUDA tensors whose options the kernel covers, the fused C++ extension
(``"cpu"``, built on first use) for CPU tensors, and the reference otherwise; where the
extension cannot be built, CPU tensors fall back to the reference with one warning.

Options a fused backend does not implement (the Triton kernels: ``contract.extended_options``,
the issue-24 setups; the C++ extension implements them all) are never passed to it: ``"auto"``
takes the reference for them on CUDA (no warning: the documented route, not a failure), and
naming the fused backend raises ValueError naming the options. ``route(name, p)`` says which
backend runs and why.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

from .contract import Prepared
from .reference import adaptive_info_nce_reference

Backend = Callable[[Prepared], "torch.Tensor"]  # noqa: F821

BACKENDS = ("auto", "reference", "compiled", "triton", "cpu")


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


def cpu_unavailable_reason(p: Prepared) -> str | None:
    """Why ``backend="cpu"`` cannot run these inputs, or None when it can (builds it once)."""
    from . import cpu

    return cpu.unsupported_reason(p)


_fallback_warned = False


def _cpu_or_reference(p: Prepared) -> Backend:
    """auto on CPU: the extension, or the reference with one warning per process if it failed
    to build (silently when the user turned it off)."""
    global _fallback_warned
    from . import cpu

    reason = cpu.unsupported_reason(p)
    if reason is None:
        return cpu.adaptive_info_nce_cpu
    if not cpu.disabled() and not _fallback_warned:
        _fallback_warned = True
        warnings.warn(f"adaptive_cl: using the PyTorch reference on CPU: {reason}. "
                      f"Set {cpu.build.DISABLE_ENV}=0 to silence this.", RuntimeWarning, stacklevel=4)
    return adaptive_info_nce_reference


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
    if name == "cpu":
        from . import cpu

        if p.z.device.type != "cpu":
            raise ValueError(f"backend='cpu' is not available: {cpu.unsupported_reason(p)}")
        reason = cpu.load_error()
        if reason is not None:
            raise RuntimeError(f"backend='cpu' is not available: {reason}")
        return cpu.adaptive_info_nce_cpu
    # auto: the fused kernel on CUDA when it covers the options, the C++ extension on CPU.
    if p.z.is_cuda and triton_unavailable_reason(p) is None:
        from .kernels import adaptive_info_nce_triton

        return adaptive_info_nce_triton
    if p.z.device.type == "cpu":
        return _cpu_or_reference(p)
    return adaptive_info_nce_reference


def route(name: str, p: Prepared) -> tuple[str, str | None]:
    """(the backend that ``name`` runs for these inputs, why it is not the fused one or None):
    what ``resolve`` picks, in words, e.g. ``("reference", "the C++ extension does not
    implement layout='cross' yet; ...")`` for "auto" on CPU."""
    fn = resolve(name, p)
    if fn is adaptive_info_nce_reference and name == "auto":
        if p.z.device.type == "cpu":
            return "reference", cpu_unavailable_reason(p)
        return "reference", triton_unavailable_reason(p)
    for label in BACKENDS[1:]:
        if name == label:
            return label, None
    from . import cpu

    return ("cpu" if fn is cpu.adaptive_info_nce_cpu else "triton"), None
