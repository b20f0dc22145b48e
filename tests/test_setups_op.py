"""The setups' custom op (adaptive_cl::info_nce_setup): opcheck with the new arguments on the
reference and the C++ extension, its values and gradients (dL/dtau included) against the eager
reference, and a fullgraph torch.compile that runs it."""

from __future__ import annotations

import pytest
import torch

from adaptive_cl import adaptive_info_nce, ops
from kernels._cases import rel_err

pytestmark = pytest.mark.skipif(not ops.AVAILABLE, reason="torch without torch.library.custom_op")

B, D, M = 5, 3, 2

#: (setup keyword arguments of adaptive_info_nce, the op's layout, symmetric, same_label)
SETUPS = {
    "cross-logq-queue-mask-exclude": dict(layout="cross", log_q=True, negatives=True, mask=True, labels=True,
                                          same_label="exclude"),
    "symmetric-mask": dict(layout="cross", symmetric=True, mask=True),
    "views-queue-labels": dict(negatives=True, labels=True),
    "mask-all-but-one": dict(mask="one"),  # fewer than two valid pairs: the reference inside the op
}


def _case(spec: dict, threshold: str):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    za = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    rows = 2 * B if spec.get("layout", "views") == "views" or spec.get("symmetric") else B
    k = (torch.rand(rows, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    kw = dict(layout=spec.get("layout", "views"), symmetric=spec.get("symmetric", False),
              same_label=spec.get("same_label", "positive"), threshold=threshold, threshold_scale=0.2)
    if spec.get("negatives"):
        kw["negatives"] = torch.randn(M, D, generator=g, dtype=torch.float64)
    if spec.get("log_q"):
        kw["log_q"] = torch.randn(B + M, generator=g, dtype=torch.float64)
    if spec.get("labels"):
        kw["labels"] = torch.tensor([0, 1, 0, 2, 1])
    if spec.get("mask") == "one":
        kw["mask"] = torch.tensor([False, False, True, False, False])
    elif spec.get("mask"):
        kw["mask"] = torch.tensor([True, True, False, True, True])
    return z, za, k, tau, kw


def _op_args(z, za, k, tau, kw, backend, reduction="mean"):
    return (z, za, k, None, kw.get("labels"), tau, kw.get("negatives"), kw.get("log_q"), kw.get("mask"), 1.0, True,
            "negatives", "normalized", 0.5, kw["threshold"], kw["threshold_scale"], reduction, kw["layout"],
            kw["symmetric"], kw["same_label"], backend)


@pytest.mark.parametrize("threshold", ["soft", "hard"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", SETUPS)
def test_opcheck_and_values(name, backend, threshold, request):
    if backend == "cpu":
        request.getfixturevalue("ext")
    z, za, k, tau, kw = _case(SETUPS[name], threshold)
    for reduction in ("mean", "none"):
        args = _op_args(z, za, k, tau, kw, backend, reduction)
        torch.library.opcheck(torch.ops.adaptive_cl.info_nce_setup.default, args)
        loss, _ = torch.ops.adaptive_cl.info_nce_setup(*args)
        want = adaptive_info_nce(z, za, k, temperature=tau, backend="reference", reduction=reduction, **kw)
        assert rel_err(loss, want) < 1e-13
        up = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        got_grads = torch.autograd.grad(loss, [z, za, k, tau], up)
        want_grads = torch.autograd.grad(want, [z, za, k, tau], up)
        for g, w in zip(got_grads, want_grads):
            assert rel_err(g, w) < 1e-12


def test_fullgraph_compile_runs_the_setup_op_on_the_extension(ext):
    """Inside torch.compile(fullgraph=True) a setup runs as one op (no graph break), on the C++
    extension when backend="cpu", with the eager values and gradients."""
    z, za, k, tau, kw = _case(SETUPS["cross-logq-queue-mask-exclude"], "soft")
    calls = []
    from adaptive_cl import cpu

    real = cpu.extension_inputs

    def spy(*a, **kws):
        calls.append(1)
        return real(*a, **kws)

    cpu.extension_inputs = spy
    try:
        f = torch.compile(lambda a, b, kk, t: adaptive_info_nce(a, b, kk, temperature=t, backend="cpu", **kw),
                          fullgraph=True)
        out = f(z, za, k, tau)
        grads = torch.autograd.grad(out, [z, za, k, tau])
    finally:
        cpu.extension_inputs = real
    assert calls  # the extension computed it
    want = adaptive_info_nce(z, za, k, temperature=tau, backend="reference", **kw)
    assert rel_err(out, want) < 1e-13
    for g, w in zip(grads, torch.autograd.grad(want, [z, za, k, tau])):
        assert rel_err(g, w) < 1e-12
