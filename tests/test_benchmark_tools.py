"""CPU unit tests of the benchmark tooling (benchmarks/): floors, records, merging, targets,
plans, the impl registry's losses. Synthetic records here test the checker; they are not
results and never touch benchmarks/results/."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)
import floor  # noqa: E402
import gpu_check  # noqa: E402
import impls  # noqa: E402
import run  # noqa: E402
from helpers import assert_close_normwise  # noqa: E402

sys.path.remove(BENCH)


def rec(impl, dtype, n, ms, mib, *, d=64, mode="fwd+bwd", prec="highest", device="GPU X", command="c", date="2026-11-23"):
    return run.make_record(impl, n, d, dtype, mode, ms, mib, device=device, torch_version="2.11", triton_version="3.6",
                           date=date, command=command, fp32_precision=prec)


def passing_records(**kw):
    return [
        rec("fused", "bfloat16", 32768, 4.0, 12, **kw), rec("sdpa", "bfloat16", 32768, 3.0, 20, **kw),
        rec("fused", "float32", 32768, 4.0, 24, **kw), rec("compiled", "float32", 32768, 25.0, 9000, **kw),
        rec("fused", "float32", 512, 0.1, 1, **kw), rec("compiled", "float32", 512, 0.65, 5, **kw),
        rec("fused", "float32", 16384, 3.0, 20, **kw), rec("eager", "float32", 16384, 22.0, 6400, **kw),
    ]


# ------------------------------------------------------------------------------ floor
def test_floor_matches_kernel_notes_at_32768_64():
    t = floor.times_ms(32768, 64)
    assert t["exp"] == pytest.approx(0.55, abs=0.01)
    assert t["mm_bf16"] == pytest.approx(0.42, abs=0.01)
    assert t["mm_fp32_ieee"] == pytest.approx(6.15, abs=0.05)
    assert t["mm_tf32x3"] == pytest.approx(2.5, abs=0.01)
    assert t["floor_bf16"] == t["exp"]  # exp-bound at D=64
    assert t["floor_fp32_ieee"] == t["mm_fp32_ieee"]


def test_floor_counts_scale():
    a, b = floor.counts(1024, 64), floor.counts(2048, 128)
    assert b["exps"] == 4 * a["exps"] and b["matmul_flops"] == 8 * a["matmul_flops"]
    f = floor.counts(1024, 64, "fwd")
    assert f["exps"] * 2 == a["exps"] and f["matmul_flops"] * 3 == a["matmul_flops"]
    assert floor.times_ms(2048, 256)["floor_bf16"] == floor.times_ms(2048, 256)["mm_bf16"]  # matmul-bound at D=256
    assert floor.sdpa_floor_ms(32768, 64) == pytest.approx(7 * 2 * 32768**2 * 64 / 989e12 * 1e3)
    text = floor.tables((512,), (64,))
    assert "| 512 | 64 |" in text and "floor bf16" in text


# ------------------------------------------------------------------------------ records
def test_record_shape_is_exact():
    r = rec("fused", "bfloat16", 512, 0.25, 3)
    assert tuple(r) == run.RECORD_FIELDS
    assert set(r) == {"impl", "N", "D", "dtype", "mode", "median_ms", "peak_mib", "device", "torch", "triton",
                      "date", "command", "fp32_precision"}
    assert isinstance(r["N"], int) and isinstance(r["median_ms"], float) and isinstance(r["peak_mib"], float)
    json.dumps(r)
    with pytest.raises(ValueError):
        rec("fused", "float16", 512, 1, 1)
    with pytest.raises(ValueError):
        rec("fused", "float32", 512, 1, 1, mode="bwd")
    with pytest.raises(ValueError):
        rec("fused", "float32", 512, 1, 1, date="23/11/2026")


def test_device_slug_and_path():
    assert run.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert run.results_path("NVIDIA H200", "2026-11-23", "/r") == "/r/nvidia-h200-2026-11-23.json"


def test_merge_replaces_same_key_and_keeps_the_rest(tmp_path):
    path = str(tmp_path / "x.json")
    first = [rec("fused", "float32", 512, 1.0, 1), rec("eager", "float32", 512, 2.0, 9)]
    run.write_records(path, first)
    second = [rec("fused", "float32", 512, 0.5, 1), rec("fused", "float32", 512, 0.7, 1, prec="high")]
    merged = run.write_records(path, second)
    assert run.load_records(path) == merged
    with open(path) as f:
        assert set(json.load(f)) == {"records"}
    fused = sorted((r["fp32_precision"], r["median_ms"]) for r in merged if r["impl"] == "fused")
    assert fused == [("high", 0.7), ("highest", 0.5)]
    assert [r["median_ms"] for r in merged if r["impl"] == "eager"] == [2.0]


def test_markdown_table_and_plots(tmp_path):
    records = passing_records() + [rec("fused", "float32", 512, 0.05, 1, mode="fwd")]
    table = run.markdown_table(records)
    assert "### float32, D=64, fwd+bwd" in table and "| 512 |" in table and "0.100 / 1.0" in table
    written = run.plot(records, str(tmp_path / "gpu"))
    assert [os.path.basename(p) for p in written] == ["gpu-time.png", "gpu-memory.png"]
    assert all(os.path.getsize(p) > 1000 for p in written)
    assert gpu_check.result_files("/a/gpu-2026.json") == ["/a/gpu-2026.json", "/a/gpu-2026-time.png", "/a/gpu-2026-memory.png"]


# ------------------------------------------------------------------------------ targets
def test_targets_pass():
    results = run.check_targets(passing_records())
    assert [e["ok"] for e in results] == [True] * 4
    assert results[1]["ratio"] == pytest.approx(25.0 / 4.0)
    assert results[3]["ratio"] == pytest.approx(20 / 6400)
    assert "PASS" in run.format_targets(results)


def test_targets_fail_and_missing():
    records = passing_records()
    records[0] = rec("fused", "bfloat16", 32768, 4.6, 12)  # 4.6 / 3.0 > 1.5
    records = [r for r in records if r["impl"] != "eager"]
    results = run.check_targets(records)
    assert [e["ok"] for e in results] == [False, True, True, False]
    assert results[0]["ratio"] == pytest.approx(4.6 / 3.0)
    assert results[3]["ratio"] is None and "missing" in results[3]["note"]


def test_targets_pair_the_same_precision_and_flag_mixed_runs():
    records = [r for r in passing_records() if r["impl"] != "compiled"]
    # compiled only at "high" and fused only at "highest": no pair for the float32 time targets.
    records += [rec("compiled", "float32", n, 1.0, 1, prec="high") for n in (512, 32768)]
    results = run.check_targets(records)
    assert results[1]["ratio"] is None and results[2]["ratio"] is None
    # Pairs from different commands still compute, with a warning.
    records = passing_records()
    records[1] = rec("sdpa", "bfloat16", 32768, 3.0, 20, command="other")
    assert "different runs" in run.check_targets(records)[0]["note"]


def test_check_targets_exit_codes(tmp_path):
    good, bad = str(tmp_path / "good.json"), str(tmp_path / "bad.json")
    run.write_records(good, passing_records())
    run.write_records(bad, passing_records()[:4])
    assert run.run_check_targets(good) == 0
    assert run.run_check_targets(bad) == 1
    assert run.run_check_targets(str(tmp_path / "absent.json")) == 1


# ------------------------------------------------------------------------------ plans
def test_default_plan_measures_the_target_records_first():
    plan = run.build_plan(run.parse_args([]))
    needed = {("fused", 32768, 64, "bfloat16", "fwd+bwd"), ("sdpa", 32768, 64, "bfloat16", "fwd+bwd"),
              ("fused", 32768, 64, "float32", "fwd+bwd"), ("compiled", 32768, 64, "float32", "fwd+bwd"),
              ("fused", 512, 64, "float32", "fwd+bwd"), ("compiled", 512, 64, "float32", "fwd+bwd"),
              ("fused", 16384, 64, "float32", "fwd+bwd"), ("eager", 16384, 64, "float32", "fwd+bwd")}
    assert set(plan[:8]) == needed
    assert len(plan) == len(set(plan))
    quick = run.build_plan(run.parse_args(["--quick"]))
    assert needed <= set(quick) and {m for *_, m in quick} == {"fwd+bwd"}
    sel = run.build_plan(run.parse_args(["--impls", "fused", "--N", "1024", "--D", "32", "--dtypes", "bfloat16", "--modes", "fwd"]))
    assert sel == [("fused", 1024, 32, "bfloat16", "fwd")]
    with pytest.raises(SystemExit):
        run.parse_args(["--impls", "nope"])


def test_skip_reasons():
    gib80 = 80 * 2**30
    assert "float32" in impls.skip_reason("sdpa", 512, 64, torch.float32, "fwd", gib80)
    assert impls.skip_reason("sdpa", 512, 64, torch.bfloat16, "fwd", gib80) is None
    assert "GiB" in impls.skip_reason("eager", 65536, 64, torch.float32, "fwd+bwd", gib80)
    assert impls.skip_reason("eager", 32768, 64, torch.float32, "fwd+bwd", gib80) is None
    assert impls.skip_reason("fused", 65536, 256, torch.float32, "fwd+bwd", gib80) is None
    assert "N <=" in impls.skip_reason("official-loop", 8192, 64, torch.float32, "fwd", gib80)


def test_run_without_cuda_writes_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--output", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA" in proc.stderr and not out.exists()
    dry = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--dry-run", "--quick"],
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0 and "measure" in dry.stdout


# ------------------------------------------------------------------------------ impls on CPU
@pytest.mark.parametrize("n", [8, 64])
def test_loss_impls_agree_on_cpu(n):
    x = impls.make_inputs(n, 16, torch.float32, device="cpu", seed=1)
    eager = impls.FORWARDS["eager"](x)
    loop = impls.FORWARDS["official-loop"](x)
    assert_close_normwise(loop, eager, dtype=torch.float32, length=n + 16)
    for mode in impls.MODES:
        out = impls.make_step("eager", x, mode)()
        if mode == "fwd+bwd":
            assert len(out) == 2 and out[0].shape == x.z.shape


def test_inputs_exercise_the_threshold():
    x = impls.make_inputs(512, 64, torch.float32, device="cpu")
    zs = torch.nn.functional.normalize(torch.cat([x.z, x.z_aug]).detach(), dim=1)
    c = zs @ zs.T
    b = 256
    idx = torch.arange(512)
    cand = torch.ones(512, 512, dtype=torch.bool)
    cand[idx, idx] = False
    cand[idx, (idx + b) % 512] = False
    frac = (c > torch.cat([x.k, x.k])[:, None])[cand].float().mean().item()
    assert 0.03 < frac < 0.2  # roughly SimThres' 10%
    with pytest.raises(ValueError):
        impls.make_step("nope", x, "fwd")
    with pytest.raises(ValueError):
        impls.make_step("eager", x, "bwd")


def test_run_main_loop_with_a_fake_device(tmp_path, monkeypatch):
    """run.main's loop (plan, skips, records, merge, table, plots) on CPU, with the CUDA calls
    and the timer replaced: fake numbers into a temporary file, never into results/."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: SimpleNamespace(total_memory=2**30))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    real_inputs = impls.make_inputs
    monkeypatch.setattr(impls, "make_inputs", lambda n, d, dtype, seed=0: real_inputs(n, d, dtype, device="cpu", seed=seed))
    calls = []
    monkeypatch.setattr(run, "bench_ms", lambda step, **kw: (calls.append(step()), 1.5)[1])
    monkeypatch.setattr(run, "peak_mib", lambda step: 2.5)
    monkeypatch.setattr(impls, "fused_unavailable_reason", lambda x, impl="fused": "no kernels on the fake device")
    out = tmp_path / "fake.json"
    argv = ["--impls", "fused,eager,official-loop", "--N", "8,16", "--D", "4", "--dtypes", "float32",
            "--output", str(out)]
    assert run.main(argv) == 0
    records = run.load_records(str(out))
    assert {r["impl"] for r in records} == {"eager", "official-loop"}  # fused: skipped as unavailable
    assert all(tuple(r) == run.RECORD_FIELDS and r["device"] == "Fake GPU" for r in records)
    assert {(r["N"], r["mode"]) for r in records if r["impl"] == "eager"} == {(8, "fwd"), (8, "fwd+bwd"), (16, "fwd"), (16, "fwd+bwd")}
    assert records[0]["command"].startswith("python benchmarks/run.py --impls")
    assert (tmp_path / "fake-time.png").exists() and (tmp_path / "fake-memory.png").exists()
    # A second run replaces its records instead of duplicating them; a spent budget measures nothing.
    assert run.main(argv + ["--no-plot"]) == 0
    assert len(run.load_records(str(out))) == len(records)
    assert run.main(argv + ["--budget-s", "0"]) == 0
    assert len(run.load_records(str(out))) == len(records)
    # An impl that raises is reported (exit 1) and the others are still recorded.
    real_step = impls.make_step

    def broken(impl, x, mode):
        if impl == "official-loop":
            raise ArithmeticError("planted failure")
        return real_step(impl, x, mode)

    monkeypatch.setattr(impls, "make_step", broken)
    monkeypatch.setattr(run, "cuda_alive", lambda: True)
    out2 = tmp_path / "errors.json"
    assert run.main(argv[:-1] + [str(out2), "--no-plot"]) == 1
    assert {r["impl"] for r in run.load_records(str(out2))} == {"eager"}


