"""Backend selection around the extension: "auto" prefers it for CPU tensors; where it cannot be
built "auto" falls back to the reference with one warning and "cpu" raises a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from adaptive_cl import adaptive_info_nce, backends
from adaptive_cl.contract import make_options, prepare
from adaptive_cl.cpu import adaptive_info_nce_cpu, build
from adaptive_cl.reference import adaptive_info_nce_reference

ROOT = Path(__file__).resolve().parents[2]


def _prepared(device="cpu"):
    z = torch.randn(4, 3, device=device)
    return prepare(z, z + 0.1, 0.3, None, make_options())


def test_auto_prefers_the_extension_on_cpu(ext):
    assert backends.resolve("auto", _prepared()) is adaptive_info_nce_cpu
    assert backends.resolve("cpu", _prepared()) is adaptive_info_nce_cpu


def test_cpu_backend_rejects_other_devices():
    with pytest.raises(ValueError, match="backend='cpu' is not available: tensors are on meta"):
        backends.resolve("cpu", _prepared("meta"))


@pytest.fixture
def failed_build(monkeypatch):
    """The extension as if its build had failed (restored afterwards)."""
    monkeypatch.setattr(build, "_state", {"tried": True, "module": None,
                                          "error": "the CPU extension could not be built (simulated)"})
    monkeypatch.setattr(backends, "_fallback_warned", False)
    monkeypatch.delenv(build.DISABLE_ENV, raising=False)


def test_failed_build_auto_warns_once_and_uses_the_reference(failed_build):
    z = torch.randn(5, 4)
    with pytest.warns(RuntimeWarning, match="using the PyTorch reference on CPU: .*simulated") as record:
        got = adaptive_info_nce(z, z + 0.2, 0.1)
        again = adaptive_info_nce(z, z + 0.2, 0.1)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    expected = adaptive_info_nce(z, z + 0.2, 0.1, backend="reference")
    assert torch.equal(got, expected) and torch.equal(again, expected)
    assert backends.resolve("auto", _prepared()) is adaptive_info_nce_reference


def test_failed_build_cpu_backend_raises(failed_build):
    with pytest.raises(RuntimeError, match=r"backend='cpu' is not available: .*\(simulated\)"):
        adaptive_info_nce(torch.randn(4, 3), torch.randn(4, 3), backend="cpu")


def test_disabled_extension_falls_back_silently(monkeypatch):
    monkeypatch.setenv(build.DISABLE_ENV, "0")
    monkeypatch.setattr(build, "_state", {"tried": False, "module": None, "error": None})
    monkeypatch.setattr(backends, "_fallback_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", _prepared()) is adaptive_info_nce_reference
    with pytest.raises(RuntimeError, match="disabled"):
        backends.resolve("cpu", _prepared())


NO_COMPILER_SCRIPT = textwrap.dedent("""
    import json, sys, warnings, torch
    sys.path.insert(0, sys.argv[1])
    from adaptive_cl import adaptive_info_nce
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = adaptive_info_nce(z, z + 0.1, 0.2)
        adaptive_info_nce(z, z + 0.1, 0.2)
    try:
        adaptive_info_nce(z, z + 0.1, backend="cpu")
        error = None
    except RuntimeError as err:
        error = str(err)
    ref = adaptive_info_nce(z, z + 0.1, 0.2, backend="reference")
    print(json.dumps({"warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
                      "equal": bool(torch.equal(got, ref)), "error": error}))
""")


def test_no_compiler_end_to_end(tmp_path):
    """A fresh process whose compiler does not exist: no exception, one warning, the reference."""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    env.pop(build.DISABLE_ENV, None)
    res = subprocess.run([sys.executable, "-c", NO_COMPILER_SCRIPT, str(ROOT)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(out["warnings"]) == 1 and "could not be built" in out["warnings"][0]
    assert out["equal"]
    assert out["error"] is not None and "backend='cpu' is not available" in out["error"]
