"""The training CLI: its entry points, its outputs, and every bad input ending in one line on
stderr and exit code 2 before any training."""

import importlib
import json
import os
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch

from adaptive_cl.rec import cli
from adaptive_cl.rec.synthetic import make_synthetic
from adaptive_cl.rec.train import CHECKPOINT, Trainer
from helpers import write_sequence_file

ROOT = Path(__file__).resolve().parents[2]
RESULT_KEYS = ["method", "dataset", "preset", "valid", "test", "epochs", "train_seconds",
               "history", "config"]
METRICS = {f"{m}@{k}" for m in ("NDCG", "Recall", "MRR") for k in (5, 10, 20)}
SMALL = ["--max-len", "10", "--batch-size", "128", "--no-progress"]


def write_sequences(path: Path, seed: int = 0, num_users: int = 200) -> Path:
    return write_sequence_file(path, make_synthetic(num_users=num_users, num_items=40, mean_length=8.0, seed=seed))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A data file and a finished one-epoch run on it (shared; copy before changing it)."""
    root = tmp_path_factory.mktemp("cli")
    data = write_sequences(root / "seqs.txt")
    out = root / "run"
    assert cli.main(["--data", str(data), "--epochs", "1", "--out", str(out), *SMALL]) == 0
    return data, out


@pytest.fixture
def no_training(monkeypatch):
    """Bad inputs must be refused before training starts."""
    def fit(self):
        raise AssertionError("training started")

    monkeypatch.setattr(Trainer, "fit", fit)


def refused(argv, capsys, *fragments) -> str:
    """Run the CLI expecting exit code 2 and one line on stderr holding every fragment."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("adaptive-cl-train: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


# ------------------------------------------------------------------------------ entry points

def test_entry_points(monkeypatch, capsys):
    # The console script names the package's main; ``python -m adaptive_cl.rec`` and the
    # example run it too (in this process: a subprocess would import torch again).
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(ROOT / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    module, _, name = scripts["adaptive-cl-train"].partition(":")
    assert getattr(importlib.import_module(module), name) is cli.main
    for run, target, prog in ((runpy.run_module, "adaptive_cl.rec", "python -m adaptive_cl.rec"),
                              (runpy.run_path, str(ROOT / "examples" / "train_sasrec.py"),
                               "train_sasrec.py")):
        monkeypatch.setattr(sys, "argv", [target, "--help"])
        with pytest.raises(SystemExit) as done:
            run(target, run_name="__main__")
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: {prog}") and "--overwrite" in out
        monkeypatch.setattr(sys, "argv", [target, "--batch-size", "0"])
        with pytest.raises(SystemExit) as done:
            run(target, run_name="__main__")
        assert done.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"{prog}: error: argument --batch-size")


