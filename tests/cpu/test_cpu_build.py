"""The extension's first build is announced on stderr (once, with its cache folder) and can be
done ahead with ``python -m adaptive_cl.cpu.build`` (issue 23: a silent first call of ~50 s)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from adaptive_cl.cpu import build

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process state that has not tried the extension, a cache folder of its own, and a fake
    compiler that leaves a library where torch would (nothing is compiled)."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv(build.DISABLE_ENV, raising=False)
    monkeypatch.setattr(build, "_state", {"tried": False, "module": None, "error": None})
    calls = []

    def fake_load(name, **kwargs):
        calls.append(name)
        folder = build.build_dir(name)
        (folder / f"{name}.so").write_bytes(b"")
        return types.SimpleNamespace(__file__=str(folder / f"{name}.so"))

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    return calls


def test_first_build_says_so_once_on_stderr(fresh, capsys, monkeypatch):
    assert build.load_error() is None and len(fresh) == 1
    err = capsys.readouterr().err
    assert err.count("building the C++ CPU extension") == 1
    assert str(build.build_dir(fresh[0])) in err and "python -m adaptive_cl.cpu.build" in err
    build.extension()  # the same process: loaded, nothing said again
    assert capsys.readouterr().err == ""
    # a later process finds the cached library: it loads without the message
    monkeypatch.setattr(build, "_state", {"tried": False, "module": None, "error": None})
    assert build.load_error() is None and len(fresh) == 2
    assert "building" not in capsys.readouterr().err


def test_build_ahead_command(fresh, capsys):
    assert build.main([]) == 0
    out = capsys.readouterr()
    assert "CPU extension ready" in out.out and str(build.build_dir(fresh[0])) in out.out


def test_build_ahead_command_reports_a_disabled_extension(monkeypatch, capsys):
    monkeypatch.setenv(build.DISABLE_ENV, "0")
    monkeypatch.setattr(build, "_state", {"tried": False, "module": None, "error": None})
    assert build.main([]) == 1
    assert "disabled" in capsys.readouterr().err


def test_python_dash_m_builds_or_finds_it(ext):
    """The real command, in a fresh process (the session's build is cached: it only loads)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "adaptive_cl.cpu.build"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CPU extension ready" in done.stdout
