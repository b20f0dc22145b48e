"""``AdaptiveInfoNCEFunction``: the autograd wrapper around the fused kernels, and the two entry
points it is built from.

``forward_rows`` (row-stats launch + forward launch) and ``backward_rows`` (per-row launch +
backward launch) take a contiguous range [row_start, row_stop) of the N = 2B global rows of
Z = [z; z_aug]: each computes its rows against all N columns, and the backward reads every
row's statistics from full (N,) tensors (a distributed caller gathers them). The autograd
Function uses the whole range. It saves O(N D) prepared rows and O(N) per-row statistics,
never an N x N tensor, and never synchronises with the host: every data-dependent scalar (the
all-finite flag, the gradient scale) stays on the device.

Launch configuration: ``launch.TABLE``, one entry per (D bucket, dtype, float32 path) shared by
both passes, never tuned at run time (``python -m adaptive_cl.kernels.autotune`` measures on a
GPU and prints a replacement table).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import triton
from torch.autograd.function import once_differentiable

from . import adaptive_info_nce_fwd as fwd
from . import launch
from .adaptive_info_nce_bwd import _bwd_kernel, _bwd_rows_kernel
from .adaptive_info_nce_fwd import LOG2E, _fwd_kernel
from .row_stats import _row_stats_kernel, rows_per_program

#: How the forward counts its histogram (return_stats): "shared" is ``tl.histogram``, which
#: Triton >= 3.9 lowers to shared-memory atomics (ATOMS.POPC.INC, about 7 instructions per
#: element at any bin count, compiled for sm_90); older Triton lowers it with warp ballots whose
#: cost grows with the bins (triton 3.6: 229 instructions per element at 2048 bins), so there
#: "atomic" (one relaxed global atomic increment per element into the program's own row of a
#: (programs, bins) buffer) is used. Both give the same integer counts (order-free).
#: ADAPTIVE_CL_HIST=shared|atomic overrides it.
HIST_MODE = "shared" if tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 9) else "atomic"


def hist_mode() -> str:
    choice = os.environ.get("ADAPTIVE_CL_HIST", HIST_MODE)
    if choice not in ("shared", "atomic"):
        raise ValueError(f"ADAPTIVE_CL_HIST must be 'shared' or 'atomic'; got {choice!r}")
    return choice

#: The float32 path when ``torch.get_float32_matmul_precision()`` is "highest": "ieee" (float32
#: FMA products, K-split so it does not spill) or "3xtf32" (this package's symmetric three-pass
#: tf32 product: about float32 accuracy, error <= ~3 * 2^-22 |a||b| per dot, several times the
#: FMA rate on an H100). Both give c_ij and c_ji the same bits, so the backward's transposed
#: threshold decisions equal the forward's. Override per process with
#: ADAPTIVE_CL_FP32_HIGHEST=ieee|3xtf32. "high"/"medium" use one tf32 pass.
HIGHEST_FP32_PRECISION = "ieee"


def dot_path(dtype: torch.dtype) -> str:
    """float32: follow torch's matmul precision; half types: native tensor cores."""
    if dtype != torch.float32:
        return "native"
    if torch.get_float32_matmul_precision() == "highest":
        choice = os.environ.get("ADAPTIVE_CL_FP32_HIGHEST", HIGHEST_FP32_PRECISION)
        if choice not in ("ieee", "3xtf32"):
            raise ValueError(f"ADAPTIVE_CL_FP32_HIGHEST must be 'ieee' or '3xtf32'; got {choice!r}")
        return choice
    return "tf32"


def _launch(kernel, grid, args, kwargs):
    kernel[grid](*args, **kwargs)


#: How a launch is carried out (compile_check swaps in a recorder).
LAUNCHER = _launch


def _run(kernel, grid, *args, **kwargs):
    """Every launch goes through here. FMA contraction is pinned on (Triton 3.9 warns that its
    default will change): the instruction counts in NOTES.md assume it."""
    LAUNCHER(kernel, grid, args, dict(kwargs, enable_fp_fusion=True))


#: Round float32 operands to tf32 on the one-pass "tf32" path (the prepared rows in the
#: row-stats pass, G' before the backward's second product): the tensor cores truncate them
#: otherwise (issue 23). A switch only so the emulation test can show the truncation's error.
ROUND_TF32 = True


def _round_tf32(path: str) -> bool:
    return ROUND_TF32 and path == "tf32"


def _path_of(pr) -> str:
    """The float32 path the prepared rows were made for (the matmul precision may change between passes)."""
    return pr.consts["DOT_PREC"] if pr.zs.dtype == torch.float32 else "native"


