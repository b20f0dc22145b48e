"""The loss under torch.compile: the registered custom op (adaptive_cl/ops.py).

Compile cost is kept small: tiny shapes, the "aot_eager" compiler (Dynamo + AOTAutograd, which
is what meets the op's fake implementation and autograd formula) for every option set, and one
Inductor compile of the default path.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptive_cl import AdaptiveInfoNCE, adaptive_info_nce, ops
from adaptive_cl.backends import triton_unavailable_reason
from adaptive_cl.contract import make_options, prepare
from helpers import assert_close_normwise, safe_threshold, views

pytestmark = pytest.mark.skipif(not ops.AVAILABLE, reason="torch.library.custom_op needs torch >= 2.4")

OPTION_NAMES = ("temperature", "normalize", "denominator", "weighting", "positive_weight",
                "threshold", "threshold_scale", "reduction")


#: The kernels run on CUDA where there is a GPU, else under Triton's interpreter on the CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


#: The triton backend's compile tests run twice: "triton" where the kernels run here (the
#: interpreter on a CPU-only machine, the GPU on a GPU one) and "triton-cuda", marked cuda, so that
#: ``pytest -m cuda`` (benchmarks/gpu_check.py) runs them on the GPU too.
TRITON_CUDA = pytest.param("triton-cuda", marks=pytest.mark.cuda)


def _backend_device(backend: str) -> tuple[str, str]:
    if backend == "triton-cuda":
        return "triton", "cuda"
    return backend, TRITON_DEVICE if backend == "triton" else "cpu"


def _triton_missing() -> str | None:
    z = torch.zeros(2, 2, device=TRITON_DEVICE)
    return triton_unavailable_reason(prepare(z, z, None, None, make_options()))


def _missing(backend: str) -> str | None:
    """Why a backend cannot run on this machine (None: it can)."""
    if backend == "triton-cuda":
        return None if torch.cuda.is_available() else "needs a CUDA GPU"
    if backend == "triton":
        return _triton_missing()
    if backend == "cpu":
        from adaptive_cl import cpu

        return cpu.load_error()
    return None


class Encoder(nn.Module):
    """A small model whose forward ends in the loss, as users compile it."""

    def __init__(self, dim: int, backend: str, **options):
        super().__init__()
        self.proj = nn.Linear(dim, dim + 1)
        self.loss = AdaptiveInfoNCE(backend=backend, **options)

    def forward(self, x, x_aug, k=None, labels=None):
        return self.loss(torch.tanh(self.proj(x)), self.proj(x_aug), k, labels)


def _graph_ops(calls):
    """A torch.compile backend that records the ops of each captured graph, then runs
    aot_eager (so the op's fake implementation and autograd formula are traced)."""
    from torch._dynamo import lookup_backend

    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        calls.append({str(node.target) for node in gm.graph.nodes if node.op == "call_function"})
        return aot_eager(gm, example_inputs)

    return backend


def _run(model, x, x_aug, k, labels, upstream):
    out = model(x, x_aug, k, labels)
    leaves = [t for t in (x, x_aug, k) if isinstance(t, torch.Tensor) and t.requires_grad] + list(model.parameters())
    return out, torch.autograd.grad(out, leaves, upstream)


CASES = {
    "reference": [
        dict(k="B", labels=True, options=dict(temperature=0.5, reduction="none")),
        dict(k="soft", options=dict(threshold="soft", threshold_scale=0.1, weighting="unit", positive_weight=0.3)),
        dict(k="float", options=dict(denominator="all", normalize=False, reduction="sum")),
    ],
    "triton": [
        dict(k="B", options=dict(reduction="none", denominator="all")),
        dict(k="float", options=dict(weighting="unit", positive_weight=0.4, temperature=0.5)),
        dict(k="B", labels=True, options=dict(temperature=0.5, reduction="none")),
        dict(k="soft", options=dict(threshold="soft", threshold_scale=0.1, weighting="unit", positive_weight=0.3)),
    ],
}


CASES["cpu"] = CASES["reference"]  # the C++ extension covers every option


@pytest.mark.parametrize("backend", ["reference", "triton", TRITON_CUDA, "cpu"])
def test_fullgraph_compile_matches_eager(backend):
    if _missing(backend):
        pytest.skip(_missing(backend))
    backend, device = _backend_device(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    torch.manual_seed(0)
    x, x_aug = views(6, 4, dtype=dtype, seed=3, device=device)
    x.requires_grad_(True)
    x_aug.requires_grad_(True)
    for case in CASES[backend]:
        model = Encoder(4, backend, **case["options"]).to(device, dtype)
        with torch.no_grad():
            e1, e2 = model.proj(x), model.proj(x_aug)
        k = None
        if case["k"] == "float":
            k, _ = safe_threshold(torch.tanh(e1).double().cpu(), e2.double().cpu(), "scalar",
                                  normalize=model.loss.options.normalize)
        elif case["k"] in ("B", "soft"):
            k, _ = safe_threshold(torch.tanh(e1).double().cpu(), e2.double().cpu(), "B")
            k = k.to(device, dtype).requires_grad_(case["k"] == "soft")
        labels = torch.tensor([0, 1, 0, 2, 1, 3], device=device) if case.get("labels") else None
        n = 12
        upstream = (torch.linspace(0.5, 1.5, n, dtype=dtype, device=device)
                    if case["options"].get("reduction") == "none" else None)
        eager, eager_grads = _run(model, x, x_aug, k, labels, upstream)

        calls = []
        torch._dynamo.reset()  # Dynamo caches per code object, across torch.compile wrappers
        compiled = torch.compile(model, fullgraph=True, backend=_graph_ops(calls))  # a graph break raises
        got, got_grads = _run(compiled, x, x_aug, k, labels, upstream)
        assert len(calls) == 1 and "adaptive_cl.info_nce" in calls[0], calls  # one graph, the op in it
        # The loss runs the same backend code inside the op; only the model's own ops and the
        # autograd engine's summation order differ: a few ulps of the dtype.
        tol = dict(dtype=dtype, length=n + 5)  # the suite's policy: N = 12 columns, D = 5
        assert_close_normwise(got, eager, **tol)
        for g, e in zip(got_grads, eager_grads):
            assert_close_normwise(g, e, **tol)


def test_inductor_compile_of_the_default_path():
    """What a user gets from torch.compile(model) with every default (one Inductor compile)."""
    torch.manual_seed(1)
    model = Encoder(4, "auto")
    x, x_aug = views(5, 4, dtype=torch.float32, seed=4)
    x.requires_grad_(True)
    with torch.no_grad():
        k, _ = safe_threshold(torch.tanh(model.proj(x)).double(), model.proj(x_aug).double(), "B")
    eager, eager_grads = _run(model, x, x_aug, k.float(), None, None)
    got, got_grads = _run(torch.compile(model, fullgraph=True), x, x_aug, k.float(), None, None)
    # Inductor may reassociate the model's matmul/tanh: float32 rounding, a few ulps.
    assert_close_normwise(got, eager, dtype=torch.float32, length=10 + 5)
    for g, e in zip(got_grads, eager_grads):
        assert_close_normwise(g, e, dtype=torch.float32, length=10 + 5)


# ------------------------------------------------------------------------------------ opcheck
def _op_args(z, z_aug, k=None, k_value=None, labels=None, backend="reference", **options):
    o = make_options(**options)
    return (z, z_aug, k, k_value, labels) + tuple(getattr(o, f) for f in OPTION_NAMES) + (backend,)


def _opcheck_samples(backend, device):
    dtype = torch.float32 if backend == "triton" else torch.float64
    z, z_aug = views(5, 3, dtype=dtype, seed=7, device=device)
    z.requires_grad_(True)
    z_aug.requires_grad_(True)
    z64, z_aug64 = z.detach().double().cpu(), z_aug.detach().double().cpu()
    k_b, _ = safe_threshold(z64, z_aug64, "B", seed=1)
    k_n, _ = safe_threshold(z64, z_aug64, "N", seed=2)
    value, _ = safe_threshold(z64, z_aug64, "scalar", seed=3)
    k_b, k_n = k_b.to(device, dtype), k_n.to(device, dtype)
    yield _op_args(z, z_aug, k_value=value, backend=backend)
    yield _op_args(z, z_aug, k=k_n, backend=backend, reduction="none", denominator="all")
    yield _op_args(z, z_aug, backend=backend, normalize=False, reduction="sum", temperature=2.0)
    labels = torch.tensor([0, 1, 0, 2, 1], device=device)  # every backend fuses labels and the soft threshold
    yield _op_args(z, z_aug, k=k_b.clone().requires_grad_(True), labels=labels, backend=backend,
                   threshold="soft", weighting="unit", positive_weight=0.3)
    yield _op_args(z, z_aug, labels=labels.repeat(2), backend=backend, reduction="none")


@pytest.mark.parametrize("backend", ["reference", "auto", "triton", TRITON_CUDA, "cpu"])
def test_opcheck(backend):
    if _missing(backend):
        pytest.skip(_missing(backend))
    backend, device = _backend_device(backend)
    for args in _opcheck_samples(backend, device):
        torch.library.opcheck(torch.ops.adaptive_cl.info_nce.default, args)


def test_op_with_the_compiled_backend(monkeypatch):
    """backend="compiled" inside the op (a nested torch.compile): values and gradients. The
    nested compiler is swapped for aot_eager to keep CI cheap; the plumbing is the same."""
    import functools

    from adaptive_cl import backends
    from adaptive_cl.reference import adaptive_info_nce_reference

    monkeypatch.setattr(backends, "_compiled_reference", functools.lru_cache(None)(
        lambda: torch.compile(adaptive_info_nce_reference, backend="aot_eager", dynamic=False)))
    z, z_aug = views(4, 3, seed=8)
    z.requires_grad_(True)
    expected = adaptive_info_nce(z, z_aug, 0.1, backend="reference")
    (g_expected,) = torch.autograd.grad(expected, z)
    got, _ = torch.ops.adaptive_cl.info_nce(*_op_args(z, z_aug, k_value=0.1, backend="compiled"))
    (g_got,) = torch.autograd.grad(got, z)
    assert_close_normwise(got, expected, dtype=torch.float64, length=8 + 3)
    assert_close_normwise(g_got, g_expected, dtype=torch.float64, length=8 + 3)


def test_schema_is_the_documented_one():
    schema = str(torch.ops.adaptive_cl.info_nce.default._schema)
    assert schema == "adaptive_cl::info_nce" + ops.FORWARD_SCHEMA
    assert "Tensor? k, float? k_value, Tensor? labels, float temperature" in schema
    backward = str(torch.ops.adaptive_cl.info_nce_backward.default._schema)
    assert backward.startswith("adaptive_cl::info_nce_backward(Tensor grad, Tensor z, Tensor z_aug")


def test_op_rejects_bad_arguments():
    z, z_aug = views(3, 2)
    with pytest.raises(ValueError, match="not both"):
        torch.ops.adaptive_cl.info_nce(*_op_args(z, z_aug, k=torch.zeros(3, dtype=z.dtype), k_value=0.1))
    with pytest.raises(ValueError, match="backend must be one of"):
        torch.ops.adaptive_cl.info_nce(*_op_args(z, z_aug, backend="cuda"))
    with pytest.raises(ValueError, match="reduction must be one of"):
        args = list(_op_args(z, z_aug))
        args[5 + OPTION_NAMES.index("reduction")] = "avg"
        torch.ops.adaptive_cl.info_nce(*args)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        torch.ops.adaptive_cl.info_nce(*_op_args(z, z_aug, labels=torch.zeros(3)))


def test_eager_calls_do_not_go_through_the_op(monkeypatch):
    """Eager mode runs the backend directly (double backward keeps working on the reference)."""
    def fail(*args, **kwargs):
        raise AssertionError("the op was called in eager mode")

    monkeypatch.setattr(ops, "info_nce", fail)
    z, z_aug = views(3, 2)
    z.requires_grad_(True)
    (g,) = torch.autograd.grad(adaptive_info_nce(z, z_aug, backend="reference"), z, create_graph=True)
    assert g.requires_grad


@pytest.mark.parametrize("backend", ["reference", "triton", TRITON_CUDA, "cpu"])
def test_return_stats_under_fullgraph(backend):
    """return_stats inside a fullgraph compile (the Module, labels, soft threshold, "none"):
    one graph with the op in it, and the eager call's loss, gradients and statistics."""
    if _missing(backend):
        pytest.skip(_missing(backend))
    backend, device = _backend_device(backend)
    z, z_aug = views(5, 4, dtype=torch.float32, seed=9, device=device)
    z.requires_grad_(True)
    k = torch.tensor([0.1, 0.3, -0.2, 0.0, 0.2], device=device, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1], device=device)
    loss_fn = AdaptiveInfoNCE(threshold="soft", threshold_scale=0.1, reduction="none", backend=backend,
                              stats_bins=64)

    def f(z, z_aug, k, labels):
        return loss_fn(torch.tanh(z), z_aug, k, labels, return_stats=True)

    eager, eager_stats = f(z, z_aug, k, labels)
    calls = []
    torch._dynamo.reset()
    got, got_stats = torch.compile(f, fullgraph=True, backend=_graph_ops(calls))(z, z_aug, k, labels)
    assert len(calls) == 1 and "adaptive_cl.info_nce" in calls[0], calls
    tol = dict(dtype=torch.float32, length=10 + 4, cond=1 / 0.1)  # soft: c / beta, beta = 0.1
    assert_close_normwise(got, eager, **tol)
    upstream = torch.linspace(0.5, 1.5, 10, device=device)
    for g, e in zip(torch.autograd.grad(got, (z, k), upstream), torch.autograd.grad(eager, (z, k), upstream)):
        assert_close_normwise(g, e, **tol)
    # the compiled statistics are the dense ones; the kernel's eager m_i are float32 sums
    assert_close_normwise(got_stats.m, eager_stats.m, **tol)
    assert got_stats.range == eager_stats.range and got_stats.histogram.dtype == torch.int64
    assert int(got_stats.histogram.sum()) == 10 * 8


@pytest.mark.parametrize("backend", ["triton", TRITON_CUDA, "cpu"])
def test_op_threshold_gradient_every_shape(backend):
    """The op's soft-threshold dL/dk folded back to each shape of k (0-d, (B,), (N,); a float
    has none), against the float64 reference, and its fake outputs (the (S, N) row statistics
    included) shaped as the real ones."""
    if _missing(backend):
        pytest.skip(_missing(backend))
    backend, device = _backend_device(backend)
    z, z_aug = views(5, 3, dtype=torch.float32, seed=11, device=device)
    labels = torch.tensor([0, 1, 0, 2, 1], device=device)
    options = dict(threshold="soft", threshold_scale=0.1, weighting="unit", positive_weight=0.3)
    for k in (torch.tensor(0.2), torch.linspace(-0.2, 0.4, 5), torch.linspace(-0.3, 0.5, 10), 0.2):
        zg = z.clone().requires_grad_(True)
        kt = k.to(device).requires_grad_(True) if torch.is_tensor(k) else None
        args = _op_args(zg, z_aug, k=kt, k_value=None if torch.is_tensor(k) else k, labels=labels,
                        backend=backend, **options)
        loss, row_stats = torch.ops.adaptive_cl.info_nce(*args)
        fake_loss, fake_stats = ops._info_nce_fake(*args)
        assert (fake_loss.shape, fake_loss.dtype) == (loss.shape, loss.dtype)
        assert (fake_stats.shape, fake_stats.dtype) == (row_stats.shape, row_stats.dtype)
        got = torch.autograd.grad(loss, [zg] + ([kt] if kt is not None else []))
        z64 = z.detach().double().cpu().requires_grad_(True)
        k64 = k.detach().double().requires_grad_(True) if torch.is_tensor(k) else k
        ref = adaptive_info_nce(z64, z_aug.double().cpu(), k64, labels=labels.cpu(), backend="reference", **options)
        expected = torch.autograd.grad(ref, [z64] + ([k64] if torch.is_tensor(k) else []))
        tol = dict(dtype=torch.float32, length=10 + 3, cond=1 / 0.1)  # soft: c / beta, beta = 0.1
        assert_close_normwise(loss, ref, **tol)
        for g, e in zip(got, expected):
            assert g.shape == e.shape and g.dtype == torch.float32
            assert_close_normwise(g, e, **tol)


# ------------------------------------------------------------------- strides of the backward op
@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
def test_backward_op_strides_agree_with_its_fake(backend):
    """issue 23: the backward op's fake outputs kept a transposed z's strides (empty_like) while
    the real ones are contiguous: compared directly. Then the same transposed inputs
    through a fullgraph compile, against eager."""
    if _missing(backend):
        pytest.skip(_missing(backend))
    backend, device = _backend_device(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    z, z_aug = views(5, 4, dtype=dtype, seed=12, device=device)
    zt = z.t().contiguous().t()  # (B, D) with strides (1, B)
    assert not zt.is_contiguous()
    o = make_options()
    args = _op_args(zt, z_aug.t().contiguous().t(), k_value=0.1, backend=backend)
    _, row_stats = torch.ops.adaptive_cl.info_nce(*args)
    grad = torch.tensor(1.0, dtype=torch.float32 if backend == "triton" else dtype, device=device)
    bargs = (grad,) + args[:5] + (row_stats,) + args[5:]
    real = torch.ops.adaptive_cl.info_nce_backward(*bargs)
    fake = ops._info_nce_backward_fake(*bargs)
    for r, f in zip(real, fake):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)
    del o

    def f(a, b):
        return adaptive_info_nce(a, b, 0.1, backend=backend)

    base = z.t().contiguous().requires_grad_(True)  # (D, B): the loss sees base.t()
    eager = f(base.t(), z_aug)
    (g_eager,) = torch.autograd.grad(eager, base)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(base.t(), z_aug)
    (g_got,) = torch.autograd.grad(got, base)
    assert_close_normwise(got, eager, dtype=dtype, length=20)
    assert_close_normwise(g_got, g_eager, dtype=dtype, length=20)


# ---------------------------------------------------------------------- CUDA graphs (GPU only)
@pytest.mark.cuda
def test_cuda_graph_capture_and_replay_matches_eager():
    """The fused loss, forward and backward, captured in a CUDA graph and replayed on new inputs
    copied into the static buffers, equals eager calls (labels included: their ids are built
    without a host write, issue 23). Any host synchronisation in the launches fails the capture."""
    dev = "cuda"
    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(32, 32).to(dev)
    static_x = torch.randn(64, 32, generator=g).to(dev)
    static_xa = torch.randn(64, 32, generator=g).to(dev)
    labels = (torch.arange(64) % 7).to(dev)

    def step(x, xa):
        lin.zero_grad(set_to_none=False)
        loss = adaptive_info_nce(lin(x), lin(xa), 0.3, labels=labels, temperature=0.2, backend="triton")
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up: compile the kernels outside the capture
            step(static_x, static_xa)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(static_x, static_xa)
    for seed in (1, 2):
        x = torch.randn(64, 32, generator=torch.Generator().manual_seed(seed)).to(dev)
        xa = x + 0.5 * torch.randn(64, 32, generator=torch.Generator().manual_seed(seed + 10)).to(dev)
        static_x.copy_(x)
        static_xa.copy_(xa)
        graph.replay()
        torch.cuda.synchronize()
        replay_loss, replay_grad = static_loss.clone(), lin.weight.grad.clone()
        eager_loss = step(x, xa)
        assert torch.equal(replay_loss, eager_loss.detach())  # the same launches on the same data
        assert torch.equal(replay_grad, lin.weight.grad)
