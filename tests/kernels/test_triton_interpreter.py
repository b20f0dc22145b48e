"""The fused Triton kernels under Triton's CPU interpreter, against the float64 reference.

Every option value of the kernel is paired with every other at least once (a pairwise
covering design over small odd shapes), forward and gradients. On a machine with CUDA the
same tests run the compiled kernels on the GPU (the interpreter is only used without CUDA:
tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton).
"""

from __future__ import annotations

import warnings

import pytest
import torch

triton = pytest.importorskip("triton")

from adaptive_cl import adaptive_info_nce  # noqa: E402
from adaptive_cl import backends  # noqa: E402
from adaptive_cl.contract import make_options, prepare  # noqa: E402
from adaptive_cl.kernels import adaptive_info_nce_fwd as fwd  # noqa: E402
from adaptive_cl.kernels import launch as klaunch  # noqa: E402
from adaptive_cl.kernels import unsupported_reason  # noqa: E402
from adaptive_cl.reference import adaptive_info_nce_reference  # noqa: E402

from ._cases import case_id, covers_all_pairs, make_views, pairwise_cases, pick_k, rel_err, similarity64  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

FACTORS = {
    "shape": [(2, 1), (3, 7), (17, 32), (40, 70)],
    "dtype": [torch.float32, torch.float16],
    "k": ["none", "scalar", "0d", "B", "N"],
    "denominator": ["negatives", "all"],
    "weighting": ["normalized", "unit"],
    "alpha": [0.5, 0.3, 1.0],
    # 0.02 < FIXED_SHIFT_MIN_TAU: the online-max path with normalize=True.
    "tau": [1.0, 0.1, 0.02],
    "normalize": [True, False],
    "reduction": ["mean", "sum", "none"],
    "layout": ["contiguous", "noncontig"],
    # True: MAX_BLOCK_D lowered to 16, so D > 16 takes the chunked-D forward and the
    # D-split backward grid.
    "dchunk": [False, True],
}


def _allowed(case):
    return not (case["weighting"] == "unit" and case["alpha"] == 1.0)


CASES = pairwise_cases(FACTORS, _allowed, seed=1)

# Tolerances against float64 (norm ratios). float32: the interpreter's dots are float32 numpy
# products; float16: the backward casts G and z^_J to float16 for the second dot.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 5e-3)}


def test_design_covers_every_pair():
    assert covers_all_pairs(CASES, FACTORS, _allowed) == []
    assert len(CASES) <= 30


def _run(backend, z, za, k, upstream, opts, dtype):
    """Loss, row losses and gradients (z, z_aug, k) for one backend."""
    zt = z.detach().to(dtype).requires_grad_()
    zat = za.detach().to(dtype).requires_grad_()
    kt = k.detach().clone().requires_grad_() if isinstance(k, torch.Tensor) else k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loss = adaptive_info_nce(zt, zat, kt, backend=backend, **opts)
        rows = adaptive_info_nce(zt.detach(), zat.detach(), k if not isinstance(k, torch.Tensor) else k.detach(),
                                 backend=backend, **dict(opts, reduction="none"))
    loss.backward(upstream)
    kgrad = kt.grad if isinstance(kt, torch.Tensor) else None
    return loss.detach(), rows.detach(), zt.grad, zat.grad, kgrad


