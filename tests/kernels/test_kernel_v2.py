"""Kernel v2 behaviour under Triton's CPU interpreter (or the GPU when there is one): non-finite
inputs, rows of extreme magnitude, the float16 gradient scale, row ranges, and the launch table
shared by both passes. Every numeric check is against float64 (the reference, or F.normalize)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from adaptive_cl import adaptive_info_nce  # noqa: E402
from adaptive_cl.contract import make_options  # noqa: E402
from adaptive_cl.kernels import adaptive_info_nce_fwd as fwd  # noqa: E402
from adaptive_cl.kernels import function as kfunc  # noqa: E402
from adaptive_cl.kernels import launch  # noqa: E402

from helpers import assert_close_normwise  # noqa: E402

from ._cases import make_views, pick_k, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _loss_and_grads(z, za, k, backend, **opts):
    zt, zat = z.detach().clone().requires_grad_(), za.detach().clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loss = adaptive_info_nce(zt, zat, k, backend=backend, **opts)
    g = None
    if loss.dim():
        g = torch.linspace(-1.0, 2.0, loss.numel(), dtype=torch.float32, device=loss.device)
    loss.backward(g)
    return loss.detach(), zt.grad, zat.grad


# ---------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("bad,where,reduction,normalize", [
    (float("nan"), "z", "none", True),
    (float("inf"), "z_aug", "mean", True),
    (-float("inf"), "z", "sum", False),
    (float("nan"), "z_aug", "none", False),
])
def test_non_finite_input_gives_nan_everywhere(bad, where, reduction, normalize):
    """Contract 1: one NaN/inf element anywhere: every row loss NaN and every gradient element
    NaN (tl.maximum drops NaN, so without the flag a NaN row looked like a zero row)."""
    z, za = make_views(9, 20, torch.float32, seed=1, device=DEVICE)
    (z if where == "z" else za)[4, 7] = bad
    k, _ = pick_k(torch.nan_to_num(z).cpu(), torch.nan_to_num(za).cpu(), "B", True)
    loss, dz, dza = _loss_and_grads(z, za, k.to(DEVICE), "triton", reduction=reduction, normalize=normalize,
                                    temperature=0.5 if normalize else 1.0)
    assert torch.isnan(loss).all()
    assert torch.isnan(dz).all() and torch.isnan(dza).all()


def test_finite_inputs_are_not_flagged():
    """The flag is per call: a NaN call does not poison the next one."""
    z, za = make_views(9, 20, torch.float32, seed=2, device=DEVICE)
    bad = z.clone()
    bad[0, 0] = float("nan")
    adaptive_info_nce(bad, za, 0.2, backend="triton")
    assert torch.isfinite(adaptive_info_nce(z, za, 0.2, backend="triton", reduction="none")).all()


@pytest.mark.parametrize("denominator", ["negatives", "all"])
def test_nan_threshold_row_has_no_threshold_positives(denominator):
    """A NaN k_i: c > NaN is false, so row i (and only row i) has no threshold positives."""
    z, za = make_views(11, 13, torch.float32, seed=3, device=DEVICE)
    k, margin = pick_k(z.cpu(), za.cpu(), "N", True)
    assert margin > 1e-4
    k[5] = float("nan")
    k[16] = float("nan")
    k = k.to(DEVICE)
    opts = dict(temperature=0.3, denominator=denominator, reduction="none")
    got = _loss_and_grads(z, za, k, "triton", **opts)
    want = _loss_and_grads(z.double(), za.double(), k.double(), "reference", **opts)
    assert torch.isfinite(got[0]).all()
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5


# --------------------------------------------------------------------------- magnitudes
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e19), (torch.float32, 1e30), (torch.float32, 1e-30),
                                          (torch.float32, 3e-13), (torch.float16, 3e-3), (torch.float16, 6e4)])
def test_row_norms_neither_overflow_nor_underflow(dtype, scale):
    """Contract 2: rows of magnitude 1e19 / 1e30 give the loss of the same rows at unit size,
    tiny rows are divided by eps exactly like F.normalize in float64. Compared with the
    kernel's own loss on rows normalised in float64 (exact) where |z| >= eps, and with the
    float64 reference."""
    z, za = make_views(9, 24, torch.float32, seed=4, device=DEVICE)
    z, za = z.to(dtype), za.to(dtype)
    big = z.clone()
    for r in (1, 6):
        big[r] = (z[r].double() / z[r].double().abs().max() * scale).to(dtype)
    k, _ = pick_k(big.cpu().double(), za.cpu().double(), "scalar", True)
    opts = dict(temperature=0.2, reduction="none")
    got = _loss_and_grads(big, za, k, "triton", **opts)
    ref = _loss_and_grads(big.double(), za.double(), k, "reference", **opts)
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    assert rel_err(got[0], ref[0]) <= tol
    assert rel_err(got[2], ref[2]) <= (1e-5 if dtype == torch.float32 else 5e-3)
    norms = big.double().norm(dim=1)
    if bool((norms >= 1e-12).all()):
        unit = F.normalize(big.double(), dim=1).to(dtype)
        assert rel_err(got[0], _loss_and_grads(unit, za, k, "triton", **opts)[0]) <= tol


# ------------------------------------------------------------------ float16 gradient scale
@pytest.mark.parametrize("reduction,upstream", [("mean", 1e-3), ("none", 2e-6)])
def test_float16_gradient_terms_stay_normal(reduction, upstream):
    """G is scaled by a power of two before its float16 cast. Rows of norm ~5e-3 make dL/dz
    = (dL/dz^) / |z| large while the terms of G are u P ~ u / N: with the upstream gradients
    here those terms (~1e-7) would be float16 subnormals (a few significant bits) and the
    gradient would be off by far more than 5e-3, although dL/dz itself (~1e-2) is normal."""
    z, za = make_views(40, 32, torch.float16, seed=5, device=DEVICE)
    z, za = z * 1e-3, za * 1e-3
    k, _ = pick_k(z.cpu(), za.cpu(), "B", True)
    opts = dict(temperature=0.2, reduction=reduction)
    outs = []
    for backend, dt in (("triton", torch.float16), ("reference", torch.float64)):
        zt, zat = z.detach().to(dt).requires_grad_(), za.detach().to(dt).requires_grad_()
        loss = adaptive_info_nce(zt, zat, k.to(DEVICE).to(dt), backend=backend, **opts)
        g = torch.full_like(loss, upstream)
        loss.backward(g)
        outs.append((zt.grad, zat.grad))
    (dz, dza), (rdz, rdza) = outs
    assert torch.isfinite(dz).all() and bool(dz.abs().max() > 0)
    assert rel_err(torch.cat([dz, dza]), torch.cat([rdz, rdza])) <= 5e-3


# ---------------------------------------------------------------------------- row ranges
def test_row_ranges_match_the_full_call():
    """forward_rows / backward_rows on [row_start, row_stop) (issue 16: a rank's own rows
    against all columns; the backward reads every row's statistics) equal the matching rows of
    the full call to float32 rounding, including ranges that straddle z / z_aug and tiles."""
    z, za = make_views(13, 20, torch.float32, seed=6, device=DEVICE)
    k, _ = pick_k(z.cpu(), za.cpu(), "N", True)
    k = k.to(DEVICE)
    o = make_options(temperature=0.2, reduction="none")
    pr = kfunc.prepare_rows(z, za, k, None, o)
    loss, cnt, rs, wx = kfunc.forward_rows(pr, o)
    u = torch.linspace(-1.0, 1.0, 26, device=DEVICE)
    full = kfunc.backward_rows(pr, o, cnt, rs, wx, u)
    for a, b in ((0, 5), (5, 21), (21, 26), (11, 11)):
        part = kfunc.forward_rows(pr, o, a, b)
        for got, want in zip(part, (loss, cnt, rs, wx)):
            assert got.shape == (b - a,)
            # the same rows, tiled differently: float32 rounding of N + D long sums, logits c / tau
            assert_close_normwise(got, want[a:b], dtype=torch.float32, length=26 + 20, cond=1 / 0.2)
        dz = kfunc.backward_rows(pr, o, cnt, rs, wx, u, a, b)
        assert dz.shape == (b - a, 20)
        # row by row against the size of the gradient rows (one element of a near-zero gradient
        # compared elementwise with atol=1e-7 failed on a fresh clone: issue 23)
        assert_close_normwise(dz, full[a:b], dtype=torch.float32, length=26 + 20, cond=1 / 0.2)
    with pytest.raises(ValueError, match="row range"):
        kfunc.forward_rows(pr, o, 3, 27)


def test_tensor_only_entry_points_match_the_autograd_function():
    """forward_stats / backward_from_stats (what a torch.library op can call: tensors in,
    tensors out, the row preparation recomputed in the backward) give the autograd Function's
    loss bits and its gradients (to rounding: the two row ranges tile rows differently), and
    dz / dz_aug do not share storage."""
    z, za = make_views(13, 20, torch.float32, seed=10, device=DEVICE)
    k, _ = pick_k(z.cpu(), za.cpu(), "B", True)
    k = torch.cat([k, k]).to(DEVICE)
    o = make_options(temperature=0.2, reduction="none")
    u = torch.linspace(-1.0, 1.0, 26, device=DEVICE)
    zt, zat = z.clone().requires_grad_(), za.clone().requires_grad_()
    loss = kfunc.AdaptiveInfoNCEFunction.apply(zt, zat, k, None, o)
    loss.backward(u)
    rows, stats = kfunc.forward_stats(z, za, k, None, o)
    dz, dza = kfunc.backward_from_stats(z, za, k, None, o, stats, u)
    assert stats.shape == (3, 26) and torch.equal(rows, loss.detach())
    assert_close_normwise(dz, zt.grad, dtype=torch.float32, length=26 + 20, cond=1 / 0.2)
    assert_close_normwise(dza, zat.grad, dtype=torch.float32, length=26 + 20, cond=1 / 0.2)
    assert dz.untyped_storage().data_ptr() != dza.untyped_storage().data_ptr()


# ------------------------------------------------------------------------- launch table
def test_table_covers_every_bucket_and_path():
    for bucket in launch.D_BUCKETS:
        for dt, paths in (("float32", ("ieee", "3xtf32", "tf32")), ("bfloat16", ("native",)),
                          ("float16", ("native",))):
            for path in paths:
                cfg = launch.TABLE[(bucket, dt, path)]
                assert cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.num_warps in (4, 8)
                assert cfg.k_chunk is None or cfg.k_chunk >= 16


def test_soft_threshold_configurations():
    """The soft threshold's tiles: at most SOFT_MAX_BLOCK_N columns, or a SOFT_TABLE entry (chosen
    where that rule still spilled); every key of SOFT_TABLE is a key of TABLE; the hard
    threshold's table is untouched."""
    for key in launch.SOFT_TABLE:
        assert key in launch.TABLE
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fwd, "INTERPRET", False)  # the GPU's configurations, not the interpreter's
        for bucket, d in ((16, 16), (64, 64), (128, 100), (256, 256), ("wide", 320)):
            for dt, path in (("bfloat16", "native"), ("float32", "ieee"), ("float32", "3xtf32"), ("float32", "tf32")):
                dtype = getattr(torch, dt)
                hard = launch.lookup(d, dtype, path)
                soft = launch.lookup(d, dtype, path, soft=True)
                assert hard == launch.TABLE[(bucket, dt, path)]
                assert soft == launch.SOFT_TABLE.get((bucket, dt, path), soft)
                assert soft.block_n <= launch.SOFT_MAX_BLOCK_N


