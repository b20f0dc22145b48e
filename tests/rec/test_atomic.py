"""Atomic writes: a writer that fails leaves the old file (or none) and no temporary file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptive_cl.rec.atomic import atomic_save, atomic_savefig, atomic_savez, atomic_write, atomic_write_text


class Boom(Exception):
    pass


def _half_then_fail(f):
    f.write(b"partial")
    raise Boom


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_text(path, '{"old": 1}')
    with pytest.raises(Boom):
        atomic_write(path, _half_then_fail)
    assert path.read_text() == '{"old": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    with pytest.raises(Boom):
        atomic_write(tmp_path / "new.json", _half_then_fail)
    assert not (tmp_path / "new.json").exists()


def test_torch_numpy_and_figures_round_trip(tmp_path):
    atomic_save({"w": torch.arange(3)}, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.arange(3))
    atomic_savez(tmp_path / "a.npz", x=np.arange(4))
    with np.load(tmp_path / "a.npz") as f:
        assert f["x"].tolist() == [0, 1, 2, 3]
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    atomic_savefig(fig, tmp_path / "f.png", dpi=50)
    plt.close(fig)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "c.pt", "f.png"]
