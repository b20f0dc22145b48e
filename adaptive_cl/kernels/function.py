"""``AdaptiveInfoNCEFunction``: the autograd wrapper around the forward and backward kernels.

Forward: [row-norm kernel when normalize] + one forward kernel + the torch reduction. It saves
the inputs and O(N) per-row statistics (inverse norms, base-2 LSE, |A(i)|); never an N x N
tensor. Backward: one kernel launch (plus a max|u| for reduction="none"). No host sync: no
``.item()``, every scalar that depends on data stays on the device.

Launch configuration: on a GPU, ``triton.autotune`` over a few tile shapes keyed on N, D, the
dtype and the constexpr options (set ``ADAPTIVE_CL_TRITON_AUTOTUNE=0`` for one fixed
heuristic config, e.g. when compiling many option combinations in tests); under Triton's
interpreter a fixed small config (autotuning there would take minutes).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
from torch.autograd.function import once_differentiable

from . import adaptive_info_nce_fwd as fwd
from .adaptive_info_nce_bwd import _bwd_kernel
from .adaptive_info_nce_fwd import LOG2E, _fwd_kernel, _row_norm_kernel, block_d

#: ``tl.dot`` precision for float32 inputs when ``torch.get_float32_matmul_precision()`` is
#: "highest": "ieee" (FMA, exact float32 products) or "3xtf32" (this package's symmetric
#: three-pass tf32 product: about float32 accuracy, error <= ~3 * 2^-22 |a||b| per dot, ~2.5x
#: the FMA rate on an H100). Both give c_ij and c_ji the same bits, so the backward's
#: transposed threshold decisions equal the forward's. (Triton's own "tf32x3" is not used:
#: it chains the two cross terms in operand order, so c_ij and c_ji can differ in the last bit.)
#: Override per process with ADAPTIVE_CL_FP32_HIGHEST=ieee|3xtf32.
HIGHEST_FP32_PRECISION = "ieee"

#: Tile shapes (BLOCK_M, BLOCK_N) under the interpreter; tests may change it.
INTERPRET_BLOCKS = (16, 16)

_OPTION_KEYS = ["N", "D", "NORMALIZE", "FIXED_SHIFT", "K_MODE", "DEN_ALL", "UNIT", "SINGLE_D",
                "DOT_PREC", "BLOCK_D"]


def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# Small on purpose: every option combination is tuned separately. Configs that do not fit
# (shared memory / registers at wide D) are skipped by the autotuner; 32x32 always fits.
_FWD_CONFIGS = _configs([(128, 64, 8, 2), (64, 64, 4, 2), (64, 128, 8, 2), (32, 32, 4, 2)])
_BWD_CONFIGS = _configs([(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2)])

_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_OPTION_KEYS)(_fwd_kernel)
_bwd_tuned = triton.autotune(_BWD_CONFIGS, key=_OPTION_KEYS + ["PER_ROW_U"])(_bwd_kernel)


def _autotune_enabled() -> bool:
    return not fwd.INTERPRET and os.environ.get("ADAPTIVE_CL_TRITON_AUTOTUNE", "1") != "0"


def _fixed_config(dtype: torch.dtype, bd: int) -> dict:
    """One config without tuning: the interpreter's, or a safe GPU heuristic (smaller tiles
    when a row chunk is wide, to stay within registers / shared memory)."""
    if fwd.INTERPRET:
        m, n = INTERPRET_BLOCKS
        return {"BLOCK_M": m, "BLOCK_N": n}
    wide = bd * torch.finfo(dtype).bits // 8 >= 512
    m = n = 32 if wide else 64
    # float32 with 256-wide chunks: 2 stages of the "3xtf32" path need 224 KiB of shared
    # memory at D > 256 (sm_90 compile, Triton 3.9), 3 KiB under the H100's limit; 1 stage: 96 KiB.
    stages = 1 if dtype == torch.float32 and bd >= 256 else 2
    return {"BLOCK_M": m, "BLOCK_N": n, "num_warps": 4, "num_stages": stages}


def dot_precision(dtype: torch.dtype) -> str:
    """float32: follow torch's matmul precision; half types ignore it (native tensor cores)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        choice = os.environ.get("ADAPTIVE_CL_FP32_HIGHEST", HIGHEST_FP32_PRECISION)
        if choice not in ("ieee", "3xtf32"):
            raise ValueError(f"ADAPTIVE_CL_FP32_HIGHEST must be 'ieee' or '3xtf32'; got {choice!r}")
        return choice
    return "tf32"


def _launch(kernel, tuned, grid_rows, extra_dims, args, consts, dtype, bd):
    if _autotune_enabled():
        grid = lambda meta: (triton.cdiv(grid_rows, meta["BLOCK_M"]),) + extra_dims  # noqa: E731
        tuned[grid](*args, **consts)
    else:
        cfg = _fixed_config(dtype, bd)
        kernel[(triton.cdiv(grid_rows, cfg["BLOCK_M"]),) + extra_dims](*args, **consts, **cfg)


