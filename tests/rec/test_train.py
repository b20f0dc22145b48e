"""Training loop: learning, bit-identical resume, atomic checkpoints, results."""

import json
import math

import pytest
import torch

from adaptive_cl.rec import train as train_module
from adaptive_cl.rec.data import leave_one_out
from adaptive_cl.rec.metrics import evaluate_popularity
from adaptive_cl.rec.synthetic import make_synthetic
from adaptive_cl.rec.train import CHECKPOINT, CheckpointError, TrainConfig, Trainer, train

RESULT_KEYS = ["method", "dataset", "preset", "valid", "test", "epochs", "train_seconds",
               "history", "config"]
METRICS = {f"{m}@{k}" for m in ("NDCG", "Recall", "MRR") for k in (5, 10, 20)}


@pytest.fixture(scope="module")
def split():
    return leave_one_out(make_synthetic(num_users=300, num_items=60, mean_length=10.0), 10)


@pytest.fixture(scope="module")
def small_split():
    return leave_one_out(make_synthetic(num_users=120, num_items=40, mean_length=8.0), 10)


def config(**kw) -> TrainConfig:
    base = dict(epochs=4, batch_size=64, max_len=10, hidden=16, inner=32, lr=5e-3,
                holdout_size=64, progress=False, seed=3)
    return TrainConfig.from_preset("default", **{**base, **kw})


def test_short_run_beats_popularity(split):
    results = train(config(epochs=3), split)
    popularity = evaluate_popularity(split, "test")
    assert results["test"]["NDCG@10"] > popularity["NDCG@10"] + 0.05
    assert list(results) == RESULT_KEYS and set(results["test"]) == METRICS
    row = results["history"][-1]
    for key in ("loss", "ce", "cl", "k", "k_stat_pooled", "k_stat_batch_mean", "uniformity",
                "alignment", "valid"):
        assert key in row
    # Statistical SimThres in the first epoch: the running statistic (k = 1 for the first batch).
    assert 0.0 < results["history"][0]["k"] < 1.0
    assert results["history"][1]["k"] == pytest.approx(results["history"][0]["k_stat_pooled"])
    json.dumps(results)


class Interrupt(Exception):
    pass


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def check_resume_is_bit_identical(cfg: TrainConfig, split, tmp_path) -> tuple[dict, dict]:
    """Train ``cfg`` without a stop and stopped after epoch 2 then resumed; assert the results,
    the history and the final checkpoints' model, objective, optimizer and RNG states are equal.
    Returns the two checkpoints (uninterrupted, resumed)."""
    full = train(cfg, split, tmp_path / "full")

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, split, tmp_path / "cut", callback=stop_after_two)
    resumed = train(cfg, split, tmp_path / "cut", resume=True)

    def strip(history):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    assert resumed["test"] == full["test"] and resumed["valid"] == full["valid"]
    assert strip(resumed["history"]) == strip(full["history"])
    a = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)
    for part in ("model", "objective", "optimizer", "rng"):
        assert _equal(a[part], b[part]), part
    return a, b


@pytest.mark.parametrize("kw", [
    dict(method="adaptiverec", simthres="learnable", lr_schedule="cosine",
         kstat_method="batch_mean"),
    dict(method="cl4srec"),
])
def test_resume_is_bit_identical(small_split, tmp_path, kw):
    check_resume_is_bit_identical(config(**kw), small_split, tmp_path)


def test_resume_rejects_a_different_config(split, small_split, tmp_path):
    train(config(epochs=1), small_split, tmp_path)
    with pytest.raises(CheckpointError, match="other data"):
        train(config(epochs=2), split, tmp_path, resume=True)
    with pytest.raises(ValueError, match="lr"):
        train(config(epochs=2, lr=1e-2), small_split, tmp_path, resume=True)
    with pytest.raises(ValueError, match="ties"):
        train(config(epochs=2, ties="optimistic"), small_split, tmp_path, resume=True)
    with pytest.raises(ValueError, match="no checkpoint"):
        train(config(), small_split, tmp_path / "empty", resume=True)
    # A checkpoint written before a config field existed resumes with the field's default.
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    del state["config"]["ties"]
    torch.save(state, tmp_path / CHECKPOINT)
    assert train(config(epochs=2), small_split, tmp_path, resume=True)["epochs"] == 2


