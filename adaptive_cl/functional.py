"""``adaptive_info_nce``: the functional entry point."""

from __future__ import annotations

import torch

from . import backends, ops
from .contract import LossOptions, make_options, prepare


def apply_loss(
    z: torch.Tensor,
    z_aug: torch.Tensor,
    k: torch.Tensor | float | None,
    labels: torch.Tensor | None,
    options: LossOptions,
    backend: str,
) -> torch.Tensor:
    """Validate the tensors against checked options and run the chosen backend (the functional
    and the Module share this). Under torch.compile the backend runs inside the registered
    custom op (adaptive_cl/ops.py), so the compiled graph has no break."""
    p = prepare(z, z_aug, k, labels, options)
    if ops.AVAILABLE and torch.compiler.is_compiling():
        return ops.info_nce(p, backend)
    return backends.resolve(backend, p)(p)


def adaptive_info_nce(
    z: torch.Tensor,
    z_aug: torch.Tensor,
    k: torch.Tensor | float | None = None,
    *,
    temperature: float = 1.0,
    normalize: bool = True,
    labels: torch.Tensor | None = None,
    denominator: str = "negatives",
    weighting: str = "normalized",
    positive_weight: float = 0.5,
    threshold: str = "hard",
    threshold_scale: float = 0.05,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """AdaptiveRec's InfoNCE with adaptive positives (SimThres), over the 2B views [z; z_aug].

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
        temperature: tau >= 1e-30; logits are c / tau.
        normalize: L2-normalise rows (``F.normalize`` convention) so c is the cosine.
        labels: optional integer (B,) or (N,) tensor; rows with equal labels are extra
            positives regardless of k (supervised / same-target positives).
        denominator: "negatives" (paper Eq. 9: partner + negatives) or "all" (released code:
            partner + every candidate).
        weighting: "normalized" (alpha on the partner, (1 - alpha)/m_i on each extra positive)
            or "unit" (Eq. 9 read literally, weight one per positive plus log constants).
        positive_weight: alpha in (0, 1] (< 1 for "unit").
        threshold: "hard" (c > k; gradient in k is zero) or "soft" (sigmoid((c - k) / scale),
            differentiable in k).
        threshold_scale: the soft threshold's scale beta > 0.
        reduction: "mean" | "sum" | "none" (the N per-row losses).
        backend: "auto" | "reference" | "compiled" | "triton" | "cpu" (see the README's
            options table; "auto": the Triton kernel on CUDA where it covers the options, the
            C++ extension on CPU, else the reference).

    Returns:
        The loss in float32 (float64 for float64 inputs); gradients reach z, z_aug in their
        own dtype and k (zero for the hard threshold).

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
    )
    return apply_loss(z, z_aug, k, labels, options, backend)