def _recorded(n_rows, d, dtype=torch.float32, **opts):
    launches = []
    saved = kfunc.LAUNCHER

    def record(kernel, grid, args, kwargs):
        launches.append((kernel, kwargs))
        saved(kernel, grid, args, kwargs)

    kfunc.LAUNCHER = record
    try:
        z, za = make_views(n_rows, d, dtype, seed=7, device=DEVICE)
        zt = z.requires_grad_()
        adaptive_info_nce(zt, za, 0.3, backend="triton", **opts).backward()
    finally:
        kfunc.LAUNCHER = saved
    return launches


def test_forward_and_backward_share_one_configuration_independent_of_n():
    """One configuration per (D bucket, dtype, path): the forward and the backward tile, chunk
    and MMA the same way, and a different N changes nothing."""
    keys = ("BLOCK_M", "BLOCK_N", "K_CHUNK", "ONE_CHUNK", "DOT_PREC", "num_warps", "num_stages")
    seen = set()
    for n_rows in (5, 23):
        rec = _recorded(n_rows, 20)
        tiles = [kw for k, kw in rec if "BLOCK_N" in kw]
        assert len(tiles) == 2  # forward, backward
        seen |= {tuple(kw[x] for x in keys) for kw in tiles}
    assert len(seen) == 1