def test_default_threads():
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert cli.default_threads() == max(1, min(cpus // 2, cli.MAX_DEFAULT_THREADS))


# ------------------------------------------------------------------------------ a good run

def test_writes_results_and_plots(tmp_path, capsys):
    path = write_sequences(tmp_path / "seqs.txt")
    out = tmp_path / "run"
    assert cli.main(["--data", str(path), "--epochs", "1", "--out", str(out), "--plots",
                     "--method", "adaptiverec", "--threads", "1", *SMALL]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == RESULT_KEYS
    assert results["dataset"] == "seqs" and results["preset"] == "default"
    assert set(results["test"]) == METRICS and set(results["valid"]) == METRICS
    assert results["epochs"] == 1 and len(results["history"]) == 1
    assert results["config"]["batch_size"] == 128
    assert set(json.loads((out / "popularity.json").read_text())) == {"valid", "test"}
    assert sorted(p.name for p in out.iterdir()) == sorted(cli.RUN_FILES)  # no temporaries
    info = json.loads((out / "run.json").read_text())  # what ran where
    assert (info["device"], info["torch"], info["peak_memory_mib"]) == ("cpu", torch.__version__,
                                                                        None)
    assert info["argv"][:2] == ["--data", str(path)] and info["wall_s"] > 0
    for name in cli.FIGURES:
        assert (out / name).stat().st_size > 0
    printed = capsys.readouterr().out
    assert "popularity" in printed and "NDCG@10" in printed and "1 CPU threads" in printed
    # A finished run continues with more epochs, from its checkpoint.
    assert cli.main(["--data", str(path), "--epochs", "2", "--out", str(out), "--resume",
                     "--plots", *SMALL]) == 0
    assert len(json.loads((out / "results.json").read_text())["history"]) == 2


def test_overwrite_replaces_a_finished_run(finished, tmp_path, capsys):
    data, run = finished
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "simthres.png").write_bytes(b"an old figure")
    refused(["--data", str(data), "--epochs", "1", "--out", str(out), *SMALL], capsys,
            "argument --out", "finished run", "--overwrite")
    assert cli.main(["--data", str(data), "--epochs", "1", "--out", str(out), "--overwrite",
                     "--method", "sasrec", *SMALL]) == 0
    assert json.loads((out / "results.json").read_text())["method"] == "sasrec"
    assert not (out / "simthres.png").exists()  # nothing of the old run is left


# ------------------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize("argv, flag", [
    (["--method", "bert4rec"], "--method"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "fast"], "--lr"),
    (["--simthres", "learnable", "--method", "sasrec"], "--simthres"),
    (["--contrast", "xx"], "--contrast"),
    (["--resume"], "--resume"),
    (["--device", "gpu9"], "--device"),
    (["--preset", "huge"], "--preset"),
    (["--data", "/nonexistent/file.txt"], "--data"),
    (["--threads", "0"], "--threads"),
    (["--plots"], "--plots"),
    (["--out", "x", "--resume", "--overwrite"], "--overwrite"),
    (["--format", "pairs"], "--format"),
    (["--seed", "-1"], "--seed"),
    (["--lr", "inf"], "--lr"),
    (["--preset", "paper", "--batch-size", "100000"], "--batch-size"),
])
def test_bad_flags(argv, flag, capsys, no_training):
    refused(argv, capsys, f"argument {flag}")


