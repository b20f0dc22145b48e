#!/usr/bin/env python3
"""The one command a GPU session runs: correctness on the GPU, the benchmark, the targets.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "$OUT"

Needs no install: the repository root goes on PYTHONPATH of every step. Steps, within
``--total-s`` seconds (default 480, a budget meant to keep the whole command under 9 minutes; not yet timed on a GPU):

1. ``python -m pytest tests -m cuda -q`` (the kernels' CUDA tests, labels / the soft threshold /
   return_stats included), junit XML kept; at most ``--pytest-timeout`` seconds (default 240).
2. ``python -m adaptive_cl.kernels.autotune --quick`` (D = 64, bfloat16 and the float32 paths:
   candidate launch configurations timed against the package's fixed table, which was chosen
   from compile facts without a GPU), report and a table to paste in ``autotune.md``; at most
   ``--autotune-timeout`` seconds.
3. ``benchmarks/run.py`` with the default set (``--quick``: the target shapes only; both
   include the fused kernel with labels, the soft threshold and return_stats at N = 32768, whose
   time over the plain kernel run.py prints) and a time budget of what is left (less a
   reserve); results JSON and plots into benchmarks/results/.
4. ``benchmarks/run.py --check-targets`` on that JSON.
5. With ``--out DIR``: copies into DIR (flat, at most 8 files, as the device tool returns them):
   ``junit-cuda.xml``, ``autotune.md``, the results JSON, its ``-time.png`` and ``-memory.png``,
   ``targets.md``, ``summary.md`` and ``gpu_check.log`` (everything printed).

Exit status: 0 every step passed (tests green, benchmark without errors, all four targets
met); 1 some step failed (summary.md says which); 2 no CUDA device (nothing run, nothing
written).
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUN = os.path.join(HERE, "run.py")
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)


class Tee:
    """Print to stdout and append to a log file."""

    def __init__(self, path: str | None):
        self.file = open(path, "w") if path else None

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        if self.file:
            self.file.write(text + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stream(cmd: list[str], log: Tee, timeout_s: float) -> tuple[int | None, str, float]:
    """Run ``cmd`` in ROOT, echoing its output; returns (exit code or None on timeout, output, s)."""
    log(f"$ {' '.join(cmd)}")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    lines: list[str] = []

    def pump():
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            log(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log(f"!! timed out after {timeout_s:.0f} s: stopping process group {proc.pid}")
        os.killpg(proc.pid, signal.SIGKILL)  # the group this command started, nothing else
        proc.wait()
        rc = None
    reader.join(timeout=10)
    return rc, "\n".join(lines), time.monotonic() - t0


def result_files(json_path: str) -> list[str]:
    """run.py's outputs for one results JSON: the JSON and its two plots."""
    stem = os.path.splitext(json_path)[0]
    return [json_path, stem + "-time.png", stem + "-memory.png"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or None,
                    help="folder to copy results, logs and junit into (default: $OUT when set)")
    ap.add_argument("--total-s", type=float, default=480.0, help="wall-clock budget of the whole check (default 480)")
    ap.add_argument("--pytest-timeout", type=float, default=240.0, help="limit of the CUDA tests (default 240 s)")
    ap.add_argument("--reserve-s", type=float, default=75.0,
                    help="kept back from the benchmark's budget for its last measurement, plots, the check (default 75)")
    ap.add_argument("--quick", action="store_true", help="benchmark only the target shapes (run.py --quick)")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the CUDA tests")
    ap.add_argument("--skip-bench", action="store_true", help="do not benchmark (check targets of existing results)")
    ap.add_argument("--autotune-timeout", type=float, default=90.0,
                    help="limit of the launch-table measurement (default 90 s; 0 skips it)")
    ap.add_argument("--bench-args", default="", help="extra arguments for run.py, one string")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing run, nothing written. "
              "Run it on the GPU machine: PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out \"$OUT\"",
              file=sys.stderr)
        return 2

    import run as bench  # benchmarks/run.py's helpers (paths, targets)

    out = os.path.abspath(args.out) if args.out else None
    if out:
        os.makedirs(out, exist_ok=True)
    # junit, targets, summary and the log are written straight into --out (else a temp folder).
    scratch = out or tempfile.mkdtemp(prefix="gpu_check-")
    log = Tee(os.path.join(scratch, "gpu_check.log"))
    device = torch.cuda.get_device_name(0)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    log(f"# gpu_check {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}")
    log(f"# device {device}; python {sys.version.split()[0]}; torch {torch.__version__}; triton {triton_version}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        log(f"# nvidia-smi: {smi.stdout.strip()}")
    except (OSError, subprocess.SubprocessError):
        pass

    steps: list[tuple[str, str, str]] = []  # (step, status, detail)
    junit = os.path.join(scratch, "junit-cuda.xml")
    if args.skip_tests:
        steps.append(("cuda tests", "skipped", "--skip-tests"))
        junit = ""
    else:
        log("\n## 1. CUDA tests")
        rc, text, secs = stream([sys.executable, "-m", "pytest", "tests", "-m", "cuda", "-q", "-rs",
                                 "-p", "no:cacheprovider", f"--junitxml={junit}"], log, args.pytest_timeout)
        last = text.strip().splitlines()[-1] if text.strip() else ""
        if rc == 0:
            status = "pass"
        elif rc == 5:
            status, last = "FAIL", "no cuda-marked tests were collected"
        else:
            status = "FAIL" if rc is not None else "TIMEOUT"
        steps.append(("cuda tests", status, f"{last} ({secs:.0f} s)"))

    if args.autotune_timeout > 0:
        log("\n## 2. Launch table (adaptive_cl.kernels.autotune --quick)")
        tune_out = os.path.join(scratch, "autotune.md")
        rc, text, secs = stream([sys.executable, "-m", "adaptive_cl.kernels.autotune", "--quick", "--out", tune_out],
                                log, args.autotune_timeout)
        status = "pass" if rc == 0 else ("TIMEOUT" if rc is None else "FAIL")
        steps.append(("launch table", status, f"autotune.md ({secs:.0f} s)"))
    else:
        steps.append(("launch table", "skipped", "--autotune-timeout 0"))

    json_path = bench.results_path(device, bench.today())
    if args.skip_bench:
        steps.append(("benchmark", "skipped", "--skip-bench"))
        existing = bench.latest_results_file()
        json_path = existing or json_path
    else:
        left = args.total_s - (time.monotonic() - t_start) - args.reserve_s
        budget = max(30.0, min(300.0, left))
        log(f"\n## 3. Benchmark (budget {budget:.0f} s)")
        cmd = [sys.executable, os.path.relpath(RUN, ROOT), "--budget-s", f"{budget:.0f}",
               "--output", os.path.relpath(json_path, ROOT)]
        if args.quick:
            cmd.append("--quick")
        cmd += args.bench_args.split()
        rc, text, secs = stream(cmd, log, budget + args.reserve_s + 60)
        summary_line = next((ln for ln in text.splitlines() if " measured, " in ln), "")
        status = "pass" if rc == 0 else ("TIMEOUT" if rc is None else "FAIL")
        steps.append(("benchmark", status, f"{summary_line} ({secs:.0f} s)"))

    log("\n## 4. Targets")
    targets_path = os.path.join(scratch, "targets.md")
    if os.path.exists(json_path):
        rc, text, _ = stream([sys.executable, RUN, "--check-targets", "--results", json_path], log, 60)
        with open(targets_path, "w") as f:
            f.write(text + "\n")
        passed = next((ln for ln in text.splitlines() if "targets pass" in ln), "")
        steps.append(("targets", "pass" if rc == 0 else "FAIL", passed))
    else:
        steps.append(("targets", "FAIL", f"no results file {json_path}"))
        targets_path = ""

    total = time.monotonic() - t_start
    summary = [f"# gpu_check on {device}", "",
               f"torch {torch.__version__}, triton {triton_version}, {total:.0f} s in all", "",
               "| step | status | detail |", "|---|---|---|"]
    summary += [f"| {s} | {st} | {d} |" for s, st, d in steps]
    summary_path = os.path.join(scratch, "summary.md")
    with open(summary_path, "w") as f:
        f.write("\n".join(summary) + "\n")
    log("\n" + "\n".join(summary))
    log.close()

    copied = []
    if out:  # the device tool returns only files under $OUT: 7 files, flat
        for path in result_files(json_path):
            if os.path.exists(path):
                shutil.copy2(path, out)
                copied.append(os.path.basename(path))
    print(f"logs, junit, targets and summary in {scratch}" + (f"; copied {', '.join(copied)}" if copied else ""))
    ok = all(st in ("pass", "skipped") for _, st, _ in steps)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
