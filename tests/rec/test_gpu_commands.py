"""The training pipeline's GPU commands, end to end on the CPU with tiny settings: they run,
record what they measured, judge nothing off a GPU, and refuse to pretend without CUDA."""

import json
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from adaptive_cl.rec.synthetic import make_synthetic
from helpers import write_sequence_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_train  # noqa: E402
import train_speed  # noqa: E402

sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = make_synthetic(num_users=200, num_items=40, mean_length=8.0)
    return write_sequence_file(tmp_path_factory.mktemp("data") / "tiny.txt", d)


def test_train_speed_on_cpu_records_and_judges_nothing(data, tmp_path):
    assert train_speed.main(["--device", "cpu", "--no-compile", "--data", str(data), "--methods",
                             "sasrec", "adaptiverec", "--epochs", "2", "--evals", "1",
                             "--max-len", "10", "--out", str(tmp_path)]) == 0
    [record_file] = tmp_path.glob("train-cpu-*.json")
    records = json.loads(record_file.read_text())["records"]
    assert [r["method"] for r in records] == ["sasrec", "adaptiverec"]
    for r in records:
        assert len(r["epoch_s"]) == 2 and len(r["eval_s"]) == 1 and r["steps_per_epoch"] >= 1
        assert r["device"] == "cpu" and r["torch"] == torch.__version__ and not r["compile"]
        assert r["epoch_median_s"] > 0 and r["host_syncs_in_step"] == "not checked (CPU)"
    table = record_file.with_suffix(".md").read_text()
    assert "adaptiverec epoch <= 2.0 s" in table and "pass" not in table and "n/a (CPU)" in table


def test_train_speed_cpu_steps_estimate_the_epoch(data, tmp_path):
    """--steps: K timed steps and one evaluation give an epoch estimate, with the thread count,
    the preset and the load recorded; the tag keeps before/after records apart."""
    assert train_speed.main(["--device", "cpu", "--data", str(data), "--methods", "duorec",
                             "--steps", "1", "--threads", "1", "--max-len", "10", "--tag",
                             "after 1t", "--results-dir", str(tmp_path)]) == 0
    [record_file] = tmp_path.glob("train-cpu-*-after-1t.json")
    [r] = json.loads(record_file.read_text())["records"]
    assert (r["method"], r["preset"], r["threads"], r["timed_steps"]) == ("duorec", "default", 1, 1)
    # The estimate is per-step wall time x steps + one evaluation; the record rounds each figure
    # (the estimate to 0.1 s, s/step to 1e-4 s, the evaluation to 1e-3 s).
    formula = r["wall_s_per_step"] * r["steps_per_epoch"] + r["eval_s"]
    assert abs(r["epoch_estimate_s"] - formula) <= 0.05 + 5e-5 * r["steps_per_epoch"] + 5e-4
    assert r["wall_s_per_step"] > 0
    assert r["cpu_s_per_step"] > 0 and "load_average_1min_before" in r
    assert "epoch estimate, 1 thread(s)" in record_file.with_suffix(".md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_nothing_is_measured(data, tmp_path, capsys):
    assert train_speed.main(["--data", str(data), "--out", str(tmp_path)]) == 2
    assert gpu_train.main(["--data", str(data), "--out", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir()) and "no CUDA" in capsys.readouterr().err


def test_gpu_train_end_to_end_on_cpu(data, tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    assert gpu_train.main([
        "--device", "cpu", "--data", str(data), "--out", str(out), "--total-s", "900",
        "--speed-args", "--no-compile --methods sasrec --epochs 1 --evals 1 --max-len 10",
        "--reproduce-args", f"--out-dir {results} --methods sasrec --seeds 0 --jobs 1 -- "
                            "--epochs 1 --max-len 10 --threads 1"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"gpu_train.log", "results-tiny.tar.gz", "reproduce-summary.md"} <= names
    assert any(n.startswith("train-cpu-") and n.endswith(".json") for n in names)
    with tarfile.open(out / "results-tiny.tar.gz") as tar:
        assert "tiny/sasrec-seed0.json" in tar.getnames()
    log = (out / "gpu_train.log").read_text()
    assert "speed: ok (CPU: nothing judged)" in log and "reproduce: ok" in log