def _dot_prec(path: str) -> str:
    # Triton's input_precision; half types ignore it ("tf32" is its default).
    return "tf32" if path == "native" else path


@dataclass
class Prepared:
    """What both passes read: the row-stats outputs and the call's compile-time shape."""

    zs: torch.Tensor  # (N, ld) scaled rows, input dtype
    zh: torch.Tensor  # (N, ld) normalised rows (normalize=True), else zs
    inv: torch.Tensor  # (N,) float32
    jac: torch.Tensor  # (N,) float32
    big: torch.Tensor  # (N,) float32
    flag: torch.Tensor  # (1,) int32: 1 if any input element is not finite
    k_t: torch.Tensor  # (N,) float32 thresholds (soft: times log2(e)/beta), or a placeholder
    lab: torch.Tensor  # (N,) float32 label ids (dense_label_ids, exact), or a placeholder
    k_scalar: float  # soft: times log2(e)/beta
    consts: dict  # constexpr options shared by both passes
    shape: launch.Shape
    b: int
    d: int


_PREPARED_TENSORS = ("zs", "zh", "inv", "jac", "big", "flag", "k_t", "lab")


def prepare_rows(z, z_aug, k_rows, k_scalar, o, *, labels_rows=None,
                 config: launch.LaunchConfig | None = None) -> Prepared:
    """Launch the row-stats kernel over all N rows (they are every program's columns).
    ``labels_rows``: None or (N,) integer labels (same-label candidates are extra positives)."""
    b, d = z.shape
    n = 2 * b
    dev = z.device
    path = dot_path(z.dtype)
    cfg = config or launch.lookup(d, z.dtype, path, soft=o.threshold == "soft")
    shape = launch.shape_for(d, cfg)
    ld = -(-d // 16) * 16  # row stride of the prepared copies: 16-element aligned
    zs = torch.empty((n, ld), dtype=z.dtype, device=dev)
    zh = torch.empty((n, ld), dtype=z.dtype, device=dev) if o.normalize else zs
    f32 = dict(dtype=torch.float32, device=dev)
    inv, jac, big = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32)
    flag = torch.zeros(1, dtype=torch.int32, device=dev)
    rb = rows_per_program(shape.block_d, fwd.INTERPRET)
    _run(_row_stats_kernel, (triton.cdiv(n, rb),),
        z, z_aug, zs, zh, inv, jac, big, flag, b, n, d, ld,
        z.stride(0), z.stride(1), z_aug.stride(0), z_aug.stride(1),
        NORMALIZE=o.normalize, ROUND_TF32=_round_tf32(path), BLOCK_R=rb, BLOCK_D=shape.block_d)
    soft = o.threshold == "soft"
    # The soft threshold's membership is sigmoid((c - k)/beta) = 1 / (1 + 2^((k - c) log2(e)/beta)):
    # thresholds go to the kernels pre-multiplied by log2(e)/beta.
    kscale = LOG2E / o.threshold_scale if soft else 1.0
    if k_scalar is not None:
        kmode, k_t = 1, inv  # inv: a placeholder pointer, never read
    elif k_rows is None:
        kmode, k_t = 0, inv
    else:
        kmode, k_t = 2, k_rows.detach().to(torch.float32)
        if soft:
            k_t = k_t * kscale
    lab = flag if labels_rows is None else dense_label_ids(labels_rows.detach()).float()
    consts = dict(
        NORMALIZE=o.normalize, FIXED_SHIFT=bool(o.normalize and o.temperature >= fwd.FIXED_SHIFT_MIN_TAU),
        K_MODE=kmode, DEN_ALL=o.denominator == "all", DOT_PREC=_dot_prec(path),
        LABELS=labels_rows is not None, SOFT=soft)
    return Prepared(zs, zh, inv, jac, big, flag, k_t, lab, float(k_scalar) * kscale if kmode == 1 else 0.0,
                    consts, shape, b, d)


#: Label ids are compared as float32 (exact below 2^24): calls with more rows take the reference.
MAX_LABEL_ROWS = 2**24


def dense_label_ids(labels: torch.Tensor) -> torch.Tensor:
    """(N,) int32 ids with equal ids exactly for equal labels (ranks of the distinct values, so
    < N): the kernels compare them as float32 (exact for N <= 2^24) instead of int64 labels
    (half the registers of a column tile's labels, one float compare). A sort and a scan on the
    device: no host synchronisation."""
    srt, order = torch.sort(labels.to(torch.int64))
    # built by ops on device tensors only: an indexed write of a Python scalar (step[0] = 0)
    # is a host-to-device copy on CUDA, a stall that also breaks CUDA-graph capture (issue 23)
    step = torch.cat([torch.zeros_like(srt[:1], dtype=torch.int32), (srt[1:] != srt[:-1]).to(torch.int32)])
    ids = torch.empty_like(step)
    ids.scatter_(0, order, step.cumsum(0, dtype=torch.int32))
    return ids


