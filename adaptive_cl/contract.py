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
LAYOUTS = ("views", "cross")
SAME_LABEL = ("positive", "exclude")

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
    layout: str = "views"
    symmetric: bool = False
    same_label: str = "positive"


#: The value of ``LossOptions.temperature`` when the temperature is a tensor (``Prepared.temperature``
#: holds it): NaN, so a backend that read the float instead of routing would return NaN, never a
#: plausible loss at some other temperature.
TENSOR_TEMPERATURE = float("nan")


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
    ``(loss, LossStats)`` (see :mod:`adaptive_cl.histogram`).

    The setups of issue 24 (all ``None`` / defaults for the plain AdaptiveRec loss):
    ``options.layout`` / ``options.symmetric`` say which rows and columns exist (``rows``);
    ``k_rows`` then has one entry per row (B for "cross", 2B with ``symmetric``), ``labels_rows``
    holds the labels of Z's rows ("views": N; "cross": the B pairs) followed by the queue's M
    when those were given. ``temperature``: the 0-d tensor temperature (compute dtype, possibly
    requiring grad; ``options.temperature`` is then NaN). ``negatives``: the (M, D) queue (z's
    dtype, no grad). ``log_q``: (B,) or (B + M,) in the compute dtype. ``mask``: (B,) bool.
    """

    z: torch.Tensor
    z_aug: torch.Tensor
    k_rows: torch.Tensor | None
    k_scalar: float | None
    labels_rows: torch.Tensor | None
    options: LossOptions
    stats: StatsSpec | None = None
    temperature: torch.Tensor | None = None
    negatives: torch.Tensor | None = None
    log_q: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.z.shape[0]

    @property
    def rows(self) -> int:
        """How many rows (per-row losses) the loss has: 2B ("views", or "cross" with
        ``symmetric``), B ("cross")."""
        o = self.options
        return self.batch if o.layout == "cross" and not o.symmetric else 2 * self.batch

    @property
    def queue(self) -> int:
        """M, the number of extra negative columns (0 without ``negatives``)."""
        return 0 if self.negatives is None else self.negatives.shape[0]

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.z.dtype)


def extended_options(p: Prepared) -> tuple[str, ...]:
    """The issue-24 options these inputs use, by argument name (empty for the plain AdaptiveRec
    loss): what a backend that implements only the views layout must refuse or route."""
    o = p.options
    used = []
    if o.layout != "views":
        used.append(f"layout={o.layout!r}")
    if o.symmetric:
        used.append("symmetric=True")
    if p.temperature is not None:
        used.append("a tensor temperature")
    if p.negatives is not None:
        used.append("negatives")
    if p.log_q is not None:
        used.append("log_q")
    if o.same_label != "positive":
        used.append(f"same_label={o.same_label!r}")
    if p.mask is not None:
        used.append("mask")
    return tuple(used)


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
    layout: str = "views",
    symmetric: bool = False,
    same_label: str = "positive",
) -> LossOptions:
    """Check the scalar options (shared by the functional and the Module's constructor).

    ``temperature`` may be a tensor (checked against the inputs by ``prepare``): the options
    then carry TENSOR_TEMPERATURE."""
    if isinstance(temperature, torch.Tensor):
        temperature = TENSOR_TEMPERATURE
    else:
        temperature = _check_real("temperature", temperature)
        if not temperature >= MIN_TEMPERATURE:
            raise ValueError(f"temperature must be > 0 (and >= {MIN_TEMPERATURE:g}); got {temperature}")
    _check_choice("layout", layout, LAYOUTS)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool; got {type(symmetric).__name__}")
    if symmetric and layout != "cross":
        raise ValueError("symmetric=True needs layout='cross' (the views layout is symmetric already)")
    _check_choice("same_label", same_label, SAME_LABEL)
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
        layout=layout,
        symmetric=symmetric,
        same_label=same_label,
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


def _row_shapes(options: LossOptions, batch: int) -> tuple[int, ...]:
    """The lengths a per-row tensor (k) may have: (B,) always; (N,) = (2B,) in the views layout
    and for the two directions of a symmetric cross loss."""
    return (batch,) if options.layout == "cross" and not options.symmetric else (batch, 2 * batch)


def _rows(name: str, t: torch.Tensor, batch: int, options: LossOptions = LossOptions()) -> torch.Tensor:
    """Expand a (B,) per-pair vector to one entry per row, keeping a full-length one as is."""
    shapes = _row_shapes(options, batch)
    if t.dim() == 1 and t.shape[0] == batch:
        return t if shapes == (batch,) else torch.cat([t, t])
    if t.dim() == 1 and t.shape[0] in shapes:
        return t
    if options.layout == "views":
        want = f"(B,)=({batch},) or (N,)=({2 * batch},)"
    elif options.symmetric:
        want = f"(B,)=({batch},) or (2B,)=({2 * batch},) (direction 1, then direction 2)"
    else:
        want = f"(B,)=({batch},) with layout='cross'"
    raise ValueError(f"{name} must have shape {want}; got {tuple(t.shape)}")


def _prepare_k(k: object, z: torch.Tensor, dtype: torch.dtype,
               options: LossOptions = LossOptions()) -> tuple[torch.Tensor | None, float | None]:
    if k is None:
        return None, None
    batch = z.shape[0]
    rows = max(_row_shapes(options, batch))
    if isinstance(k, numbers.Real) and not isinstance(k, bool):
        value = float(k)
        return torch.full((rows,), value, dtype=dtype, device=z.device), value
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
        return k.expand(rows), None
    return _rows("k", k, batch, options), None


def _prepare_labels(labels: object, z: torch.Tensor, options: LossOptions = LossOptions(),
                    queue: int = 0) -> torch.Tensor | None:
    """(N,) row labels in the views layout ((B,) expanded), (B,) pair labels in the cross
    layout; with a queue of M negatives, labels may go on with the queue's M labels ((N + M,)
    or (B + M,)); without them the queue's columns match no label."""
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be None or an integer tensor of shape (B,) or (N,); got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor; got dtype {labels.dtype}")
    if labels.device != z.device:
        raise ValueError(f"labels must be on the same device as z ({z.device}); got {labels.device}")
    labels = labels.to(torch.int64)
    b = z.shape[0]
    own = b if options.layout == "cross" else 2 * b  # the labels of Z's rows (of the pairs in cross)
    if queue and labels.dim() == 1 and labels.shape[0] == own + queue:
        return labels
    if options.layout == "cross":
        if labels.dim() == 1 and labels.shape[0] == b:
            return labels
        extra = f" or (B + M,)=({b + queue},) with the queue's labels" if queue else ""
        raise ValueError(f"labels must have shape (B,)=({b},) with layout='cross'{extra}; got {tuple(labels.shape)}")
    try:
        return _rows("labels", labels, b)
    except ValueError:
        if not queue:
            raise
        raise ValueError(f"labels must have shape (B,)=({b},), (N,)=({2 * b},) or (N + M,)=({2 * b + queue},) "
                         f"with the queue's labels; got {tuple(labels.shape)}") from None


