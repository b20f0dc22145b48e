"""SimThres: the similarity threshold of AdaptiveRec, statistical or learned.

``SimilarityStats`` gathers, per epoch, a histogram of the cosine similarities c_ij over each
row's candidate set N(i) (j != i, j != partner) of the 2B contrastive views, entirely on the
device (no host sync per step), from ``adaptive_cl.similarity_histogram``: counted inside the
fused kernel on CUDA and by the C++ extension's histogram-only pass on CPU (nothing N x N is
materialised or sorted), by the reference's dense similarities where neither is available. It gives the epoch's k_stat in two ways, both read by
``adaptive_cl.histogram_percentile`` (``torch.quantile``'s linear interpolation, within one bin
width of the exact percentile):

- ``"pooled"`` (the loss's k_stat, the default): the percentile of all pooled c_ij, from the
  epoch's histogram (``bins=2048`` on [-1, 1], width ~1e-3);
- ``"batch_mean"`` (the released AdaptiveRec code): the mean of the per-batch percentiles, each
  from its batch's histogram.

Thresholds: ``StatisticalSimThres`` uses the previous epoch's k_stat (in the first epoch, the
running statistic of the epoch's batches so far, by default); ``LearnableSimThres`` wraps a network g (``ThresholdNet``, any batch size, or the
authors' ``FlattenedThresholdNet``) regularised towards k_stat from the second epoch on.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..contract import MAX_STATS_BINS
from ..stats import histogram_percentile, similarity_histogram

KSTAT_METHODS = ("pooled", "batch_mean")
#: StatisticalSimThres' first epoch, before any statistic exists.
KSTAT_STARTS = ("running", "none", "zero")
#: FlattenedThresholdNet's initialisations: nn.Linear's, or the release's N(0, 0.02).
THRESHOLD_INITS = ("default", "normal")
#: Thresholds are scaled to (-1.05, 1.05): slightly beyond the cosine range, so g can switch
#: positives fully off (k > 1) or make every candidate positive (k < -1).
THRESHOLD_RANGE = 1.05


def candidate_similarities(z: torch.Tensor, z_aug: torch.Tensor) -> torch.Tensor:
    """Cosine similarities over N(i) of the N = 2B stacked views: ``(N, N - 2)``.

    Built with a gather of precomputable column indices, not boolean indexing, which would
    make the device report a data-dependent size to the host.
    """
    if z.dim() != 2 or z.shape != z_aug.shape or len(z) < 2:
        raise ValueError(
            f"z and z_aug must be equal (B, D) with B >= 2, got {tuple(z.shape)}, "
            f"{tuple(z_aug.shape)}"
        )
    zn = F.normalize(torch.cat([z, z_aug]).float(), dim=1)
    c = (zn @ zn.T).clamp(-1.0, 1.0)
    return c.gather(1, _candidate_columns(len(z), z.device))


@functools.lru_cache(maxsize=8)
def _candidate_columns(b: int, device: torch.device) -> torch.Tensor:
    """The gather index of :func:`candidate_similarities`, built once per batch size (not
    with a handful of launches every step)."""
    n = 2 * b
    rows = torch.arange(n, device=device)[:, None]
    # Row i takes columns (i + 1 + t) mod N for t = 0..N-2 (everything but itself); its
    # partner (i + B) mod N is always at t = B - 1, so that offset is left out.
    t = torch.cat([torch.arange(b - 1, device=device), torch.arange(b, n - 1, device=device)])
    return (rows + 1 + t[None, :]) % n


def exact_percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of ``values`` with linear interpolation (``torch.quantile``'s default),
    via ``kthvalue`` so it works beyond 2^24 values. Returns a 0-d tensor on the device."""
    flat = values.reshape(-1).float()
    if flat.numel() == 0:
        raise ValueError("values is empty")
    pos = q * (flat.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, flat.numel() - 1)
    a = flat.kthvalue(lo + 1).values
    b = flat.kthvalue(hi + 1).values if hi != lo else a
    return a + (pos - lo) * (b - a)


def _check_q(q: float) -> float:
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    return float(q)