def test_option_impls_run_and_compare_with_fused():
    """fused-labels / fused-soft / fused-stats (issue 15) run the kernel (the interpreter here)
    with their option, fused-soft's backward also returns dL/dk; the plans include them, and the
    cost table divides each by the plain kernel's time."""
    pytest.importorskip("triton")
    x = impls.make_inputs(16, 8, torch.float32, device="cpu", seed=2)
    for impl in impls.OPTION_IMPLS:
        assert impls.fused_unavailable_reason(x, impl) is None
        loss = impls.make_step(impl, x, "fwd")()
        assert loss.dim() == 0 and torch.isfinite(loss)
        grads = impls.make_step(impl, x, "fwd+bwd")()
        assert len(grads) == (3 if impl == "fused-soft" else 2)
        assert all(torch.isfinite(g).all() for g in grads)
    plan = run.build_plan(run.parse_args([]))
    assert {(i, 32768, 64, "bfloat16", "fwd+bwd") for i in impls.OPTION_IMPLS} <= set(plan)
    quick = run.build_plan(run.parse_args(["--quick"]))
    assert {(i, 32768, 64, "float32", "fwd+bwd") for i in impls.OPTION_IMPLS} <= set(quick)
    meta = dict(device="GPU", torch_version="t", triton_version="t", date="2026-01-01", command="c",
                fp32_precision="highest")
    recs = [run.make_record("fused", 8192, 64, "bfloat16", "fwd+bwd", 2.0, 1.0, **meta),
            run.make_record("fused-soft", 8192, 64, "bfloat16", "fwd+bwd", 3.0, 1.0, **meta),
            run.make_record("fused-labels", 8192, 64, "float32", "fwd+bwd", 3.0, 1.0, **meta)]
    table = run.option_costs(recs)
    assert "| fused-soft | 8192 | 64 | bfloat16 | fwd+bwd | 3.000 | 2.000 | 1.50 |" in table
    assert "fused-labels" not in table  # no plain-kernel record of the same shape to divide by
    assert run.option_costs(recs[:1]) == ""


@pytest.mark.parametrize("impl", ["cpu-cross", "cpu-queue", "eager-cross", "eager-queue"])
def test_cpu_bench_setup_cases_compute_the_setup(impl, ext):
    """cpu_bench's issue-24 rows time what they name: the cross layout or a queue of M = N rows,
    fused or in the reference, giving the reference's gradients."""
    from benchmarks import cpu_bench
    from adaptive_cl import adaptive_info_nce

    inputs = impls.make_inputs(16, 8, torch.float32, device="cpu")
    setup, backend = cpu_bench.SETUP_IMPLS[impl]
    kw = impls.setup_kwargs(inputs, setup)
    assert ("layout" in kw) == (setup == "cross") and ("negatives" in kw) == (setup == "queue")
    if setup == "queue":
        assert kw["negatives"].shape == (impls.QUEUE_FACTOR * 16, 8)
    grads = cpu_bench._step(impl, inputs)()
    ref = torch.autograd.grad(adaptive_info_nce(inputs.z, inputs.z_aug, inputs.k, backend="reference", **kw),
                              (inputs.z, inputs.z_aug))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
