"""RCL and MCLRec through the Trainer and the training CLI: configuration, bit-identical
resume (the augmenters' own optimizer included), end-to-end runs on synthetic data and Beauty."""

import json
from pathlib import Path

import pytest
import torch

from adaptive_cl.rec import cli
from adaptive_cl.rec.data import leave_one_out
from adaptive_cl.rec.synthetic import make_synthetic
from adaptive_cl.rec.train import TrainConfig, Trainer
from test_train import check_resume_is_bit_identical

BEAUTY = Path("/work/shared/data/Beauty.txt")


@pytest.fixture(scope="module")
def split():
    return leave_one_out(make_synthetic(num_users=120, num_items=40, mean_length=8.0), 10)


def config(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=64, max_len=10, hidden=16, inner=32, lr=5e-3,
                holdout_size=64, progress=False, seed=3)
    return TrainConfig.from_preset("default", **{**base, **kw})


def test_method_defaults_and_validation():
    rcl, mclrec = config(method="rcl"), config(method="mclrec")
    assert rcl.simthres == mclrec.simthres == "none"
    assert not rcl.normalize and not mclrec.normalize  # both papers use the inner product
    assert (mclrec.crop, mclrec.mask, mclrec.reorder) == (0.5, 0.5, 0.8)
    assert config(method="cl4srec").crop == 0.6
    thresholded = config(method="mclrec", simthres="statistical")
    assert thresholded.normalize  # a SimThres is a cosine level
    assert config(method="rcl", simthres="learnable", rcl_weighting="row").normalize
    with pytest.raises(ValueError, match="rcl_weighting='similarity'"):
        config(method="rcl", simthres="statistical")
    with pytest.raises(ValueError, match="similarity='dot'"):
        config(method="mclrec", simthres="statistical", similarity="dot")
    for bad, match in ((dict(rcl_alpha=0.0), "rcl_alpha"), (dict(rcl_ngram=3), "rcl_ngram"),
                       (dict(rcl_weighting="pairs"), "rcl_weighting"),
                       (dict(mclrec_update="meta"), "mclrec_update"),
                       (dict(mclrec_regularizer="x"), "mclrec_regularizer"),
                       (dict(mclrec_beta=-1.0), "mclrec_beta"),
                       (dict(max_batches=0), "max_batches")):
        with pytest.raises(ValueError, match=match):
            config(**bad)


def test_epoch_cap(split):
    trainer = Trainer(config(method="sasrec", max_batches=2, batch_size=16), split)
    assert len(trainer._batches()) == 2


# The threshold variants' state is covered by test_train's resume test; these two cover what
# RCL and MCLRec add (the cached weak positives, the augmenters and their own Adam).
@pytest.mark.parametrize("kw", [dict(method="rcl"), dict(method="mclrec")])
def test_resume_is_bit_identical(split, tmp_path, kw):
    cfg = config(**kw, max_batches=3)  # a few steps per epoch show what resume restores
    a, _ = check_resume_is_bit_identical(cfg, split, tmp_path)
    if kw["method"] == "mclrec":
        assert a["objective"]["_extra_state"]["augmenter_optimizer"]["state"]
    if kw["method"] == "rcl":  # the weak positives were cached next to the checkpoint
        assert len(list((tmp_path / "cut" / "cache").glob("rcl-weak-*.npz"))) == 1


def test_augmenters_are_not_in_the_encoders_optimizer(split):
    trainer = Trainer(config(method="mclrec"), split)
    own = {id(p) for p in trainer.objective.augmenters.parameters()}
    main = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert own and not own & main
    joint = Trainer(config(method="mclrec", mclrec_update="joint"), split)
    main = {id(p) for group in joint.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in joint.objective.augmenters.parameters()} <= main


def _run(argv, out: Path) -> dict:
    assert cli.main([*argv, "--epochs", "1", "--max-batches", "2", "--batch-size", "32",
                     "--no-progress", "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("method, extra, part", [
    ("rcl", [], "weak"),
    ("mclrec", ["--mclrec-regularizer", "code"], "augmenter"),
])
def test_cli_on_the_synthetic_data(tmp_path, method, extra, part):
    results = _run(["--method", method, *extra], tmp_path)
    assert results["method"] == method and results["epochs"] == 1
    assert part in results["history"][0] and results["config"]["max_batches"] == 2
    assert 0 <= results["test"]["NDCG@10"] <= 1


@pytest.mark.slow
@pytest.mark.skipif(not BEAUTY.is_file(), reason="needs /work/shared/data/Beauty.txt")
@pytest.mark.parametrize("method, part", [("rcl", "strong"), ("mclrec", "cl2")])
def test_cli_on_beauty(tmp_path, method, part):
    results = _run(["--data", str(BEAUTY), "--method", method, "--max-len", "10"], tmp_path)
    assert results["dataset"] == "Beauty" and results["method"] == method
    row = results["history"][0]
    assert part in row and all(v == v for v in row.values() if isinstance(v, float))
    if method == "rcl":
        assert len(list((tmp_path / "cache").glob("rcl-weak-*.npz"))) == 1


@pytest.mark.parametrize("argv, flag", [
    (["--method", "mclrec", "--rcl-alpha", "0.1"], "--rcl-alpha"),
    (["--method", "rcl", "--rcl-alpha", "0"], "--rcl-alpha"),
    (["--method", "rcl", "--mclrec-update", "joint"], "--mclrec-update"),
    (["--method", "duorec", "--simthres", "statistical"], "--simthres"),
    (["--method", "mclrec", "--cache-dir", "x"], "--cache-dir"),
    (["--method", "mclrec", "--mclrec-beta", "-1"], "--mclrec-beta"),
    (["--max-batches", "0"], "--max-batches"),
])
def test_cli_bad_arguments(argv, flag, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {flag}" in err, err


def test_cli_rejects_a_threshold_on_eq16(capsys):
    assert cli.main(["--method", "rcl", "--simthres", "statistical", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rcl_weighting" in err, err
