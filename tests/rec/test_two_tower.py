"""examples/two_tower.py and adaptive_cl/rec/two_tower.py at a size that runs in seconds."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

from adaptive_cl import adaptive_info_nce
from adaptive_cl.rec.data import leave_one_out
from adaptive_cl.rec.synthetic import make_synthetic
from adaptive_cl.rec.two_tower import item_log_q, train_two_tower
from helpers import write_sequence_file

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "two_tower.py"
SMALL = ["--items", "40", "--hidden", "16", "--max-len", "10", "--batch-size", "32", "--max-batches", "15"]


def _example():
    spec = importlib.util.spec_from_file_location("two_tower_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_beats_popularity_on_the_synthetic_data(capsys):
    results = _example().main(["--users", "200", "--epochs", "3", *SMALL])
    out = capsys.readouterr().out
    assert "NDCG@10" in out and "Recall@10" in out and "popularity" in out
    assert "threshold k =" in out  # the adaptive threshold switched on after the first epoch
    # the planted successor structure is learnable; popularity cannot see it
    assert results["two-tower"]["NDCG@10"] > 1.5 * results["popularity"]["NDCG@10"]


def test_example_reads_a_data_file(tmp_path, capsys):
    path = write_sequence_file(tmp_path / "seqs.txt", make_synthetic(num_users=120, num_items=30, seed=2))
    results = _example().main(["--data", str(path), "--kcore", "1", "--epochs", "1", *SMALL])
    assert capsys.readouterr().out.startswith("seqs")
    for metrics in results.values():
        assert all(math.isfinite(v) and 0 <= v <= 1 for v in metrics.values())


def test_item_log_q_is_the_log_share_of_the_training_targets():
    targets = torch.tensor([1, 1, 2, 3, 3, 3])
    log_q = item_log_q(targets, num_items=4)
    assert torch.allclose(log_q[1:4].exp(), torch.tensor([2 / 6, 1 / 6, 3 / 6]))
    assert torch.isfinite(log_q).all()  # item 4 (never a target) and padding stay finite


def test_training_uses_the_two_tower_options(monkeypatch):
    """Every training batch runs the cross layout with logQ of its targets, item ids as labels
    with exclusion, and the threshold of the previous epoch (none in the first)."""
    import adaptive_cl.rec.two_tower as tt

    calls = []

    def spy(users, items, k, **kw):
        calls.append((k, kw))
        return adaptive_info_nce(users, items, k, **kw)

    monkeypatch.setattr(tt, "adaptive_info_nce", spy)
    split = leave_one_out(make_synthetic(num_users=60, num_items=20, seed=1), max_len=8)
    _, history = train_two_tower(split, epochs=2, batch_size=16, hidden=8, layers=1, max_batches=2, log=lambda s: None)
    assert [k for k, _ in calls][:2] == [None, None] and all(isinstance(k, float) for k, _ in calls[2:])
    assert history.thresholds[0] is None and history.thresholds[1] == calls[-1][0]
    for _, kw in calls:
        assert kw["layout"] == "cross" and kw["same_label"] == "exclude"
        assert torch.equal(kw["log_q"], item_log_q(split.train_targets, split.num_items)[kw["labels"]])