def check_against_reference(z, za, k, opts, dtype, upstream, tol_loss, tol_grad):
    out, rows, dz, dza, dk = _run("triton", z, za, k, upstream, opts, z.dtype)
    ref, ref_rows, rdz, rdza, _ = _run("reference", z, za, k, upstream, opts, torch.float64)
    assert out.dtype == torch.float32
    assert dz.dtype == z.dtype and dza.dtype == za.dtype
    assert dz.shape == z.shape and dza.shape == za.shape
    n = rows.shape[0]
    # Forward errors are measured against the logits' size L = max|s_ij| as well as the loss:
    # a row loss is a difference of logits (LSE_i - s_ip), which can cancel to ~0.
    logit = float(similarity64(z.cpu(), za.cpu(), opts["normalize"]).abs().max()) / opts["temperature"]
    err_rows = (rows.double() - ref_rows).abs()
    assert (err_rows <= tol_loss * (ref_rows.abs() + logit)).all(), float(err_rows.max())
    bound = tol_loss * float(ref_rows.abs().sum() + n * logit)
    if opts["reduction"] == "none":
        assert ((out.double() - ref).abs() <= tol_loss * (ref.abs() + logit)).all()
    else:
        scale = 1.0 / n if opts["reduction"] == "mean" else 1.0
        assert float((out.double() - ref).abs()) <= bound * scale
    # Gradients: norm ratio, plus a floor where the exact gradient vanishes (D = 1 with
    # normalize: z^ = sign(z), flat in z), scaled by the size of dL/dz^ ~ |u| L sqrt(N) / |z|.
    got, want = torch.cat([dz, dza]).double(), torch.cat([rdz, rdza])
    floor = 0.0
    if opts["normalize"]:
        norms = torch.cat([z, za]).double().norm(dim=1)
        if bool((norms > 0).all()):
            u = torch.ones(()) if upstream is None else upstream.detach().double().abs().max().cpu()
            u = float(u) / (n if opts["reduction"] == "mean" else 1)
            floor = u * logit * n ** 0.5 / float(norms.min())
    err = float((got - want).norm())
    assert err <= tol_grad * (float(want.norm()) + floor), (err, float(want.norm()), floor)
    if isinstance(k, torch.Tensor):
        assert dk is not None and dk.shape == k.shape and not dk.any()
    assert torch.isfinite(dz).all() and torch.isfinite(dza).all()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case, monkeypatch):
    if case["dchunk"]:
        monkeypatch.setattr(fwd, "MAX_BLOCK_D", 16)
    b, d = case["shape"]
    seed = b * 1000 + d
    z, za = make_views(b, d, case["dtype"], seed=seed, normalize=case["normalize"],
                       layout=case["layout"], device=DEVICE)
    k, margin = pick_k(z.cpu(), za.cpu(), case["k"], case["normalize"])
    assert margin > 1e-4, "threshold too close to a similarity"
    if isinstance(k, torch.Tensor):
        k = k.to(DEVICE)
    opts = dict(temperature=case["tau"], normalize=case["normalize"], denominator=case["denominator"],
                weighting=case["weighting"], positive_weight=case["alpha"], reduction=case["reduction"])
    g = torch.Generator().manual_seed(seed + 1)
    if case["reduction"] == "none":
        upstream = torch.randn(2 * b, generator=g).to(DEVICE)
    else:
        upstream = torch.tensor(-0.75 if seed % 2 else 1.3, device=DEVICE)
    tol_loss, tol_grad = TOL[case["dtype"]]
    check_against_reference(z, za, k, opts, case["dtype"], upstream, tol_loss, tol_grad)


def test_zero_row_and_k_grad_shapes():
    z, za = make_views(17, 7, torch.float32, seed=3, device=DEVICE)
    z[4] = 0.0
    za[9] = 0.0
    for kind in ("B", "N"):
        k, margin = pick_k(z.cpu(), za.cpu(), kind, True)
        assert margin > 1e-4
        opts = dict(temperature=0.5, normalize=True, denominator="negatives", weighting="normalized",
                    positive_weight=0.5, reduction="mean")
        check_against_reference(z, za, k.to(DEVICE), opts, torch.float32, None, 1e-5, 1e-5)


