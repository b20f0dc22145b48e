#!/usr/bin/env python3
"""The training pipeline's GPU command: the speed targets, then the reproduction, in one budget.

    mkdir -p shared/data && cp /work/shared/data/Beauty.txt shared/data/   # once, on this side
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_train.py --data shared/data/Beauty.txt --out "$OUT"

(``shared/`` inside the checkout travels to the GPU machine; nothing outside it does.) Steps,
within ``--total-s`` seconds (default 480, a budget meant to keep the command under 9 minutes;
not yet timed on a GPU):

1. ``benchmarks/train_speed.py`` (at most ``--speed-s``): epoch and evaluation times of SASRec,
   AdaptiveRec and DuoRec against the targets, the host-sync check; its JSON and table go to
   ``benchmarks/results/`` and ``--out``. Its compilations fill Inductor's cache, which the
   reproduction's runs then reuse.
2. ``examples/reproduce.py --budget-s <what is left>``: the runs without a committed result;
   the results folder comes back packed (``results-<dataset>.tar.gz``, split into parts above
   15 MiB) with ``reproduce-summary.md``.

Then, on this side: ``rm -rf examples/results/<dataset> && cat <files_at>/results-*.tar.gz* | tar
-xz -C examples/results``, copy ``train-*.json``/``.md`` into ``benchmarks/results/``, commit.
Exit status: 0 when both steps succeeded (targets met, no run failed), 1 otherwise, 2 without
CUDA (nothing run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from gpu_check import Tee, stream  # noqa: E402  (the same log and subprocess handling)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="interaction file, inside the checkout")
    ap.add_argument("--out", default=os.environ.get("OUT") or None,
                    help="folder for what comes back (default: $OUT)")
    ap.add_argument("--total-s", type=float, default=480.0)
    ap.add_argument("--speed-s", type=float, default=180.0, help="limit of step 1 (180)")
    ap.add_argument("--reserve-s", type=float, default=30.0,
                    help="kept back at the end for packing (30)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--speed-args", default="",
                    help="extra arguments for train_speed.py, one string")
    ap.add_argument("--reproduce-args", default="",
                    help="extra arguments for reproduce.py, one string (e.g. '--jobs 2'; "
                         "training arguments after '--')")
    ap.add_argument("--device", default="cuda",
                    help="'cpu' runs both steps as a smoke test (nothing judged; pass "
                         "--out-dir in --reproduce-args to keep examples/results clean)")
    args = ap.parse_args(argv)
    start = time.monotonic()

    import torch

    if args.device != "cpu" and not torch.cuda.is_available():
        print("gpu_train: no CUDA device: nothing run", file=sys.stderr)
        return 2
    if not os.path.isfile(args.data):
        print(f"gpu_train: argument --data: no such file: {args.data}", file=sys.stderr)
        return 2
    # Steps run in the repository root; the data path stays relative (it is recorded).
    data = os.path.relpath(os.path.abspath(args.data), ROOT)
    out = os.path.abspath(args.out) if args.out else None
    if out:
        os.makedirs(out, exist_ok=True)
    log = Tee(os.path.join(out, "gpu_train.log") if out else None)
    name = torch.cuda.get_device_name(0) if args.device != "cpu" else "CPU (smoke test)"
    log(f"# gpu_train on {name}, torch {torch.__version__}")
    steps = []
    if args.skip_speed:
        steps.append(("speed", "skipped"))
    else:
        log("\n## 1. Training speed")
        cmd = [sys.executable, os.path.join(HERE, "train_speed.py"), "--data", data,
               "--device", args.device, "--budget-s", f"{max(args.speed_s - 60, 30):.0f}"]
        if out:
            cmd += ["--out", out]
        cmd += args.speed_args.split()
        rc, _, secs = stream(cmd, log, args.speed_s)
        met = "ok, targets met" if args.device != "cpu" else "ok (CPU: nothing judged)"
        steps.append(("speed", {0: met, 1: "TARGETS MISSED", None: "TIMEOUT"}
                      .get(rc, f"FAIL (exit {rc})") + f" ({secs:.0f} s)"))
    left = args.total_s - (time.monotonic() - start) - args.reserve_s
    log(f"\n## 2. Reproduction (budget {left:.0f} s)")
    cmd = [sys.executable, os.path.join(ROOT, "examples", "reproduce.py"), "--data", data,
           "--device", args.device, "--budget-s", f"{max(left, 1):.0f}"]
    if out:
        cmd += ["--archive", out]
    cmd += args.reproduce_args.split()  # last: its '--' hands the rest to the training runs
    rc, _, secs = stream(cmd, log, max(left, 1) + args.reserve_s)
    steps.append(("reproduce", {0: "ok", None: "TIMEOUT"}.get(rc, f"FAIL (exit {rc})")
                  + f" ({secs:.0f} s)"))
    log("\n" + "\n".join(f"{name}: {status}" for name, status in steps)
        + f"\n{time.monotonic() - start:.0f} s in all")
    log.close()
    return 0 if all(s.startswith(("ok", "skipped")) for _, s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