def test_plots_need_matplotlib(tmp_path, capsys, no_training, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    refused(["--out", str(tmp_path), "--plots"], capsys, "--plots", "matplotlib")


def test_bad_data(tmp_path, capsys, no_training):
    refused(["--data", str(tmp_path)], capsys, "argument --data", "is a directory")
    path = tmp_path / "seqs.txt"
    path.write_text("1 2 3 4 5\n2 3 4\n3 4 5 6\n4 2 3 5 6\n5 3 4\n6 2 x 4\n7 3 4 5\n")
    # Detected as sequences, then one bad token: the line, the token and the flag.
    refused(["--data", str(path)], capsys, str(path), "line 6", "'x'", "--format")
    refused(["--data", str(path), "--format", "sequences"], capsys, "line 6", "--format sequences")
    # Empty (or blank) before any format is known: once an UnboundLocalError traceback.
    for text in ("", "\n  \n"):
        path.write_text(text)
        refused(["--data", str(path)], capsys, "argument --data", str(path), "empty")
    path.write_text("1 2 3 4\n2 5 6 7\n")  # well-formed, but far too sparse
    refused(["--data", str(path), "--format", "sequences"], capsys, "argument --data",
            "5-core filter", "removed all 6 interactions")


def test_bad_out(tmp_path, capsys, no_training):
    file = tmp_path / "file"
    file.write_text("")
    refused(["--out", str(file)], capsys, "argument --out", "not a directory")
    refused(["--out", str(file / "run")], capsys, "argument --out", "cannot write")
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        refused(["--out", str(locked / "run")], capsys, "argument --out", "cannot write")


def test_an_interrupted_run_is_not_restarted_silently(finished, tmp_path, capsys, no_training):
    data, run = finished
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(run / CHECKPOINT, out / CHECKPOINT)
    refused(["--data", str(data), "--out", str(out), *SMALL], capsys, "interrupted run",
            "--resume")


def _checkpoint_variants(run: Path, tmp_path: Path):
    good = (run / CHECKPOINT).read_bytes()
    yield "empty", lambda p: p.write_bytes(b""), "cannot read"
    yield "truncated", lambda p: p.write_bytes(good[: len(good) // 2]), "cannot read"
    yield "text", lambda p: p.write_text("not a checkpoint\n"), "cannot read"
    yield "foreign", lambda p: torch.save({"weights": torch.zeros(2)}, p), "not a checkpoint"
    yield "directory", lambda p: p.mkdir(), "is a directory"


def test_bad_checkpoints(finished, tmp_path, capsys, no_training):
    data, run = finished
    argv = ["--data", str(data), "--epochs", "2", *SMALL, "--resume"]
    refused([*argv, "--out", str(tmp_path / "none")], capsys, "--resume", "no checkpoint")
    assert not (tmp_path / "none").exists()  # nothing created for a refused run
    (tmp_path / "no-checkpoint").mkdir()
    refused([*argv, "--out", str(tmp_path / "no-checkpoint")], capsys, "--resume",
            "no checkpoint")
    for name, spoil, fragment in _checkpoint_variants(run, tmp_path):
        out = tmp_path / name
        out.mkdir()
        spoil(out / CHECKPOINT)
        refused([*argv, "--out", str(out)], capsys, "argument --resume", fragment)


def test_resume_checks_config_and_data(finished, tmp_path, capsys, no_training):
    data, run = finished
    out = tmp_path / "run"
    shutil.copytree(run, out)
    argv = ["--epochs", "2", "--out", str(out), "--resume", *SMALL]
    # Another setting that changes results.
    refused(["--data", str(data), *argv, "--method", "sasrec"], capsys, "--resume",
            "method='adaptiverec'")
    # Other data of another size (once a size-mismatch traceback).
    other = write_sequences(tmp_path / "other.txt", seed=1, num_users=150)
    refused(["--data", str(other), *argv], capsys, "--resume", "other data")
    # Other data of the same shape (once trained on silently): same users and items, with two
    # items swapped in every sequence.
    same_shape = tmp_path / "same_shape.txt"
    lines = []
    for line in data.read_text().splitlines():
        user, *items = line.split()
        items[0], items[-1] = items[-1], items[0]
        lines.append(" ".join([user, *items]))
    same_shape.write_text("\n".join(lines) + "\n")
    refused(["--data", str(same_shape), *argv], capsys, "--resume", "other data")


def test_every_setting_is_one_flag_generated_from_the_config():
    """Each TrainConfig field is reachable from the command line: generated from its one
    declaration (help, choices, checks) or set by a hand-written run flag (EXCLUDED); with no
    flag given, every generated setting keeps the config's default."""
    import contextlib
    import dataclasses
    import io

    from adaptive_cl.rec.train import TrainConfig

    parser_flags = set()
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    help_text = buffer.getvalue()
    for f in dataclasses.fields(TrainConfig):
        flag = cli.EXCLUDED.get(f.name, cli.flag_of(f.name))
        assert flag in help_text, f.name
        parser_flags.add(flag)
        if f.name not in cli.EXCLUDED:
            assert f.metadata["help"].split()[0] in help_text  # its own help, once
            assert help_text.count(f"{flag} ") + help_text.count(f"{flag}\n") >= 1
    assert len(parser_flags) == len(dataclasses.fields(TrainConfig))
    config = cli.build_config(cli.parse_args([]))
    default = TrainConfig()
    special = {"epochs", "max_len"}  # the CLI's synthetic-data schedule (documented in --help)
    for f in cli.generated_fields():
        if f.name not in special:
            assert getattr(config, f.name) == getattr(default, f.name), f.name
    assert (config.epochs, config.max_len) == (cli.SYNTHETIC_EPOCHS, cli.SYNTHETIC_MAX_LEN)


@pytest.mark.parametrize("argv, message", [
    (["--lr", "0"], "argument --lr: must be finite and > 0"),
    (["--crop", "1.5"], "argument --crop: must be in [0, 1]"),
    (["--layers", "x"], "argument --layers: 'x' is not a valid int"),
    (["--threshold", "medium"], "argument --threshold: invalid choice"),
    (["--method", "sasrec", "--rcl-alpha", "0.1"], "argument --rcl-alpha: only applies to --method rcl"),
    (["--method", "sasrec", "--kstat-bins", "100"], "kstat_bins must be a power of two"),
])
def test_generated_flags_check_their_values(argv, message, capsys, no_training):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
