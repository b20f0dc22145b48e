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

    ``distributed=True``: the loss of the global batch of a ``torch.distributed`` process group
    (``group``, default the default group), for training under DDP, as
    pytorch-metric-learning's ``DistributedLossWrapper``: each rank passes its own rows (see
    :func:`adaptive_cl.distributed.adaptive_info_nce_distributed`), the value returned is the
    global loss ("none": the rank's own row losses), and its gradient is scaled by the world
    size W, so that after DDP *averages* the parameter gradients over the W ranks they equal
    the gradient of the global loss in one process. (Calling ``adaptive_info_nce_distributed``
    directly gives the unscaled gradient: multiply by W yourself there.) Every rank must call
    forward and backward (collectives). Without an initialised process group: RuntimeError.
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
        distributed: bool = False,
        group=None,
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
        if not isinstance(distributed, bool):
            raise ValueError(f"distributed must be a bool; got {distributed!r}")
        if group is not None and not distributed:
            raise ValueError("group is only used with distributed=True")
        self.distributed = distributed
        self.group = group

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
        if self.distributed:
            return self._distributed(z, z_aug, k, labels, stats, negatives, log_q, mask)
        return apply_loss(z, z_aug, k, labels, self.options, self.backend, stats, temperature=tau,
                          negatives=negatives, log_q=log_q, mask=mask)

    def _distributed(self, z, z_aug, k, labels, stats, negatives, log_q, mask):
        import torch.distributed as dist

        from .distributed import adaptive_info_nce_distributed

        o = self.options
        out = adaptive_info_nce_distributed(
            z, z_aug, k, labels=labels, temperature=self.temperature, normalize=o.normalize,
            denominator=o.denominator, weighting=o.weighting, positive_weight=o.positive_weight,
            threshold=o.threshold, threshold_scale=o.threshold_scale, reduction=o.reduction,
            backend=self.backend, group=self.group, return_stats=stats is not None,
            stats_bins=stats.bins if stats else 2048, stats_range=stats.range if stats else (-1.0, 1.0),
            layout=o.layout, symmetric=o.symmetric, same_label=o.same_label, negatives=negatives,
            log_q=log_q, mask=mask)
        loss, rest = (out[0], out[1:]) if stats is not None else (out, ())
        world = dist.get_world_size(self.group)
        # the same value, W times the gradient: loss - loss.detach() is exactly 0 forward
        loss = loss + (world - 1) * (loss - loss.detach())
        return (loss, *rest) if stats is not None else loss

    def extra_repr(self) -> str:
        o = self.options
        fields = ", ".join(f"{f}={getattr(o, f)!r}" for f in o.__dataclass_fields__ if f != "temperature")
        tau = "learned" if isinstance(self.temperature, torch.Tensor) else repr(o.temperature)
        extra = ", distributed=True" if self.distributed else ""
        return f"temperature={tau}, {fields}, backend={self.backend!r}{extra}"
