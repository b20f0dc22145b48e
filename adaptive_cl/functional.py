"""``adaptive_info_nce``: the functional entry point."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from . import backends, ops
from .contract import LossOptions, StatsSpec, extended_options, make_options, make_stats_spec, prepare


def autocast_dtype(z: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype in force for z's device type, or None when autocast is off there."""
    if not isinstance(z, torch.Tensor):
        return None
    kind = z.device.type
    try:
        if not torch.is_autocast_enabled(kind):
            return None
        return torch.get_autocast_dtype(kind)
    except (TypeError, RuntimeError, AttributeError):  # a device type autocast does not know
        return None


def autocast_inputs(z, z_aug):
    """The autocast rule (README, "Mixed precision"): the loss behaves like a function wrapped
    in ``torch.amp.custom_fwd(device_type, cast_inputs=<autocast dtype>)``, as fused losses do:
    inside an enabled autocast region of z's device type, floating z and z_aug (float64 kept, as
    autocast keeps it) are cast to the region's dtype (so a float32 z under bf16 autocast takes
    the bfloat16 tensor-core path, and a bf16 / float32 mix of z and z_aug is allowed), and the
    loss runs with autocast disabled (its float32 accumulation is not autocast's to change).
    Gradients come back in each input's own dtype (autograd of the cast). Outside autocast the
    dtypes must match (TypeError). Returns (z, z_aug, context manager to run the loss in)."""
    dtype = autocast_dtype(z)
    if dtype is None:
        return z, z_aug, contextlib.nullcontext()

    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            return t.to(dtype)
        return t

    return cast(z), cast(z_aug), torch.autocast(z.device.type, enabled=False)


def apply_loss(
    z: torch.Tensor,
    z_aug: torch.Tensor,
    k: torch.Tensor | float | None,
    labels: torch.Tensor | None,
    options: LossOptions,
    backend: str,
    stats: StatsSpec | None = None,
    *,
    temperature: torch.Tensor | float | None = None,
    negatives: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
):
    """Validate the tensors against checked options and run the chosen backend (the functional
    and the Module share this). With ``stats``: (loss, LossStats), from the backend itself when
    it computes them in its own pass (``fused_stats``), else from the reference's dense
    similarities, so that every backend returns the same thing. Under torch.compile the loss
    runs inside the registered custom op (adaptive_cl/ops.py), so the compiled graph has no
    break; statistics asked for there are traced into the graph from the dense similarities
    (N x N memory on every backend, the fused kernel's included; still no break, so
    ``fullgraph=True`` holds). The issue-24 setups (``extended_options``) run inside their own
    op (``adaptive_cl::info_nce_setup``) under torch.compile; ``backends.resolve`` routes or
    refuses them by backend, in eager mode as in the op. Under autocast the inputs follow
    :func:`autocast_inputs` (a queue of negatives is cast with them)."""
    dtype = autocast_dtype(z)
    z, z_aug, region = autocast_inputs(z, z_aug)
    if (dtype is not None and isinstance(negatives, torch.Tensor)
            and negatives.is_floating_point() and negatives.dtype != torch.float64):
        negatives = negatives.to(dtype)
    with region:
        return _apply(z, z_aug, k, labels, options, backend, stats, temperature, negatives,
                      log_q, mask)


def _apply(z, z_aug, k, labels, options, backend, stats, temperature, negatives, log_q, mask):
    p = prepare(z, z_aug, k, labels, options, stats, temperature=temperature, negatives=negatives,
                log_q=log_q, mask=mask)
    if ops.AVAILABLE and torch.compiler.is_compiling() and extended_options(p):
        loss = ops.info_nce_setup(dataclasses.replace(p, stats=None), backend)
        return loss if stats is None else (loss, _dense_stats(p))
    if ops.AVAILABLE and torch.compiler.is_compiling():
        loss = ops.info_nce(dataclasses.replace(p, stats=None), backend)
        return loss if stats is None else (loss, _dense_stats(p))
    fn = backends.resolve(backend, p)
    if stats is None or getattr(fn, "fused_stats", False):
        return fn(p)
    return fn(dataclasses.replace(p, stats=None)), _dense_stats(p)


def _dense_stats(p):
    from .reference import similarity_stats

    return similarity_stats(p)


