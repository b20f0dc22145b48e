"""The training CLI: train SASRec with a contrastive objective and compare it with the popularity
baseline.

    adaptive-cl-train                                   # AdaptiveRec on the synthetic demo data
    adaptive-cl-train --data Beauty.txt --method duorec --epochs 100 --out runs/x
    python -m adaptive_cl.rec ...                       # the same, without the console script
    torchrun --standalone --nproc_per_node 2 -m adaptive_cl.rec --distributed ...   # DDP (rec/ddp.py)

(``examples/train_sasrec.py`` is a thin wrapper around :func:`main`.)

Without ``--data`` it trains on the embedded synthetic dataset (planted sequential structure,
sequences of ~12 items) with a short schedule (``--epochs 3``, ``--max-len 20``) that needs
about 90 s of one CPU core; with ``--data`` the defaults are the protocol's (``--epochs 100``,
``--max-len 50``, early stopping with patience 10).

Metrics rank ties pessimistically (an item scoring as high as the target counts as above it), so
tied scores can only lower them; the popularity baseline, whose integer counts tie often, is
measured the same way.

Everything that can be checked is checked before training starts (the data file readable and
parseable, ``--out`` writable and not holding another run, a ``--resume`` checkpoint readable
and made from the same data and settings); every bad input ends with one line on stderr naming
the argument and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

from .atomic import atomic_write_text
from .data import FORMATS, DataFormatError, detect_format, leave_one_out, load_dataset
from .ddp import DataParallel
from .environment import describe, peak_memory_mib
from .metrics import evaluate_popularity
from .synthetic import make_synthetic
from .train import (
    CHECKPOINT,
    CHECKS,
    METHODS,
    PRESETS,
    CheckpointError,
    Trainer,
    TrainConfig,
)

SYNTHETIC_EPOCHS, SYNTHETIC_MAX_LEN = 3, 20
DATA_EPOCHS, DATA_MAX_LEN = 100, 50
TABLE_METRICS = ("NDCG@5", "NDCG@10", "NDCG@20", "Recall@5", "Recall@10", "Recall@20",
                 "MRR@10")
RESULTS, POPULARITY, RUN_INFO = "results.json", "popularity.json", "run.json"
#: ``plots.plot_results``' file names (not imported: plots needs matplotlib).
FIGURES = ("similarities.png", "simthres.png", "uniformity_alignment.png")
#: Every file a run writes into ``--out``: what ``--overwrite`` removes before training.
RUN_FILES = (RESULTS, POPULARITY, RUN_INFO, CHECKPOINT, *FIGURES)


class CLIError(Exception):
    """A bad input: :func:`main` prints it as one line and exits with code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise CLIError(f"{message} (see --help)")


def number(kind: type, accept, requirement: str):
    """An argparse ``type``: ``kind(text)`` that ``accept`` holds for, else an error saying
    ``requirement`` (NaN fails every comparison, so it is refused too)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value
    return parse


def positive(kind: type):
    return number(kind, lambda v: 0 < v < float("inf"), "finite and > 0")


_seed = number(int, lambda v: 0 <= v < 2**32, "in [0, 2**32)")  # numpy's seed range


#: TrainConfig fields without a generated flag, and the hand-written flag that sets each.
EXCLUDED = {
    "method": "--method",
    "preset": "--preset",
    "device": "--device",
    "seed": "--seed",
    "compile": "--no-compile",
    "amp": "--amp",
    "progress": "--no-progress",
    "record_histograms": "--plots",
}


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def generated_fields() -> list[dataclasses.Field]:
    """The TrainConfig fields the CLI generates a flag for (every one outside EXCLUDED)."""
    return [f for f in dataclasses.fields(TrainConfig) if f.name not in EXCLUDED]


def _value_type(f: dataclasses.Field):
    """The argparse ``type`` of a setting: its CHECKS rule as a number parser, else its
    annotation's type (``int`` for choices of ints)."""
    kind = {"int": int, "float": float, "str": str}[
        str(f.type).replace(" | None", "").strip()]
    check = f.metadata.get("check")
    if check is None:
        return kind
    ok, what = CHECKS[check]
    return number(kind, ok, what)


