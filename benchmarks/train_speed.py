#!/usr/bin/env python3
"""Training-pipeline speed on a GPU against the targets: a Beauty epoch of AdaptiveRec <= 2 s,
of SASRec <= 1 s, a full evaluation <= 0.5 s (H200), and no host sync inside a training step.

    PYTHONUNBUFFERED=1 python3 benchmarks/train_speed.py --data shared/data/Beauty.txt --out "$OUT"

Per method, one process, the CLI's configuration for a data file (max_len 50, batch 256, bf16
autocast, torch.compile unless --no-compile): a warm-up (compilation, autotuning) on a few
batches, then ``--epochs`` timed training epochs (``Trainer.train_epoch``: the shuffled pass over
every training sample, ending in its one read-back) and ``--evals`` timed full evaluations of
the validation users (``Trainer.evaluate``; the first, warm-up one is not counted). Three steps
then run under ``torch.cuda.set_sync_debug_mode("error")``: any synchronising call fails the
check. Medians are judged against the targets.

On a CPU a Beauty epoch takes minutes, so ``--steps K`` times K training steps after the warm-up
(wall and process CPU time) and estimates the epoch as K-step time per step x steps per epoch
+ one timed evaluation; ``--threads`` sets torch's threads, ``--preset`` the configuration and
``--code DIR`` imports ``adaptive_cl`` from DIR (an older checkout) to time before / after:

    python benchmarks/train_speed.py --device cpu --data Beauty.txt --steps 12 --threads 1 \
        --methods sasrec duorec adaptiverec --results-dir benchmarks/results --tag after

Writes ``benchmarks/results/train-<device>-<date>.json`` (``{"records": [...]}``, one record per
method) and a markdown table beside it; with ``--out DIR`` copies both there. Exit status 0 when
every judged target passes, 1 otherwise, 2 without CUDA (unless ``--device cpu``, which runs
the same steps as a smoke test and judges nothing).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if "--code" in sys.argv[:-1]:  # before anything imports adaptive_cl
    ROOT = os.path.abspath(sys.argv[sys.argv.index("--code") + 1])
sys.path.insert(0, ROOT)

#: Targets on the H200 (issue 14): seconds.
EPOCH_TARGETS = {"adaptiverec": 2.0, "sasrec": 1.0}
EVAL_TARGET = 0.5
WARMUP_BATCHES = 3


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def measure(method: str, split, args, torch) -> dict:
    from adaptive_cl.rec.environment import describe, peak_memory_mib
    from adaptive_cl.rec.train import TrainConfig, Trainer

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    config = TrainConfig.from_preset(
        args.preset, method=method, max_len=split.max_len, device=args.device, amp=cuda,
        compile=not args.no_compile, compile_mode=args.compile_mode, progress=False,
        epochs=args.epochs, seed=0)
    trainer = Trainer(config, split)
    if args.steps:
        return measure_steps(trainer, config, args, torch)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    full = trainer._batches
    start = time.perf_counter()
    trainer._batches = lambda: full()[:WARMUP_BATCHES]  # compiles the full-batch step
    trainer.train_epoch()
    sync()
    warmup_s = time.perf_counter() - start
    trainer._batches = full

    epoch_s = []
    for _ in range(args.epochs):
        sync()
        start = time.perf_counter()
        trainer.train_epoch()  # ends in its one read-back: the time includes every kernel
        epoch_s.append(time.perf_counter() - start)
    eval_s = []
    for _ in range(args.evals + 1):
        sync()
        start = time.perf_counter()
        trainer.evaluate("valid")  # ends in the metrics' read-back
        eval_s.append(time.perf_counter() - start)
    eval_s = eval_s[1:]

    syncs = "not checked (CPU)"
    if cuda:
        batches = full()[:3]
        trainer.model.train()  # evaluate() left it in eval mode: another graph, another compile
        trainer.objective.train()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for idx in batches:
                trainer.train_batch(idx)
            syncs = "none"
        except RuntimeError as err:
            syncs = f"FAIL: {str(err).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    steps = len(full())
    return {
        "method": method, **describe(device), "compile": config.compile,
        "compile_mode": config.compile_mode, "amp": trainer.amp, "batch_size": config.batch_size,
        "max_len": config.max_len, "steps_per_epoch": steps, "num_train": split.num_train,
        "num_eval_users": split.num_eval_users, "warmup_s": round(warmup_s, 3),
        "epoch_s": [round(x, 4) for x in epoch_s], "eval_s": [round(x, 4) for x in eval_s],
        "epoch_median_s": statistics.median(epoch_s), "eval_median_s": statistics.median(eval_s),
        "ms_per_step": 1e3 * statistics.median(epoch_s) / steps, "host_syncs_in_step": syncs,
        "peak_memory_mib": peak_memory_mib(device),
        "date": _dt.date.today().isoformat(), "command": " ".join(["python3", *sys.argv]),
    }


def measure_steps(trainer, config, args, torch) -> dict:
    """CPU: ``args.steps`` timed steps after two warm-up steps, one timed evaluation; the epoch
    estimated from them."""
    from adaptive_cl.rec.environment import describe

    trainer.model.train()
    trainer.objective.train()
    batches = trainer._batches()
    if len(batches) < args.steps + 2:
        raise SystemExit(f"train_speed: --steps {args.steps} needs {args.steps + 2} batches, "
                         f"an epoch has {len(batches)}")
    for idx in batches[:2]:
        trainer.train_batch(idx)
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    for idx in batches[2:2 + args.steps]:
        trainer.train_batch(idx)
    wall, cpu = (time.perf_counter() - wall) / args.steps, (time.process_time() - cpu) / args.steps
    start = time.perf_counter()
    trainer.evaluate("valid")
    eval_s = time.perf_counter() - start
    steps = len(batches)
    return {
        "method": method_name(config), "preset": config.preset, **describe(args.device),
        "threads": torch.get_num_threads(), "code": ROOT, "batch_size": config.batch_size,
        "steps_per_epoch": steps, "timed_steps": args.steps, "wall_s_per_step": round(wall, 4),
        "cpu_s_per_step": round(cpu, 4), "eval_s": round(eval_s, 3),
        "epoch_estimate_s": round(wall * steps + eval_s, 1),
        "load_average_1min_before": load, "load_average_1min_after": os.getloadavg()[0],
        "tag": args.tag, "date": _dt.date.today().isoformat(),
        "command": " ".join(["python3", *sys.argv]),
    }


def method_name(config) -> str:
    return config.method if config.preset == "default" else f"{config.method} ({config.preset})"


def judge(record: dict, cuda: bool) -> list[tuple[str, str, str]]:
    """(what, measured, verdict) rows for one method's record."""
    rows = []
    if "epoch_estimate_s" in record:  # CPU steps: nothing to judge
        return [(f"{record['method']} epoch estimate, {record['threads']} thread(s)",
                 f"{record['epoch_estimate_s']:.0f} s ({record['wall_s_per_step']:.3f} s/step "
                 f"wall, {record['cpu_s_per_step']:.3f} s CPU; evaluation {record['eval_s']:.1f} s; "
                 f"load {record['load_average_1min_before']:.1f})", "n/a (CPU)")]
    target = EPOCH_TARGETS.get(record["method"])
    verdict = lambda ok: ("pass" if ok else "FAIL") if cuda else "n/a (CPU)"  # noqa: E731
    epoch = record["epoch_median_s"]
    rows.append((f"{record['method']} epoch" + (f" <= {target} s" if target else ""),
                 f"{epoch:.3f} s ({record['ms_per_step']:.2f} ms/step)",
                 verdict(epoch <= target) if target else "(no target)"))
    rows.append((f"{record['method']} full evaluation <= {EVAL_TARGET} s",
                 f"{record['eval_median_s']:.3f} s", verdict(record["eval_median_s"] <= EVAL_TARGET)))
    syncs = record["host_syncs_in_step"]
    rows.append((f"{record['method']} host syncs in a step", syncs,
                 ("pass" if syncs == "none" else "FAIL") if cuda else "n/a (CPU)"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="interaction file (default: the synthetic data)")
    ap.add_argument("--methods", nargs="+", default=["sasrec", "adaptiverec", "duorec"])
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per method (2)")
    ap.add_argument("--evals", type=int, default=3, help="timed evaluations per method (3)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--preset", default="default", help="the training preset (default)")
    ap.add_argument("--steps", type=int, default=None,
                    help="time this many steps and estimate the epoch (CPU) instead of epochs")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--code", default=None, help="import adaptive_cl from this checkout")
    ap.add_argument("--tag", default="", help="a label for the record's file name (before/after)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip the methods left once this many seconds have passed")
    ap.add_argument("--results-dir", default=None,
                    help="where the record goes (default on CUDA: benchmarks/results; off CUDA "
                         "none: a smoke test records nothing there)")
    ap.add_argument("--out", default=None, help="also copy the JSON and the table here")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("train_speed: no CUDA device: nothing measured, nothing written "
              "(--device cpu runs it as a smoke test)", file=sys.stderr)
        return 2
    from adaptive_cl.rec.data import leave_one_out, load_dataset
    from adaptive_cl.rec.environment import device_name
    from adaptive_cl.rec.synthetic import make_synthetic

    t0 = time.perf_counter()
    data = load_dataset(args.data) if args.data else make_synthetic()
    split = leave_one_out(data, args.max_len)
    print(f"{data.name}: {split.num_train} training samples, {split.num_eval_users} users; "
          f"{device_name(args.device)}, torch {torch.__version__}", flush=True)
    name = f"train-{slug(device_name(args.device))}-{_dt.date.today().isoformat()}"
    if args.tag:
        name += f"-{slug(args.tag)}"
    results_dir = args.results_dir or (os.path.join(HERE, "results") if cuda else None)
    records, rows = [], []

    def write(skipped: list[str]) -> str:
        """The record and table so far (after every method: a kill keeps what was measured)."""
        lines = [f"# training speed on {device_name(args.device)} ({data.name}, torch "
                 f"{torch.__version__}, compile={not args.no_compile})", "",
                 "| check | measured | verdict |", "|---|---|---|"]
        lines += [f"| {what} | {measured} | {verdict} |" for what, measured, verdict in rows]
        if skipped:
            lines += ["", f"Not measured: {', '.join(skipped)}"]
        table = "\n".join(lines) + "\n"
        for folder in filter(None, (results_dir, args.out)):
            os.makedirs(folder, exist_ok=True)
            stem = os.path.join(folder, name)
            for suffix, text in ((".json", json.dumps({"records": records}, indent=1)),
                                 (".md", table)):
                with open(stem + suffix + ".tmp", "w") as f:  # never a partial record
                    f.write(text)
                os.replace(stem + suffix + ".tmp", stem + suffix)
        return table

    skipped: list[str] = []
    for i, method in enumerate(args.methods):
        if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
            skipped = [f"{m} (budget)" for m in args.methods[i:]]
            break
        record = measure(method, split, args, torch)
        record["dataset"] = data.name
        records.append(record)
        rows.extend(judge(record, cuda))
        print(rows[-1][0] + ": " + rows[-1][1] if "epoch_estimate_s" in record else
              f"{method}: warm-up {record['warmup_s']:.1f} s, epochs {record['epoch_s']} s, "
              f"evaluations {record['eval_s']} s, syncs: {record['host_syncs_in_step']}",
              flush=True)
        write([f"{m} (not yet)" for m in args.methods[i + 1:]])
    print("\n" + write(skipped))
    for folder in filter(None, (results_dir, args.out)):
        print(f"wrote {os.path.join(folder, name)}.json and .md")
    failed = any(verdict == "FAIL" for _, _, verdict in rows) or (cuda and skipped)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