@pytest.mark.parametrize("reduction,den", [("none", "negatives"), ("mean", "all")])
def test_fp32_ieee_k_split_as_on_the_gpu(monkeypatch, reduction, den):
    """The float32 "highest" default ("ieee") with the table's K chunk (16-wide pieces of D, the
    GPU's non-spilling path) against float64, D not a multiple of the chunk."""
    if not fwd.INTERPRET:
        pytest.skip("the GPU always uses the table's K chunk")
    monkeypatch.setattr(launch, "INTERPRET_K_CHUNK", True)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    monkeypatch.setenv("ADAPTIVE_CL_FP32_HIGHEST", "ieee")
    try:
        assert launch.lookup(37, torch.float32, "ieee").k_chunk == 16
        z, za = make_views(19, 37, torch.float32, seed=8, device=DEVICE)
        k, _ = pick_k(z.cpu(), za.cpu(), "N", True)
        opts = dict(temperature=0.1, reduction=reduction, denominator=den)
        got = _loss_and_grads(z, za, k, "triton", **opts)
        want = _loss_and_grads(z.double(), za.double(), k.double(), "reference", **opts)
        for g, w in zip(got, want):
            assert rel_err(g, w) <= 1e-5
    finally:
        torch.set_float32_matmul_precision(before)