def _add_settings(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig setting (its help, choices, checks and default from the one
    declaration in train.py); default None = the preset's or the config's value."""
    group = p.add_argument_group("training settings (defaults: the protocol, or the preset's)")
    for f in generated_fields():
        meta, default = f.metadata, f.default
        help_text = meta["help"] + ("" if default is None else f" (default: {default})")
        if meta.get("methods"):
            help_text += f"; {', '.join(meta['methods'])} only"
        if f.type in (bool, "bool"):
            group.add_argument(flag_of(f.name), action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
            continue
        group.add_argument(flag_of(f.name), type=_value_type(f), choices=meta.get("choices"),
                           default=None, help=help_text,
                           metavar=None if meta.get("choices") else f.name.upper())


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} "
                                         "CUDA device(s)")
    return text


PROG = "adaptive-cl-train"


def default_threads() -> int:
    """The default ``--threads``: half the CPUs this process may use, at least 1, at most
    ``MAX_DEFAULT_THREADS``.

    PyTorch's own default (one thread per core) oversubscribes a machine that also runs
    anything else: the model's many small operations then wait on each other's preempted
    threads. On a 2-core machine loaded by other jobs the demo took 2868 s with two threads
    against 275 s with one. Half the CPUs costs at most half the speed on an idle machine and
    avoids that collapse on a shared one."""
    try:
        cpus = len(os.sched_getaffinity(0))  # the CPUs this process may run on (containers)
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus // 2, MAX_DEFAULT_THREADS))


MAX_DEFAULT_THREADS = 8


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    """Parse and cross-check the flags; raises :class:`CLIError` naming the bad one. The
    training settings' flags are generated from :class:`TrainConfig` (:func:`_add_settings`);
    the flags here are the run's: data, output, device, threads."""
    p = _Parser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="interaction file (default: synthetic data)")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    p.add_argument("--method", default="adaptiverec", choices=METHODS)
    p.add_argument("--preset", default="default", choices=PRESETS,
                   help="default: the protocol; paper: AdaptiveRec's released configuration "
                        "(adaptiverec, and duorec as its Table 1 baseline); release: each "
                        "method's own released configuration (README: Presets)")
    p.add_argument("--cache-dir", type=Path,
                   help="cache for RCL's weak positives (default: OUT/cache; none without --out)")
    p.add_argument("--device", type=_device,
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=_seed, default=TrainConfig.seed)
    p.add_argument("--no-compile", action="store_true",
                   help="run the training passes eagerly (default on CUDA: torch.compile)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on CUDA (default: on with the default preset, off with "
                        "paper and release, which reproduce in float32; never on CPU)")
    p.add_argument("--threads", type=positive(int),
                   help=f"CPU threads for PyTorch (default: half the usable CPUs, at most "
                        f"{MAX_DEFAULT_THREADS}; {default_threads()} here)")
    p.add_argument("--out", type=Path, help="directory for results.json, run.json (device, "
                   "versions, wall time, peak memory) and checkpoint.pt")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in OUT (refused without this flag)")
    p.add_argument("--plots", action="store_true", help="write PNG figures into OUT")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over the processes torchrun starts (gloo on CPU, NCCL on "
                        "CUDA: one GPU per process); --batch-size stays the global batch")
    _add_settings(p)
    args = p.parse_args(argv)
    if args.data is None and args.format != "auto":
        p.error("argument --format: only applies with --data")
    if args.data is not None:
        if args.data.is_dir():
            p.error(f"argument --data: {args.data} is a directory; expected an interaction file")
        if not args.data.is_file():
            p.error(f"argument --data: no such file: {args.data}")
    if args.resume and args.out is None:
        p.error("argument --resume: needs --out DIR holding checkpoint.pt")
    if args.resume and args.overwrite:
        p.error("argument --overwrite: not allowed with --resume (continue the run or replace it)")
    if args.plots and args.out is None:
        p.error("argument --plots: needs --out DIR for the figures")
    if args.plots and importlib.util.find_spec("matplotlib") is None:
        p.error("argument --plots: needs matplotlib (pip install 'adaptive-cl[examples]')")
    for f in generated_fields():
        methods = f.metadata.get("methods")
        if methods and getattr(args, f.name) is not None and args.method not in methods:
            p.error(f"argument {flag_of(f.name)}: only applies to --method "
                    f"{', '.join(methods)}, not {args.method}")
    if args.cache_dir is not None and args.method != "rcl":
        p.error(f"argument --cache-dir: only applies to --method rcl, not {args.method}")
    return args


