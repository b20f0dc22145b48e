"""examples/reproduce.py: the plan, skipping finished runs, the budget (runs stopped with their
checkpoint and resumed, runs not started), failures, aggregation and the archive."""

import json
import os
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from adaptive_cl.rec import aggregate, reproduce
from adaptive_cl.rec.published import PUBLISHED
from adaptive_cl.rec.reproduce import SETUPS, Estimate, Layout, Run, Runner, make_plan
from adaptive_cl.rec.synthetic import make_synthetic
from adaptive_cl.rec.train import CHECKPOINT, METHODS
from helpers import write_sequence_file

ROOT = Path(__file__).resolve().parents[2]
RESULT_KEYS = ["method", "dataset", "preset", "valid", "test", "epochs", "train_seconds",
               "history", "config"]
# Tiny runs: one CPU thread each (CI has two cores); lr 1e-12 makes validation flat, so early
# stopping ends every run after exactly 1 + patience epochs, whatever the timing.
TINY = ["--max-len", "10", "--batch-size", "128", "--threads", "1"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Unfinished runs go to the user's cache by default: a private one per test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = make_synthetic(num_users=200, num_items=40, mean_length=8.0)
    return write_sequence_file(tmp_path_factory.mktemp("data") / "tiny.txt", d)


def test_plan_covers_every_method_in_named_setups():
    plan = make_plan("beauty")
    assert {r.method for r in plan} == set(METHODS) and {r.seed for r in plan} == {0, 1, 2}
    assert len(plan) == len(set(plan)) == 3 * len(SETUPS)
    # Seed 0 of the table, then the paired claim's other seeds, then the rest.
    assert [r.name for r in plan[:8]] == [
        "sasrec-seed0", "duorec-seed0", "duorec-paper-seed0", "adaptiverec-seed0",
        "duorec-paper-seed1", "adaptiverec-seed1", "duorec-paper-seed2", "adaptiverec-seed2"]
    assert plan[12:] == [Run("beauty", m, s) for s in (0, 1, 2) for m in SETUPS
                         if m not in reproduce.PRIORITY]
    assert (plan[4].method, plan[4].preset) == ("duorec", "paper")
    assert (plan[3].method, plan[3].preset) == ("adaptiverec", "paper")
    assert all(r.preset == "release" for r in plan if r.method not in ("adaptiverec", "duorec")
               or r.setup == "duorec")
    assert make_plan("x", ["duorec"], [5]) == [Run("x", "duorec", 5)]
    for setups, seeds in ((["bert4rec"], [0]), (["sasrec", "sasrec"], [0]), (["sasrec"], []),
                          (["sasrec"], [0, 0]), (["sasrec"], [-1])):
        with pytest.raises(ValueError, match="setups|seeds"):
            make_plan("x", setups, seeds)
    assert reproduce.dataset_name(Path("data/Beauty.txt")) == "beauty"
    assert reproduce.dataset_name(None) == "synthetic"


def test_a_run_that_cannot_fit_is_not_started(tmp_path):
    now = [0.0]
    runner = Runner(Layout(tmp_path, "d"), None, budget_s=100, reserve_s=10, min_start_s=60,
                    estimates={"sasrec": Estimate(epoch_s=20, overhead_s=30)},
                    clock=lambda: now[0], say=lambda text: None)
    assert runner.fits(Run("d", "sasrec", 0)) == (True, "")  # 90 s left >= 30 + 20
    assert runner.fits(Run("d", "duorec", 0))[0]  # no estimate: 90 >= min_start_s
    now[0] = 45.0  # 45 s left
    assert runner.fits(Run("d", "sasrec", 0)) == (False, "45 s left, a first epoch needs 50 s "
                                                  "(30 s to start + 20.0 s an epoch)")
    assert not runner.fits(Run("d", "duorec", 0))[0]
    outcomes = runner.run(make_plan("d", ["sasrec", "duorec"], [0]))
    assert [o.status for o in outcomes] == ["not started"] * 2
    assert not list(tmp_path.rglob("*"))  # nothing written, nothing started


def test_estimates_come_from_runs_on_the_same_device():
    def record(device, seconds, wall):
        return {"device_name": device, "history": [{"seconds": s} for s in seconds],
                "segments": [{"wall_s": wall}]}

    records = {("sasrec", 0): record("H200", [2.0, 4.0, 3.0], 19.0),
               ("sasrec", 1): record("CPU", [100.0], 150.0)}
    assert reproduce.estimates(records, "H200") == {"sasrec": Estimate(3.0, 10.0)}
    assert reproduce.estimates(records, "H100") == {}


def test_budget_stops_runs_which_resume_later_and_finished_runs_are_skipped(data, tmp_path,
                                                                             cache):
    out = tmp_path / "results"
    # A run that cannot end by itself while the test watches (1000 epochs): however late a
    # loaded machine lets the runner see the first checkpoint, the run is still going.
    train_args = ["--epochs", "1000", "--lr", "1e-12", "--patience", "1000", *TINY]
    plan = make_plan("tiny", ["sasrec", "duorec"], [0])
    layout = Layout(out, "tiny")
    # Unfinished runs live in the cache, outside the results (and the repository).
    assert layout.work == cache / "adaptive-cl" / "reproduce" / "tiny"
    checkpoint = layout.work_dir(plan[0]) / CHECKPOINT
    said = []
    # The budget runs out as soon as the first run has checkpointed an epoch: it is stopped,
    # the second one is never started.
    runner = Runner(layout, data, "sequences", jobs=1, train_args=train_args, budget_s=1e6,
                    reserve_s=1, clock=lambda: 2e6 if checkpoint.exists() else 0.0, poll_s=0.05,
                    say=said.append)
    first = runner.run(plan)
    assert [o.status for o in first] == ["stopped", "not started"]
    epoch = reproduce.checkpoint_epoch(layout.work_dir(plan[0]))
    assert epoch >= 1 and first[0].detail == f"checkpoint at epoch {epoch}"
    assert not layout.result(plan[0]).exists() and not layout.work_dir(plan[1]).exists()
    assert not list(layout.work_dir(plan[0]).glob(".*.tmp"))
    assert sorted(p.name for p in out.rglob("*")) in ([], ["tiny"])  # nothing unfinished there
    notes = reproduce.unfinished_notes(layout, plan, first)
    assert notes[0].startswith(f"sasrec-seed0: checkpoint at epoch {epoch}")

    # Resumed with one more epoch to go (epochs may change on resume); the second run trains
    # as many from scratch.
    total = epoch + 1
    train_args = ["--epochs", str(total), "--lr", "1e-12", "--patience", "1000", *TINY]
    argv = ["--data", str(data), "--format", "sequences", "--methods", "sasrec", "duorec",
            "--seeds", "0", "--out-dir", str(out), "--jobs", "1", "--archive",
            str(tmp_path / "archive"), "--", *train_args]
    assert reproduce.main(argv) == 0
    for run in plan:
        record = json.loads(layout.result(run).read_text())
        assert list(record)[:len(RESULT_KEYS)] == RESULT_KEYS
        assert record["epochs"] == total and len(record["epoch_seconds"]) == total
        assert record["device_name"].startswith("CPU") and record["torch"] == torch.__version__
        assert record["command"].startswith(f"python -m adaptive_cl.rec --data {data} ")
        assert record["setup"] == run.setup and f"--preset {run.preset}" in record["command"]
        assert "--resume" not in record["command"] and f"--seed {run.seed}" in record["command"]
    segments = json.loads(layout.result(plan[0]).read_text())["segments"]
    assert [(s["outcome"], s["resumed"]) for s in segments] == [("stopped", False),
                                                                 ("finished", True)]
    assert not layout.work.exists()  # finished runs leave nothing unfinished behind
    readme = (out / "tiny" / "README.md").read_text()
    assert "| sasrec | 0 |" in readme and "| duorec | 0 |" in readme and "Not finished" not in readme
    assert "| duorec | duorec | release |" in readme  # what each setup ran
    with tarfile.open(tmp_path / "archive" / "results-tiny.tar.gz") as tar:
        assert {"tiny/sasrec-seed0.json", "tiny/duorec-seed0.json",
                "tiny/README.md"} <= set(tar.getnames())

    # Everything is done: a third invocation starts nothing.
    said.clear()
    again = Runner(layout, data, "sequences", train_args=train_args, say=said.append).run(plan)
    assert [o.status for o in again] == ["done before"] * 2 and said == []


def test_a_failed_run_is_recorded_and_not_retried_unless_asked(data, tmp_path, capsys, cache):
    # Arguments that parse (they are checked before any run) but fail once the data is read:
    # the paper preset drops the last partial batch, and this batch is larger than the data.
    train = ["--", "--epochs", "1", "--batch-size", "100000"]
    argv = ["--data", str(data), "--setups", "adaptiverec", "--seeds", "0", "--out-dir",
            str(tmp_path), "--jobs", "1", *train]
    assert reproduce.main(argv) == 1
    work = cache / "adaptive-cl" / "reproduce" / "tiny" / "adaptiverec-seed0"
    failed = json.loads((work / "failed.json").read_text())
    assert failed["returncode"] == 2 and any("--batch-size" in line for line in failed["log_tail"])
    assert not (tmp_path / "tiny" / "adaptiverec-seed0.json").exists()
    assert "adaptiverec-seed0: failed" in (tmp_path / "tiny" / "README.md").read_text()
    assert reproduce.main(argv) == 0
    assert "failed before" in capsys.readouterr().out
    assert reproduce.main([*argv[:-len(train)], "--retry-failed", *train]) == 1


def _record(method, seed, ndcg10, recall10, device="H200"):
    test = {f"{m}@{k}": 0.01 * k for m in ("NDCG", "Recall", "MRR") for k in (5, 10, 20)}
    test.update({"NDCG@10": ndcg10, "Recall@10": recall10})
    return {"method": method, "dataset": "Beauty", "preset": "default", "valid": {"NDCG@10": 0.1},
            "test": test, "epochs": 2, "train_seconds": 3.0,
            "history": [{"epoch": 1, "valid": {"NDCG@10": 0.1}, "seconds": 1.5},
                        {"epoch": 2, "valid": {"NDCG@10": 0.05}, "seconds": 1.5}],
            "config": {"seed": seed}, "device_name": device, "torch": "2.11",
            "segments": [{"wall_s": 10.0}]}


def test_aggregation_table_paired_differences_and_published_numbers(tmp_path):
    # AdaptiveRec pairs with DuoRec under its own release configuration (duorec-paper).
    ndcg = {("sasrec", 0): .030, ("sasrec", 1): .028, ("duorec-paper", 0): .040,
            ("duorec-paper", 1): .044, ("duorec-paper", 2): .042, ("adaptiverec", 0): .043,
            ("adaptiverec", 1): .047, ("adaptiverec", 3): .050, ("duorec", 0): .1}
    results = tmp_path / "beauty"
    results.mkdir()
    for (setup, seed), value in ndcg.items():
        record = _record(setup.split("-")[0], seed, value, 2 * value)
        (results / f"{setup}-seed{seed}.json").write_text(json.dumps({**record, "setup": setup}))
    (results / "notes.txt").write_text("not a result")
    path = aggregate.write_report(results, "beauty", command="reproduce.py --data Beauty.txt",
                                  unfinished=["sasrec-seed2: checkpoint at epoch 7"])
    readme = path.read_text()
    ada = [.043, .047, .050]
    row = next(line for line in readme.splitlines() if line.startswith("| adaptiverec | 0, 1, 3 |"))
    assert f"{statistics.fmean(ada):.4f} ± {statistics.stdev(ada):.4f}" in row
    diffs = [.043 - .040, .047 - .044]  # seeds 0 and 1 only: DuoRec has no seed 3
    assert f"{statistics.fmean(diffs):+.4f} ± {statistics.stdev(diffs):.4f} (n=2, vs duorec-paper)" in row
    duo = next(line for line in readme.splitlines() if line.startswith("| duorec | 0 |"))
    assert duo.endswith("| — | — |")  # no difference of DuoRec to itself
    base = next(line for line in readme.splitlines() if line.startswith("| duorec-paper | 0, 1, 2 |"))
    assert f"{.040 - .1:+.4f} (n=1, vs duorec)" in base
    # The paper's DuoRec row stands beside the duorec-paper setup.
    assert any(line.startswith("| duorec-paper | published [adaptiverec-paper]") and "0.0421" in line
               for line in readme.splitlines())
    # The paper's AdaptiveRec row beside ours, and by how much ours differs from it.
    paper = next(p for p in PUBLISHED["beauty"]
                 if p.method == "adaptiverec" and p.source == "adaptiverec-paper")
    gap = f"{statistics.fmean(ada) - paper.metrics['NDCG@10']:+.4f}"
    rows = [line for line in readme.splitlines() if line.startswith("| adaptiverec | ")]
    assert any("published [adaptiverec-paper]" in line and "0.0427" in line for line in rows)
    assert any("reproduced − published" in line and gap in line for line in rows)
    assert "sasrec-seed2: checkpoint at epoch 7" in readme
    assert (results / "results.png").stat().st_size > 0 and "(results.png)" in readme
    again = aggregate.write_report(results, "beauty", command="reproduce.py --data Beauty.txt",
                                   unfinished=["sasrec-seed2: checkpoint at epoch 7"])
    assert again.read_text() == readme  # derived from the files alone: rebuilding is idempotent


def test_every_published_entry_names_an_explained_source():
    from adaptive_cl.rec.published import SOURCES

    used = {p.source for entries in PUBLISHED.values() for p in entries}
    assert used <= set(SOURCES), used - set(SOURCES)
    assert len(SOURCES) <= 4  # the plot has four markers for published points


def test_a_result_that_does_not_match_its_name_is_an_error(tmp_path):
    (tmp_path / "sasrec-seed0.json").write_text(json.dumps(_record("duorec", 0, .1, .2)))
    with pytest.raises(ValueError, match="sasrec-seed0.json"):
        aggregate.load_results(tmp_path)
    (tmp_path / "sasrec-seed0.json").write_text("{not json")
    with pytest.raises(ValueError, match="sasrec-seed0.json"):
        aggregate.load_results(tmp_path)


def test_archive_splits_into_parts_that_join_back(tmp_path):
    results = tmp_path / "beauty"
    results.mkdir()
    (results / "big.bin").write_bytes(torch.randint(0, 256, (50_000,), dtype=torch.uint8)
                                      .numpy().tobytes())
    parts = reproduce.archive(results, tmp_path / "out", part_bytes=16_000)
    assert len(parts) > 1 and all(p.stat().st_size <= 16_000 for p in parts)
    joined = tmp_path / "joined.tar.gz"
    joined.write_bytes(b"".join(p.read_bytes() for p in sorted(parts)))
    with tarfile.open(joined) as tar:
        assert tar.extractfile("beauty/big.bin").read() == (results / "big.bin").read_bytes()


@pytest.mark.parametrize("argv, flag", [
    (["--jobs", "0"], "--jobs"),
    (["--budget-s", "-5"], "--budget-s"),
    (["--setups", "bert4rec"], "--setups"),
    (["--", "--preset", "paper"], "--preset"),
    (["--data", "/nonexistent.txt"], "--data"),
    (["--device", "gpu9"], "--device"),
    (["--", "--method", "sasrec"], "--method"),
    (["--", "--out=x"], "--out"),
])
def test_bad_arguments_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(argv)
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    # Once launched as 18 runs that each failed and were then skipped as "failed before".
    (["--", "--epochs", "0"], "argument --epochs"),
    (["--", "--rcl-alpha", "0.1"], "argument --rcl-alpha: only applies to --method rcl"),
    (["--format", "csv"], "argument --format"),
    (["--data", "{tmp}"], "is a directory"),
])
def test_training_arguments_are_checked_before_any_run(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    cut = argv.index("--") if "--" in argv else len(argv)
    argv[cut:cut] = ["--out-dir", str(tmp_path / "out"), "--dry-run"]
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_example_script_is_a_thin_wrapper(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "reproduce.py"), "--dry-run",
                           "--out-dir", str(tmp_path), "--setups", "sasrec", "--seeds", "4"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert ("pending       sasrec-seed4: python -m adaptive_cl.rec --method sasrec --preset "
            "release --seed 4") in done.stdout
    assert not list(tmp_path.iterdir())