def _kmode(k_rows, k_scalar):
    if k_scalar is not None:
        return 1
    return 0 if k_rows is None else 2


def forward_rows(z, z_aug, k_rows, k_scalar, o):
    """Per-row losses (N,) float32 plus the statistics the backward needs."""
    b, d = z.shape
    n = 2 * b
    dev = z.device
    bd = block_d(d)
    single = bd >= d
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    lse2 = torch.empty(n, dtype=torch.float32, device=dev)
    cnt = torch.empty(n, dtype=torch.float32, device=dev)
    if o.normalize:
        stats = torch.empty(2 * n, dtype=torch.float32, device=dev)
        rb = 16 if fwd.INTERPRET else max(16, min(64, 4096 // bd))  # <= 4096 elements per program
        _row_norm_kernel[(triton.cdiv(n, rb),)](
            z, z_aug, stats, b, n, d, z.stride(0), z.stride(1), z_aug.stride(0), z_aug.stride(1),
            BLOCK_R=rb, BLOCK_D=bd)
    else:
        stats = lse2  # placeholder pointer, never read
    kmode = _kmode(k_rows, k_scalar)
    k_t = k_rows if kmode == 2 else lse2  # lse2: a placeholder pointer, never read
    if kmode == 2 and k_t.dtype != torch.float32:
        k_t = k_t.float()
    tau = o.temperature
    alpha = o.positive_weight
    log_1m = math.log1p(-alpha) if alpha < 1.0 else 0.0  # only used by "unit" (alpha < 1)
    consts = dict(
        NORMALIZE=o.normalize, FIXED_SHIFT=bool(o.normalize and tau >= fwd.FIXED_SHIFT_MIN_TAU),
        K_MODE=kmode, DEN_ALL=o.denominator == "all", UNIT=o.weighting == "unit",
        SINGLE_D=single, DOT_PREC=dot_precision(z.dtype), BLOCK_D=bd)
    args = (z, z_aug, stats, k_t, loss, lse2, cnt,
            b, n, d, z.stride(0), z.stride(1), z_aug.stride(0), z_aug.stride(1), k_t.stride(0),
            float(k_scalar) if kmode == 1 else 0.0, LOG2E / tau, 1.0 / tau, alpha,
            math.log(alpha), log_1m)
    _launch(_fwd_kernel, _fwd_tuned, n, (), args, consts, z.dtype, bd)
    return loss, lse2, cnt, stats, k_t, consts


def backward_rows(z, z_aug, k_t, k_scalar, stats, lse2, cnt, consts, o, grad):
    """dz, dz_aug (input dtype) for the upstream gradient ``grad`` of the reduced loss."""
    b, d = z.shape
    n = 2 * b
    tau = o.temperature
    grad = grad.detach().to(torch.float32)
    if o.reduction == "none":
        u = grad.contiguous()
        g = torch.linalg.vector_norm(u, float("inf")).reshape(1)  # max |u|, on the device
        post = 1.0 / tau
        per_row = True
    else:
        u = grad.reshape(1)
        g = u
        post = (1.0 / (n * tau)) if o.reduction == "mean" else 1.0 / tau
        per_row = False
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    dza = torch.empty(z_aug.shape, dtype=z_aug.dtype, device=z_aug.device)
    bd = consts["BLOCK_D"]
    bconsts = dict(consts, PER_ROW_U=per_row)
    args = (z, z_aug, stats, k_t, lse2, cnt, u, g, dz, dza,
            b, n, d, z.stride(0), z.stride(1), z_aug.stride(0), z_aug.stride(1), k_t.stride(0),
            dz.stride(0), dz.stride(1), dza.stride(0), dza.stride(1),
            float(k_scalar) if consts["K_MODE"] == 1 else 0.0, LOG2E / tau, o.positive_weight, post)
    _launch(_bwd_kernel, _bwd_tuned, n, (triton.cdiv(d, bd),), args, bconsts, z.dtype, bd)
    return dz, dza


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
            loss, lse2, cnt, stats, k_t, consts = forward_rows(z, z_aug, k_rows, k_scalar, options)
        ctx.save_for_backward(z, z_aug, k_t, stats, lse2, cnt)
        ctx.k_scalar = k_scalar
        ctx.consts = consts
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
        z, z_aug, k_t, stats, lse2, cnt = ctx.saved_tensors
        dz = dza = dk = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            with _on_device(z):
                dz, dza = backward_rows(z, z_aug, k_t, ctx.k_scalar, stats, lse2, cnt, ctx.consts,
                                        ctx.options, grad)
            dz = dz if ctx.needs_input_grad[0] else None
            dza = dza if ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[2]:
            shape, dtype = ctx.k_shape
            dk = torch.zeros(shape, dtype=dtype, device=z.device)
        return dz, dza, dk, None, None