def test_deterministic_bitwise():
    z, za = make_views(40, 70, torch.float32, seed=5, device=DEVICE)
    k, _ = pick_k(z.cpu(), za.cpu(), "N", True)
    u = torch.randn(80, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    outs = []
    for _ in range(2):
        zt, zat = z.clone().requires_grad_(), za.clone().requires_grad_()
        loss = adaptive_info_nce(zt, zat, k.to(DEVICE), temperature=0.2, reduction="none", backend="triton")
        loss.backward(u)
        outs.append((loss.detach(), zt.grad, zat.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_partner_only_rows_with_everything_positive():
    """k below every similarity: A(i) = N(i) (|A| = N-2); "negatives" leaves only the partner
    in the denominator."""
    z, za = make_views(17, 7, torch.float32, seed=7, device=DEVICE)
    for den in ("negatives", "all"):
        for weighting in ("normalized", "unit"):
            opts = dict(temperature=0.3, normalize=True, denominator=den, weighting=weighting,
                        positive_weight=0.4, reduction="sum")
            check_against_reference(z, za, -2.0, opts, torch.float32, None, 1e-5, 1e-5)


def test_large_logits_dot_products_online_max():
    """normalize=False with large dot products: the online max must keep exp2 finite."""
    g = torch.Generator().manual_seed(11)
    z, za = (torch.nn.functional.normalize(torch.randn(17, 32, generator=g), dim=1) * 3.0 for _ in range(2))
    z, za = z.to(DEVICE), za.to(DEVICE)  # |dots| <= 9: logits up to 90 (exp(90) overflows float32)
    opts = dict(temperature=0.1, normalize=False, denominator="all", weighting="normalized",
                positive_weight=0.5, reduction="mean")
    check_against_reference(z, za, None, opts, torch.float32, None, 1e-5, 1e-5)


@pytest.mark.parametrize("blocks", [(32, 16), (64, 32), (32, 64), (128, 64), (64, 128)])
def test_interpreter_block_shapes(monkeypatch, blocks):
    """Other tile shapes (those of the launch table and of autotune's candidates, BLOCK_M !=
    BLOCK_N, blocks wider than N, N not a multiple of either) give the same numbers within float32 rounding: the
    special-tile logic (diagonal, partners, columns >= N) must hold for every combination."""
    monkeypatch.setattr(klaunch, "INTERPRET_BLOCKS", blocks)
    if blocks[0] == 64 and blocks[1] == 32:
        monkeypatch.setattr(fwd, "MAX_BLOCK_D", 16)  # also the chunked-D / D-split path
    z, za = make_views(37, 20, torch.float32, seed=13, device=DEVICE)
    k, _ = pick_k(z.cpu(), za.cpu(), "N", True)
    opts = dict(temperature=0.1, normalize=True, denominator="negatives", weighting="unit",
                positive_weight=0.5, reduction="none")
    u = torch.randn(74, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    check_against_reference(z, za, k.to(DEVICE), opts, torch.float32, u, 1e-5, 1e-5)


# ----------------------------------------------------------------------- availability / routing
def _prepared(dtype=torch.float32, k=0.3, labels=None, **opts):
    z, za = make_views(5, 4, dtype, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return prepare(z, za, k, labels, make_options(**opts))


def test_unsupported_reasons():
    assert unsupported_reason(_prepared()) is None or DEVICE == "cpu" and not fwd.INTERPRET
    assert "float64" in unsupported_reason(_prepared(torch.float64))
    if fwd.INTERPRET:
        assert "bfloat16" in unsupported_reason(_prepared(torch.bfloat16))
    # Every loss option is fused (issue 15): labels and the soft threshold are not refused.
    for p in (_prepared(labels=torch.arange(5)), _prepared(threshold="soft"),
              _prepared(labels=torch.arange(10), threshold="soft", denominator="all")):
        assert unsupported_reason(p) is None or DEVICE == "cpu" and not fwd.INTERPRET


def test_labels_beyond_float32_ids_are_refused(monkeypatch):
    """Label ids are compared as float32 in the kernels: more rows than 2^24 take the reference
    (checked on metadata, here with the limit lowered)."""
    from adaptive_cl.kernels import function as kfunc
    import adaptive_cl.kernels as kernels

    monkeypatch.setattr(kernels, "MAX_LABEL_ROWS", 8)
    assert kfunc.MAX_LABEL_ROWS == 2**24
    reason = unsupported_reason(_prepared(labels=torch.arange(5)))
    assert reason is not None and "labels with N = 10 > 8 rows" in reason
    assert unsupported_reason(_prepared()) is None or DEVICE == "cpu" and not fwd.INTERPRET


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(fwd, "INTERPRET", False)
    reason = unsupported_reason(_prepared())
    assert reason.startswith("tensors are on cpu; the Triton kernels need CUDA tensors")
    with pytest.raises(ValueError, match="backend='triton' is not available: tensors are on cpu"):
        backends.resolve("triton", _prepared())


def test_explicit_triton_errors_and_auto_falls_back():
    p = _prepared(torch.float64)
    with pytest.raises(ValueError, match="backend='triton' is not available: "):
        backends.resolve("triton", p)
    # auto's fallback: the C++ extension for CPU tensors when it is built, else the reference
    from adaptive_cl import cpu

    on_cpu = not p.z.is_cuda and cpu.load_error() is None
    assert backends.resolve("auto", p) is (cpu.adaptive_info_nce_cpu if on_cpu else adaptive_info_nce_reference)
    with pytest.raises(ValueError, match="not available"):
        adaptive_info_nce(p.z, p.z_aug, 0.3, backend="triton")


def test_auto_sends_every_option_to_the_kernel_on_cuda():
    """On CUDA tensors "auto" takes the fused kernel for labels and the soft threshold too; on
    CPU tensors the C++ extension or the reference (the interpreter is for tests, not speed)."""
    from adaptive_cl.kernels import adaptive_info_nce_triton

    from adaptive_cl import cpu

    for p in (_prepared(labels=torch.arange(5)), _prepared(threshold="soft")):
        if p.z.is_cuda:
            want = adaptive_info_nce_triton
        else:
            want = cpu.adaptive_info_nce_cpu if cpu.load_error() is None else adaptive_info_nce_reference
        assert backends.resolve("auto", p) is want


def test_triton_backend_resolves_when_supported():
    p = _prepared()
    if fwd.INTERPRET or p.z.is_cuda:
        from adaptive_cl.kernels import adaptive_info_nce_triton

        assert backends.resolve("triton", p) is adaptive_info_nce_triton


# ------------------------------------------------------------------ float32 dot precisions
@pytest.fixture
def emulate_tf32(monkeypatch):
    """Make the interpreter's tl.dot drop the 13 low mantissa bits of float32 operands when
    input_precision is tf32 (as tensor cores do), so precision modes differ here as on a GPU."""
    if not fwd.INTERPRET:
        pytest.skip("tf32 emulation patches Triton's interpreter")
    import numpy as np
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == ir.INPUT_PRECISION.TF32 and a.data.dtype == np.float32:
            def trunc(x):
                return (np.ascontiguousarray(x).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)

            a = interpreter.TensorHandle(trunc(a.data), a.dtype)
            b = interpreter.TensorHandle(trunc(b.data), b.dtype)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


@pytest.mark.parametrize("dchunk", [False, True])
def test_fp32_highest_three_pass_tf32_meets_float32_tolerance(emulate_tf32, monkeypatch, dchunk):
    """ADAPTIVE_CL_FP32_HIGHEST=3xtf32 stays within the float32 bound (1e-5) with tf32 products,
    where a single tf32 pass ("high") does not."""
    if dchunk:
        monkeypatch.setattr(fwd, "MAX_BLOCK_D", 16)
    z, za = make_views(40, 70, torch.float32, seed=17, device=DEVICE)
    k, _ = pick_k(z.cpu(), za.cpu(), "N", True)
    opts = dict(temperature=0.05, normalize=True, denominator="negatives", weighting="normalized",
                positive_weight=0.5, reduction="mean")
    before = torch.get_float32_matmul_precision()
    try:
        monkeypatch.setenv("ADAPTIVE_CL_FP32_HIGHEST", "3xtf32")
        torch.set_float32_matmul_precision("highest")
        check_against_reference(z, za, k.to(DEVICE), opts, torch.float32, None, 1e-5, 1e-5)
        torch.set_float32_matmul_precision("high")
        with pytest.raises(AssertionError):
            check_against_reference(z, za, k.to(DEVICE), opts, torch.float32, None, 1e-5, 1e-5)
        check_against_reference(z, za, k.to(DEVICE), opts, torch.float32, None, 2e-3, 2e-3)
    finally:
        torch.set_float32_matmul_precision(before)


def test_three_pass_deterministic(emulate_tf32, monkeypatch):
    """The 3xtf32 path: two runs agree bitwise (loss and gradients)."""
    monkeypatch.setenv("ADAPTIVE_CL_FP32_HIGHEST", "3xtf32")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        z, za = make_views(17, 32, torch.float32, seed=19, device=DEVICE)
        k, _ = pick_k(z.cpu(), za.cpu(), "B", True)
        outs = []
        for _ in range(2):
            zt, zat = z.clone().requires_grad_(), za.clone().requires_grad_()
            loss = adaptive_info_nce(zt, zat, k.to(DEVICE), temperature=0.1, backend="triton")
            loss.backward()
            outs.append((loss.detach(), zt.grad, zat.grad))
        assert all(torch.equal(a, b) for a, b in zip(*outs))
    finally:
        torch.set_float32_matmul_precision(before)


# Every combination of the options that change the kernels' per-element logic (threshold
# kind x denominator x weighting x exponent path), on one small odd shape: the pairwise design
# above only guarantees pairs, and these four interact inside the same few lines.
CORE = [(k, den, w, path) for k in ("none", "scalar", "B", "N") for den in ("negatives", "all")
        for w in ("normalized", "unit") for path in ("fixed", "online", "dot")]


@pytest.mark.parametrize("kind,den,weighting,path", CORE, ids=["-".join(c) for c in CORE])
def test_core_option_product(kind, den, weighting, path):
    normalize = path != "dot"
    tau = {"fixed": 0.2, "online": 0.02, "dot": 0.5}[path]
    z, za = make_views(17, 7, torch.float32, seed=23, normalize=normalize, device=DEVICE)
    k, margin = pick_k(z.cpu(), za.cpu(), kind, normalize)
    assert margin > 1e-4
    if isinstance(k, torch.Tensor):
        k = k.to(DEVICE)
    opts = dict(temperature=tau, normalize=normalize, denominator=den, weighting=weighting,
                positive_weight=0.4, reduction="none")
    u = torch.randn(34, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    check_against_reference(z, za, k, opts, torch.float32, u, 1e-5, 1e-5)


# ------------------------------------------------------------- tf32: rounding, not truncation
def _prepared_rows(z, za, precision):
    from adaptive_cl.contract import make_options
    from adaptive_cl.kernels import function as kfunc

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        return kfunc.prepare_rows(z, za, None, None, make_options(temperature=0.1))
    finally:
        torch.set_float32_matmul_precision(before)


def test_tf32_path_prepares_operands_rounded_to_tf32():
    """issue 23: on the one-pass tf32 path the row-stats pass stores the rows rounded to tf32
    (low 13 mantissa bits zero, nearest with ties away), so the tensor cores' truncation of
    its operands is exact; the ieee path keeps full float32 rows."""
    z, za = make_views(19, 24, torch.float32, seed=31, device=DEVICE)
    tf32 = _prepared_rows(z, za, "high")
    low = 0x1FFF
    for t in (tf32.zs, tf32.zh):  # columns past D: the row stride's padding, never read
        assert int((t[:, :24].contiguous().view(torch.int32) & low).count_nonzero()) == 0
    ieee = _prepared_rows(z, za, "highest")
    assert int((ieee.zs[:, :24].contiguous().view(torch.int32) & low).count_nonzero()) > 0
    # rounded, not truncated: each value is the tf32 neighbour nearest the float32 row
    x = ieee.zs[:, :24].double()
    step = torch.ldexp(torch.ones_like(x), torch.frexp(x).exponent - 11)  # tf32 ulp of each value
    assert bool(((tf32.zs[:, :24].double() - x).abs() <= step / 2).all())


def _tf32_errors(round_operands, monkeypatch):
    from adaptive_cl.kernels import function as kfunc

    monkeypatch.setattr(kfunc, "ROUND_TF32", round_operands)
    # the quick CUDA grid's fp32-tf32 case: B = 257, D = 64, normalize=False, tau = 0.1
    z, za = make_views(257, 64, torch.float32, seed=257, normalize=False, device=DEVICE)
    outs = []
    for backend, dt in (("triton", torch.float32), ("reference", torch.float64)):
        zt, zat = z.detach().to(dt).clone().requires_grad_(), za.detach().to(dt).clone().requires_grad_()
        loss = adaptive_info_nce(zt, zat, None, temperature=0.1, normalize=False, backend=backend)
        loss.backward()
        outs.append((loss.detach().double(), torch.cat([zt.grad, zat.grad]).double()))
    (loss, g), (ref, rg) = outs
    return float((loss - ref).abs() / ref.abs()), rel_err(g, rg)


def test_tf32_truncation_error_emulated(emulate_tf32, monkeypatch):
    """The interpreter's tl.dot made to truncate tf32 operands as the hardware does
    (``emulate_tf32``), float32 against the float64 reference: with the operands rounded first
    (the kernels' tf32 path) the loss and gradient errors stay within the CUDA tests' tf32 bound
    (2e-3); truncated alone they are biased low and do not (issue 23: 3.6e-3 / 2.1e-3 measured
    this way)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        rounded = _tf32_errors(True, monkeypatch)
        truncated = _tf32_errors(False, monkeypatch)
    finally:
        torch.set_float32_matmul_precision(before)
    assert max(rounded) <= 2e-3, rounded
    assert max(truncated) > 2e-3, truncated
    assert truncated[0] > 2 * rounded[0]  # the bias: truncation's loss error is the larger
