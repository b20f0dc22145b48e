"""The loss contract: option checking and input preparation shared by every backend.

Every backend receives the same :class:`Prepared` bundle, so a backend never re-validates and
never sees an input shape other than ``(B, D)`` views, ``(N,)`` thresholds and ``(N,)`` labels.
All checks here are on metadata only (shapes, dtypes, devices, Python values): nothing reads a
tensor's values, so validation never synchronises with a GPU.

What every backend must compute is written out in :mod:`adaptive_cl.reference` (formulas and
numeric rules). The rules a backend most easily gets wrong, since values are never checked:

- Non-finite inputs: if any element of z or z_aug is NaN or +-inf, every row's loss is NaN
  (so "mean" and "sum" are NaN) and every element of the gradients of z and z_aug is NaN. A
  NaN threshold k_i: hard, row i has no threshold positives; soft, row i's loss is NaN. This
  is implemented without a host synchronisation (a device-side flag folded into the result).
- normalize=True: z^ = z / max(||z||_2, NORM_EPS) with the norm computed so that it neither
  overflows nor underflows for any finite row.
- Accumulation in float32 for half/float32 inputs, float64 for float64; the loss in that
  dtype, gradients in the input dtype. Temperatures down to MIN_TEMPERATURE give a finite loss
  for finite inputs (normalize=True).
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import torch

DENOMINATORS = ("negatives", "all")
WEIGHTINGS = ("normalized", "unit")
THRESHOLDS = ("hard", "soft")
REDUCTIONS = ("mean", "sum", "none")

#: The ``F.normalize`` epsilon: a zero row normalises to zero, so its cosine with every row is 0.
NORM_EPS = 1e-12

#: The smallest temperature: with cosines the logits c / tau, every row loss (<= about 2 / tau)
#: and their sum over any N < 1e8 rows stay finite in float32 (max 3.4e38); a smaller tau
#: would turn finite inputs into an infinite or NaN loss.
MIN_TEMPERATURE = 1e-30


@dataclass(frozen=True)
class LossOptions:
    """The scalar options of the loss (hashable, so kernels can specialise on them)."""

    temperature: float = 1.0
    normalize: bool = True
    denominator: str = "negatives"
    weighting: str = "normalized"
    positive_weight: float = 0.5
    threshold: str = "hard"
    threshold_scale: float = 0.05
    reduction: str = "mean"


#: Bin counts the statistics accept: powers of two (the kernels' histograms are tensors of
#: that size), at most this many.
MAX_STATS_BINS = 4096


@dataclass(frozen=True)
class StatsSpec:
    """What ``return_stats=True`` asks for: a histogram of the candidate similarities c_ij with
    ``bins`` equal bins on ``range`` = (lo, hi) (values outside go to the edge bins)."""

    bins: int = 2048
    range: tuple[float, float] = (-1.0, 1.0)

    @property
    def width(self) -> float:
        return (self.range[1] - self.range[0]) / self.bins


def make_stats_spec(bins: object = 2048, range: object = (-1.0, 1.0)) -> StatsSpec:
    """Check the statistics' histogram options (``stats_bins``, ``stats_range``)."""
    if isinstance(bins, bool) or not isinstance(bins, numbers.Integral):
        raise TypeError(f"stats_bins must be an int; got {type(bins).__name__}")
    bins = int(bins)
    if bins < 2 or bins > MAX_STATS_BINS or bins & (bins - 1):
        raise ValueError(f"stats_bins must be a power of two in [2, {MAX_STATS_BINS}]; got {bins}")
    return StatsSpec(bins, check_stats_range(range))


def check_stats_range(range: object, name: str = "stats_range") -> tuple[float, float]:
    """A finite (lo, hi) pair with lo < hi."""
    if not isinstance(range, (tuple, list)) or len(range) != 2:
        raise TypeError(f"{name} must be a pair (lo, hi); got {range!r}")
    lo, hi = (_check_real(name, v) for v in range)
    if not lo < hi:
        raise ValueError(f"{name} must have lo < hi; got {range!r}")
    return lo, hi


@dataclass
class Prepared:
    """Validated inputs in the one layout every backend consumes.

    ``k_rows``: ``None`` or an ``(N,)`` tensor in the compute dtype (row ``i`` and ``i + B``
    share ``k[i]`` when a ``(B,)`` threshold was given); expanded with differentiable ops, so
    gradients flow back to the caller's ``k``.
    ``k_scalar``: the threshold as a Python float when it was given as one (then ``k_rows`` is a
    constant tensor and kernels may take the float instead and skip the load).
    ``labels_rows``: ``None`` or an ``(N,)`` int64 tensor.
    ``stats``: ``None``, or what ``return_stats=True`` asked for: the backend then returns
    ``(loss, LossStats)`` (see :mod:`adaptive_cl.stats`).
    """

    z: torch.Tensor
    z_aug: torch.Tensor
    k_rows: torch.Tensor | None
    k_scalar: float | None
    labels_rows: torch.Tensor | None
    options: LossOptions
    stats: StatsSpec | None = None

    @property
    def batch(self) -> int:
        return self.z.shape[0]

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.z.dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 inputs stay float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    return value


