"""Reproduce a results table within time budgets: a plan of (dataset, method, seed) training runs,
run a few at a time, resumed across invocations, then aggregated (see :mod:`.aggregate`).

    python examples/reproduce.py --data Beauty.txt --budget-s 480 --archive "$OUT"
    python -m adaptive_cl.rec.reproduce ...                      # the same after pip install

A run is a *setup* (a method under a named configuration, :data:`SETUPS`: each method as its
authors released it, plus DuoRec under AdaptiveRec's release configuration, the baseline of
AdaptiveRec's paired claim) and a seed. Under ``--out-dir`` (default ``examples/results``), with
``<dataset>`` the data file's stem in lower case (``synthetic`` without ``--data``):

- ``<dataset>/<setup>-seed<k>.json``: a finished run: the CLI's ``results.json`` plus the setup,
  device, torch and triton versions, the command, the wall time of every epoch and the sessions
  it took;
- ``<dataset>/README.md`` and ``results.png``: the table over every finished run, and its plot.

Unfinished runs live in the work directory, outside the repository (``--work-dir``, default
``$XDG_CACHE_HOME/adaptive-cl/reproduce/<dataset>``, i.e. ``~/.cache/...``):
``<setup>-seed<k>/`` holds its ``checkpoint.pt`` (written atomically after every epoch, about
14 MB on Beauty; 6.4 GB for AdaptiveRec's flattened threshold network and its Adam moments) and
``train.log``. Nothing large is ever written beside the results; losing the work directory costs
the unfinished runs only.

Each run is ``python -m adaptive_cl.rec --data ... --method M --preset P --seed K --out
<work>/<name>``, in its own process, ``--jobs`` at a time. Runs whose result file exists are
skipped. When the budget is spent (or the invocation is interrupted) the runs still going are
stopped (SIGINT, so a checkpoint being written stays whole) and the next invocation resumes them
with ``--resume``: on the CPU bit-identically to an uninterrupted run. A run is started only
while its first epoch can still end before the deadline (estimated from earlier runs of the
setup on the same device, else ``--min-start-s``). A run that has not finished never has a file
beside the results.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import aggregate, cli
from .data import FORMATS
from .environment import describe
from .atomic import atomic_write_text
from .train import CHECKPOINT, CheckpointError, read_checkpoint

#: setup name -> (method, preset) (train.TrainConfig.preset_fields says what a preset sets).
SETUPS = {
    "sasrec": ("sasrec", "release"),
    "duorec": ("duorec", "release"),
    "duorec-paper": ("duorec", "paper"),  # the DuoRec row of AdaptiveRec's Table 1
    "adaptiverec": ("adaptiverec", "paper"),
    "cl4srec": ("cl4srec", "release"),
    "rcl": ("rcl", "release"),
    "mclrec": ("mclrec", "release"),
}
#: Seed 0 of these first, then the paired claim's other seeds (PAIRED_FIRST), then the rest.
PRIORITY = aggregate.ORDER
PAIRED_FIRST = ("duorec-paper", "adaptiverec")
SEEDS = (0, 1, 2)
LOG, SEGMENTS, FAILED = "train.log", "segments.json", "failed.json"
#: Flags the plan sets for every run; passing them in the training arguments is an error.
PLAN_FLAGS = ("--data", "--format", "--method", "--preset", "--seed", "--out", "--resume",
              "--device", "--no-progress")
#: Without measurements: a GPU run's allowance for the CUDA context and allocator slack, and its
#: memory when no earlier run on the device recorded a peak. Only used to cap --jobs auto.
CONTEXT_MIB, DEFAULT_RUN_MIB = 1024, 4096
#: --jobs auto never exceeds this: without MPS the GPU time-slices between processes, so runs
#: beyond the few that fill its idle gaps only stretch each other.
MAX_AUTO_JOBS = 4
ARCHIVE_PART_BYTES = 15 * 2**20  # the device tool returns files of at most 16 MiB


@dataclass(frozen=True)
class Run:
    dataset: str
    setup: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.setup}-seed{self.seed}"

    @property
    def method(self) -> str:
        return SETUPS[self.setup][0]

    @property
    def preset(self) -> str:
        return SETUPS[self.setup][1]


def dataset_name(data: Path | None) -> str:
    return "synthetic" if data is None else data.stem.lower()


def default_work_root(dataset: str) -> Path:
    """Where unfinished runs live unless ``--work-dir`` says: the user's cache, outside any
    repository."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "adaptive-cl" / "reproduce" / dataset