def row_programs(pr: Prepared, row_start: int = 0, row_stop: int | None = None) -> int:
    """The forward's programs over rows [row_start, row_stop): the rows of its histogram buffer."""
    row_start, row_stop = _range(2 * pr.b, row_start, row_stop)
    return triton.cdiv(row_stop - row_start, pr.shape.block_m)


def hist_buffer(pr: Prepared, bins: int, row_start: int = 0, row_stop: int | None = None) -> torch.Tensor:
    """A zeroed (programs, bins) int32 buffer for ``forward_rows(..., hist=...)``."""
    return torch.zeros((row_programs(pr, row_start, row_stop), bins), dtype=torch.int32, device=pr.zs.device)


def finish_histogram(pr: Prepared, hist: torch.Tensor) -> torch.Tensor:
    """(bins,) int64 counts from a hist buffer the forward filled: each program counted its pairs
    j > i once, c_ij = c_ji, so twice the column sums; all zero when an input was not finite
    (nothing to count: the loss is NaN). No host synchronisation."""
    counts = hist.sum(dim=0, dtype=torch.int64) * 2
    return torch.where(pr.flag == 0, counts, torch.zeros_like(counts))


def _range(n, row_start, row_stop):
    row_stop = n if row_stop is None else row_stop
    if not (0 <= row_start <= row_stop <= n):
        raise ValueError(f"row range [{row_start}, {row_stop}) must lie within [0, {n}]")
    return row_start, row_stop


def forward_rows(pr: Prepared, o, row_start: int = 0, row_stop: int | None = None, *,
                 hist: torch.Tensor | None = None, hist_range: tuple[float, float] = (-1.0, 1.0)):
    """Rows [row_start, row_stop) of Z against all N columns: (loss, m, rs, wx), each
    (row_stop - row_start,) float32: the row losses, m_i (|A(i)|, soft: sum_j a_ij), and the
    backward's per-row factors; with the soft threshold a fifth, ha (the row term A_i of
    dl_i/da_ij). ``hist``: a zeroed buffer from :func:`hist_buffer` (its width is the bin
    count), to also count the candidate similarities c_ij, i in the range and j > i, into equal
    bins on ``hist_range`` (values outside go to the edge bins); :func:`finish_histogram` turns
    it into counts over all candidate pairs (summed over a partition of the rows first)."""
    n = 2 * pr.b
    row_start, row_stop = _range(n, row_start, row_stop)
    r = row_stop - row_start
    f32 = dict(dtype=torch.float32, device=pr.zs.device)
    soft = pr.consts["SOFT"]
    outs = tuple(torch.empty(r, **f32) for _ in range(5 if soft else 4))
    if r == 0:
        return outs
    loss, cnt, rs, wx = outs[:4]
    ha = outs[4] if soft else loss  # placeholder pointer when not soft
    tau, alpha = o.temperature, o.positive_weight
    sh = pr.shape
    bins = 0
    lo, bin_scale = 0.0, 0.0
    if hist is not None:
        bins = hist.shape[1]
        if hist.shape != (row_programs(pr, row_start, row_stop), bins) or hist.dtype != torch.int32:
            raise ValueError("hist must come from hist_buffer(pr, bins, row_start, row_stop)")
        lo, hi = float(hist_range[0]), float(hist_range[1])
        bin_scale = bins / (hi - lo)
    _run(_fwd_kernel, (triton.cdiv(r, sh.block_m),),
        pr.zs, pr.inv, pr.k_t, pr.lab, pr.flag, loss, cnt, rs, wx, ha, loss if hist is None else hist,
        pr.b, n, pr.d, pr.zs.stride(0), row_start, row_stop, pr.k_t.stride(0),
        pr.k_scalar, LOG2E / tau, 1.0 / tau, alpha, math.log(alpha),
        math.log1p(-alpha) if alpha < 1.0 else 0.0,  # only "unit" reads it (alpha < 1 there)
        LOG2E / o.threshold_scale, lo, bin_scale, 1.0,
        **pr.consts, UNIT=o.weighting == "unit", STATS=bins, HIST_ATOMIC=hist_mode() == "atomic",
        BLOCK_M=sh.block_m, BLOCK_N=sh.block_n,
        K_CHUNK=sh.k_chunk, ONE_CHUNK=sh.one_chunk, num_warps=sh.num_warps, num_stages=sh.num_stages)
    return outs