class SimilarityStats:
    """Per-epoch statistics of the candidate similarities, accumulated on the device.

    Args:
        q: the percentile as a fraction (0.9 = the paper's 90th percentile).
        bins: histogram bins on [-1, 1], a power of two <= 4096 (the percentiles are within
            one bin width, 2 / bins, of exact).
        device: where the accumulators live (the training device).
        batch_percentiles: also read each batch's percentile from its histogram (needed for
            ``"batch_mean"``).
    """

    def __init__(
        self,
        q: float = 0.9,
        bins: int = 2048,
        device: torch.device | str = "cpu",
        batch_percentiles: bool = True,
    ) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2 or bins > MAX_STATS_BINS \
                or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two in [2, {MAX_STATS_BINS}], got {bins!r}")
        self.q = _check_q(q)
        self.bins = bins
        self.device = torch.device(device)
        self.batch_percentiles = batch_percentiles
        self.reset()

    def reset(self) -> None:
        """Start a new epoch."""
        self.counts = torch.zeros(self.bins, dtype=torch.int64, device=self.device)
        self.batch_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.num_batches = 0

    @torch.no_grad()
    def update(self, z: torch.Tensor, z_aug: torch.Tensor) -> None:
        """Add one batch's candidate similarities (the two views of the contrastive loss)."""
        counts = similarity_histogram(z.detach(), z_aug.detach(), bins=self.bins).to(self.device)
        self.counts += counts
        if self.batch_percentiles:
            self.batch_sum += histogram_percentile(counts, self.q)
        self.num_batches += 1

    def percentile(self, method: str = "pooled") -> float:
        """The epoch's k_stat (one host sync): ``"pooled"`` or ``"batch_mean"``."""
        if method not in KSTAT_METHODS:
            raise ValueError(f"method must be one of {KSTAT_METHODS}, got {method!r}")
        if self.num_batches == 0:
            raise ValueError("no batch was recorded this epoch")
        if method == "batch_mean":
            if not self.batch_percentiles:
                raise ValueError("batch_mean needs SimilarityStats(batch_percentiles=True)")
            return float(self.batch_sum) / self.num_batches
        return float(histogram_percentile(self.counts, self.q))

    def running(self, method: str = "pooled") -> torch.Tensor:
        """The statistic of the batches recorded so far, as a 0-d device tensor (no host
        sync); needs at least one batch."""
        if method == "batch_mean":
            return (self.batch_sum / self.num_batches).float()
        return histogram_percentile(self.counts, self.q).float()

    def histogram(self, bins: int = 64) -> list[int]:
        """The epoch's counts coarsened to ``bins`` equal bins on [-1, 1] (for plots)."""
        if self.bins % bins:
            raise ValueError(f"bins must divide {self.bins}, got {bins!r}")
        return self.counts.view(bins, -1).sum(1).tolist()

    def state_dict(self) -> dict:
        return {"counts": self.counts.clone(), "batch_sum": self.batch_sum.clone(),
                "num_batches": self.num_batches}

    def load_state_dict(self, state: dict) -> None:
        self.counts = state["counts"].to(self.device)
        self.batch_sum = state["batch_sum"].to(self.device)
        self.num_batches = int(state["num_batches"])


class StatisticalSimThres:
    """k for epoch e = k_stat of epoch e - 1. Before the first statistic exists (epoch 1),
    ``start`` decides:

    - ``"running"`` (the training default): the same statistic over the batches of this epoch
      seen so far (read on the device from the epoch's :class:`SimilarityStats`, no host
      sync), and no extra positives for the very first batch;
    - ``"none"`` (the class default, which needs no statistics): no extra positives (k = 1: no
      cosine exceeds it) for the whole first epoch;
    - ``"zero"``: k = 0 (the paper's "0 before the first epoch"; at initialisation the 90th
      percentile of candidate cosines is about 0.8, so most candidates become positives).
    """

    def __init__(self, start: str = "none", stats: SimilarityStats | None = None,
                 method: str = "pooled") -> None:
        if start not in KSTAT_STARTS:
            raise ValueError(f"start must be one of {KSTAT_STARTS}, got {start!r}")
        if start == "running" and stats is None:
            raise ValueError("start='running' needs the epoch's SimilarityStats")
        if method not in KSTAT_METHODS:
            raise ValueError(f"method must be one of {KSTAT_METHODS}, got {method!r}")
        self.start = start
        self.stats = stats
        self.method = method
        self.updated = False
        self.k = 0.0 if start == "zero" else 1.0
        self._tensor: torch.Tensor | None = None

    def update(self, k_stat: float) -> None:
        self.k = float(k_stat)
        self.updated = True
        self._tensor = None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if not self.updated and self.start == "running" and self.stats.num_batches:
            return self.stats.running(self.method).to(h.device)
        # One fill per epoch, not one per step.
        if self._tensor is None or self._tensor.device != h.device:
            self._tensor = torch.full((), self.k, device=h.device)
        return self._tensor

    def state_dict(self) -> dict:
        return {"k": self.k, "updated": self.updated}

    def load_state_dict(self, state: dict) -> None:
        self.k = float(state["k"])
        self.updated = bool(state.get("updated", True))
        self._tensor = None