def default_setups() -> list[str]:
    """Every setup, the issue's table first."""
    return [m for m in PRIORITY if m in SETUPS] + [m for m in SETUPS if m not in PRIORITY]


def make_plan(dataset: str, setups: Sequence[str] | None = None,
              seeds: Sequence[int] = SEEDS) -> list[Run]:
    """The runs in the order they start: seed 0 of the issue's setups; the other seeds of the
    paired claim (AdaptiveRec and its DuoRec baseline); the issue's other setups' other seeds;
    then the remaining setups seed by seed."""
    setups = default_setups() if setups is None else list(setups)
    bad = [m for m in setups if m not in SETUPS]
    if bad or not setups or len(set(setups)) != len(setups):
        raise ValueError(f"setups must be distinct names among {tuple(SETUPS)}, got {setups}")
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be distinct integers >= 0, got {seeds}")
    first = [m for m in PRIORITY if m in setups]
    paired = [m for m in PAIRED_FIRST if m in first]
    rest = [m for m in setups if m not in PRIORITY]
    order = [(m, seeds[0]) for m in first]
    order += [(m, s) for s in seeds[1:] for m in paired]
    order += [(m, s) for s in seeds[1:] for m in first if m not in paired]
    order += [(m, s) for s in seeds for m in rest]
    return [Run(dataset, m, s) for m, s in order]


@dataclass
class Layout:
    """Where a dataset's results and unfinished runs live."""

    out_dir: Path
    dataset: str
    work_root: Path | None = None

    def __post_init__(self) -> None:
        self.results = Path(self.out_dir) / self.dataset
        self.work = Path(self.work_root) if self.work_root else default_work_root(self.dataset)

    def result(self, run: Run) -> Path:
        return self.results / f"{run.name}.json"

    def work_dir(self, run: Run) -> Path:
        return self.work / run.name