def build_config(args: argparse.Namespace, prog: str = PROG) -> TrainConfig:
    """The run's :class:`TrainConfig` from the flags; raises :class:`CLIError` if invalid."""
    synthetic = args.data is None
    try:
        preset_epochs = TrainConfig.preset_fields(args.preset, args.method).get("epochs")
    except ValueError as err:
        raise CLIError(f"argument --preset: {err}") from None
    cuda = torch.device(args.device).type == "cuda"
    overrides = {f.name: getattr(args, f.name) for f in generated_fields()
                 if getattr(args, f.name) is not None}
    if args.epochs is None:  # a preset's own budget (DuoRec's release: 50) before the protocol's
        overrides["epochs"] = SYNTHETIC_EPOCHS if synthetic else preset_epochs or DATA_EPOCHS
    if args.max_len is None:
        overrides["max_len"] = SYNTHETIC_MAX_LEN if synthetic else DATA_MAX_LEN
    overrides.update(
        method=args.method, device=args.device, seed=args.seed, progress=not args.no_progress,
        record_histograms=args.plots,
        amp=cuda and (args.amp if args.amp is not None else args.preset == "default"),
        # Compiling pays off on a GPU, where the step is launch-bound; on a CPU its minutes of
        # compilation would outweigh a short run. Data-parallel runs stay eager (DDP wraps the
        # plain module).
        compile=cuda and not args.no_compile and not args.distributed,
    )
    if args.simthres == "learnable-flat" and args.drop_last is None:
        overrides["drop_last"] = True  # the flattened threshold net has a fixed batch size
    try:
        return TrainConfig.from_preset(args.preset, **overrides)
    except ValueError as err:
        raise CLIError(str(err)) from None


def check_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    """``--out`` must be a writable directory (created if need be) that holds no other run,
    unless ``--resume`` continues it or ``--overwrite`` replaces it."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"argument --out: {out} exists and is not a directory")
    if resume and not out.exists():
        raise CLIError(f"argument --resume: no checkpoint at {out / CHECKPOINT}")
    if not (resume or overwrite):
        if (out / RESULTS).exists():
            raise CLIError(f"argument --out: {out} holds a finished run ({RESULTS}); pass "
                           "--overwrite to replace it (or --resume with more --epochs)")
        if (out / CHECKPOINT).exists():
            raise CLIError(f"argument --out: {out} holds an interrupted run ({CHECKPOINT}); "
                           "pass --resume to continue it or --overwrite to start again")
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CLIError(f"argument --out: cannot write to {out}: {err.strerror or err}") from None


def load_data(args: argparse.Namespace, max_len: int):
    """(data, split) from ``--data`` (synthetic without it); raises :class:`CLIError`."""
    if args.data is None:
        data = make_synthetic()
        return data, leave_one_out(data, max_len=max_len)
    fmt = args.format
    try:
        if fmt == "auto":
            fmt = detect_format(args.data)
        data = load_dataset(args.data, fmt)
        return data, leave_one_out(data, max_len=max_len)
    except DataFormatError as err:
        if err.format_hint:
            how = f"; pass --format (one of {', '.join(FORMATS)})"
        elif fmt == "auto":  # the file failed before any format was detected (e.g. empty)
            how = ""
        elif args.format == "auto":
            how = f" (read as the detected --format {fmt})"
        else:
            how = f" (read as --format {fmt})"
        raise CLIError(f"argument --data: {err.where}: {err.problem}{how}") from None
    except ValueError as err:  # e.g. nothing survives the 5-core filter
        raise CLIError(f"argument --data: {err}") from None
    except OSError as err:
        raise CLIError(f"argument --data: cannot read {args.data}: {err.strerror or err}") from None


def table(rows: dict[str, dict[str, float]]) -> str:
    width = max(len(name) for name in rows)
    lines = [" " * width + "".join(f"{m:>11}" for m in TABLE_METRICS)]
    for name, metrics in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{metrics[m]:>11.4f}" for m in TABLE_METRICS))
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``) and return the exit code: 0 done,
    2 a bad input (one line on stderr, nothing trained), 1 a diverged run. ``prog`` only names
    the command in messages."""
    try:
        return _run(argv, prog)
    except CLIError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (with --out, --resume continues from the last finished "
              "epoch)", file=sys.stderr)
        return 130