def make_options(
    *,
    temperature: float = 1.0,
    normalize: bool = True,
    denominator: str = "negatives",
    weighting: str = "normalized",
    positive_weight: float = 0.5,
    threshold: str = "hard",
    threshold_scale: float = 0.05,
    reduction: str = "mean",
) -> LossOptions:
    """Check the scalar options (shared by the functional and the Module's constructor)."""
    temperature = _check_real("temperature", temperature)
    if not temperature >= MIN_TEMPERATURE:
        raise ValueError(f"temperature must be > 0 (and >= {MIN_TEMPERATURE:g}); got {temperature}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool; got {type(normalize).__name__}")
    _check_choice("denominator", denominator, DENOMINATORS)
    _check_choice("weighting", weighting, WEIGHTINGS)
    _check_choice("threshold", threshold, THRESHOLDS)
    _check_choice("reduction", reduction, REDUCTIONS)
    positive_weight = _check_real("positive_weight", positive_weight)
    if not 0.0 < positive_weight <= 1.0:
        raise ValueError(f"positive_weight must be in (0, 1]; got {positive_weight}")
    if weighting == "unit" and positive_weight == 1.0:
        raise ValueError(
            "positive_weight must be < 1 with weighting='unit' (its extra-positive constant is "
            "-log((1 - positive_weight) / m_i)); got 1.0"
        )
    threshold_scale = _check_real("threshold_scale", threshold_scale)
    if threshold_scale <= 0:
        raise ValueError(f"threshold_scale must be > 0; got {threshold_scale}")
    return LossOptions(
        temperature=temperature,
        normalize=normalize,
        denominator=denominator,
        weighting=weighting,
        positive_weight=positive_weight,
        threshold=threshold,
        threshold_scale=threshold_scale,
        reduction=reduction,
    )


def _check_views(z: object, z_aug: object, min_batch: int = 2) -> None:
    for name, t in (("z", z), ("z_aug", z_aug)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, D); got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (B, D); got shape {tuple(t.shape)}")
    assert isinstance(z, torch.Tensor) and isinstance(z_aug, torch.Tensor)
    if z.shape != z_aug.shape:
        raise ValueError(
            f"z and z_aug must have the same shape (B, D); got {tuple(z.shape)} and {tuple(z_aug.shape)}"
        )
    if z.dtype != z_aug.dtype:
        raise TypeError(f"z and z_aug must have the same dtype; got {z.dtype} and {z_aug.dtype}")
    if z.device != z_aug.device:
        raise ValueError(f"z and z_aug must be on the same device; got {z.device} and {z_aug.device}")
    if z.shape[0] < min_batch:
        raise ValueError(f"z must hold at least B={min_batch} rows (N = 2B >= 4); got B={z.shape[0]}")
    if z.shape[1] < 1:
        raise ValueError(f"z must have at least one feature column; got D={z.shape[1]}")


def _rows(name: str, t: torch.Tensor, batch: int) -> torch.Tensor:
    """Expand a (B,) per-pair vector to (N,) rows, keeping (N,) as is."""
    if t.dim() == 1 and t.shape[0] == batch:
        return torch.cat([t, t])
    if t.dim() == 1 and t.shape[0] == 2 * batch:
        return t
    raise ValueError(
        f"{name} must have shape (B,)=({batch},) or (N,)=({2 * batch},); got {tuple(t.shape)}"
    )


def _prepare_k(k: object, z: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor | None, float | None]:
    if k is None:
        return None, None
    batch = z.shape[0]
    if isinstance(k, numbers.Real) and not isinstance(k, bool):
        value = float(k)
        return torch.full((2 * batch,), value, dtype=dtype, device=z.device), value
    if not isinstance(k, torch.Tensor):
        raise TypeError(
            f"k must be None, a float, or a floating tensor of shape (), (B,) or (N,); got {type(k).__name__}"
        )
    if not k.is_floating_point():
        raise TypeError(f"k must be a floating-point tensor; got dtype {k.dtype}")
    if k.device != z.device:
        raise ValueError(f"k must be on the same device as z ({z.device}); got {k.device}")
    k = k.to(dtype)
    if k.dim() == 0:
        return k.expand(2 * batch), None
    return _rows("k", k, batch), None


def _prepare_labels(labels: object, z: torch.Tensor) -> torch.Tensor | None:
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be None or an integer tensor of shape (B,) or (N,); got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor; got dtype {labels.dtype}")
    if labels.device != z.device:
        raise ValueError(f"labels must be on the same device as z ({z.device}); got {labels.device}")
    return _rows("labels", labels.to(torch.int64), z.shape[0])


def unbounded_loss_warning(options: LossOptions, has_k: bool, has_labels: bool, stacklevel: int = 2) -> None:
    """Warn when the options make the loss unbounded below (see :mod:`adaptive_cl.reference`); ``stacklevel`` counts from
    the caller of this function, as ``warnings.warn``'s does."""
    if not options.normalize and options.denominator == "negatives" and (has_k or has_labels):
        warnings.warn(
            "normalize=False with extra positives and denominator='negatives': extra positives sit "
            "outside the log-sum-exp, so the loss is unbounded below as the norms of z grow",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def prepare(
    z: torch.Tensor,
    z_aug: torch.Tensor,
    k: torch.Tensor | float | None,
    labels: torch.Tensor | None,
    options: LossOptions,
    stats: StatsSpec | None = None,
    *,
    min_batch: int = 2,
) -> Prepared:
    """Validate the tensors against each other and the options; return the backend bundle.

    ``min_batch``: the fewest rows z may hold (a rank's shard of a distributed batch may hold
    fewer than the loss's minimum of 2; distributed.py checks the global batch instead)."""
    _check_views(z, z_aug, min_batch)
    dtype = compute_dtype(z.dtype)
    k_rows, k_scalar = _prepare_k(k, z, dtype)
    labels_rows = _prepare_labels(labels, z)
    if options.threshold == "soft" and k is None:
        raise ValueError("threshold='soft' needs a threshold k; got k=None")
    if not torch.compiler.is_compiling():  # Dynamo cannot trace warnings.warn; the op warns at run time
        unbounded_loss_warning(options, k is not None, labels is not None, stacklevel=3)
    return Prepared(z, z_aug, k_rows, k_scalar, labels_rows, options, stats)
