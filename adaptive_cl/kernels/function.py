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
    k_t: torch.Tensor  # (N,) float32 thresholds, or a placeholder
    k_scalar: float
    consts: dict  # constexpr options shared by both passes
    shape: launch.Shape
    b: int
    d: int


_PREPARED_TENSORS = ("zs", "zh", "inv", "jac", "big", "flag", "k_t")


def prepare_rows(z, z_aug, k_rows, k_scalar, o, *, config: launch.LaunchConfig | None = None) -> Prepared:
    """Launch the row-stats kernel over all N rows (they are every program's columns)."""
    b, d = z.shape
    n = 2 * b
    dev = z.device
    path = dot_path(z.dtype)
    cfg = config or launch.lookup(d, z.dtype, path)
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
        NORMALIZE=o.normalize, BLOCK_R=rb, BLOCK_D=shape.block_d)
    if k_scalar is not None:
        kmode, k_t = 1, inv  # inv: a placeholder pointer, never read
    elif k_rows is None:
        kmode, k_t = 0, inv
    else:
        kmode, k_t = 2, k_rows.detach().to(torch.float32)
    consts = dict(
        NORMALIZE=o.normalize, FIXED_SHIFT=bool(o.normalize and o.temperature >= fwd.FIXED_SHIFT_MIN_TAU),
        K_MODE=kmode, DEN_ALL=o.denominator == "all", DOT_PREC=_dot_prec(path))
    return Prepared(zs, zh, inv, jac, big, flag, k_t, float(k_scalar) if kmode == 1 else 0.0, consts,
                    shape, b, d)


def _range(n, row_start, row_stop):
    row_stop = n if row_stop is None else row_stop
    if not (0 <= row_start <= row_stop <= n):
        raise ValueError(f"row range [{row_start}, {row_stop}) must lie within [0, {n}]")
    return row_start, row_stop


def forward_rows(pr: Prepared, o, row_start: int = 0, row_stop: int | None = None):
    """Rows [row_start, row_stop) of Z against all N columns: (loss, m, rs, wx), each
    (row_stop - row_start,) float32: the row losses, |A(i)|, and the backward's per-row factors."""
    n = 2 * pr.b
    row_start, row_stop = _range(n, row_start, row_stop)
    r = row_stop - row_start
    f32 = dict(dtype=torch.float32, device=pr.zs.device)
    loss, cnt, rs, wx = (torch.empty(r, **f32) for _ in range(4))
    if r == 0:
        return loss, cnt, rs, wx
    tau, alpha = o.temperature, o.positive_weight
    sh = pr.shape
    _run(_fwd_kernel, (triton.cdiv(r, sh.block_m),),
        pr.zs, pr.inv, pr.k_t, pr.flag, loss, cnt, rs, wx,
        pr.b, n, pr.d, pr.zs.stride(0), row_start, row_stop, pr.k_t.stride(0),
        pr.k_scalar, LOG2E / tau, 1.0 / tau, alpha, math.log(alpha),
        math.log1p(-alpha) if alpha < 1.0 else 0.0,  # only "unit" reads it (alpha < 1 there)
        **pr.consts, UNIT=o.weighting == "unit", BLOCK_M=sh.block_m, BLOCK_N=sh.block_n,
        K_CHUNK=sh.k_chunk, ONE_CHUNK=sh.one_chunk, num_warps=sh.num_warps, num_stages=sh.num_stages)
    return loss, cnt, rs, wx