def adaptive_info_nce(
    z: torch.Tensor,
    z_aug: torch.Tensor,
    k: torch.Tensor | float | None = None,
    *,
    temperature: float | torch.Tensor = 1.0,
    normalize: bool = True,
    labels: torch.Tensor | None = None,
    layout: str = "views",
    symmetric: bool = False,
    negatives: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    same_label: str = "positive",
    mask: torch.Tensor | None = None,
    denominator: str = "negatives",
    weighting: str = "normalized",
    positive_weight: float = 0.5,
    threshold: str = "hard",
    threshold_scale: float = 0.05,
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
    stats_bins: int = 2048,
    stats_range: tuple[float, float] = (-1.0, 1.0),
):
    """AdaptiveRec's InfoNCE with adaptive positives (SimThres), over the 2B views [z; z_aug]
    (or, with ``layout="cross"``, z's rows against z_aug's columns).

    For each of the N = 2B rows, candidates whose similarity to the row exceeds the row's
    threshold ``k[i]`` stop being negatives and become extra, down-weighted positives; the view
    partner stays the main positive. The exact formulas are in :mod:`adaptive_cl.reference`'s
    docstring and the README.

    Args:
        z, z_aug: the two views, shape (B, D), same dtype (float16/bfloat16/float32/float64)
            and device, B >= 2.
        k: the similarity threshold (SimThres): None (plain contrastive loss), a float, a 0-d
            tensor, or a floating tensor of shape (B,) (shared by rows i and i+B) or (N,).
            Compared against the cosine (or dot product with ``normalize=False``).
        temperature: tau >= 1e-30; logits are c / tau. A 0-d floating tensor (e.g. a learnable
            parameter, or CLIP's ``logit_scale.exp().reciprocal()``) makes the loss
            differentiable in tau; its value is not checked on the host.
        normalize: L2-normalise rows (``F.normalize`` convention) so c is the cosine.
        labels: optional integer (B,) or (N,) tensor; rows with equal labels are extra
            positives regardless of k (supervised / same-target positives). With
            ``layout="cross"``: (B,), one label per pair. With ``negatives``, the queue's M
            labels may follow ((N + M,) or (B + M,)); otherwise queue columns match no label.
        layout: "views" (2B rows, every row also a column) or "cross" (rows z_i, columns
            z_aug_j, row i's positive column i: the two-tower / CLIP loss, B x B).
        symmetric: with "cross", also rows z_aug against columns z; the loss is the mean of the
            two directions' ("none": 2B values, direction 1 then direction 2).
        negatives: optional (M, D) queue of extra columns (MoCo, a memory bank), z's dtype,
            not requiring grad; candidates of every row, never rows. Not with symmetric=True.
        log_q: cross layout, symmetric=False: (B,) (or (B + M,) with negatives) log sampling
            probabilities subtracted from each column's logits (logQ correction), no grad.
        same_label: "positive" (labels make extra positives) or "exclude" (candidates sharing
            a row's label leave its log-sum-exp and its positives: accidental hits removed).
        mask: optional (B,) bool; a False pair is padding: no loss, never a column, zero
            gradient; "mean" averages over the valid rows.
        denominator: "negatives" (paper Eq. 9: partner + negatives) or "all" (released code:
            partner + every candidate).
        weighting: "normalized" (alpha on the partner, (1 - alpha)/m_i on each extra positive)
            or "unit" (Eq. 9 read literally, weight one per positive plus log constants).
        positive_weight: alpha in (0, 1] (< 1 for "unit").
        threshold: "hard" (c > k; gradient in k is zero) or "soft" (sigmoid((c - k) / scale),
            differentiable in k).
        threshold_scale: the soft threshold's scale beta > 0.
        reduction: "mean" | "sum" | "none" (the per-row losses: N; B in "cross", 2B symmetric).
        backend: "auto" | "reference" | "compiled" | "triton" | "cpu" (see the README's
            options table; "auto": the Triton kernel for CUDA tensors, with every option; the
            C++ extension for CPU tensors; else the reference).
        return_stats: also return the call's statistics (:class:`adaptive_cl.stats.LossStats`):
            per-row m_i and a histogram of the candidate similarities c_ij, the input of
            SimThres' percentile (:func:`adaptive_cl.stats.histogram_percentile`), counted in
            the forward pass of the Triton kernel and of the C++ extension (nothing N x N
            stored; the reference and "compiled", and every backend under torch.compile, count
            them from the dense similarities).
        stats_bins: the histogram's bins, a power of two <= 4096 (default 2048: width ~1e-3).
        stats_range: (lo, hi) of the equal bins (default the cosine's (-1, 1)); values
            outside go to the edge bins.

    Returns:
        The loss in float32 (float64 for float64 inputs); gradients reach z, z_aug in their
        own dtype and k (zero for the hard threshold). With ``return_stats``: (loss, LossStats).

    Under ``torch.autocast`` (z's device type): z and z_aug are cast to the autocast dtype and
    the loss runs with autocast off, as ``torch.amp.custom_fwd(cast_inputs=...)`` does (float64
    inputs are kept); so z and z_aug may then differ in dtype. See :func:`autocast_inputs`.

    Non-finite values: one NaN or +-inf anywhere in z or z_aug makes every row's loss NaN (and
    so "mean"/"sum") and every element of the gradients of z and z_aug NaN, never a plausible
    finite loss; no host synchronisation is spent on it. A NaN in k gives that row no threshold
    positives (hard: c > NaN is false) or a NaN loss (soft).
    """
    options = make_options(
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
    stats = make_stats_spec(stats_bins, stats_range) if _check_flag(return_stats) else None
    return apply_loss(z, z_aug, k, labels, options, backend, stats, temperature=temperature,
                      negatives=negatives, log_q=log_q, mask=mask)


def _check_flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"return_stats must be a bool; got {type(value).__name__}")
    return value