def test_no_autotuning_left():
    """Launches are plain JIT functions with a fixed configuration (no triton.autotune)."""
    for kernel, _ in _recorded(5, 7):
        assert not isinstance(kernel, triton.runtime.Autotuner)


def test_backward_twice_with_a_retained_graph():
    """The prepared rows are saved through save_for_backward: a retained graph can run the
    backward again (same gradient), and nothing is kept on ctx beyond metadata."""
    z, za = make_views(5, 7, torch.float32, seed=9, device=DEVICE)
    zt = z.requires_grad_()
    loss = adaptive_info_nce(zt, za, 0.3, backend="triton")
    loss.backward(retain_graph=True)
    first = zt.grad.clone()
    loss.backward()
    assert torch.equal(zt.grad, 2 * first)


_SAME_BITS_SCRIPT = """
import hashlib, os, sys, torch
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # as tests/conftest.py does
    sys.path.insert(0, sys.argv[2])
    from _triton_compat import patch_interpreter_index
    patch_interpreter_index()
from adaptive_cl import adaptive_info_nce
g = torch.Generator().manual_seed(11)
dt = getattr(torch, sys.argv[1])
z = torch.randn(21, 19, generator=g).to(dt)
za = (z + 0.7 * torch.randn(21, 19, generator=g)).to(dt)
zt = z.clone().requires_grad_()
loss = adaptive_info_nce(zt, za, 0.25, temperature=0.2, backend="triton", reduction="none")
loss.backward(torch.linspace(-1, 1, 42).to(loss.device))
h = hashlib.sha256()
for t in (loss, zt.grad):
    h.update(t.detach().cpu().contiguous().numpy().tobytes())
print(h.hexdigest())
"""


