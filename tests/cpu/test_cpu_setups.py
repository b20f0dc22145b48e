"""The C++ extension on the issue-24 setups (cross layout, symmetric, queue, log_q, exclusion,
mask, tensor temperature) against the float64 reference, over the covering design of
tests/setup_cases.py (new options x old ones, odd B, M, D), in float64 and float32: the loss,
the gradients of z, z_aug, a soft k and tau, and the statistics."""

from __future__ import annotations

import pytest
import torch

from adaptive_cl import adaptive_info_nce
from kernels._cases import case_id
from setup_cases import EPS64, covering_cases, make_case, normwise_bound

CASES = covering_cases()
F32 = torch.finfo(torch.float32).eps


def _run(case, seed, backend, dtype):
    z, za, k, kw = make_case(case, seed, dtype=dtype)
    z.requires_grad_()
    za.requires_grad_()
    tensors = [z, za]
    if isinstance(k, torch.Tensor):
        k = k.to(dtype).requires_grad_()
        tensors.append(k)
    if isinstance(kw["temperature"], torch.Tensor):
        kw["temperature"] = kw["temperature"].to(dtype).requires_grad_()
        tensors.append(kw["temperature"])
    for name in ("negatives", "log_q"):
        if name in kw:
            kw[name] = kw[name].to(dtype)
    loss, stats = adaptive_info_nce(z, za, k, backend=backend, return_stats=True, stats_bins=32,
                                    stats_range=(-2.5, 2.5), **kw)
    # a fixed random upstream gradient, so "none" rows are weighted differently
    up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(loss.dtype)
    grads = torch.autograd.grad((loss * up).sum(), tensors)
    return loss, grads, stats


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_extension_matches_the_reference(case, dtype, ext):
    seed = CASES.index(case)
    want, want_grads, want_stats = _run(case, seed, "reference", torch.float64)
    got, got_grads, got_stats = _run(case, seed, "cpu", dtype)
    eps = EPS64 if dtype == torch.float64 else F32
    b, d = case["shape"]
    length = d + 2 * b + case["queue"]
    scale = 1.0 / 0.3 if case["normalize"] else 10.0  # logits' size: 1/tau (cosines) or a few dots / tau
    assert got.dtype == dtype
    assert float((got.double() - want).norm()) <= normwise_bound(length, scale * max(1, want.numel()) ** 0.5, eps)
    for g, w in zip(got_grads, want_grads):
        bound = normwise_bound(length, scale * max(float(w.norm()), 1.0), eps)
        assert float((g.double() - w).norm()) <= bound
    assert torch.allclose(got_stats.m.double(), want_stats.m, rtol=0, atol=normwise_bound(length, 1.0, eps))
    if dtype == torch.float64:  # float32 similarities may land in a neighbouring bin
        assert torch.equal(got_stats.histogram, want_stats.histogram)
    else:
        assert int(got_stats.histogram.sum()) == int(want_stats.histogram.sum())


def test_cross_layout_skips_half_the_tiles(ext):
    """Not a timing: the cross layout's forward visits only the other half's column tiles, so at
    B = 2 tiles of rows it computes about half the views layout's similarity tiles. Checked through
    the result: a cross loss over B rows equals the reference at a size with several tiles."""
    g = torch.Generator().manual_seed(5)
    b, d = 300, 7  # N = 600 > 2 column tiles of 256 (float32)
    z, za = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    q = torch.randn(70, d, generator=g)
    log_q = torch.randn(b + 70, generator=g)
    kw = dict(layout="cross", negatives=q, log_q=log_q, temperature=0.2)
    got = adaptive_info_nce(z, za, 0.3, backend="cpu", reduction="none", **kw)
    want = adaptive_info_nce(z.double(), za.double(), 0.3, backend="reference", reduction="none",
                             **dict(kw, negatives=q.double(), log_q=log_q.double()))
    assert float((got.double() - want).norm()) <= normwise_bound(2 * b + 70 + d, 5.0 * b ** 0.5, F32)


@pytest.mark.parametrize("layout", ["cross", "symmetric", "views"])
def test_setups_are_thread_count_independent(layout, ext):
    """Every row's sums run over the columns in a fixed order, dL/dtau is a fixed-order sum over
    the rows: 1 and 2 threads give the same bits."""
    g = torch.Generator().manual_seed(9)
    b, d = 70, 5
    z, za = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    kw = dict(layout="views" if layout == "views" else "cross", symmetric=layout == "symmetric",
              labels=torch.randint(0, 9, (b,), generator=g), same_label="exclude")
    if layout != "symmetric":
        kw["negatives"] = torch.randn(40, d, generator=g)

    def once():
        zz, zza = z.clone().requires_grad_(), za.clone().requires_grad_()
        tau = torch.tensor(0.25, requires_grad=True)
        loss = adaptive_info_nce(zz, zza, 0.2, temperature=tau, backend="cpu", **kw)
        return (loss, *torch.autograd.grad(loss, [zz, zza, tau]))

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = once()
        torch.set_num_threads(2)
        two = once()
    finally:
        torch.set_num_threads(before)
    for a, c in zip(one, two):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_inputs_accumulate_in_float32(dtype, ext):
    """Half inputs (and a half queue) are computed in float32 like the plain loss: the loss in
    float32, gradients in the input dtype, equal to the float32 call on the same (rounded) values."""
    g = torch.Generator().manual_seed(11)
    z, za, q = (torch.randn(n, 6, generator=g).to(dtype) for n in (7, 7, 3))
    tau = torch.tensor(0.3, requires_grad=True)
    kw = dict(layout="cross", negatives=q, log_q=torch.randn(10, generator=g), temperature=tau,
              mask=torch.tensor([True] * 6 + [False]))

    def run(a, b, queue):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = adaptive_info_nce(a, b, 0.2, backend="cpu", **dict(kw, negatives=queue))
        return (loss, *torch.autograd.grad(loss, [a, b, tau]))

    half = run(z, za, q)
    single = run(z.float(), za.float(), q.float())
    assert half[0].dtype == torch.float32 and half[1].dtype == dtype and half[2].dtype == dtype
    assert torch.equal(half[0], single[0]) and torch.equal(half[3], single[3])
    assert torch.equal(half[1], single[1].to(dtype)) and torch.equal(half[2], single[2].to(dtype))
