"""Data-parallel training (rec/ddp.py, ``--distributed``) against one process on the same
global batches: 2 gloo processes, uneven shares."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ddp_cases
from adaptive_cl.rec.train import CHECKPOINT, train
from helpers import write_sequence_file

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


def _strip(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def _close(a, b, users: int, path=""):
    """Recursive comparison of results dicts."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _close(a[key], b[key], users, f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, users, f"{path}[{i}]")
    elif isinstance(a, float) and ("valid" in path or "test" in path):
        # Ranking metrics: equal unless two items' scores fall within float32 rounding of each
        # other for some user; one user's rank moving changes a mean metric by <= 1/users.
        assert a == pytest.approx(b, abs=1.01 / users), (path, a, b)
    elif isinstance(a, float):
        # Losses and statistics: float32 sums in another order (shares across processes) over
        # ~30 Adam steps; measured ~2e-7 relative.
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (path, a, b)
    else:
        assert a == b, path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    data = ddp_cases.make_synthetic(num_users=150, num_items=40, mean_length=8.0)
    path = write_sequence_file(out / "seqs.txt", data)
    mp.spawn(ddp_cases.worker, args=(2, str(out / "store"), str(out), str(path)), nprocs=2, join=True)
    return out


@pytest.fixture
def one_thread():
    # Small models on a shared 2-core CPU run several times faster on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(ddp_cases.CONFIGS))
def test_two_processes_train_like_one(runs, name, one_thread):
    got = json.loads((runs / f"{name}.json").read_text())
    split = ddp_cases.small_split()
    expected = train(ddp_cases.config(**ddp_cases.CONFIGS[name]), split)
    assert got["config"].pop("processes") == 2
    got["history"], expected["history"] = _strip(got["history"]), _strip(expected["history"])
    expected["train_seconds"] = got["train_seconds"]
    _close(got, json.loads(json.dumps(expected)), split.num_eval_users)


def test_a_resumed_data_parallel_run_equals_the_uninterrupted_one(runs):
    full = json.loads((runs / "adaptiverec.json").read_text())
    resumed = json.loads((runs / "resumed.json").read_text())
    assert _strip(resumed["history"]) == _strip(full["history"])
    assert resumed["test"] == full["test"]
    a = torch.load(runs / "adaptiverec" / CHECKPOINT, weights_only=True)
    b = torch.load(runs / "cut" / CHECKPOINT, weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert len(b["rng_processes"]) == 2


def test_cli_distributed_writes_results_once(runs):
    results = json.loads((runs / "cli" / "results.json").read_text())
    assert results["config"]["processes"] == 2 and results["epochs"] == 1
    assert sorted(p.name for p in (runs / "cli").iterdir()) == [CHECKPOINT, "popularity.json",
                                                                "results.json", "run.json"]


def test_cli_distributed_needs_torchrun(capsys, monkeypatch):
    from adaptive_cl.rec import cli

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["--distributed", "--no-progress"]) == 2
    assert "torchrun" in capsys.readouterr().err


def test_methods_without_shares_are_refused():
    from adaptive_cl.rec.ddp import DataParallel
    from adaptive_cl.rec.train import TrainConfig

    for method in ("rcl", "mclrec"):
        with pytest.raises(ValueError, match=f"method '{method}' does not train data-parallel"):
            DataParallel.check_config(TrainConfig(method=method, simthres="none"))
    with pytest.raises(ValueError, match="loss_backend='compiled' has no distributed"):
        DataParallel.check_config(TrainConfig(loss_backend="compiled"))
    DataParallel.check_config(TrainConfig())
