"""Properties of the CPU backend the contract fixes: thread-count independence (bitwise),
layouts, the non-finite and normalisation rules, half-precision inputs, argument errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from adaptive_cl import adaptive_info_nce
from adaptive_cl.contract import make_options
from helpers import assert_close_normwise

from ._inputs import SOFT_SCALE, cpu, make_views, reference64, threshold

ROOT = Path(__file__).resolve().parents[2]

THREADS_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys, torch
    sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
    from adaptive_cl import adaptive_info_nce, similarity_histogram
    from adaptive_cl.cpu import build
    from kernels._cases import make_views

    def digest(dtype, threads, **opts):
        torch.set_num_threads(threads)
        z, za = make_views(301, 37, dtype, seed=5, normalize=opts.get("normalize", True))
        z.requires_grad_(True); za.requires_grad_(True)
        k = torch.linspace(0.05, 0.3, 301, dtype=dtype).requires_grad_(True)
        labels = torch.arange(602) % 7
        loss, st = adaptive_info_nce(z, za, k, labels=labels, reduction="none", backend="cpu", return_stats=True,
                                     stats_bins=4096, **opts)
        grads = torch.autograd.grad(loss, (z, za, k), torch.linspace(-1, 1, 602, dtype=dtype))
        alone = similarity_histogram(z, za, bins=4096, normalize=opts.get("normalize", True), backend="cpu")
        h = hashlib.sha256()
        for t in (loss, *grads, st.m, st.histogram, alone):
            h.update(t.detach().contiguous().numpy().tobytes())
        return h.hexdigest(), build.extension().num_threads()

    out = {}
    for dtype in (torch.float32, torch.float64):
        for name, opts in (("hard", dict(temperature=0.2)),
                           ("soft-online", dict(threshold="soft", temperature=0.002, denominator="all")),
                           ("dot", dict(normalize=False, weighting="unit", positive_weight=0.3))):
            out[f"{dtype}-{name}"] = [digest(dtype, t, **opts) for t in (1, 2, 1)]
    print(json.dumps(out))
""")


