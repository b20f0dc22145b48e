"""The loss over the global batch of a ``torch.distributed`` process group.

Each rank r holds B_r rows of both views (B_r may differ between ranks, and may be 0). The loss
is the single-process loss of the concatenated global batch, rows ordered

    Z = [z of rank 0; z of rank 1; ...; z_aug of rank 0; z_aug of rank 1; ...]   (N = 2B rows)

so the partner of row i is i + B, as in :func:`adaptive_cl.adaptive_info_nce`. Every negative
of every rank counts for every row: that is the point of training contrastively on many
devices.

How it runs, per rank: one small all-gather of the shard sizes (and of a check that every rank
passed the same D, dtype and options; the sizes reach the host, one synchronisation per call),
an all-gather of both views (and of the labels), then the rank computes the losses of *its own*
2 B_r rows against all N columns. The reduced loss is all-reduced, so every rank returns the
global value; reduction="none" returns the rank's own 2 B_r row losses, ordered
[own z rows; own z_aug rows].

Gradients: every rank's inputs receive exactly the gradient of the global loss, as in one
process, provided every rank runs backward (as DDP requires anyway: the backward holds a
collective). A loss term of row i depends on every column j, so rank r's rows also push
gradient into the other ranks' inputs. Each backend hook chooses how that gradient reaches its
owner:

- the reference lets autograd give rank r's contributions to all N rows of Z, all-reduces them
  (O(N D) traffic, the size of the forward's gather) and keeps its own rows: simple and exact
  for every option, autograd does the work;
- the fused kernel all-gathers every row's O(N) statistics (and upstream gradients and
  thresholds) instead and, S being symmetric (dL/dz^_r = (1/tau) sum_j (G_rj + G_jr) z^_j),
  forms its own rows' whole gradient from its own tile walk: O(N) traffic, no work on rows
  it does not own.

Memory per rank: O(N D) for the gathered views (and, for the reference, their gradients), plus
O(B_r N) for the reference's block of the similarity matrix and its autograd intermediates
(the fused kernel: O(N) statistics); never N x N.

With DDP: DDP *averages* parameter gradients over the W ranks, while this loss already gives
each rank the full gradient of the global loss for its inputs; so the parameter gradient DDP
produces is (1/W) of the single-process one. Multiply the loss by W (``dist.get_world_size()``)
before backward to train exactly as one process on the global batch (see examples/ddp_contrastive.py).

Under torch.compile this function runs eagerly (``torch.compiler.disable``: one graph break
around the loss; the encoder before it still compiles).

``return_stats=True`` (as in ``adaptive_info_nce``) also returns a LossStats: ``m`` of the
rank's own rows, and the histogram of the whole global batch's candidate similarities (each
rank counts its own rows' pairs, then one all-reduce of the counts; the same on every rank).

Non-finite inputs anywhere in the global batch make every rank's loss NaN and every element of
every rank's gradients NaN (the contract's rule), without a host synchronisation.

The issue-24 setups (``layout="cross"``, ``symmetric``, a queue replicated on every rank,
``log_q``, ``same_label="exclude"``, ``mask``, a tensor temperature whose gradient is
all-reduced) run on the reference path (``_setup_loss``: the gathered batch, this rank's pairs'
rows against every column, the column gradients all-reduced to their owners); the fused hook
refuses them by name.

Backends: a backend joins through a ``RowsHook`` (own-rows forward + backward) in ``HOOKS``.
Wired: "reference" (row subsets of the PyTorch reference, every option) and "triton" (the fused
kernels over row ranges, every option, float32/float16/bfloat16, as in one process). "auto" takes the fused kernel for CUDA tensors whose options it covers, else the
reference (the single-process rule). A backend without a hook ("compiled", ...) is a
ValueError naming the ones that work.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from . import backends
from .functional import _check_flag
from .contract import LossOptions, Prepared, StatsSpec, extended_options, make_options, make_stats_spec, prepare
from .histogram import LossStats
from .reference import block_stats, pair_rows, row_block

__all__ = ["adaptive_info_nce_distributed", "Shard", "RowsHook", "HOOKS"]

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


@dataclass(frozen=True)
class Shard:
    """Where this rank's rows sit in the global batch, and the collectives the hooks use."""

    group: Any
    rank: int
    sizes: tuple[int, ...]  # B_q of every rank q, in rank order

    @property
    def batch(self) -> int:
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def local(self) -> int:
        return self.sizes[self.rank]

    def own_rows(self, device) -> torch.Tensor:
        """Global indices of this rank's 2 B_r rows of Z: [own z rows; own z_aug rows]."""
        z_rows = torch.arange(self.offset, self.offset + self.local, device=device)
        return torch.cat([z_rows, z_rows + self.batch])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's (B_q, ...) tensor in rank order (padded to the largest
        B_q for the collective, which needs equal sizes)."""
        width = max(self.sizes)
        padded = x.new_zeros((width,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in self.sizes]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([part[:size] for part, size in zip(parts, self.sizes)])

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(2 B_r, ...) own-row values, ordered as ``own_rows``, to the (N, ...) global rows."""
        return torch.cat([self.gather(x[: self.local]), self.gather(x[self.local:])])

    def reduce_to_owners(self, grad_rows: torch.Tensor) -> torch.Tensor:
        """Sum every rank's (N, ...) contributions to the global rows; return this rank's
        (2 B_r, ...) rows, ordered as ``own_rows``."""
        total = grad_rows.contiguous().clone()
        dist.all_reduce(total, group=self.group)
        return total[self.own_rows(total.device)]