def test_a_diverged_run_stops_with_a_clear_error(small_split, tmp_path):
    trainer = Trainer(config(epochs=3, method="sasrec"), small_split, tmp_path)
    model = trainer.model
    model.loss = lambda h, targets: type(model).loss(model, h, targets) * math.nan
    with pytest.raises(FloatingPointError, match="epoch 1: the mean training loss is nan"):
        trainer.fit()
    assert not (tmp_path / CHECKPOINT).exists()


def test_metrics_tie_rule_and_similarity_checks(small_split):
    results = train(config(epochs=1, method="sasrec", ties="optimistic"), small_split)
    assert results["config"]["ties"] == "optimistic"
    assert TrainConfig().ties == "pessimistic"
    with pytest.raises(ValueError, match="ties"):
        config(ties="average")
    with pytest.raises(ValueError, match="similarity='dot'"):
        config(method="adaptiverec", similarity="dot")
    config(method="adaptiverec", similarity="dot", simthres="none")
    config(method="duorec", similarity="dot")


def test_checkpoint_write_is_atomic(small_split, tmp_path, monkeypatch):
    trainer = Trainer(config(epochs=1), small_split, tmp_path)
    trainer.fit()
    path = tmp_path / CHECKPOINT
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_flattened_threshold_needs_drop_last():
    with pytest.raises(ValueError, match="drop_last"):
        config(simthres="learnable-flat")
    paper = TrainConfig.from_preset("paper")
    assert (paper.batch_size, paper.drop_last, paper.lr_schedule, paper.simthres,
            paper.denominator, paper.kstat_method, paper.threshold_init,
            paper.threshold_detach) == (1024, True, "warmup-cosine", "learnable-flat", "all",
                                        "batch_mean", "normal", False)
    with pytest.raises(ValueError, match="method"):
        config(method="bert4rec")
    with pytest.raises(ValueError, match="preset"):
        TrainConfig.from_preset("fast")
    with pytest.raises(ValueError, match="kstat_bins"):
        config(kstat_bins=1000, record_histograms=True)


def test_paper_style_run_with_flattened_threshold(small_split):
    results = train(config(epochs=2, simthres="learnable-flat", drop_last=True,
                           lr_schedule="cosine", denominator="all", kstat_method="batch_mean"),
                    small_split)
    assert all(row["k"] is not None for row in results["history"])
    assert "reg" in results["history"][-1]
    first, second = (row["lr"] for row in results["history"])
    assert first == 5e-3 and second < first  # cosine schedule, lr recorded as used


def test_early_stopping_and_test_from_the_best_epoch(small_split):
    trainer = Trainer(config(epochs=10, patience=2, lr=1e-12, method="sasrec"), small_split)
    results = trainer.fit()  # a negligible lr: validation never improves after epoch 1
    assert results["epochs"] == 3 and len(results["history"]) == 3
    assert results["valid"] == results["history"][0]["valid"]
    assert results["test"] == trainer.evaluate("test", trainer.best_state)


def test_training_runs_without_tqdm(monkeypatch):
    # tqdm belongs to the examples extra: without it the loop still runs, and a requested bar
    # becomes one warning.
    import sys

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert list(train_module.progress_bar([1, 2], disable=True)) == [1, 2]
    with pytest.warns(RuntimeWarning, match="tqdm is not installed"):
        bar = train_module.progress_bar(total=3)
    bar.update()
    bar.set_postfix(loss="1.0")
    bar.close()