def backward_rows(pr: Prepared, o, cnt, rs, wx, grad, row_start: int = 0, row_stop: int | None = None, *,
                  ha: torch.Tensor | None = None, dk: torch.Tensor | None = None):
    """dL/dZ for rows [row_start, row_stop): a (row_stop - row_start, D) tensor in the input
    dtype. ``cnt``, ``rs``, ``wx`` (and ``ha`` with the soft threshold): every row's (N,)
    statistics from forward_rows; ``grad``: the upstream gradient of the reduced loss (0-d) or of
    every row loss ((N,), "none"). ``dk`` (soft threshold with a threshold tensor): a
    (row_stop - row_start,) float32 tensor that receives dL/dk_i of the range's rows (a row
    reduction in a fixed order: deterministic)."""
    n = 2 * pr.b
    row_start, row_stop = _range(n, row_start, row_stop)
    dev = pr.zs.device
    soft = pr.consts["SOFT"]
    if soft and ha is None:
        raise ValueError("the soft threshold's backward needs ha, the fifth output of forward_rows")
    if dk is not None and not (soft and pr.consts["K_MODE"] == 2):
        raise ValueError("dk is computed for threshold='soft' with a threshold tensor only")
    grad = grad.detach().to(device=dev, dtype=torch.float32)
    per_row = o.reduction == "none"
    u = grad.contiguous() if per_row else grad.reshape(1)
    u_scale = 1.0 / n if o.reduction == "mean" else 1.0
    f32 = dict(dtype=torch.float32, device=dev)
    a, bx, bp = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32)
    fixed = pr.consts["FIXED_SHIFT"]
    uu = a if fixed else torch.empty(n, **f32)
    h_a = torch.empty(n, **f32) if soft else a
    post = torch.empty(1, **f32)
    kappa = o.temperature / o.threshold_scale
    _run(_bwd_rows_kernel, (1,), u, cnt, rs, wx, ha if soft else wx, pr.inv, a, bx, bp, uu, h_a, post, n,
         u_scale, o.positive_weight, 1.0 / o.temperature, kappa,
         PER_ROW_U=per_row, FIXED_SHIFT=fixed, UNIT=o.weighting == "unit", SOFT=soft,
         NORMALIZE=pr.consts["NORMALIZE"], DEN_ALL=pr.consts["DEN_ALL"], BLOCK=1024 if not fwd.INTERPRET else 64)
    r = row_stop - row_start
    dz = torch.empty((r, pr.d), dtype=pr.zs.dtype, device=dev)
    if r == 0:
        return dz
    if dk is not None and (dk.shape != (r,) or dk.dtype != torch.float32 or not dk.is_contiguous()):
        raise ValueError(f"dk must be a contiguous ({r},) float32 tensor")
    sh = pr.shape
    grid = (triton.cdiv(r, sh.block_m), triton.cdiv(pr.d, sh.block_d))
    _run(_bwd_kernel, grid,
        pr.zs, pr.zh, pr.inv, pr.jac, pr.big, pr.k_t, pr.lab, pr.flag, a, bx, bp, uu, h_a, post, dz,
        post if dk is None else dk,
        pr.b, n, pr.d, pr.zs.stride(0), row_start, row_stop, pr.k_t.stride(0), pr.k_scalar,
        LOG2E / o.temperature, LOG2E / o.threshold_scale, kappa / math.log(2.0), 1.0,
        **pr.consts, K_GRAD=dk is not None, ROUND_TF32=_round_tf32(_path_of(pr)), BLOCK_M=sh.block_m, BLOCK_N=sh.block_n,
        BLOCK_D=sh.block_d, K_CHUNK=sh.k_chunk, ONE_CHUNK=sh.one_chunk, SPLIT_D=sh.split_d,
        num_warps=sh.num_warps, num_stages=sh.num_stages)
    return dz


def stats_rows(o) -> int:
    """Rows of forward_stats' per-row statistics: 3 ([m, rs, wx]), 4 with the soft threshold
    ([m, rs, wx, ha])."""
    return 4 if o.threshold == "soft" else 3


def forward_stats(z, z_aug, k_rows, k_scalar, o, *, labels_rows=None):
    """(row losses (N,), per-row statistics (stats_rows(o), N)), both float32, for a caller that
    may keep only tensors between the passes (a torch.library custom op): the backward
    recomputes the O(N D) row preparation instead of saving it. Rows [m_i, rs_i, wx_i] and, with
    the soft threshold, ha_i."""
    pr = prepare_rows(z, z_aug, k_rows, k_scalar, o, labels_rows=labels_rows)
    loss, *rest = forward_rows(pr, o)
    return loss, torch.stack(rest)