class ThresholdNet(nn.Module):
    """Default g: one threshold per row from that row's representation and the batch's
    mean and standard deviation, so k reflects the batch composition (the paper's point)
    while working for any batch size, including a smaller last batch.

    ``(B, H) -> (B,)``, each in (-1.05, 1.05) via ``1.05 * tanh``.
    """

    def __init__(self, hidden: int, width: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3 * hidden, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != 2:
            raise ValueError(f"h must be (B, H), got shape {tuple(h.shape)}")
        mean = h.mean(0, keepdim=True).expand_as(h)
        std = h.std(0, unbiased=False, keepdim=True).expand_as(h)
        return THRESHOLD_RANGE * torch.tanh(self.mlp(torch.cat([h, mean, std], 1)).squeeze(1))


class FlattenedThresholdNet(nn.Module):
    """The released AdaptiveRec g: the whole batch flattened, Linear(B*H -> B*H/8) ->
    Linear(-> B) -> sigmoid, scaled to (-1.05, 1.05).

    Faithful but costly: B*H*B*H/8 weights (537M at B=1024, H=64) and a fixed batch size, so
    a run using it must drop the partial last batch. ``init="normal"`` draws the weights from
    N(0, 0.02) with zero biases (the release, RecBole's initialisation); ``"default"`` keeps
    ``nn.Linear``'s.

    The first layer's weight gradient (B*H*B*H/8 values, 2 GB at B = 1024) is written into a
    buffer kept across steps, in ``W``'s own layout: letting autograd allocate it afresh each
    step (and ``zero_grad`` release it) cost more than the arithmetic on the CPU, where every
    fresh page is a fault, and ``x @ W.T`` would also produce the transpose and copy it.
    """

    def __init__(self, batch_size: int, hidden: int, init: str = "default") -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if init not in THRESHOLD_INITS:
            raise ValueError(f"init must be one of {THRESHOLD_INITS}, got {init!r}")
        width = max(batch_size * hidden // 8, 1)
        self.batch_size = batch_size
        self.hidden = hidden
        self.net = nn.Sequential(nn.Linear(batch_size * hidden, width),
                                 nn.Linear(width, batch_size))
        if init == "normal":
            for layer in self.net:
                nn.init.normal_(layer.weight, 0.0, 0.02)
                nn.init.zeros_(layer.bias)
        self._grad_buffer: torch.Tensor | None = None

    def weight_grad_buffer(self, weight: torch.Tensor) -> torch.Tensor:
        if (self._grad_buffer is None or self._grad_buffer.shape != weight.shape
                or self._grad_buffer.device != weight.device
                or self._grad_buffer.dtype != weight.dtype):
            self._grad_buffer = torch.empty_like(weight)
        return self._grad_buffer

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape != (self.batch_size, self.hidden):
            raise ValueError(
                f"FlattenedThresholdNet was built for batches of shape ({self.batch_size}, "
                f"{self.hidden}), got {tuple(h.shape)}; drop the partial last batch "
                f"(drop_last=True) or use ThresholdNet, which takes any batch size"
            )
        first, second = self.net
        hidden = _ColumnLinear.apply(h.reshape(-1), first.weight, first.bias, self)
        s = torch.sigmoid(second(hidden).squeeze(0))
        return THRESHOLD_RANGE * (2.0 * s - 1.0)


class _ColumnLinear(torch.autograd.Function):
    """``(W x + b)`` as a ``(1, out)`` row for a single flattened input ``x``; the backward
    writes W's gradient (the outer product g x^T) into the net's kept buffer and sets or adds
    it to ``W.grad`` itself (autograd gets None for W: no fresh allocation, no copy)."""

    @staticmethod
    def forward(ctx, x, weight, bias, net):
        ctx.save_for_backward(x, weight)
        ctx.net = net
        return torch.addmv(bias, weight, x)[None]

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad[0]
        grad_x = weight.T.mv(g) if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[1]:
            if weight.grad is None:
                buffer = ctx.net.weight_grad_buffer(weight)
                torch.outer(g, x, out=buffer)
                weight.grad = buffer
            else:  # accumulate, as autograd would (zero_grad(set_to_none=False), two passes)
                weight.grad.addr_(g, x)
        grad_bias = g if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, None


class LearnableSimThres(nn.Module):
    """k_learn = g(batch representations), regularised towards the previous epoch's k_stat.

    Args:
        net: ``ThresholdNet`` or ``FlattenedThresholdNet``.
        weight: regularizer weight (0.1).
        squared: ``weight * ||k - k_stat||_2^2`` (the paper) instead of the unsquared norm (the
            released code, the default).
        detach_input: feed g detached representations, so the regularizer trains g only and
            does not pull the encoder towards making g's output match k_stat.
    """

    def __init__(
        self, net: nn.Module, weight: float = 0.1, squared: bool = False, detach_input: bool = True
    ) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight!r}")
        self.net = net
        self.weight = float(weight)
        self.squared = squared
        self.detach_input = detach_input
        self.register_buffer("k_stat", torch.zeros(()))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.int64))
        self._seen = 0  # host mirror of epochs_seen, so forward passes never read the device

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.detach() if self.detach_input else h)

    def update(self, k_stat: float) -> None:
        """End of an epoch: the new control value k_stat."""
        self.k_stat.fill_(float(k_stat))
        self._seen += 1
        self.epochs_seen.fill_(self._seen)

    def regularizer(self, k: torch.Tensor) -> torch.Tensor:
        """``weight * ||k - k_stat||_2`` (squared if asked); zero in the first epoch, when no
        k_stat exists yet."""
        if self._seen == 0:
            return torch.zeros((), device=k.device)
        d = torch.linalg.vector_norm(k.float() - self.k_stat)
        return self.weight * (d.square() if self.squared else d)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._seen = int(self.epochs_seen)