def backward_rows(pr: Prepared, o, cnt, rs, wx, grad, row_start: int = 0, row_stop: int | None = None):
    """dL/dZ for rows [row_start, row_stop): a (row_stop - row_start, D) tensor in the input
    dtype. ``cnt``, ``rs``, ``wx``: every row's (N,) statistics from forward_rows; ``grad``:
    the upstream gradient of the reduced loss (0-d) or of every row loss ((N,), "none")."""
    n = 2 * pr.b
    row_start, row_stop = _range(n, row_start, row_stop)
    dev = pr.zs.device
    grad = grad.detach().to(device=dev, dtype=torch.float32)
    per_row = o.reduction == "none"
    u = grad.contiguous() if per_row else grad.reshape(1)
    u_scale = 1.0 / n if o.reduction == "mean" else 1.0
    f32 = dict(dtype=torch.float32, device=dev)
    a, bx, bp = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32)
    fixed = pr.consts["FIXED_SHIFT"]
    uu = a if fixed else torch.empty(n, **f32)
    post = torch.empty(1, **f32)
    _run(_bwd_rows_kernel, (1,), u, cnt, rs, wx, a, bx, bp, uu, post, n, u_scale, o.positive_weight,
                           1.0 / o.temperature, PER_ROW_U=per_row, FIXED_SHIFT=fixed,
                           UNIT=o.weighting == "unit", BLOCK=1024 if not fwd.INTERPRET else 64)
    r = row_stop - row_start
    dz = torch.empty((r, pr.d), dtype=pr.zs.dtype, device=dev)
    if r == 0:
        return dz
    sh = pr.shape
    grid = (triton.cdiv(r, sh.block_m), triton.cdiv(pr.d, sh.block_d))
    _run(_bwd_kernel, grid,
        pr.zs, pr.zh, pr.inv, pr.jac, pr.big, pr.k_t, pr.flag, a, bx, bp, uu, post, dz,
        pr.b, n, pr.d, pr.zs.stride(0), row_start, row_stop, pr.k_t.stride(0), pr.k_scalar,
        LOG2E / o.temperature, **pr.consts, BLOCK_M=sh.block_m, BLOCK_N=sh.block_n,
        BLOCK_D=sh.block_d, K_CHUNK=sh.k_chunk, ONE_CHUNK=sh.one_chunk, SPLIT_D=sh.split_d,
        num_warps=sh.num_warps, num_stages=sh.num_stages)
    return dz


def forward_stats(z, z_aug, k_rows, k_scalar, o):
    """(row losses (N,), per-row statistics (3, N)), both float32, for a caller that may keep
    only tensors between the passes (a torch.library custom op): the backward recomputes the
    O(N D) row preparation instead of saving it. Rows [m_i, rs_i, wx_i]."""
    pr = prepare_rows(z, z_aug, k_rows, k_scalar, o)
    loss, cnt, rs, wx = forward_rows(pr, o)
    return loss, torch.stack([cnt, rs, wx])


def backward_from_stats(z, z_aug, k_rows, k_scalar, o, stats, grad):
    """(dz, dz_aug) from forward_stats' statistics; two separate tensors (no aliasing: the z
    rows and the z_aug rows are computed as two row ranges)."""
    pr = prepare_rows(z, z_aug, k_rows, k_scalar, o)
    b = z.shape[0]
    cnt, rs, wx = stats[0].contiguous(), stats[1].contiguous(), stats[2].contiguous()
    return (backward_rows(pr, o, cnt, rs, wx, grad, 0, b), backward_rows(pr, o, cnt, rs, wx, grad, b, 2 * b))


def _on_device(t):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class AdaptiveInfoNCEFunction(torch.autograd.Function):
    """apply(z, z_aug, k_rows, k_scalar, options) -> the reduced loss (float32).

    ``k_rows``: None or an (N,) tensor (gets a zero gradient: the hard threshold is flat);
    ``k_scalar``: a Python float (then pass k_rows=None). Differentiable once."""

    @staticmethod
    def forward(ctx, z, z_aug, k_rows, k_scalar, options):
        with _on_device(z):
            pr = prepare_rows(z, z_aug, k_rows, k_scalar, options)
            loss, cnt, rs, wx = forward_rows(pr, options)
        # Tensors through save_for_backward (freed after backward unless the graph is retained).
        ctx.save_for_backward(cnt, rs, wx, *(getattr(pr, f) for f in _PREPARED_TENSORS))
        ctx.prepared = dataclasses.replace(pr, **{f: None for f in _PREPARED_TENSORS})
        ctx.options = options
        ctx.k_shape = None if k_rows is None else (k_rows.shape, k_rows.dtype)
        if options.reduction == "mean":
            return loss.mean()
        if options.reduction == "sum":
            return loss.sum()
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        cnt, rs, wx, *tensors = ctx.saved_tensors
        pr = dataclasses.replace(ctx.prepared, **dict(zip(_PREPARED_TENSORS, tensors)))
        dz = dza = dk = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            with _on_device(pr.zs):
                dzz = backward_rows(pr, ctx.options, cnt, rs, wx, grad)
            dz = dzz[: pr.b] if ctx.needs_input_grad[0] else None
            dza = dzz[pr.b:] if ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[2]:
            shape, dtype = ctx.k_shape
            dk = torch.zeros(shape, dtype=dtype, device=pr.zs.device)
        return dz, dza, dk, None, None