def backward_from_stats(z, z_aug, k_rows, k_scalar, o, stats, grad, *, labels_rows=None, k_grad: bool = False):
    """(dz, dz_aug) from forward_stats' statistics; two separate tensors (no aliasing: the z
    rows and the z_aug rows are computed as two row ranges). ``k_grad`` (soft threshold with a
    threshold tensor): also dL/dk_rows, an (N,) float32 tensor: (dz, dz_aug, dk_rows)."""
    pr = prepare_rows(z, z_aug, k_rows, k_scalar, o, labels_rows=labels_rows)
    b = z.shape[0]
    cnt, rs, wx = stats[0].contiguous(), stats[1].contiguous(), stats[2].contiguous()
    ha = stats[3].contiguous() if pr.consts["SOFT"] else None
    dk = torch.empty(2 * b, dtype=torch.float32, device=z.device) if k_grad else None
    dzs = tuple(backward_rows(pr, o, cnt, rs, wx, grad, lo_, hi_, ha=ha, dk=None if dk is None else dk[lo_:hi_])
                for lo_, hi_ in ((0, b), (b, 2 * b)))
    return dzs + ((dk,) if k_grad else ())


def _on_device(t):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class AdaptiveInfoNCEFunction(torch.autograd.Function):
    """apply(z, z_aug, k_rows, k_scalar, options, labels_rows=None, stats=None) -> the reduced
    loss (float32), or with ``stats`` (a contract.StatsSpec) (loss, m, histogram): m (N,)
    float32 (NaN rows when an input was not finite) and the (bins,) int64 histogram of the
    candidate similarities, neither differentiable.

    ``k_rows``: None or an (N,) tensor: its gradient is dL/dk with the soft threshold (a row
    reduction in the backward) and zero with the hard one (flat); ``k_scalar``: a Python float
    (then pass k_rows=None). ``labels_rows``: None or (N,) integer labels. Differentiable once."""

    @staticmethod
    def forward(ctx, z, z_aug, k_rows, k_scalar, options, labels_rows=None, stats=None):
        with _on_device(z):
            pr = prepare_rows(z, z_aug, k_rows, k_scalar, options, labels_rows=labels_rows)
            hist = None if stats is None else hist_buffer(pr, stats.bins)
            outs = forward_rows(pr, options, hist=hist, hist_range=(-1.0, 1.0) if stats is None else stats.range)
        loss, rows = outs[0], outs[1:]
        # Tensors through save_for_backward (freed after backward unless the graph is retained).
        ctx.save_for_backward(*rows, *(getattr(pr, f) for f in _PREPARED_TENSORS))
        ctx.n_rows = len(rows)
        ctx.prepared = dataclasses.replace(pr, **{f: None for f in _PREPARED_TENSORS})
        ctx.options = options
        ctx.k_shape = None if k_rows is None else (k_rows.shape, k_rows.dtype)
        if options.reduction == "mean":
            out = loss.mean()
        elif options.reduction == "sum":
            out = loss.sum()
        else:
            out = loss
        if stats is None:
            return out
        m = torch.where(pr.flag == 0, rows[0], float("nan"))
        counts = finish_histogram(pr, hist)
        ctx.mark_non_differentiable(m, counts)
        return out, m, counts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, *_stats_grads):
        saved = ctx.saved_tensors
        rows, tensors = saved[: ctx.n_rows], saved[ctx.n_rows:]
        cnt, rs, wx = rows[:3]
        ha = rows[3] if ctx.n_rows > 3 else None
        pr = dataclasses.replace(ctx.prepared, **dict(zip(_PREPARED_TENSORS, tensors)))
        dz = dza = dk = None
        soft_k = ctx.options.threshold == "soft" and ctx.needs_input_grad[2]
        dk_rows = torch.empty(2 * pr.b, dtype=torch.float32, device=pr.zs.device) if soft_k else None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or soft_k:
            with _on_device(pr.zs):
                dzz = backward_rows(pr, ctx.options, cnt, rs, wx, grad, ha=ha, dk=dk_rows)
            dz = dzz[: pr.b] if ctx.needs_input_grad[0] else None
            dza = dzz[pr.b:] if ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[2]:
            shape, dtype = ctx.k_shape
            if soft_k:
                dk = dk_rows.to(dtype).reshape(shape)
            else:
                dk = torch.zeros(shape, dtype=dtype, device=pr.zs.device)
        return dz, dza, dk, None, None, None, None
