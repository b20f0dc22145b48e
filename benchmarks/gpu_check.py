#!/usr/bin/env python3
"""The one command a GPU session runs: correctness on the GPU, the launch table, the benchmark,
the targets.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "$OUT"

Needs no install: the repository root goes on PYTHONPATH of every step. One deadline for the
whole command, ``--total-s`` seconds from its start (default 540: the device tool's hard limit is
600 s); each step runs until the smaller of its own cap and what is left minus what the later
steps need (their minimum), so the command ends before its budget even when every step hangs:

1. ``python -m pytest tests -m cuda -v`` (the kernels' CUDA tests, the triton backend's
   torch.compile tests and the CUDA-graph capture/replay test included), with a per-test limit
   (``--per-test-timeout``, the ``_pytest_deadline`` plugin in this folder: a hanging test
   fails and the session goes on) and junit XML; cap ``--pytest-timeout`` (default 240 s).
2. ``python -m adaptive_cl.kernels.autotune --quick`` (D = 64, bfloat16 and the float32 paths,
   candidates timed against the fixed table), its report appended to ``autotune.md`` after
   every combination; cap ``--autotune-timeout`` (default 90 s, 0 skips it).
3. ``benchmarks/run.py`` (``--quick``: the target shapes only) with a time budget of what this
   step has, less ``--reserve-s`` for its last measurement and plots; results JSON (rewritten
   after every measurement) and plots.
4. ``benchmarks/run.py --check-targets`` on that JSON: ``targets.md``.

A step at its limit gets SIGINT (pytest then writes its junit and summary), and SIGKILL (it and
its descendants) 10 s later. Children stay in this command's process group, so a kill of the
command takes them along. Every artefact goes to ``--out`` as soon as it exists: junit,
autotune.md and targets.md are written there directly, the benchmark JSON and plots copied after
the step, ``gpu_check.log`` (everything printed) line by line, and ``summary.md`` rewritten after
every step (flat, at most 8 files, as the device tool returns them).

Exit status: 0 every step passed (tests green, benchmark without errors, all four targets
met); 1 some step failed or timed out (summary.md says which); 2 no CUDA device (nothing run,
nothing written).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUN = os.path.join(HERE, "run.py")
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

#: Seconds between a step's SIGINT and its SIGKILL.
KILL_GRACE_S = 10.0


class Tee:
    """Print to stdout and append to a log file (flushed per line)."""

    def __init__(self, path: str | None):
        self.file = open(path, "w") if path else None
        self.lock = threading.Lock()

    def __call__(self, text: str = "") -> None:
        with self.lock:
            print(text, flush=True)
            if self.file:
                self.file.write(text + "\n")
                self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def descendants(pid: int) -> list[int]:
    """The live descendants of ``pid`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def stream(cmd: list[str], log: Tee, timeout_s: float, grace_s: float = KILL_GRACE_S) -> tuple[int | None, str, float]:
    """Run ``cmd`` in ROOT, echoing its output; returns (exit code, or None when it had to be
    stopped at ``timeout_s``, its output, seconds). Stopping: SIGINT to the child, then after
    ``grace_s`` (at most) SIGKILL to it and its descendants, never to this process group."""
    log(f"$ {' '.join(cmd)}  (limit {timeout_s:.0f} s)")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    lines: list[str] = []

    def pump():
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            log(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    rc: int | None
    try:
        rc = proc.wait(timeout=max(timeout_s, 0.1))
    except subprocess.TimeoutExpired:
        log(f"!! limit of {timeout_s:.0f} s reached: SIGINT to {proc.pid}")
        family = descendants(proc.pid)
        try:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log(f"!! still running after {grace_s:.0f} s: SIGKILL to {proc.pid} and its descendants")
        _kill(sorted(set(family + descendants(proc.pid))) + [proc.pid])
        proc.wait()
        rc = None
    reader.join(timeout=5)
    return rc, "\n".join(lines), time.monotonic() - t0


def result_files(json_path: str) -> list[str]:
    """run.py's outputs for one results JSON: the JSON and its two plots."""
    stem = os.path.splitext(json_path)[0]
    return [json_path, stem + "-time.png", stem + "-memory.png"]


# ------------------------------------------------------------------------------ the step runner
@dataclass
class Step:
    """One command of the check. ``command(limit_s)`` builds its argv for the seconds it has;
    ``min_s``: below this it is not started (and what earlier steps keep back for it);
    ``artefacts()``: files to copy into --out once it ended (whatever its outcome);
    ``judge(rc, output, seconds)`` -> (status, detail); ``output_to``: a file for its output."""

    name: str
    command: Callable[[float], list[str]]
    cap_s: float
    min_s: float = 5.0
    artefacts: Callable[[], list[str]] = field(default=lambda: [])
    judge: Callable[[int | None, str, float], tuple[str, str]] | None = None
    output_to: str | None = None  # also write the step's output to this file


def default_judge(rc: int | None, text: str, secs: float) -> tuple[str, str]:
    last = text.strip().splitlines()[-1] if text.strip() else ""
    status = "pass" if rc == 0 else ("TIMEOUT" if rc is None else "FAIL")
    return status, f"{last[:200]} ({secs:.0f} s)"


def write_summary(path: str, header: list[str], results: list[tuple[str, str, str]], started: float) -> None:
    lines = header + [f"{time.monotonic() - started:.0f} s so far", "", "| step | status | detail |", "|---|---|---|"]
    lines += [f"| {s} | {st} | {d} |" for s, st, d in results]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def execute(steps: list[Step], *, out: str, total_s: float, log: Tee, header: list[str] | None = None,
            started: float | None = None, grace_s: float = KILL_GRACE_S) -> list[tuple[str, str, str]]:
    """Run ``steps`` in order within one deadline (``started`` + ``total_s``): step i runs for
    min(cap_i, time left - 2 graces - sum over the later steps of (min_s + 2 graces)). The summary is
    rewritten and artefacts copied into ``out`` after every step. Returns (step, status, detail).
    A stopped step may overrun its limit by up to two kill graces, which the limits keep back."""
    started = time.monotonic() if started is None else started
    deadline = started + total_s
    header = header or ["# gpu_check", ""]
    summary = os.path.join(out, "summary.md")
    results: list[tuple[str, str, str]] = []
    write_summary(summary, header, [(s.name, "pending", "") for s in steps], started)
    for i, step in enumerate(steps):
        # A stopped step may overrun its limit by its kill grace and by the time to stop it (scan
        # its descendants, drain its output, a loaded machine's slow exit): 2 graces each.
        later = sum(s.min_s + 2 * grace_s for s in steps[i + 1:])
        limit = min(step.cap_s, deadline - time.monotonic() - later - 2 * grace_s)
        if limit < step.min_s:
            results.append((step.name, "skipped", f"no time left ({max(limit, 0):.0f} s < {step.min_s:.0f} s)"))
            log(f"\n## {step.name}: skipped, {max(limit, 0):.0f} s left for it")
        else:
            log(f"\n## {step.name} (limit {limit:.0f} s)")
            rc, text, secs = stream(step.command(limit), log, limit, grace_s=grace_s)
            if step.output_to:
                with open(step.output_to, "w") as f:
                    f.write(text + "\n")
            results.append((step.name, *(step.judge or default_judge)(rc, text, secs)))
        for path in step.artefacts():
            if os.path.exists(path) and os.path.dirname(os.path.abspath(path)) != os.path.abspath(out):
                shutil.copy2(path, out)
        pending = [(s.name, "pending", "") for s in steps[i + 1:]]
        write_summary(summary, header, results + pending, started)
    return results


# ------------------------------------------------------------------------------ the GPU plan
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or None,
                    help="folder for results, logs and junit (default: $OUT when set, else a temporary folder)")
    ap.add_argument("--total-s", type=float, default=540.0, help="deadline of the whole command (default 540 s)")
    ap.add_argument("--pytest-timeout", type=float, default=240.0, help="cap of the CUDA tests (default 240 s)")
    ap.add_argument("--per-test-timeout", type=float, default=60.0, help="limit of one CUDA test (default 60 s)")
    ap.add_argument("--reserve-s", type=float, default=45.0,
                    help="kept back from the benchmark's own budget for its last measurement and plots (default 45)")
    ap.add_argument("--quick", action="store_true", help="benchmark only the target shapes (run.py --quick)")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the CUDA tests")
    ap.add_argument("--skip-bench", action="store_true", help="do not benchmark (check targets of existing results)")
    ap.add_argument("--autotune-timeout", type=float, default=90.0,
                    help="cap of the launch-table measurement (default 90 s; 0 skips it)")
    ap.add_argument("--bench-args", default="", help="extra arguments for run.py, one string")
    return ap.parse_args(argv)


def plan(args, out: str, json_path: str, existing_json: str | None) -> list[Step]:
    steps: list[Step] = []
    py = sys.executable
    if not args.skip_tests:
        junit = os.path.join(out, "junit-cuda.xml")

        def tests_judge(rc, text, secs):
            status, detail = default_judge(rc, text, secs)
            if rc == 5:
                status, detail = "FAIL", "no cuda-marked tests were collected"
            return status, detail

        steps.append(Step("cuda tests", lambda limit: [
            py, "-m", "pytest", "tests", "-m", "cuda", "-v", "-rs", "-p", "no:cacheprovider",
            "-p", "_pytest_deadline", f"--per-test-timeout={args.per_test_timeout:g}", f"--junitxml={junit}"],
            args.pytest_timeout, min_s=30.0, judge=tests_judge))
    if args.autotune_timeout > 0:
        tune = os.path.join(out, "autotune.md")
        steps.append(Step("launch table", lambda limit: [py, "-m", "adaptive_cl.kernels.autotune", "--quick",
                                                         "--out", tune], args.autotune_timeout, min_s=20.0))
    if not args.skip_bench:
        def bench_cmd(limit):
            budget = max(10.0, limit - args.reserve_s)
            cmd = [py, os.path.relpath(RUN, ROOT), "--budget-s", f"{budget:.0f}", "--output",
                   os.path.relpath(json_path, ROOT)]
            return cmd + (["--quick"] if args.quick else []) + args.bench_args.split()

        def bench_judge(rc, text, secs):
            line = next((ln for ln in text.splitlines() if " measured, " in ln), "")
            return ("pass" if rc == 0 else ("TIMEOUT" if rc is None else "FAIL")), f"{line} ({secs:.0f} s)"

        steps.append(Step("benchmark", bench_cmd, 10_000.0, min_s=60.0,
                          artefacts=lambda: result_files(json_path), judge=bench_judge))
    targets_json = existing_json if args.skip_bench else json_path
    targets_md = os.path.join(out, "targets.md")

    def targets_cmd(limit):
        return [py, RUN, "--check-targets", "--results", targets_json or json_path]

    def targets_judge(rc, text, secs):
        if not os.path.exists(targets_json or json_path):
            return "FAIL", f"no results file {targets_json or json_path}"
        passed = next((ln for ln in text.splitlines() if "targets pass" in ln), "")
        return ("pass" if rc == 0 else ("TIMEOUT" if rc is None else "FAIL")), passed

    steps.append(Step("targets", targets_cmd, 60.0, min_s=10.0, judge=targets_judge, output_to=targets_md))
    return steps


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing run, nothing written. "
              "Run it on the GPU machine: PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out \"$OUT\"",
              file=sys.stderr)
        return 2

    import run as bench  # benchmarks/run.py's helpers (paths, targets)

    out = os.path.abspath(args.out) if args.out else tempfile.mkdtemp(prefix="gpu_check-")
    os.makedirs(out, exist_ok=True)
    log = Tee(os.path.join(out, "gpu_check.log"))
    device = torch.cuda.get_device_name(0)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    log(f"# gpu_check {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}, deadline {args.total_s:.0f} s")
    log(f"# device {device}; python {sys.version.split()[0]}; torch {torch.__version__}; triton {triton_version}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        log(f"# nvidia-smi: {smi.stdout.strip()}")
    except (OSError, subprocess.SubprocessError):
        pass
    json_path = bench.results_path(device, bench.today())
    existing = bench.latest_results_file() if args.skip_bench else None
    header = [f"# gpu_check on {device}", "", f"torch {torch.__version__}, triton {triton_version}, "
              f"deadline {args.total_s:.0f} s", ""]
    skipped = [(name, "skipped", flag) for name, flag in (("cuda tests", "--skip-tests"), ("benchmark", "--skip-bench"))
               if getattr(args, flag[2:].replace("-", "_"))]
    if args.autotune_timeout <= 0:
        skipped.append(("launch table", "skipped", "--autotune-timeout 0"))
    results = execute(plan(args, out, json_path, existing), out=out, total_s=args.total_s, log=log,
                      header=header, started=started)
    results = skipped + results
    write_summary(os.path.join(out, "summary.md"), header, results, started)
    log(f"\nsummary in {os.path.join(out, 'summary.md')}; files: {', '.join(sorted(os.listdir(out)))}")
    log.close()
    # a step skipped by a flag is fine; one skipped for lack of time is not
    ok = all(st == "pass" or (st == "skipped" and d.startswith("--")) for _, st, d in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
