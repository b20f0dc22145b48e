"""Dropout whose CPU masks cost a quarter of ``torch.bernoulli_``'s.

On the CPU ``nn.Dropout`` draws its mask with ``bernoulli_``, about 14 ns an element: a quarter of
a Beauty training step of SASRec went there. A uniform byte decides a mask element just as well
when the drop probability ``p`` is a multiple of 1/256 (0.5, the protocol's, is), and one 64-bit
draw of the generator gives eight such bytes: P(keep) = (256 - 256 p) / 256 = 1 - p exactly (up to
the generator's 2^-64 range bias). Multiples of 1/65536 use two bytes an element; any other ``p``
compares a float32 uniform draw. The masks come from the default CPU generator, so seeding and a
checkpoint's RNG state govern them as they govern ``nn.Dropout``'s; the draws are another stream
than ``bernoulli_``'s, with the same distribution.

Off the CPU (CUDA, where the fused kernels and torch.compile handle dropout well) this is
``F.dropout``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _keep_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """``1 / (1 - p)`` where an element is kept (probability ``1 - p``), 0 where dropped."""
    n = shape.numel()
    scale = 1.0 / (1.0 - p)
    for bits, view in ((8, torch.uint8), (16, torch.int16)):
        levels = 2**bits
        threshold = p * levels
        if threshold == int(threshold):
            words = -(-n * bits // 64)
            raw = torch.empty(words, dtype=torch.int64).random_(_INT64_MIN, _INT64_MAX)
            u = raw.view(view)[:n].view(shape)
            # uint8 spans [0, 256), int16 [-32768, 32768): keep the top (1 - p) of the range.
            low = 0 if view == torch.uint8 else -(levels // 2)
            return (u >= low + int(threshold)).to(dtype).mul_(scale)
    u = torch.empty(shape, dtype=torch.float32).uniform_()
    return (u >= p).to(dtype).mul_(scale)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with byte masks on the CPU (see the module docstring)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    return x * _keep_mask(x.shape, p, x.dtype)


class Dropout(nn.Module):
    """``nn.Dropout`` with :func:`dropout`'s CPU masks."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p!r}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
