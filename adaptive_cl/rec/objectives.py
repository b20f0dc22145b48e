"""Training objectives: SASRec, CL4SRec, DuoRec and AdaptiveRec, one small module each (RCL and
MCLRec live in ``rcl.py`` and ``mclrec.py`` and share :class:`ContrastiveTerm` from here).

Each objective maps ``(model, batch, generator)`` to an :class:`ObjectiveOutput`: the total
loss, its logged parts (device tensors, never read back here), and the contrastive view pair
and thresholds for the epoch statistics. All the sequences a step encodes go through the encoder
in one pass (:func:`encode`). Every contrastive term goes through
``adaptive_info_nce``: plain InfoNCE/NT-Xent is ``k=None, positive_weight=1``; DuoRec's dot
similarity is ``normalize=False``; CL4SRec's and AdaptiveRec's cosine is ``normalize=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import adaptive_info_nce
from ..contract import make_options
from .augment import Augmenter
from .ddp import DataParallel
from .model import SASRec
from .simthres import LearnableSimThres, StatisticalSimThres

CONTRASTS = ("un", "su", "us_x")


@dataclass
class Batch:
    """One training batch; ``positives`` holds the inputs of a same-target sample per row
    (DuoRec's supervised view), present when the objective's ``needs_positives`` is set;
    ``index`` holds the rows' training-sample indices (RCL looks up weak positives by it).

    Data-parallel training (rec/ddp.py) hands every process the whole global batch, ``rows``
    (the slice of rows this process computes) and ``ddp``; random draws (augmentations) are
    made for the whole batch, the encoder runs on the ``own`` rows only, and losses are this
    process's shares. A single process has ``rows=None`` (every row) and ``ddp=None``.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    positives: torch.Tensor | None = None
    index: torch.Tensor | None = None
    rows: slice | None = None
    ddp: DataParallel | None = None

    def own(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else t[self.rows]


def cross_entropy(model: SASRec, h: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The next-item cross-entropy of the own rows (their share of the batch mean under DDP)."""
    targets = batch.own(batch.targets)
    if batch.ddp is None:
        return model.loss(h, targets)
    return batch.ddp.ce_share(model, h, targets, len(batch.targets))


def info_nce(batch: Batch, z1: torch.Tensor, z2: torch.Tensor, k, **options) -> torch.Tensor:
    """``adaptive_info_nce`` of the own rows' views (under DDP: their share of the global
    batch's loss, every process's rows as negatives)."""
    if batch.ddp is None:
        return adaptive_info_nce(z1, z2, k, **options)
    return batch.ddp.info_nce_share(z1, z2, k, len(batch.targets), **options)


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    views: tuple[torch.Tensor, torch.Tensor] | None = None
    k: torch.Tensor | None = None


def encode(model: SASRec, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``model(x)`` for each batch of sequences in ``inputs``, as one encoder pass over them
    stacked. Dropout draws independently for every row, so each output is distributed exactly
    as a separate pass; the step launches one pass's kernels instead of one per batch, and each
    parameter receives one gradient instead of a sum of several."""
    if len(inputs) == 1:
        return (model(inputs[0]),)
    return model(torch.cat(inputs)).split([len(x) for x in inputs])


def _check_weight(weight: float) -> float:
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight!r}")
    return float(weight)


def _check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return float(temperature)


class SASRecObjective(nn.Module):
    """Next-item cross-entropy only."""

    needs_positives = False

    def forward(
        self, model: SASRec, batch: Batch, generator: torch.Generator | None = None
    ) -> ObjectiveOutput:
        ce = cross_entropy(model, model(batch.own(batch.inputs)), batch)
        return ObjectiveOutput(ce, {"ce": ce.detach()})


class CL4SRecObjective(nn.Module):
    """CE + weight * InfoNCE(cosine / temperature) between two views from two distinct random
    augmentations of each sequence (the CE uses the unaugmented sequence)."""

    needs_positives = False

    def __init__(
        self,
        augmenter: Augmenter,
        weight: float = 0.1,
        temperature: float = 1.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.augmenter = augmenter
        self.weight = _check_weight(weight)
        self.temperature = _check_temperature(temperature)
        self.backend = backend

    def forward(
        self, model: SASRec, batch: Batch, generator: torch.Generator | None = None
    ) -> ObjectiveOutput:
        if not self.augmenter.fits(model):
            raise ValueError("CL4SRec's mask augmentation needs SASRec(mask_token=True)")
        v1, v2, _ = self.augmenter.two_views(batch.inputs, generator)  # drawn for every row
        h, z1, z2 = encode(model, batch.own(batch.inputs), batch.own(v1), batch.own(v2))
        ce = cross_entropy(model, h, batch)
        cl = info_nce(batch, z1, z2, None, temperature=self.temperature, normalize=True,
                      positive_weight=1.0, backend=self.backend)
        loss = ce + self.weight * cl
        return ObjectiveOutput(loss, {"ce": ce.detach(), "cl": cl.detach()}, (z1, z2))


class DuoRecObjective(nn.Module):
    """DuoRec: CE + weight * InfoNCE over a pair of views chosen by ``contrast``.

    - ``"un"``: the CE pass vs a second dropout pass of the same sequence;
    - ``"su"``: the CE pass vs a same-target sequence;
    - ``"us_x"`` (DuoRec's default): a second dropout pass vs the same-target sequence.

    ``normalize=False`` is DuoRec's dot-product similarity; ``backend`` goes to
    ``adaptive_info_nce``.
    """

    def __init__(
        self,
        contrast: str = "us_x",
        weight: float = 0.1,
        temperature: float = 1.0,
        normalize: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if contrast not in CONTRASTS:
            raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
        self.contrast = contrast
        self.weight = _check_weight(weight)
        self.temperature = _check_temperature(temperature)
        self.normalize = normalize
        self.backend = backend
        self.needs_positives = contrast != "un"

    def passes(self, model: SASRec, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(h, z1, z2)`` of the own rows: the CE pass and the two views of the contrastive
        term."""
        if self.contrast != "un" and batch.positives is None:
            raise ValueError(f"contrast {self.contrast!r} needs batch.positives")
        inputs = batch.own(batch.inputs)
        if self.contrast == "un":
            h, z2 = encode(model, inputs, inputs)
            return h, h, z2
        if self.contrast == "su":
            h, z2 = encode(model, inputs, batch.own(batch.positives))
            return h, h, z2
        return encode(model, inputs, inputs, batch.own(batch.positives))

    def contrastive(
        self, z1: torch.Tensor, z2: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(contrastive loss, threshold regularizer or None, thresholds or None)."""
        cl = info_nce(batch, z1, z2, None, temperature=self.temperature,
                      normalize=self.normalize, positive_weight=1.0, backend=self.backend)
        return cl, None, None

    def forward(
        self, model: SASRec, batch: Batch, generator: torch.Generator | None = None
    ) -> ObjectiveOutput:
        h, z1, z2 = self.passes(model, batch)
        ce = cross_entropy(model, h, batch)
        cl, reg, k = self.contrastive(z1, z2, batch)
        loss = ce + self.weight * cl
        parts = {"ce": ce.detach(), "cl": cl.detach()}
        if reg is not None:
            loss = loss + reg
            parts["reg"] = reg.detach()
        return ObjectiveOutput(loss, parts, (z1, z2), k)


class AdaptiveRecObjective(DuoRecObjective):
    """AdaptiveRec: DuoRec (``us_x`` by default) with the threshold-adaptive loss (:mod:`adaptive_cl.reference`).

    ``simthres``: None (no threshold: alpha * NT-Xent under "normalized"), a
    ``StatisticalSimThres`` (one k per epoch) or a ``LearnableSimThres`` (one k per row; its
    regularizer joins the loss from the second epoch on). The remaining arguments go to
    ``adaptive_info_nce``; the defaults are the paper's cosine, tau = 1, alpha = 0.5.
    """

    def __init__(
        self,
        simthres: StatisticalSimThres | LearnableSimThres | None,
        contrast: str = "us_x",
        weight: float = 0.1,
        temperature: float = 1.0,
        normalize: bool = True,
        positive_weight: float = 0.5,
        denominator: str = "negatives",
        weighting: str = "normalized",
        threshold: str = "hard",
        threshold_scale: float = 0.05,
        backend: str = "auto",
    ) -> None:
        super().__init__(contrast, weight, temperature, normalize, backend)
        self.simthres = simthres
        self.loss_options = dict(
            temperature=self.temperature, normalize=normalize, positive_weight=positive_weight,
            denominator=denominator, weighting=weighting, threshold=threshold,
            threshold_scale=threshold_scale, backend=backend,
        )
        if threshold == "soft" and simthres is None:
            raise ValueError("threshold='soft' needs a simthres (k is None otherwise)")
        options = {k: v for k, v in self.loss_options.items() if k != "backend"}
        make_options(**options)  # bad values fail here, not at the first batch

    def contrastive(
        self, z1: torch.Tensor, z2: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if self.simthres is None:
            return info_nce(batch, z1, z2, None, **self.loss_options), None, None
        learnable = isinstance(self.simthres, LearnableSimThres)
        if batch.ddp is None or not learnable:
            k = k_own = self.simthres(z1)
        else:  # g sees the whole global batch; each process keeps its rows' thresholds
            if not self.simthres.detach_input:
                raise ValueError("data-parallel training needs LearnableSimThres(detach_input=True): "
                                 "g's input is gathered across processes without gradient")
            k = self.simthres(batch.ddp.gather(z1, len(batch.targets)))
            k_own = batch.own(k)
        cl = info_nce(batch, z1, z2, k_own, **self.loss_options)
        reg = self.simthres.regularizer(k) if learnable else None
        if reg is not None and batch.ddp is not None:
            reg = batch.ddp.replicated_share(reg)
        return cl, reg, k


class ContrastiveTerm(nn.Module):
    """The InfoNCE setting shared by every contrastive term of one RCL or MCLRec objective.

    Without a ``simthres`` each term is plain InfoNCE over the 2B views (``k=None``,
    ``positive_weight=1``: the methods' own losses). With one, AdaptiveRec's adaptive positives
    go on top of every term (a combination none of the papers tried): one threshold per batch
    from the anchor view, shared by the terms, whose rows are the same sequences; the loss
    options (alpha, denominator, weighting, hard/soft) are AdaptiveRec's.
    """

    def __init__(
        self,
        simthres: StatisticalSimThres | LearnableSimThres | None = None,
        temperature: float = 1.0,
        normalize: bool = False,
        positive_weight: float = 0.5,
        denominator: str = "negatives",
        weighting: str = "normalized",
        threshold: str = "hard",
        threshold_scale: float = 0.05,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.simthres = simthres
        self.temperature = _check_temperature(temperature)
        self.normalize = normalize
        self.backend = backend
        if simthres is None:
            if threshold == "soft":
                raise ValueError("threshold='soft' needs a simthres (k is None otherwise)")
            self.options = dict(temperature=self.temperature, normalize=normalize,
                                positive_weight=1.0)
        else:
            if not normalize:
                raise ValueError("a SimThres is a cosine level: it needs normalize=True")
            self.options = dict(
                temperature=self.temperature, normalize=normalize,
                positive_weight=positive_weight, denominator=denominator, weighting=weighting,
                threshold=threshold, threshold_scale=threshold_scale,
            )
        make_options(**self.options)  # bad values fail here, not at the first batch

    def threshold(self, z: torch.Tensor) -> torch.Tensor | None:
        """The batch's k from the anchor view ``z`` (None without a SimThres)."""
        return None if self.simthres is None else self.simthres(z)

    def regularizer(self, k: torch.Tensor | None) -> torch.Tensor | None:
        """The learnable threshold's pull towards k_stat (None for the other kinds)."""
        if isinstance(self.simthres, LearnableSimThres) and k is not None:
            return self.simthres.regularizer(k)
        return None

    def forward(
        self, z1: torch.Tensor, z2: torch.Tensor, k: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        return adaptive_info_nce(z1, z2, k, reduction=reduction, backend=self.backend,
                                 **self.options)