class RowsHook(Protocol):
    """One backend's own-rows forward and backward.

    ``unsupported(p)``: None, or why the backend cannot run these options (``p`` the rank's
    prepared shard). ``forward(shard, z_all, z_aug_all, k_own, k_scalar, labels_all, options,
    needs_grad, stats)``: the global views (B, D) each, ``k_own`` None or the (2 B_r,) thresholds of
    the own rows (``k_scalar`` the float when k was one), ``labels_all`` None or the (N,)
    labels, ``stats`` None or the StatsSpec of return_stats; returns the own rows' (2 B_r,)
    losses in the compute dtype, whatever the backward needs, and (with ``stats``) the own
    rows' LossStats (m of the own rows; the histogram of the own rows' candidate pairs, which
    the caller sums over the ranks), else None.
    ``backward(shard, saved, u_own)``: ``u_own`` the (2 B_r,) upstream gradient of the own
    rows' losses; returns (dz (B_r, D), dz_aug (B_r, D), dk (2 B_r,) or None): the gradient of
    the global loss for this rank's inputs. It may use the shard's collectives (every rank calls
    it at the same point), e.g. ``reduce_to_owners`` for column gradients or ``gather_rows``
    for per-row statistics.
    """

    def unsupported(self, p: Prepared) -> str | None: ...

    def forward(self, shard: Shard, z_all, z_aug_all, k_own, k_scalar, labels_all,
                options: LossOptions, needs_grad: bool, stats: StatsSpec | None = None): ...

    def backward(self, shard: Shard, saved, u_own): ...


class ReferenceRows:
    """Row subsets of the PyTorch reference (``reference.row_block_losses``); the backward is
    autograd's, the column gradients reduced to their owners."""

    def unsupported(self, p):
        return None

    def forward(self, shard, z_all, z_aug_all, k_own, k_scalar, labels_all, options, needs_grad, stats=None):
        with torch.enable_grad() if needs_grad else torch.no_grad():
            leaves = [z_all.detach().requires_grad_(needs_grad), z_aug_all.detach().requires_grad_(needs_grad)]
            if k_own is not None:
                leaves.append(k_own.detach().requires_grad_(needs_grad))
            rows = shard.own_rows(z_all.device)
            losses, c, a, candidates = row_block(leaves[0], leaves[1], rows, leaves[2] if k_own is not None else None,
                                                 labels_all, options)
        own_stats = None
        if stats is not None:
            finite = torch.isfinite(z_all).all() & torch.isfinite(z_aug_all).all()
            own_stats = block_stats(stats, finite, c, a, candidates)
        return losses.detach(), (leaves, losses), own_stats

    def backward(self, shard, saved, u_own):
        leaves, losses = saved
        grads = torch.autograd.grad(losses, leaves, u_own.to(losses.dtype), allow_unused=True,
                                    materialize_grads=True)
        own = shard.reduce_to_owners(torch.cat([grads[0], grads[1]]))
        b = shard.local
        return own[:b], own[b:], (grads[2] if len(grads) > 2 else None)