def _check_same_device(name: str, t: torch.Tensor, z: torch.Tensor) -> None:
    if t.device != z.device:
        raise ValueError(f"{name} must be on the same device as z ({z.device}); got {t.device}")


def _prepare_temperature(temperature: object, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """A tensor temperature: 0-d, floating, on z's device; in the compute dtype (differentiably,
    so dL/dtau reaches the caller's tensor). Its value is not checked (that would read it on
    the host): it must be >= MIN_TEMPERATURE, as a float temperature."""
    if not isinstance(temperature, torch.Tensor):
        return None
    if not temperature.is_floating_point():
        raise TypeError(f"temperature must be a float or a floating-point tensor; got dtype {temperature.dtype}")
    if temperature.dim() != 0:
        raise ValueError(f"temperature must be a 0-d tensor (one learnable scalar); got shape {tuple(temperature.shape)}")
    _check_same_device("temperature", temperature, z)
    return temperature.to(dtype)


def _prepare_negatives(negatives: object, z: torch.Tensor, options: LossOptions) -> torch.Tensor | None:
    if negatives is None:
        return None
    if options.symmetric:
        raise ValueError("negatives cannot be combined with symmetric=True (which direction the queue's "
                         "columns belong to is ambiguous); use symmetric=False")
    if not isinstance(negatives, torch.Tensor):
        raise TypeError(f"negatives must be None or a tensor of shape (M, D); got {type(negatives).__name__}")
    if negatives.dim() != 2 or negatives.shape[1] != z.shape[1] or negatives.shape[0] < 1:
        raise ValueError(f"negatives must have shape (M, D) with M >= 1 and D = {z.shape[1]}; "
                         f"got {tuple(negatives.shape)}")
    if negatives.dtype != z.dtype:
        raise TypeError(f"negatives must have z's dtype ({z.dtype}); got {negatives.dtype}")
    _check_same_device("negatives", negatives, z)
    if negatives.requires_grad:
        raise ValueError("negatives must not require grad: the queue's columns receive no gradient "
                         "(as in MoCo); pass negatives.detach()")
    return negatives


def _prepare_log_q(log_q: object, z: torch.Tensor, dtype: torch.dtype, options: LossOptions,
                   queue: int) -> torch.Tensor | None:
    if log_q is None:
        return None
    if options.layout != "cross" or options.symmetric:
        raise ValueError("log_q needs layout='cross' and symmetric=False (one log sampling probability per "
                         f"column of z_aug); got layout={options.layout!r}, symmetric={options.symmetric}")
    if not isinstance(log_q, torch.Tensor):
        raise TypeError(f"log_q must be None or a floating tensor; got {type(log_q).__name__}")
    if not log_q.is_floating_point():
        raise TypeError(f"log_q must be a floating-point tensor; got dtype {log_q.dtype}")
    _check_same_device("log_q", log_q, z)
    want = z.shape[0] + queue
    if log_q.dim() != 1 or log_q.shape[0] != want:
        what = f"(B + M,)=({want},) with negatives" if queue else f"(B,)=({want},)"
        raise ValueError(f"log_q must have shape {what}; got {tuple(log_q.shape)}")
    if log_q.requires_grad:
        raise ValueError("log_q must not require grad (a fixed sampling correction); pass log_q.detach()")
    return log_q.to(dtype)


def _prepare_mask(mask: object, z: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        what = type(mask).__name__ if not isinstance(mask, torch.Tensor) else f"dtype {mask.dtype}"
        raise TypeError(f"mask must be None or a bool tensor of shape (B,); got {what}")
    if mask.shape != (z.shape[0],):
        raise ValueError(f"mask must have shape (B,)=({z.shape[0]},); got {tuple(mask.shape)}")
    _check_same_device("mask", mask, z)
    return mask


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
    temperature: torch.Tensor | float | None = None,
    negatives: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> Prepared:
    """Validate the tensors against each other and the options; return the backend bundle.

    ``min_batch``: the fewest rows z may hold (a rank's shard of a distributed batch may hold
    fewer than the loss's minimum of 2; distributed.py checks the global batch instead).
    ``temperature``: the caller's temperature when it is a tensor (a float lives in
    ``options``); ``negatives``, ``log_q``, ``mask``: the issue-24 tensors (see ``Prepared``)."""
    _check_views(z, z_aug, min_batch)
    dtype = compute_dtype(z.dtype)
    tau = _prepare_temperature(temperature, z, dtype)
    if tau is None and math.isnan(options.temperature):
        raise ValueError("the options hold a tensor temperature; pass the tensor as temperature")
    negatives = _prepare_negatives(negatives, z, options)
    queue = 0 if negatives is None else negatives.shape[0]
    k_rows, k_scalar = _prepare_k(k, z, dtype, options)
    labels_rows = _prepare_labels(labels, z, options, queue)
    log_q = _prepare_log_q(log_q, z, dtype, options, queue)
    mask = _prepare_mask(mask, z)
    if options.threshold == "soft" and k is None:
        raise ValueError("threshold='soft' needs a threshold k; got k=None")
    if options.same_label == "exclude" and labels is None:
        raise ValueError("same_label='exclude' needs labels (it drops the candidates that share a row's label)")
    if not torch.compiler.is_compiling():  # Dynamo cannot trace warnings.warn; the op warns at run time
        has_label_positives = labels is not None and options.same_label == "positive"
        unbounded_loss_warning(options, k is not None, has_label_positives, stacklevel=3)
    return Prepared(z, z_aug, k_rows, k_scalar, labels_rows, options, stats,
                    temperature=tau, negatives=negatives, log_q=log_q, mask=mask)