def test_same_bits_in_another_process(monkeypatch):
    """Nothing is tuned or cached per process: a fresh interpreter computes the same loss and
    gradient bits as this one (the launch table depends only on D, dtype and the float32 path)."""
    import contextlib
    import io
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = _SAME_BITS_SCRIPT
    if DEVICE == "cuda":
        script = script.replace(".to(dt)", ".to(dt).cuda()")
    tests_dir = os.path.join(root, "tests")
    monkeypatch.setattr(sys, "argv", ["-c", "float32", tests_dir])
    here = io.StringIO()
    with contextlib.redirect_stdout(here):
        exec(compile(script, "<same-bits>", "exec"), {})
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    other = subprocess.run([sys.executable, "-c", script, "float32", tests_dir], env=env, capture_output=True, text=True,
                           timeout=300)
    assert other.returncode == 0, other.stderr[-2000:]
    assert len(here.getvalue().strip()) == 64
    assert other.stdout.strip() == here.getvalue().strip()


# ------------------------------------------------------------------ no host writes (labels)
def test_label_ids_are_built_without_a_host_write():
    """issue 23: dense_label_ids wrote a Python scalar into a device tensor (step[0] = 0: a
    0-d host tensor lifted and copied in, a host-to-device copy on CUDA that also breaks CUDA
    graph capture). Recorded at the dispatcher: no lifted scalar, no copy from a 0-d tensor;
    and the ids are still dense ranks with equal ids exactly for equal labels."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bad = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if "lift_fresh" in name or (name.startswith("aten.copy_") and args[1].dim() == 0):
                self.bad.append(name)
            return func(*args, **(kwargs or {}))

    labels = torch.tensor([7, -3, 7, 100, -3, 5, 5, 5], device=DEVICE)
    with Record() as rec:
        ids = kfunc.dense_label_ids(labels)
    assert rec.bad == [], rec.bad
    assert ids.dtype == torch.int32
    assert ids.cpu().tolist() == [2, 0, 2, 3, 0, 1, 1, 1]


# ------------------------------------------------------- float16 soft threshold gradient scale
def test_float16_soft_threshold_scale_bounds_the_negatives_term():
    """issue 23: the backward's power-of-two scale S assumed a(1 - a) W E <= W/4 for the soft
    membership term, but with denominator="negatives" only (1 - a) E <= 1 holds: a pair far
    above its threshold (a -> 1) that still dominates its row's denominator has
    a(1 - a) W E -> W, so S was up to 4x too large and the float16 G' overflowed to inf.
    Rows 0 and 1 here are such a pair (c = 0.9, k = 0.895, beta = 1e-3, tau / beta = 50,
    partners orthogonal), and positive_weight=1 leaves that term alone in the bound (the
    extra positives' weights are 0): float16 gradients must be finite and match float64."""
    d = 16
    e = torch.eye(d, dtype=torch.float64)
    z = torch.stack([e[0], 0.9 * e[0] + 0.19 ** 0.5 * e[1], e[2], e[3]])
    za = torch.stack([e[4], e[5], e[6], e[7]]) + 0.05 * torch.stack([e[2], e[3], e[0], e[1]])
    k = torch.full((8,), 0.895, dtype=torch.float64)
    opts = dict(threshold="soft", threshold_scale=1e-3, temperature=0.05, denominator="negatives",
                positive_weight=1.0, reduction="sum")
    got = _loss_and_grads(z.half().to(DEVICE), za.half().to(DEVICE), k.float().to(DEVICE), "triton", **opts)
    want = _loss_and_grads(z.half().double(), za.half().double(), k, "reference", **opts)
    assert torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all()
    g, w = torch.cat(got[1:]).double().cpu(), torch.cat(want[1:])
    assert rel_err(g, w) <= 5e-3  # float16 G' and Z^: the dtype's 2^-11 over N = 8 terms