class TritonRows:
    """The fused kernels over row ranges (kernels/function.py ``prepare_rows``, ``forward_rows``,
    ``backward_rows``). Each rank prepares all N gathered rows (an O(N D) pre-pass) and computes
    its two row ranges against every column. The backward all-gathers every row's statistics
    (three, four with the soft threshold), upstream gradient and threshold (O(N) traffic,
    against the reference's O(N D) column gradients) and, S being symmetric, forms its own rows'
    whole gradient: no gradient of another rank's rows is computed or sent. Every option, as in
    one process: labels (all-gathered), the soft threshold with dL/dk of the own rows (only row
    i's loss reads k_i, so its gradient is a reduction over the rank's own rows)."""

    def unsupported(self, p):
        return backends.triton_unavailable_reason(p)

    def forward(self, shard, z_all, z_aug_all, k_own, k_scalar, labels_all, options, needs_grad, stats=None):
        from .kernels import function as f

        # A row's backward re-evaluates every other row's decisions: all thresholds are needed,
        # gathered even when k is a float (each rank's float is its own rows' threshold; ranks
        # may differ, and a float on one rank may meet a tensor on another).
        k_all = None if k_own is None else shard.gather_rows(k_own.detach())
        b, off, r = shard.batch, shard.offset, shard.local
        with f._on_device(z_all):
            pr = f.prepare_rows(z_all, z_aug_all, k_all, None, options, labels_rows=labels_all)
            ranges = ((off, off + r), (b + off, b + off + r))
            hists = [None if stats is None else f.hist_buffer(pr, stats.bins, lo, hi) for lo, hi in ranges]
            parts = [f.forward_rows(pr, options, lo, hi, hist=h, hist_range=(-1.0, 1.0) if stats is None else stats.range)
                     for (lo, hi), h in zip(ranges, hists)]
        losses, *rows = (torch.cat([a, c]) for a, c in zip(*parts))
        own_stats = None
        if stats is not None:  # each range counted its pairs j > i; the ranks' ranges partition the rows
            counts = sum(f.finish_histogram(pr, h) for h in hists)
            own_stats = LossStats(m=torch.where(pr.flag == 0, rows[0], float("nan")), histogram=counts,
                                  range=stats.range)
        return losses, (pr, torch.stack(rows, dim=1), k_own, k_scalar, options), own_stats

    def backward(self, shard, saved, u_own):
        from .kernels import function as f

        pr, stats, k_own, k_scalar, options = saved
        cnt, rs, wx, *ha = shard.gather_rows(stats).T.contiguous()
        ha = ha[0].contiguous() if ha else None
        u_all = shard.gather_rows(u_own.detach().float().contiguous())
        per_row = dataclasses.replace(options, reduction="none")  # u_all already holds 1/N for "mean"
        b, off, r = shard.batch, shard.offset, shard.local
        soft_k = k_own is not None and k_scalar is None and options.threshold == "soft"
        dk = torch.empty(2 * r, dtype=torch.float32, device=pr.zs.device) if soft_k else None
        with f._on_device(pr.zs):
            dz = f.backward_rows(pr, per_row, cnt, rs, wx, u_all, off, off + r, ha=ha,
                                 dk=None if dk is None else dk[:r])
            dza = f.backward_rows(pr, per_row, cnt, rs, wx, u_all, b + off, b + off + r, ha=ha,
                                  dk=None if dk is None else dk[r:])
        if k_own is None:
            dk_own = None
        elif soft_k:
            dk_own = dk.to(k_own.dtype)
        else:
            dk_own = torch.zeros_like(k_own)  # the hard threshold is flat (a float k has no gradient)
        return dz, dza, dk_own