def checkpoint_epoch(work: Path) -> int | None:
    """Epochs done by the checkpoint in ``work``, None without a readable one (the run's next
    attempt then says why, in its log)."""
    path = work / CHECKPOINT
    if not path.exists():
        return None
    try:
        return int(read_checkpoint(path)["epoch"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------ estimates


@dataclass(frozen=True)
class Estimate:
    """Seconds per epoch, and per process outside the epochs (start, data, compile, test)."""

    epoch_s: float
    overhead_s: float


def estimates(records: dict[tuple[str, int], dict], device_name: str) -> dict[str, Estimate]:
    """Per setup, medians over its finished runs on ``device_name``."""
    per_method: dict[str, tuple[list[float], list[float]]] = {}
    for (method, _), r in records.items():
        if r.get("device_name") != device_name or not r.get("segments"):
            continue
        seconds = [row["seconds"] for row in r.get("history", []) if "seconds" in row]
        if not seconds:
            continue
        epochs, overheads = per_method.setdefault(method, ([], []))
        epochs.extend(seconds)
        wall = sum(s["wall_s"] for s in r["segments"])
        overheads.append(max(wall - sum(seconds), 0.0) / len(r["segments"]))
    return {m: Estimate(statistics.median(e), statistics.median(o))
            for m, (e, o) in per_method.items()}


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may run on (containers)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def auto_jobs(device: torch.device, records: dict[tuple[str, int], dict],
              device_name: str) -> tuple[int, str]:
    """How many runs share the device, and why."""
    if device.type != "cuda":
        return 1, "one run at a time off CUDA (each run's threads use every core)"
    free, _ = torch.cuda.mem_get_info(device)
    peaks = [r["peak_memory_mib"] for r in records.values()
             if r.get("device_name") == device_name and r.get("peak_memory_mib")]
    per_run = (max(peaks) if peaks else DEFAULT_RUN_MIB) + CONTEXT_MIB
    by_memory = int(0.8 * free / 2**20 // per_run)
    by_cpu = max(_usable_cpus() // 2, 1)
    jobs = max(1, min(MAX_AUTO_JOBS, by_memory, by_cpu))
    source = "the largest recorded peak" if peaks else "an unmeasured allowance"
    return jobs, (f"{jobs} at once: memory room for {by_memory} ({per_run:.0f} MiB a run from "
                  f"{source}), {by_cpu} by CPU cores, at most {MAX_AUTO_JOBS}")


# -------------------------------------------------------------------------------- running


@dataclass
class Outcome:
    run: Run
    status: str  # finished | stopped | failed | not started | done before | failed before
    detail: str = ""


@dataclass
class _Child:
    run: Run
    proc: subprocess.Popen
    command: list[str]
    resumed: bool
    started: float  # time.monotonic(); the budget's clock may be another one (tests)
    log: object
    stopping: bool = False


@dataclass
class Runner:
    """Runs a plan's pending runs (see the module docstring)."""

    layout: Layout
    data: Path | None
    data_format: str = "auto"
    device: str = "cpu"
    jobs: int = 1
    train_args: Sequence[str] = ()
    budget_s: float | None = None
    reserve_s: float = 30.0
    min_start_s: float = 60.0
    stop_grace_s: float = 20.0
    retry_failed: bool = False
    estimates: dict[str, Estimate] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic
    poll_s: float = 0.5
    say: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.env = describe(self.device)
        self._start = self.clock()
        self.deadline = (None if self.budget_s is None
                         else self._start + self.budget_s - self.reserve_s)

    # --- commands

    def train_argv(self, run: Run, resume: bool) -> list[str]:
        """The CLI's arguments for ``run`` (without the interpreter)."""
        argv = []
        if self.data is not None:
            argv += ["--data", str(self.data)]
            if self.data_format != "auto":
                argv += ["--format", self.data_format]
        argv += ["--method", run.method, "--preset", run.preset, "--seed", str(run.seed),
                 "--device", self.device,
                 "--out", str(self.layout.work_dir(run)), "--no-progress"]
        if "--threads" not in self.train_args:  # the runs share the CPUs
            argv += ["--threads", str(max(_usable_cpus() // self.jobs, 1))]
        return argv + list(self.train_args) + (["--resume"] if resume else [])

    def command(self, run: Run) -> str:
        """How to rerun ``run`` by hand (the first session's command)."""
        return shlex.join(["python", "-m", "adaptive_cl.rec", *self.train_argv(run, False)])

    # --- state of a run

    def status(self, run: Run) -> str:
        if self.layout.result(run).exists():
            return "done before"
        work = self.layout.work_dir(run)
        if (work / FAILED).exists() and not self.retry_failed:
            return "failed before"
        return "pending"

    def remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - self.clock()

    def fits(self, run: Run) -> tuple[bool, str]:
        """Can ``run`` still finish its next epoch before the deadline?"""
        left = self.remaining()
        estimate = self.estimates.get(run.setup)
        need = self.min_start_s if estimate is None else estimate.overhead_s + estimate.epoch_s
        what = ("no estimate" if estimate is None else
                f"{estimate.overhead_s:.0f} s to start + {estimate.epoch_s:.1f} s an epoch")
        if left >= need:
            return True, ""
        return False, f"{left:.0f} s left, a first epoch needs {need:.0f} s ({what})"

    # --- processes

    def _launch(self, run: Run) -> _Child:
        work = self.layout.work_dir(run)
        work.mkdir(parents=True, exist_ok=True)
        (work / FAILED).unlink(missing_ok=True)
        resume = (work / CHECKPOINT).exists()
        argv = [sys.executable, "-m", "adaptive_cl.rec", *self.train_argv(run, resume)]
        log = open(work / LOG, "ab")
        log.write(f"\n$ {shlex.join(argv)}\n".encode())
        log.flush()
        # The child imports this very package, wherever it was imported from.
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # its own group: stopped on its own
        self.say(f"start  {run.name}" + (" (resume)" if resume else ""))
        return _Child(run, proc, argv, resume, time.monotonic(), log)

    def _stop(self, children: list[_Child]) -> None:
        """SIGINT (KeyboardInterrupt: a checkpoint being written is discarded whole), then
        SIGKILL after the grace period; each signal goes to the child's own process group."""
        for child in children:
            if child.proc.poll() is None:
                child.stopping = True
                os.killpg(child.proc.pid, signal.SIGINT)
        end = time.monotonic() + self.stop_grace_s
        for child in children:
            try:
                child.proc.wait(timeout=max(end - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait()

    def _record_segment(self, child: _Child, outcome: str) -> list[dict]:
        work = self.layout.work_dir(child.run)
        path = work / SEGMENTS
        segments = json.loads(path.read_text()) if path.exists() else []
        segments.append({"device_name": self.env["device_name"], "torch": self.env["torch"],
                         "triton": self.env["triton"], "jobs": self.jobs, "resumed": child.resumed,
                         "wall_s": round(time.monotonic() - child.started, 3),
                         "outcome": outcome})
        atomic_write_text(path, json.dumps(segments, indent=1))
        return segments

    def _finish(self, child: _Child) -> Outcome:
        run, work = child.run, self.layout.work_dir(child.run)
        child.log.close()
        rc = child.proc.returncode
        # The CLI writes results.json last and atomically: once it exists the run is complete,
        # even when a stop signal caught the process on its way out.
        if (work / "results.json").exists():
            segments = self._record_segment(child, "finished")
            self._publish(run, work, segments)
            return Outcome(run, "finished", f"{sum(s['wall_s'] for s in segments):.0f} s")
        if child.stopping:
            self._record_segment(child, "stopped")
            for tmp in work.glob(".*.tmp"):  # a SIGKILL can leave one behind
                tmp.unlink()
            epoch = checkpoint_epoch(work)
            if epoch is None:  # nothing to resume: leave nothing behind
                shutil.rmtree(work)
                return Outcome(run, "stopped", "before its first epoch ended")
            return Outcome(run, "stopped", f"checkpoint at epoch {epoch}")
        self._record_segment(child, "failed")
        tail = (work / LOG).read_text(errors="replace").strip().splitlines()[-15:]
        atomic_write_text(work / FAILED, json.dumps({"returncode": rc, "log_tail": tail}, indent=1))
        return Outcome(run, "failed", f"exit {rc}: {tail[-1] if tail else ''}")

    def _publish(self, run: Run, work: Path, segments: list[dict]) -> None:
        results = json.loads((work / "results.json").read_text())
        info = json.loads((work / "run.json").read_text()) if (work / "run.json").exists() else {}
        record = {
            **results,
            "setup": run.setup,
            "device_name": info.get("device_name", self.env["device_name"]),
            "torch": info.get("torch", self.env["torch"]),
            "triton": info.get("triton", self.env["triton"]),
            "command": self.command(run),
            "epoch_seconds": [row.get("seconds") for row in results["history"]],
            "wall_s": round(sum(s["wall_s"] for s in segments), 3),
            "peak_memory_mib": info.get("peak_memory_mib"),
            "segments": segments,
        }
        self.layout.results.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.layout.result(run), json.dumps(record, indent=1))
        shutil.rmtree(work)  # after the result is in place: a crash between leaves both

    def run(self, plan: Sequence[Run]) -> list[Outcome]:
        """Run what is pending in ``plan``; returns one outcome per run of the plan."""
        outcomes: dict[Run, Outcome] = {}
        pending = []
        for run in plan:
            state = self.status(run)
            if state == "pending":
                pending.append(run)
            else:
                outcomes[run] = Outcome(run, state)
                if state == "done before":  # finished, but a crash kept its work dir
                    shutil.rmtree(self.layout.work_dir(run), ignore_errors=True)
        running: list[_Child] = []
        self.interrupted = False
        try:
            while pending or running:
                for child in [c for c in running if c.proc.poll() is not None]:
                    running.remove(child)
                    outcomes[child.run] = self._report(self._finish(child))
                if self.remaining() <= 0:
                    self.say(f"budget spent: stopping {len(running)} run(s)")
                    self._stop(running)
                    for child in running:
                        outcomes[child.run] = self._report(self._finish(child))
                    running = []
                    break
                while pending and len(running) < self.jobs:
                    run = pending.pop(0)
                    ok, why = self.fits(run)
                    if ok:
                        running.append(self._launch(run))
                    else:
                        outcomes[run] = self._report(Outcome(run, "not started", why))
                if running:
                    time.sleep(self.poll_s)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see main): stop, keep what is done
            self.interrupted = True
            self.say(f"interrupted: stopping {len(running)} run(s)")
        finally:  # also on an exception: stop what runs, keep their checkpoints
            if running:
                self._stop(running)
                for child in running:
                    if child.run not in outcomes:
                        outcomes[child.run] = self._report(self._finish(child))
        if self.layout.work.is_dir() and not any(self.layout.work.iterdir()):
            self.layout.work.rmdir()  # nothing unfinished: no empty folder to commit
        for run in pending:
            outcomes.setdefault(run, Outcome(
                run, "not started", "interrupted" if self.interrupted else "budget spent"))
        return [outcomes[run] for run in plan]

    def _report(self, outcome: Outcome) -> Outcome:
        self.say(f"{outcome.status:<12} {outcome.run.name}"
                 + (f": {outcome.detail}" if outcome.detail else ""))
        return outcome


# ------------------------------------------------------------------------------- archive


def archive(results_dir: Path, dest: Path, part_bytes: int = ARCHIVE_PART_BYTES) -> list[Path]:
    """``results_dir`` as ``dest/results-<name>.tar.gz``, split into ``.partNN`` files of at most
    ``part_bytes`` when larger (the device tool returns files of at most 16 MiB). Unpack with
    ``cat results-<name>.tar.gz* | tar -xz -C <out-dir>``."""
    dest.mkdir(parents=True, exist_ok=True)
    whole = dest / f"results-{results_dir.name}.tar.gz"
    for old in dest.glob(whole.name + "*"):
        old.unlink()
    with tarfile.open(whole, "w:gz") as tar:
        tar.add(results_dir, arcname=results_dir.name)
    if whole.stat().st_size <= part_bytes:
        return [whole]
    parts = []
    with open(whole, "rb") as f:
        while chunk := f.read(part_bytes):
            parts.append(dest / f"{whole.name}.part{len(parts):02d}")
            parts[-1].write_bytes(chunk)
    whole.unlink()
    return parts


def unfinished_notes(layout: Layout, plan: Sequence[Run], outcomes: Sequence[Outcome]) -> list[str]:
    """One line per planned run without a result."""
    why = {o.run: o for o in outcomes}
    notes = []
    for run in plan:
        if layout.result(run).exists():
            continue
        work = layout.work_dir(run)
        epoch = checkpoint_epoch(work) if work.exists() else None
        state = (f"failed (see {work / FAILED})") if (work / FAILED).exists() \
            else (f"checkpoint at epoch {epoch}" if epoch is not None else "not started")
        outcome = why.get(run)
        detail = f"; last invocation: {outcome.status}" if outcome else ""
        if outcome and outcome.detail and outcome.status == "not started":
            detail += f" ({outcome.detail})"
        notes.append(f"{run.name}: {state}{detail}")
    return notes


# ---------------------------------------------------------------------------------- CLI

PROG = "reproduce.py"


def _jobs(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1, got {text!r}")
    return value


_seconds = cli.positive(float)


def parse_args(argv: Sequence[str] | None, prog: str) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                epilog="Arguments after -- go to every training run "
                                       "(e.g. -- --epochs 1 --max-len 10).")
    p.add_argument("--data", type=Path, help="interaction file (default: the synthetic data)")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS),
                   help="its format (see adaptive-cl-train --help)")
    p.add_argument("--setups", "--methods", dest="setups", nargs="+", default=None,
                   metavar="SETUP",
                   help="runs to plan, each a method under a named configuration: "
                        + ", ".join(f"{name} ({m}, {preset} preset)"
                                    for name, (m, preset) in SETUPS.items())
                        + "; default: all")
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), metavar="SEED")
    p.add_argument("--out-dir", type=Path, default=Path("examples/results"))
    p.add_argument("--work-dir", type=Path,
                   help="unfinished runs (default: ~/.cache/adaptive-cl/reproduce/<dataset>, "
                        "or under $XDG_CACHE_HOME)")
    p.add_argument("--budget-s", type=_seconds, help="wall-clock limit of this invocation")
    p.add_argument("--reserve-s", type=_seconds, default=30.0,
                   help="kept back from the budget to stop runs, tabulate, archive (30)")
    p.add_argument("--min-start-s", type=_seconds, default=60.0,
                   help="least time left to start a run without an estimate (60)")
    p.add_argument("--jobs", type=_jobs, default="auto", help="runs at once (default: auto)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--archive", type=Path, metavar="DIR",
                   help="also pack the dataset's results folder into DIR (e.g. $OUT)")
    p.add_argument("--retry-failed", action="store_true", help="rerun runs that failed before")
    p.add_argument("--dry-run", action="store_true", help="print the plan and what would run")
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild the table")
    args = p.parse_args(argv)
    if args.data is not None and args.data.is_dir():
        p.error(f"argument --data: {args.data} is a directory; expected an interaction file")
    if args.data is not None and not args.data.is_file():
        p.error(f"argument --data: no such file: {args.data}")
    clash = [a for a in train_args if a.split("=", 1)[0] in PLAN_FLAGS]
    if clash:
        p.error(f"arguments after --: the plan sets {', '.join(clash)} itself")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"argument --device: {args.device!r} is not a torch device")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: CUDA is not available on this machine")
    try:
        args.plan = make_plan(dataset_name(args.data), args.setups, args.seeds)
    except ValueError as err:
        p.error(f"argument --setups/--seeds: {err}")
    _check_training_arguments(p, args, train_args)
    return args, train_args


def _check_training_arguments(p: argparse.ArgumentParser, args: argparse.Namespace,
                              train_args: list[str]) -> None:
    """Parse every method's training command as its runs will, before any run starts: a bad
    argument after ``--`` is one error now, not a failed (and then skipped) run per plan entry."""
    for setup in dict.fromkeys(run.setup for run in args.plan):
        method, preset = SETUPS[setup]
        argv = ["--method", method, "--preset", preset, "--seed", str(args.plan[0].seed),
                "--device", args.device, "--out", "unused", "--no-progress", *train_args]
        if args.data is not None:
            argv += ["--data", str(args.data)] + ([] if args.format == "auto"
                                                  else ["--format", args.format])
        try:
            cli.build_config(cli.parse_args(argv))
        except cli.CLIError as err:
            p.error(f"arguments after -- (for setup {setup}; --setups narrows the plan): "
                    f"{err}")


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """Exit status: 0 when no run failed (finished, stopped or not started for lack of time);
    1 when one failed; 2 on bad arguments; 130 when interrupted (SIGINT/SIGTERM: the runs are
    stopped with their checkpoints, and the table and archive are still written)."""
    args, train_args = parse_args(argv, prog)
    dataset = dataset_name(args.data)
    layout = Layout(args.out_dir, dataset, args.work_dir)
    plan = args.plan
    records = aggregate.load_results(layout.results)
    device = torch.device(args.device)
    env = describe(device)
    jobs, why = (auto_jobs(device, records, env["device_name"]) if args.jobs == "auto"
                 else (args.jobs, "as asked"))
    runner = Runner(layout, args.data, args.format, args.device, jobs, train_args, args.budget_s,
                    args.reserve_s, args.min_start_s,
                    estimates=estimates(records, env["device_name"]),
                    retry_failed=args.retry_failed)
    print(f"{dataset}: {len(plan)} runs planned on {env['device_name']}; jobs: {why}", flush=True)
    outcomes: list[Outcome] = []
    if args.dry_run:
        for run in plan:
            print(f"  {runner.status(run):<13} {run.name}: {runner.command(run)}")
        return 0
    interrupted = False
    if not args.aggregate_only:
        previous = signal.signal(signal.SIGTERM, _interrupt)  # a polite kill stops runs cleanly
        try:
            outcomes = runner.run(plan)
        finally:
            signal.signal(signal.SIGTERM, previous)
        interrupted = runner.interrupted
    command = " ".join([prog, shlex.join(sys.argv[1:] if argv is None else argv)])
    report = aggregate.write_report(layout.results, dataset, command=command,
                                    unfinished=unfinished_notes(layout, plan, outcomes))
    print(f"wrote {report}")
    counts = {s: sum(o.status == s for o in outcomes) for s in
              ("finished", "stopped", "failed", "not started", "done before", "failed before")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    print(f"{dataset}: {summary or 'nothing run'}")
    if args.archive is not None:
        for path in archive(layout.results, args.archive):
            print(f"archived {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        lines = [f"# reproduce on {env['device_name']}", "", f"    {command}", "",
                 f"jobs: {why}", "", "| run | outcome | detail |", "|---|---|---|"]
        lines += [f"| {o.run.name} | {o.status} | {o.detail} |" for o in outcomes]
        atomic_write_text(args.archive / "reproduce-summary.md", "\n".join(lines) + "\n")
    if interrupted:
        return 130
    return 1 if counts["failed"] else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main(prog="python -m adaptive_cl.rec.reproduce"))
