"""Where the issue-24 setups run: every backend either computes them (equal to the float64
reference; the C++ extension's comparisons are in tests/cpu/test_cpu_setups.py) or refuses them
by name; "auto" never hands them to a backend that lacks them."""

from __future__ import annotations

import pytest
import torch

from adaptive_cl import adaptive_info_nce, backends
from adaptive_cl.contract import extended_options, make_options, prepare
from adaptive_cl.reference import adaptive_info_nce_reference
from kernels._cases import rel_err

B, D, M = 5, 3, 2

#: one call per new option, alone: (kwargs, the name the refusal must mention)
SETUPS = {
    "cross": (dict(layout="cross"), "layout='cross'"),
    "symmetric": (dict(layout="cross", symmetric=True), "symmetric=True"),
    "tensor-tau": (dict(temperature="tensor"), "a tensor temperature"),
    "queue": (dict(negatives="queue"), "negatives"),
    "log_q": (dict(layout="cross", log_q="log_q"), "log_q"),
    "exclude": (dict(labels="labels", same_label="exclude"), "same_label='exclude'"),
    "mask": (dict(mask="mask"), "mask"),
}


def _inputs(spec: dict, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(B, D, generator=g).to(dtype)
    za = torch.randn(B, D, generator=g).to(dtype)
    tensors = {
        "tensor": torch.tensor(0.4, dtype=dtype),
        "queue": torch.randn(M, D, generator=g).to(dtype),
        "log_q": torch.log(torch.rand(B, generator=g)).to(dtype),
        "labels": torch.tensor([0, 1, 0, 2, 1]),
        "mask": torch.tensor([True, False, True, True, True]),
    }
    kw = {k: tensors.get(v, v) if isinstance(v, str) else v for k, v in spec.items()}
    return z, za, kw


def _prepared(z, za, kw):
    o = make_options(layout=kw.get("layout", "views"), symmetric=kw.get("symmetric", False),
                     same_label=kw.get("same_label", "positive"), temperature=kw.get("temperature", 1.0))
    return prepare(z, za, 0.3, kw.get("labels"), o, temperature=kw.get("temperature"),
                   negatives=kw.get("negatives"), log_q=kw.get("log_q"), mask=kw.get("mask"))


@pytest.mark.parametrize("name", SETUPS)
def test_extended_options_names_each_option(name):
    spec, label = SETUPS[name]
    z, za, kw = _inputs(spec)
    assert label in extended_options(_prepared(z, za, kw))


def test_the_plain_loss_uses_no_extended_option():
    z, za, _ = _inputs({})
    assert extended_options(_prepared(z, za, {})) == ()


@pytest.mark.parametrize("name", SETUPS)
def test_explicit_triton_backend_refuses_by_name(name):
    pytest.importorskip("triton")
    spec, label = SETUPS[name]
    z, za, kw = _inputs(spec)
    with pytest.raises(ValueError, match=f"backend='triton' is not available: .*{_re(label)}"):
        adaptive_info_nce(z, za, 0.3, backend="triton", **kw)


@pytest.mark.parametrize("name", SETUPS)
def test_auto_routes_setups_off_cuda_to_the_reference_and_says_why(name, monkeypatch):
    """Where no backend implements an option ("auto" on a non-CPU device without the kernels'
    support), the reference computes it and route() names the reason. Simulated: the CPU
    extension reported unavailable, as on a machine without a compiler."""
    from adaptive_cl import cpu

    spec, label = SETUPS[name]
    z, za, kw = _inputs(spec)
    p = _prepared(z, za, kw)
    monkeypatch.setattr(cpu, "load_error", lambda: "no compiler (simulated)")
    monkeypatch.setattr(cpu, "disabled", lambda: True)  # no fallback warning
    assert backends.resolve("auto", p) is adaptive_info_nce_reference
    assert backends.route("auto", p) == ("reference", "no compiler (simulated)")
    pytest.importorskip("triton")
    assert label in backends.triton_unavailable_reason(p)


@pytest.mark.parametrize("name", SETUPS)
def test_auto_on_cpu_takes_the_extension_for_every_setup(name, ext):
    spec, _ = SETUPS[name]
    z, za, kw = _inputs(spec)
    assert backends.route("auto", _prepared(z, za, kw)) == ("cpu", None)


def test_route_names_the_fused_backend_for_the_plain_loss(ext):
    z, za, _ = _inputs({})
    assert backends.route("auto", _prepared(z, za, {})) == ("cpu", None)
    assert backends.route("reference", _prepared(z, za, {})) == ("reference", None)


def test_compiled_backend_and_fullgraph_compile_take_every_option():
    """The 'compiled' backend is torch.compile of the reference; inside a user's
    torch.compile(fullgraph=True) the setups trace the reference (no graph break)."""
    z, za, _ = _inputs({})
    g = torch.Generator().manual_seed(1)
    q = torch.randn(M, D, generator=g)
    tau = torch.tensor(0.3, requires_grad=True)
    kw = dict(layout="cross", negatives=q, log_q=torch.randn(B + M, generator=g), temperature=tau,
              mask=torch.tensor([True, True, False, True, True]), labels=torch.tensor([0, 1, 0, 2, 1]),
              same_label="exclude", threshold="soft")
    k = torch.full((B,), 0.2)
    z64, za64 = z.double(), za.double()
    kw64 = dict(kw, negatives=q.double(), log_q=kw["log_q"].double(), temperature=torch.tensor(0.3, dtype=torch.float64))
    want = adaptive_info_nce(z64, za64, k.double(), backend="reference", **kw64)
    compiled = adaptive_info_nce(z, za, k, backend="compiled", **kw)
    assert rel_err(compiled, want) < 1e-5
    f = torch.compile(lambda a, b: adaptive_info_nce(a, b, k, backend="auto", **kw), fullgraph=True)
    out = f(z, za)
    assert rel_err(out, want) < 1e-5
    (dtau,) = torch.autograd.grad(out, tau)
    tau64 = kw64["temperature"].requires_grad_()
    (want_dtau,) = torch.autograd.grad(adaptive_info_nce(z64, za64, k.double(), backend="reference", **kw64), tau64)
    assert rel_err(dtau, want_dtau) < 1e-5


def test_distributed_triton_hook_refuses_the_setups_by_name():
    """The distributed loss runs the setups on its reference hook (tests/distributed_cases.py);
    naming the fused hook raises before any collective, naming the options."""
    pytest.importorskip("triton")
    from adaptive_cl.distributed import adaptive_info_nce_distributed

    z, za, _ = _inputs({})
    with pytest.raises(ValueError, match=r"backend='triton' cannot run these inputs: .*layout='cross'"):
        adaptive_info_nce_distributed(z, za, layout="cross", backend="triton")


def _re(text: str) -> str:
    import re

    return re.escape(text)
