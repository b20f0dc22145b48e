"""The kernels as an H100/H200 would run them, checked without a GPU: compile the launches the
package makes for sm_90 with the installed triton (ptxas and nvdisasm ship in its wheel) and
fail on a compile error, a register spill in a default configuration, shared memory over the
sm_90 limit, or the per-element targets of issue 12 missed for bfloat16 D = 64.

A representative subset (``compile_check --set ci``: bfloat16 D = 64 for the targets, float16
and float32 tf32 at D = 128, the float32 default "ieee" at D = 64, one option set; a minute or
two on 2 cores); ``python -m adaptive_cl.kernels.compile_check
--set full`` compiles everything. It runs in a subprocess because the kernels must be JIT
functions there, not the interpreter's (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _has_ptxas() -> bool:
    try:
        from triton import knobs

        return os.path.exists(knobs.nvidia.ptxas.path) and os.path.exists(knobs.nvidia.nvdisasm.path)
    except Exception:  # noqa: BLE001 - a triton without the NVIDIA backend tools
        return False


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not _has_ptxas():
        pytest.skip("this triton has no ptxas/nvdisasm (the NVIDIA backend ships them on x86-64 and aarch64 Linux)")
    tmp = tmp_path_factory.mktemp("sm90")
    out = tmp / "ci.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "adaptive_cl.kernels.compile_check", "--set", "ci", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    data["returncode"] = proc.returncode
    data["stdout"] = proc.stdout
    return data


def test_every_launch_compiles_for_sm90(report):
    failed = [f"{r['role']} {r['variant']}: {r.get('error', '')[:300]}" for r in report["records"] if not r["ok"]]
    assert not failed, failed
    roles = {r["role"] for r in report["records"]}
    assert roles == {"rowstats", "fwd", "bwdrows", "bwd"}


def test_no_spills_and_shared_memory_fits(report):
    for r in report["records"]:
        assert (r["spill_stores"] or 0) == 0 and (r["spill_loads"] or 0) == 0, (r["role"], r["variant"], r["regs"])
        assert r["shared"] <= 227 * 1024, (r["role"], r["variant"], r["shared"])


def test_per_element_targets_bf16_d64(report):
    """Interior path of the main loop, per similarity element, bfloat16 D = 64, default options:
    backward <= 32 instructions and <= 1 MUFU, forward <= 18 instructions."""
    got = {r["role"]: r["per_element"] for r in report["records"]
           if r["default"] and r["dtype"] == "bfloat16" and r["D"] == 64 and r["role"] in ("fwd", "bwd")}
    assert got["bwd"]["instr"] <= 32 and got["bwd"]["mufu"] <= 1.0, got["bwd"]
    assert got["fwd"]["instr"] <= 18 and got["fwd"]["mufu"] <= 1.0, got["fwd"]
    assert report["problems"] == [] and report["returncode"] == 0, report["problems"]


def _compile_check(tmp_path, *args):
    """Run compile_check with ``args`` in a subprocess (JIT kernels, no interpreter); its --json."""
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "adaptive_cl.kernels.compile_check", *args, "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc


def test_a_partial_batch_reuses_the_compiled_kernels(tmp_path):
    """issue 23: which arguments specialise is chosen (do_not_specialize): B never; N only in
    the forward and backward, whose column masks need its divisibility by 16 (NOTES.md: 35
    instead of 26 backward instructions per element on triton 3.6 without it). So batch sizes 8192, 8184, 4096 and 1000 (N a multiple of 16)
    share one key per kernel (before: 2 for every kernel, B's divisibility), and a partial
    batch with N not a multiple of 16 (8191) adds one key for the forward and the backward
    only, never for the row-statistics and per-row kernels (before: 3 / 3 / 2 / 3 over
    8192, 8191, 4097, 1000)."""
    if not _has_ptxas():
        pytest.skip("this triton has no NVIDIA backend")
    same_class, _ = _compile_check(tmp_path, "--batch-keys", "8192,8184,4096,1000",
                                   "--variants", "bfloat16/native/64,float32/tf32/128")
    for variant, per_kernel in same_class["batch_keys"].items():
        assert per_kernel == {"rowstats": 1, "fwd": 1, "bwdrows": 1, "bwd": 1}, (variant, per_kernel)
    odd, _ = _compile_check(tmp_path, "--batch-keys", "8192,8191,4097,1000", "--variants", "bfloat16/native/64")
    for variant, per_kernel in odd["batch_keys"].items():
        assert per_kernel == {"rowstats": 1, "fwd": 2, "bwdrows": 1, "bwd": 2}, (variant, per_kernel)


def test_three_pass_tf32_products_are_not_chained(tmp_path):
    """issue 23: 3xtf32's cross products hi_i.lo_j and lo_i.hi_j must be independent products
    summed order-independently (c_ij == c_ji bitwise); Triton's combine pass turns
    ``dot(a, b) + dot(c, d)`` into one accumulating chain. Checked on the compiled TTIR of both
    passes: no tt.dot of the S tile takes another tt.dot's result as its accumulator (the
    backward's G' Z^_J product chains its three passes on purpose: it has no transposed twin;
    before the fix the forward had 2 chained dots and the backward 4)."""
    if not _has_ptxas():
        pytest.skip("this triton has no ptxas/nvdisasm")
    data, proc = _compile_check(tmp_path, "--variants", "float32/3xtf32/64")
    recs = {r["role"]: r for r in data["records"] if r["role"] in ("fwd", "bwd")}
    assert set(recs) == {"fwd", "bwd"} and all(r["ok"] for r in recs.values()), proc.stdout[-2000:]
    for role, r in recs.items():
        allowed = {"fwd": 0, "bwd": 2}[role]
        assert r["dots"] >= 3 and r["chained_dots"] == allowed, (role, r["dots"], r["chained_dots"])
        assert (r["spill_stores"] or 0) == 0, (role, r["regs"])