#: Backends with a distributed (own-rows) implementation.
HOOKS: dict[str, RowsHook] = {"reference": ReferenceRows(), "triton": TritonRows()}


def _hook(backend: str, p: Prepared) -> RowsHook:
    """The hook of ``backend``; "auto": the fused kernel on CUDA when it covers the options,
    else the reference (the single-process rule)."""
    backends.check_name(backend)
    if backend == "auto":
        fused = p.z.is_cuda and HOOKS["triton"].unsupported(p) is None
        return HOOKS["triton" if fused else "reference"]
    if backend not in HOOKS:
        wired = ", ".join(map(repr, ["auto", *HOOKS]))
        raise ValueError(f"backend={backend!r} has no distributed implementation yet; use one of {wired}")
    reason = HOOKS[backend].unsupported(p)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run these inputs: {reason}")
    return HOOKS[backend]


def _label_rows_limit(hook: RowsHook, backend: str, p: Prepared, global_rows: int) -> RowsHook:
    """The fused hook compares label ids as float32 (exact up to 2^24 rows): checked against the
    global batch, which only the shard knows (``_hook`` saw the rank's own rows). Every rank
    computes the same answer from the same global count, so they all switch or all raise."""
    if not isinstance(hook, TritonRows) or p.labels_rows is None:
        return hook
    from . import kernels

    limit = kernels.MAX_LABEL_ROWS
    if global_rows <= limit:
        return hook
    if backend == "auto":
        return HOOKS["reference"]
    raise ValueError(f"backend={backend!r} cannot run these inputs: labels with N = {global_rows} > "
                     f"{limit} rows in the global batch (the kernels compare label ids as float32, "
                     "exact up to 2^24)")


class _GlobalBatchLoss(torch.autograd.Function):
    """apply(z, z_aug, k_own, k_scalar, shard, labels_all, options, hook, needs_grad, stats) ->
    the global loss (reduction "mean"/"sum") or the own rows' losses ("none"); with ``stats`` (a
    StatsSpec) (loss, m of the own rows, the global histogram), neither differentiable."""

    @staticmethod
    def forward(ctx, z, z_aug, k_own, k_scalar, shard, labels_all, options, hook, needs_grad, stats=None):
        z_all = shard.gather(z.detach())
        z_aug_all = shard.gather(z_aug.detach())
        losses, saved, own_stats = hook.forward(shard, z_all, z_aug_all, k_own, k_scalar, labels_all, options,
                                                needs_grad, stats)
        ctx.shard, ctx.hook, ctx.saved, ctx.options = shard, hook, saved, options
        ctx.n = 2 * shard.batch
        ctx.finite = torch.isfinite(z_all).all() & torch.isfinite(z_aug_all).all()
        if options.reduction == "none":
            out = losses.clone()
        else:
            total = losses.sum().reshape(1)
            dist.all_reduce(total, group=shard.group)
            total = total.reshape(())
            out = total / ctx.n if options.reduction == "mean" else total
        if stats is None:
            return out
        counts = own_stats.histogram.contiguous().clone()
        dist.all_reduce(counts, group=shard.group)  # the own rows' pairs: a partition of all pairs
        m = own_stats.m.clone()
        ctx.mark_non_differentiable(m, counts)
        return out, m, counts

    @staticmethod
    def backward(ctx, grad, *_stats_grads):
        o = ctx.options
        if o.reduction == "none":
            u_own = grad
        else:
            scale = 1.0 / ctx.n if o.reduction == "mean" else 1.0
            u_own = (grad * scale).expand(2 * ctx.shard.local)
        dz, dza, dk = ctx.hook.backward(ctx.shard, ctx.saved, u_own)
        ctx.saved = None
        nan = torch.tensor(float("nan"), dtype=dz.dtype, device=dz.device)
        dz, dza = torch.where(ctx.finite, dz, nan), torch.where(ctx.finite, dza, nan)
        return dz, dza, dk, None, None, None, None, None, None, None


