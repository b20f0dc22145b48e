"""CL4SRec's sequence augmentations (crop, mask, reorder), batched on device tensors.

Every operation takes a LEFT-padded ``(b, L)`` batch (0 = padding, most recent item last) and
returns a new tensor: the input, and so the stored training sequences, are never modified (the
released CL4SRec code shuffles its stored sequences in place, so the "original" data drift
during training). Randomness comes only from the ``torch.Generator`` passed in, which must live
on the batch's device; no value is read back to the host.

Lengths follow CL4SRec: crop keeps ``max(1, floor(crop * n))`` items, mask replaces
``floor(mask * n)`` items, reorder shuffles a span of ``floor(reorder * n)`` items.
"""

from __future__ import annotations

import torch

OPERATIONS = ("crop", "mask", "reorder")
MASK_IDS = ("token", "padding")


def _lengths(x: torch.Tensor) -> torch.Tensor:
    return (x != 0).sum(1)


def _check_rate(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def _span(
    n: torch.Tensor, rate: float, length: int, minimum: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random contiguous span of ``floor(rate * n)`` (at least ``minimum``, at most ``n``)
    items of each row, as (first column, span length) in left-padded coordinates."""
    m = torch.minimum(torch.floor(rate * n.double()).long().clamp_min(minimum), n)
    u = torch.rand(n.shape, generator=generator, device=n.device, dtype=torch.float64)
    offset = torch.minimum((u * (n - m + 1)).long(), n - m)  # uniform in [0, n - m]
    return length - n + offset, m


class Augmenter:
    """CL4SRec's three augmentations with configurable rates.

    Args:
        num_items: items are ``1..num_items``; the mask token is ``num_items + 1`` (the model
            needs ``mask_token=True`` whenever masking can be drawn).
        mask_id: ``"token"`` (that dedicated id, CL4SRec) or ``"padding"`` (masking writes the
            padding id 0, as MCLRec's released code does: a masked item is then ignored like
            padding and the model needs no mask row).
        crop: fraction of items a crop keeps (CL4SRec 0.6; MCLRec 0.5).
        mask: fraction of items replaced by the mask token (0.3; MCLRec 0.5).
        reorder: fraction of items in the shuffled span (0.6; MCLRec 0.8).
    """

    def __init__(
        self, num_items: int, crop: float = 0.6, mask: float = 0.3, reorder: float = 0.6,
        mask_id: str = "token",
    ) -> None:
        if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
            raise ValueError(f"num_items must be an integer >= 1, got {num_items!r}")
        if mask_id not in MASK_IDS:
            raise ValueError(f"mask_id must be one of {MASK_IDS}, got {mask_id!r}")
        self.mask_token = num_items + 1 if mask_id == "token" else 0
        self.crop_rate = _check_rate("crop", crop)
        self.mask_rate = _check_rate("mask", mask)
        self.reorder_rate = _check_rate("reorder", reorder)

    def fits(self, model) -> bool:
        """Whether ``model``'s embedding table has the row this augmenter's mask writes."""
        return self.mask_token == 0 or model.mask_token == self.mask_token

    def crop(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random contiguous subsequence, left-padded again (so it ends in the last column)."""
        length = x.shape[1]
        start, m = _span(_lengths(x), self.crop_rate, length, 1, generator)
        col = torch.arange(length, device=x.device)
        t = col - (length - m)[:, None]  # position inside the kept span, < 0 = padding
        source = (start[:, None] + t).clamp(0, length - 1)
        return torch.where(t >= 0, x.gather(1, source), torch.zeros_like(x))

    def mask(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``floor(mask * n)`` distinct random items replaced by the mask token."""
        real = x != 0
        count = torch.floor(self.mask_rate * real.sum(1).double()).long()
        keys = torch.rand(x.shape, generator=generator, device=x.device)
        keys = keys.masked_fill(~real, 2.0)  # padding sorts last, never chosen
        rank = keys.argsort(1).argsort(1)
        chosen = rank < count[:, None]
        return torch.where(chosen, torch.full_like(x, self.mask_token), x)

    def reorder(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random contiguous span of ``floor(reorder * n)`` items shuffled in place (in the
        returned copy); everything outside the span keeps its column."""
        length = x.shape[1]
        start, m = _span(_lengths(x), self.reorder_rate, length, 0, generator)
        col = torch.arange(length, device=x.device).expand_as(x)
        inside = (col >= start[:, None]) & (col < (start + m)[:, None])
        # Sort keys: outside columns keep their index; span columns draw keys in
        # [start - 0.5, start + m - 0.5), strictly between the neighbouring integer keys.
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
        keys = torch.where(inside, start[:, None] - 0.5 + u * m[:, None], col.double())
        return x.gather(1, keys.argsort(1))

    def apply(
        self, x: torch.Tensor, ops: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Row ``r`` gets operation ``OPERATIONS[ops[r]]``."""
        out = torch.stack([self.crop(x, generator), self.mask(x, generator),
                           self.reorder(x, generator)])
        return out.gather(0, ops.to(x.device)[None, :, None].expand(1, *x.shape))[0]

    def two_views(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Two views of every row from two DISTINCT random operations (CL4SRec).

        Returns ``(view1, view2, ops)`` with ``ops`` the ``(b, 2)`` operation indices.
        """
        if x.dim() != 2:
            raise ValueError(f"x must be a (b, L) batch, got shape {tuple(x.shape)}")
        first = torch.randint(0, 3, (len(x),), generator=generator, device=x.device)
        second = (first + torch.randint(1, 3, (len(x),), generator=generator, device=x.device)) % 3
        return (self.apply(x, first, generator), self.apply(x, second, generator),
                torch.stack([first, second], 1))