def _run(argv: list[str] | None, prog: str) -> int:
    args = parse_args(argv, prog)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in run.json
    if not args.distributed:
        torch.set_num_threads(args.threads or default_threads())
        return _train(args, prog, None)
    # The machine's default share is split between the processes torchrun started on it.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(args.threads or max(1, default_threads() // local))
    try:
        ddp, args.device = DataParallel.from_torchrun(args.device)
    except RuntimeError as err:
        raise CLIError(f"argument --distributed: {err}") from None
    try:
        code = _train(args, prog, ddp)
        # Leave together (process 0 writes the results last): a process tearing down its gloo
        # connections while another still works can hang in the teardown.
        torch.distributed.barrier()
        return code
    finally:
        if ddp.owns_group:
            torch.distributed.destroy_process_group()


def _train(args: argparse.Namespace, prog: str, ddp: DataParallel | None) -> int:
    main_process = ddp is None or ddp.rank == 0  # only process 0 prints and writes files
    config = build_config(args, prog)
    if ddp is not None:
        try:
            ddp.check_config(config)
        except ValueError as err:
            raise CLIError(f"argument --distributed: {err}") from None
    if args.out is not None:
        check_out(args.out, resume=args.resume, overwrite=args.overwrite)
    start = time.perf_counter()
    data, split = load_data(args, config.max_len)
    if config.drop_last and split.num_train < config.batch_size:
        raise CLIError(f"argument --batch-size: {config.batch_size} with the {config.preset} "
                       f"preset's drop_last leaves no batch of the {split.num_train} training "
                       "samples")
    trainer = Trainer(config, split, args.out, dataset=data.name, cache_dir=args.cache_dir, ddp=ddp)
    if args.resume:
        try:
            trainer.resume()
        except CheckpointError as err:
            raise CLIError(f"argument --resume: {err}") from None
    if args.overwrite and main_process:  # everything checked: only now is the old run given up
        for name in RUN_FILES:
            (args.out / name).unlink(missing_ok=True)
    where = (f"{config.device}" if ddp is None else
             f"{ddp.world} processes ({config.device} on process 0)")
    if main_process:
        print(f"{data.name}: {data.num_users} users, {data.num_items} items, "
              f"{split.num_train} training samples; {config.method} ({config.preset} preset) on "
              f"{where}, {torch.get_num_threads()} CPU threads", flush=True)
    try:
        results = trainer.fit()
    except FloatingPointError as err:  # a diverged run; the last good epoch is checkpointed
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    if not main_process:
        return 0
    popularity = {which: evaluate_popularity(split, which, ties=config.ties)
                  for which in ("valid", "test")}
    if args.out is not None:
        run = {**describe(config.device), "argv": args.argv,
               "wall_s": time.perf_counter() - start,
               "peak_memory_mib": peak_memory_mib(config.device)}
        # results.json last: its presence means the run finished (examples/reproduce.py).
        atomic_write_text(args.out / POPULARITY, json.dumps(popularity, indent=1))
        atomic_write_text(args.out / RUN_INFO, json.dumps(run, indent=1))
        atomic_write_text(args.out / RESULTS, json.dumps(results, indent=1))
        if args.plots:
            from .plots import plot_results

            for path in plot_results(results, args.out):
                print(f"wrote {path}")
    print(f"\ntest metrics ({data.name}, best epoch of {results['epochs']}, "
          f"{results['train_seconds']:.0f}s training, {time.perf_counter() - start:.0f}s total)")
    print(table({config.method: results["test"], "popularity": popularity["test"]}))
    return 0