def _shard(z: torch.Tensor, group, options: LossOptions, backend: str, has_k: bool, has_labels: bool,
           stats: StatsSpec | None = None, setup: tuple = ()) -> Shard:
    """Exchange the shard sizes, checking that every rank agrees on D, dtype and options
    (``setup``: what else every rank must give alike, e.g. the queue's size)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "adaptive_info_nce_distributed needs torch.distributed initialised "
            "(dist.init_process_group); for one process use adaptive_info_nce")
    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    fingerprint = zlib.crc32(repr((options, backend, has_k, has_labels, stats, setup)).encode())
    mine = torch.tensor([z.shape[0], z.shape[1], _DTYPE_CODES[z.dtype], fingerprint],
                        dtype=torch.int64, device=z.device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    table = torch.stack(every).tolist()
    for what, col in (("feature size D", 1), ("dtype", 2),
                      ("options (and give k, labels and return_stats alike)", 3)):
        if len({row[col] for row in table}) != 1:
            raise ValueError(f"every rank must pass the same {what}; ranks disagree: "
                             f"{[row[col] for row in table]}")
    sizes = tuple(row[0] for row in table)
    if sum(sizes) < 2:
        raise ValueError(f"the global batch must hold at least B=2 rows; the ranks hold {list(sizes)}")
    return Shard(group, rank, sizes)


@torch.compiler.disable  # collectives and a host sync: runs eagerly inside a compiled model
def adaptive_info_nce_distributed(
    z: torch.Tensor,
    z_aug: torch.Tensor,
    k: torch.Tensor | float | None = None,
    *,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    normalize: bool = True,
    denominator: str = "negatives",
    weighting: str = "normalized",
    positive_weight: float = 0.5,
    threshold: str = "hard",
    threshold_scale: float = 0.05,
    reduction: str = "mean",
    backend: str = "auto",
    group=None,
    return_stats: bool = False,
    stats_bins: int = 2048,
    stats_range: tuple[float, float] = (-1.0, 1.0),
    layout: str = "views",
    symmetric: bool = False,
    negatives: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    same_label: str = "positive",
    mask: torch.Tensor | None = None,
):
    """:func:`adaptive_cl.adaptive_info_nce` over the global batch of a process group.

    Every rank calls it with its own rows (see the module docstring for the row order) and the
    same options; the result and the gradients equal those of one process holding the whole
    batch.

    Args:
        z, z_aug: this rank's two views, (B_r, D); B_r may differ between ranks (and be 0),
            the global B = sum B_r must be >= 2. Same D and dtype on every rank.
        k: the threshold of this rank's rows: None, a float or 0-d tensor, a (B_r,) tensor
            (rows i and i + B share it) or a (2 B_r,) tensor ([own z rows; own z_aug rows]).
            None on one rank means None on all.
        labels: None or this rank's integer labels, (B_r,) or (2 B_r,) as k; compared with
            every rank's labels (they are all-gathered).
        temperature ... reduction: as ``adaptive_info_nce``; "mean" divides by the global N.
        backend: "auto" or a backend with a distributed hook (``HOOKS``: "reference", "triton").
        group: the process group (None: the default group).
        layout, symmetric, same_label, a tensor temperature: as ``adaptive_info_nce``. The cross
            layout's rows are every rank's z rows, its columns every rank's z_aug rows (then
            the queue); k, labels and log_q are this rank's pairs' ((B_r,); k (2 B_r,) with
            symmetric: own direction-1 rows, then own direction-2 rows). These setups run on the
            reference hook (the fused kernels do not implement them yet).
        negatives: the (M, D) queue, the same tensor on every rank (as MoCo's all-gathered
            queue): columns of every row; labels and log_q may go on with its M entries.
        log_q: (B_r,) this rank's z_aug columns' log sampling probabilities, or (B_r + M,)
            followed by the queue's (the same on every rank).
        mask: (B_r,) bool, this rank's padding; "mean" averages over the global valid rows.
        return_stats, stats_bins, stats_range: as ``adaptive_info_nce``: also return a
            :class:`adaptive_cl.stats.LossStats` whose ``m`` holds this rank's 2 B_r rows
            (ordered as reduction="none") and whose ``histogram`` counts the candidate
            similarities of the whole global batch (all-reduced: the same on every rank).
            Counted in the kernel's forward with the fused hook, from the rank's (2 B_r, N)
            block of similarities with the reference.

    Returns:
        "mean"/"sum": the global loss, the same value on every rank; "none": this rank's
        2 B_r row losses; with ``return_stats``: (loss, LossStats). Differentiable once; every
        rank must run backward.
    """
    options = make_options(
        temperature=temperature, normalize=normalize, denominator=denominator, weighting=weighting,
        positive_weight=positive_weight, threshold=threshold, threshold_scale=threshold_scale,
        reduction=reduction, layout=layout, symmetric=symmetric, same_label=same_label)
    stats = make_stats_spec(stats_bins, stats_range) if _check_flag(return_stats) else None
    p = prepare(z, z_aug, k, labels, options, min_batch=0, temperature=temperature, negatives=negatives,
                log_q=log_q, mask=mask)
    hook = _hook(backend, p)
    own_labels = 2 * z.shape[0] if layout == "views" else z.shape[0]
    setup = (p.queue, None if p.log_q is None else p.log_q.shape[0] - z.shape[0], mask is not None,
             isinstance(temperature, torch.Tensor),
             None if p.labels_rows is None else p.labels_rows.shape[0] - own_labels)  # the queue's labels given
    shard = _shard(z, group, options, backend, k is not None, labels is not None, stats, setup)
    if extended_options(p):  # only the reference hook implements them ("triton" raised in _hook)
        return _setup_loss(dataclasses.replace(p, stats=stats), shard)
    hook = _label_rows_limit(hook, backend, p, 2 * shard.batch)
    labels_all = None if p.labels_rows is None else shard.gather_rows(p.labels_rows)
    inputs = [z, z_aug] + ([p.k_rows] if p.k_rows is not None else [])
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    out = _GlobalBatchLoss.apply(z, z_aug, p.k_rows, p.k_scalar, shard, labels_all, options, hook,
                                 needs_grad, stats)
    if stats is None:
        return out
    loss, m, counts = out
    return loss, LossStats(m=m, histogram=counts, range=stats.range)


# ------------------------------------------------------------------------ the issue-24 setups
def _setup_loss(p: Prepared, shard: Shard):
    """The cross layout, a queue, log_q, exclusion, a mask, a tensor temperature: the global
    batch gathered, this rank's pairs' rows computed by the reference against every column
    (``reference.pair_rows``), the column gradients all-reduced to their owners."""
    o = p.options
    b_r, b = shard.local, shard.batch
    views = o.layout == "views"

    def own_then_queue(t, halves: bool):  # this rank's entries gathered, the queue's (replicated) kept
        if t is None:
            return None
        # decided by the layout, never by B_r: every rank must run the same collectives
        own = 2 * b_r if halves else b_r
        mine = shard.gather_rows(t[:own]) if halves else shard.gather(t[:own])
        return torch.cat([mine, t[own:]])

    labels_all = own_then_queue(p.labels_rows, views)
    log_q_all = own_then_queue(p.log_q, False)
    mask_all = None if p.mask is None else shard.gather(p.mask.to(torch.uint8)).bool()  # gloo has no bool
    inputs = [p.z, p.z_aug] + [t for t in (p.k_rows, p.temperature) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    out = _GlobalSetupLoss.apply(p.z, p.z_aug, p.k_rows, p.temperature, p, shard, labels_all, log_q_all,
                                 mask_all, needs_grad)
    if p.stats is None:
        return out
    loss, m, counts = out
    return loss, LossStats(m=m, histogram=counts, range=p.stats.range)


class _GlobalSetupLoss(torch.autograd.Function):
    """apply(z, z_aug, k_own, tau, p, shard, labels_all, log_q_all, mask_all, needs_grad) -> the
    global loss ("mean"/"sum") or the own rows' losses ("none"); with ``p.stats`` also (m of
    the own rows, the global histogram). Gradients: z, z_aug (own rows of the all-reduced
    column gradients), k_own (own rows only read it), tau (all-reduced)."""

    @staticmethod
    def forward(ctx, z, z_aug, k_own, tau, p, shard, labels_all, log_q_all, mask_all, needs_grad):
        o = p.options
        b_r, b = shard.local, shard.batch
        pairs = torch.arange(shard.offset, shard.offset + b_r, device=z.device)
        rows_per_pair = 1 if o.layout == "cross" and not o.symmetric else 2
        own_rows = pairs if rows_per_pair == 1 else torch.cat([pairs, pairs + b])
        with torch.enable_grad() if needs_grad else torch.no_grad():
            leaves = [shard.gather(z.detach()).requires_grad_(needs_grad),
                      shard.gather(z_aug.detach()).requires_grad_(needs_grad)]
            k_rows = None
            if k_own is not None:
                leaves.append(k_own.detach().requires_grad_(needs_grad))
                # only the own rows' thresholds are read (pair_rows): the others stay 0
                k_rows = leaves[-1].new_zeros(rows_per_pair * b).index_put((own_rows,), leaves[-1])
            tau_leaf = None
            if tau is not None:
                tau_leaf = tau.detach().requires_grad_(needs_grad)
                leaves.append(tau_leaf)
            pg = dataclasses.replace(p, z=leaves[0], z_aug=leaves[1], k_rows=k_rows, labels_rows=labels_all,
                                     log_q=log_q_all, mask=mask_all, temperature=tau_leaf,
                                     negatives=None if p.negatives is None else p.negatives.detach())
            losses, own_stats = pair_rows(pg, pairs)
        ctx.shard, ctx.leaves, ctx.losses, ctx.options = shard, leaves, losses, o
        ctx.has_k, ctx.has_tau = k_own is not None, tau is not None
        if o.reduction == "none":
            out = losses.detach().clone()
        else:
            valid = torch.tensor(float(rows_per_pair * b_r), dtype=losses.dtype, device=losses.device)
            if mask_all is not None:
                valid = (mask_all[pairs].sum() * rows_per_pair).to(losses.dtype)
            both = torch.stack([losses.detach().sum(), valid])
            dist.all_reduce(both, group=shard.group)
            total, ctx.valid = both[0], both[1].clamp(min=1)
            ctx.sum_factor = 0.5 if o.symmetric else 1.0
            out = total / ctx.valid if o.reduction == "mean" else total * ctx.sum_factor
        if p.stats is None:
            return out
        counts = own_stats.histogram.contiguous().clone()
        dist.all_reduce(counts, group=shard.group)  # the own rows' candidates: a partition of all
        m = own_stats.m.clone()
        ctx.mark_non_differentiable(m, counts)
        return out, m, counts

    @staticmethod
    def backward(ctx, grad, *_stats_grads):
        o, shard = ctx.options, ctx.shard
        if o.reduction == "none":
            u = grad
        else:
            scale = 1.0 / ctx.valid if o.reduction == "mean" else ctx.sum_factor
            u = (grad * scale).expand(ctx.losses.shape[0])
        grads = torch.autograd.grad(ctx.losses, ctx.leaves, u.to(ctx.losses.dtype), allow_unused=True,
                                    materialize_grads=True)
        ctx.leaves = ctx.losses = None
        columns = torch.cat([grads[0], grads[1]]).contiguous()
        dist.all_reduce(columns, group=shard.group)
        b, off, b_r = shard.batch, shard.offset, shard.local
        dz, dza = columns[off:off + b_r], columns[b + off:b + off + b_r]
        dk = grads[2] if ctx.has_k else None
        dtau = None
        if ctx.has_tau:
            dtau = grads[-1].contiguous().clone()
            dist.all_reduce(dtau, group=shard.group)  # every rank's rows read the one temperature
        return dz, dza, dk, dtau, None, None, None, None, None, None
