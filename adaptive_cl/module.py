"""``AdaptiveInfoNCE``: the loss as an ``nn.Module`` with the options fixed at construction."""

from __future__ import annotations

import torch
from torch import nn

from . import backends
from .contract import make_options, make_stats_spec
from .functional import _check_flag, apply_loss


class AdaptiveInfoNCE(nn.Module):
    """Module form of :func:`adaptive_cl.adaptive_info_nce` (same options, same defaults).

    Options are validated once in the constructor; ``forward(z, z_aug, k=None, labels=None,
    return_stats=False, negatives=None, log_q=None, mask=None)`` (with ``return_stats``:
    ``(loss, LossStats)``, histogram options ``stats_bins`` / ``stats_range`` set in the
    constructor). A tensor ``temperature`` is kept as the attribute ``temperature`` (an
    ``nn.Parameter`` is registered, so the optimiser sees it).
    """

    def __init__(
        self,
        *,
        temperature: float | torch.Tensor = 1.0,
        normalize: bool = True,
        denominator: str = "negatives",
        weighting: str = "normalized",
        positive_weight: float = 0.5,
        threshold: str = "hard",
        threshold_scale: float = 0.05,
        reduction: str = "mean",
        backend: str = "auto",
        stats_bins: int = 2048,
        stats_range: tuple[float, float] = (-1.0, 1.0),
        layout: str = "views",
        symmetric: bool = False,
        same_label: str = "positive",
    ) -> None:
        super().__init__()
        # a Parameter becomes a registered parameter; a float or plain tensor stays as given
        self.temperature = temperature
        self.options = make_options(
            temperature=temperature,
            normalize=normalize,
            denominator=denominator,
            weighting=weighting,
            positive_weight=positive_weight,
            threshold=threshold,
            threshold_scale=threshold_scale,
            reduction=reduction,
            layout=layout,
            symmetric=symmetric,
            same_label=same_label,
        )
        self.backend = backends.check_name(backend)
        self.stats_spec = make_stats_spec(stats_bins, stats_range)

    def forward(
        self,
        z: torch.Tensor,
        z_aug: torch.Tensor,
        k: torch.Tensor | float | None = None,
        labels: torch.Tensor | None = None,
        return_stats: bool = False,
        negatives: torch.Tensor | None = None,
        log_q: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ):
        stats = self.stats_spec if _check_flag(return_stats) else None
        tau = self.temperature if isinstance(self.temperature, torch.Tensor) else None
        return apply_loss(z, z_aug, k, labels, self.options, self.backend, stats, temperature=tau,
                          negatives=negatives, log_q=log_q, mask=mask)

    def extra_repr(self) -> str:
        o = self.options
        fields = ", ".join(f"{f}={getattr(o, f)!r}" for f in o.__dataclass_fields__ if f != "temperature")
        tau = "learned" if isinstance(self.temperature, torch.Tensor) else repr(o.temperature)
        return f"temperature={tau}, {fields}, backend={self.backend!r}"
