"""Find the operations that would make the host wait for a CUDA device, on any device.

``torch.cuda.set_sync_debug_mode`` only works on a GPU. :class:`HostSyncs` is a dispatch mode
that records, on the CPU as well, every operator call that on CUDA must read a device value back
before it returns: a value to Python (``.item()``, ``float(t)``, ``bool(t)``, ``if t:``), an
output whose size depends on the data (``nonzero``, boolean-mask indexing, ``masked_select``,
``unique``, ``repeat_interleave`` without ``output_size``, ``bincount``) or a comparison answered
on the host (``equal``). Not seen: copies to the host (``.cpu()``, ``.tolist()``, ``.numpy()``),
which are no-ops on a CPU tensor; read the code for those.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
#: Operators that always wait for the device.
ALWAYS = {
    _aten._local_scalar_dense.default: "a value read by the host (.item(), float(), bool(), if)",
    _aten.nonzero.default: "nonzero (data-dependent size)",
    _aten.masked_select.default: "masked_select (data-dependent size)",
    _aten.equal.default: "equal (answered on the host)",
    _aten.is_nonzero.default: "is_nonzero (answered on the host)",
    _aten.bincount.default: "bincount (size from the largest value)",
    _aten.unique_consecutive.default: "unique_consecutive (data-dependent size)",
    _aten._unique2.default: "unique (data-dependent size)",
    _aten.unique_dim.default: "unique (data-dependent size)",
}
_INDEXING = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default,
             _aten._index_put_impl_.default}


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def sync_reason(func, args, kwargs) -> str | None:
    """Why ``func(*args, **kwargs)`` waits for a CUDA device, or None."""
    if func in ALWAYS:
        return ALWAYS[func]
    if func in _INDEXING and len(args) > 1 and any(_is_mask(i) for i in args[1] or ()):
        return f"{func.__name__} with a boolean mask (data-dependent size)"
    if func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size (data-dependent size)"
    return None


class HostSyncs(TorchDispatchMode):
    """Records host syncs while active::

        with HostSyncs() as syncs:
            step()
        assert not syncs.found, syncs.found
    """

    def __init__(self) -> None:
        super().__init__()
        self.found: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = sync_reason(func, args, kwargs)
        if reason is not None:
            self.found[reason] += 1
        return func(*args, **kwargs)

    @property
    def count(self) -> int:
        return sum(self.found.values())