def test_thread_count_does_not_change_a_bit(ext):
    """N = 602: 19 row blocks split over 1 or 2 OpenMP threads give identical bytes: the loss,
    its gradients, return_stats' m and counts, and similarity_histogram's counts."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(ROOT)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(res.stdout.strip().splitlines()[-1])
    for name, runs in results.items():
        digests = [r[0] for r in runs]
        threads = [r[1] for r in runs]
        assert threads == [1, 2, 1], (name, threads)  # torch's setting reaches the extension's OpenMP
        assert len(set(digests)) == 1, name


def test_layouts_give_the_same_bits(ext):
    z, za = make_views(23, 19, torch.float32, seed=3)
    zs, zas = make_views(23, 19, torch.float32, seed=3, layout="noncontig")
    k_wide = torch.linspace(0.1, 0.4, 46)
    labels_wide = torch.arange(92) % 5
    k, labels = k_wide[::2], labels_wide[::2]  # strided (N,) inputs
    options = make_options(reduction="none", threshold="soft", threshold_scale=0.2)
    a = cpu(z, za, k.contiguous(), labels.contiguous(), options)
    b = cpu(zs, zas, k, labels, options)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("where", ["z-nan", "z_aug-inf", "z-neginf"])
def test_non_finite_inputs_make_everything_nan(ext, dtype, where):
    z, za = make_views(6, 5, dtype, seed=1)
    target, value = {"z-nan": (z, float("nan")), "z_aug-inf": (za, float("inf")),
                     "z-neginf": (z, float("-inf"))}[where]
    target[3, 2] = value
    for reduction in ("mean", "sum", "none"):
        for normalize in (True, False):
            loss, dz, dza, dk = cpu(z, za, torch.full((6,), 0.3, dtype=dtype), None,
                                    make_options(reduction=reduction, normalize=normalize, denominator="all",
                                                 threshold="soft"))
            assert torch.isnan(loss).all() and torch.isnan(dz).all() and torch.isnan(dza).all()
            assert torch.isnan(dk).all()


def test_nan_threshold_rules(ext):
    z, za = make_views(7, 6, torch.float64, seed=4)
    k, _ = threshold(z, za, "N", True)
    k_nan = k.clone()
    k_nan[2] = float("nan")
    # hard: row 2 has no threshold positives, exactly as with k = +inf
    k_inf = k.clone()
    k_inf[2] = float("inf")
    hard = make_options(reduction="none")
    assert torch.equal(cpu(z, za, k_nan, None, hard)[0], cpu(z, za, k_inf, None, hard)[0])
    # soft: row 2's loss is NaN, the other rows are the reference's
    soft = make_options(reduction="none", threshold="soft", threshold_scale=SOFT_SCALE)
    rows = cpu(z, za, k_nan, None, soft)[0]
    ref = reference64(z, za, k_nan, None, soft)[0]
    assert torch.isnan(rows[2]) and torch.isfinite(rows[torch.arange(14) != 2]).all()
    torch.testing.assert_close(rows, ref, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_huge_rows_normalise_like_unit_rows(ext):
    """float32 rows of size 1e19 and 1e30 (their squares overflow) and float64 rows of 1e200."""
    z, za = make_views(9, 16, torch.float64, seed=6)
    unit_z = z / z.norm(dim=1, keepdim=True)
    for dtype, scale in ((torch.float32, 1e19), (torch.float32, 1e30), (torch.float64, 1e200)):
        rows = torch.tensor([1.0, scale, 1.0, scale, 1.0, 1.0, scale, 1.0, 1.0], dtype=torch.float64)[:, None]
        k = torch.full((9,), 0.2, dtype=dtype)
        options = make_options(reduction="none", threshold="soft")
        base = cpu(unit_z.to(dtype), za.to(dtype), k, None, options)
        big = cpu((unit_z * rows).to(dtype), za.to(dtype), k, None, options)
        tol = dict(dtype=dtype, length=18 + 5)  # the suite's policy: N = 18 columns, D = 5
        assert_close_normwise(big[0], base[0], **tol)
        assert_close_normwise(big[2], base[2], **tol)  # z_aug's gradient does not see the scale
        assert_close_normwise(big[3], base[3], **tol)
        # d zhat / d z scales as 1 / ||z||
        assert_close_normwise(big[1].double() * rows, base[1], **tol)


def test_tiny_rows_follow_f_normalize(ext):
    """Rows below the 1e-12 norm floor are divided by 1e-12 (F.normalize in float64), zero rows
    give cosine 0; float32 subnormal rows included."""
    z, za = make_views(8, 5, torch.float64, seed=8)
    z[1] *= 1e-14   # norm < 1e-12
    z[2] = 0.0
    za[3] *= 1e-40  # float32 subnormals
    k = torch.full((8,), 0.1, dtype=torch.float64)
    options = make_options(reduction="none", denominator="all")
    ref = reference64(z.float().double(), za.float().double(), k, None, options)
    got = cpu(z.float(), za.float(), k.float(), None, options)
    for out, expected in zip(got[:3], ref[:3]):
        assert_close_normwise(out, expected, dtype=torch.float32, length=16 + 5)
    got64 = cpu(z, za, k, None, options)
    ref64 = reference64(z, za, k, None, options)
    for out, expected in zip(got64[:3], ref64[:3]):
        assert_close_normwise(out, expected, dtype=torch.float64, length=16 + 5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(ext, dtype):
    z, za = make_views(10, 12, dtype, seed=9)
    k = torch.full((10,), 0.25)
    options = make_options(reduction="mean")
    got = cpu(z, za, k, None, options)
    ref = cpu(z.float(), za.float(), k, None, options)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    assert torch.equal(got[0], ref[0])
    assert torch.equal(got[1], ref[1].to(dtype)) and torch.equal(got[2], ref[2].to(dtype))


def test_extension_rejects_bad_arguments(ext):
    z = torch.randn(4, 3)
    za = torch.randn(4, 3)
    args = (1.0, True, False, False, 0.5, False, 0.05, 0)
    with pytest.raises(RuntimeError, match="z must be float32 or float64"):
        ext.forward(z.int(), za.int(), None, None, *args)
    with pytest.raises(RuntimeError, match="k_rows must be a CPU tensor of z's dtype and shape"):
        ext.forward(z, za, torch.zeros(4), None, *args)
    with pytest.raises(RuntimeError, match="labels must be a CPU int64 tensor"):
        ext.forward(z, za, None, torch.zeros(8, dtype=torch.int32), *args)
    with pytest.raises(RuntimeError, match="z and z_aug must both have shape"):
        ext.forward(z, za[:, :2], None, None, *args)
    with pytest.raises(RuntimeError, match="temperature must be finite and > 0"):
        ext.forward(z, za, None, None, -1.0, *args[1:])
    loss, stats = ext.forward(z, za, None, None, *args)
    with pytest.raises(RuntimeError, match="stats must be the forward's contiguous"):
        ext.backward(z, za, None, None, stats[:, :4], torch.ones(8), *args[:-1], False)


def test_functional_defaults_run_through_the_extension(ext):
    z, za = make_views(5, 8, torch.float32, seed=12)
    assert_close_normwise(adaptive_info_nce(z, za, 0.3, backend="cpu"),
                          adaptive_info_nce(z, za, 0.3, backend="reference"), dtype=torch.float32, length=10 + 8)
