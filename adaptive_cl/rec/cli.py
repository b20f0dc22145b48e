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
from .mclrec import REGULARIZERS, UPDATES
from .metrics import evaluate_popularity
from .objectives import CONTRASTS
from .rcl import NGRAMS
from .rcl import WEIGHTINGS as RCL_WEIGHTINGS
from .synthetic import make_synthetic
from .augment import MASK_IDS
from .simthres import KSTAT_STARTS, THRESHOLD_INITS
from .train import (
    CHECKPOINT,
    COMPILE_MODES,
    METHODS,
    PRESETS,
    SIMILARITIES,
    SIMTHRES,
    STOP_METRICS,
    THRESHOLDED,
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
_fraction = number(float, lambda v: 0 < v <= 1, "in (0, 1]")
_non_negative = number(float, lambda v: 0 <= v < float("inf"), "finite and >= 0")


#: Method-specific flags: (flag, TrainConfig field, the method it belongs to).
METHOD_FLAGS = (
    ("--rcl-alpha", "rcl_alpha", "rcl"),
    ("--rcl-ngram", "rcl_ngram", "rcl"),
    ("--rcl-weighting", "rcl_weighting", "rcl"),
    ("--mclrec-update", "mclrec_update", "mclrec"),
    ("--mclrec-regularizer", "mclrec_regularizer", "mclrec"),
    ("--mclrec-lambda", "mclrec_lambda", "mclrec"),
    ("--mclrec-beta", "mclrec_beta", "mclrec"),
)


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
    """Parse and cross-check the flags; raises :class:`CLIError` naming the bad one."""
    p = _Parser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="interaction file (default: synthetic data)")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    p.add_argument("--method", default="adaptiverec", choices=METHODS)
    p.add_argument("--contrast", choices=CONTRASTS, help="DuoRec/AdaptiveRec pair (us_x)")
    p.add_argument("--simthres", choices=SIMTHRES,
                   help="AdaptiveRec's threshold (adaptiverec default: statistical, paper preset: "
                        "learnable-flat; rcl and mclrec default: none)")
    p.add_argument("--rcl-alpha", type=_fraction,
                   help="RCL: top fraction of similar training histories per user (0.05)")
    p.add_argument("--rcl-ngram", type=int, choices=NGRAMS,
                   help="RCL: Jaccard over items (1) or consecutive item pairs (2)")
    p.add_argument("--rcl-weighting", choices=RCL_WEIGHTINGS,
                   help="RCL weak-term weights: similarity (Eq. 16), row (released code), none")
    p.add_argument("--cache-dir", type=Path,
                   help="cache for RCL's weak positives (default: OUT/cache; none without --out)")
    p.add_argument("--mclrec-update", choices=UPDATES,
                   help="MCLRec: alternating encoder/augmenter/encoder steps, or joint (deviation)")
    p.add_argument("--mclrec-regularizer", choices=REGULARIZERS,
                   help="MCLRec's R: paper (Eqs. 11-15) or code (per row, three pairs)")
    p.add_argument("--mclrec-lambda", type=_non_negative, help="MCLRec: weight of L_cl1 (0)")
    p.add_argument("--mclrec-beta", type=_non_negative, help="MCLRec: weight of L_cl2 (0.05)")
    p.add_argument("--preset", default="default", choices=PRESETS,
                   help="default: the protocol; paper: AdaptiveRec's released configuration "
                        "(adaptiverec, and duorec as its Table 1 baseline); release: each "
                        "method's own released configuration (README: Presets)")
    p.add_argument("--similarity", choices=SIMILARITIES,
                   help="of the contrastive term: cos or dot (auto: dot for duorec, cos otherwise)")
    p.add_argument("--temperature", type=positive(float), help="contrastive tau (1.0)")
    p.add_argument("--cl-weight", type=_non_negative,
                   help="weight of the contrastive term, lambda (0.1)")
    p.add_argument("--stop-metric", choices=STOP_METRICS,
                   help="validation metric of early stopping and the best epoch (NDCG@10)")
    p.add_argument("--kstat-start", choices=KSTAT_STARTS,
                   help="statistical SimThres in the first epoch, before any statistic: running "
                        "(the epoch's batches so far), none (no extra positives), zero (k = 0)")
    p.add_argument("--threshold-init", choices=THRESHOLD_INITS,
                   help="learnable-flat's initialisation: nn.Linear's (default) or normal "
                        "N(0, 0.02) (paper preset)")
    p.add_argument("--threshold-detach", action=argparse.BooleanOptionalAction, default=None,
                   help="feed the threshold network detached representations (default; the "
                        "paper preset feeds them attached, as released)")
    p.add_argument("--mask-id", choices=MASK_IDS,
                   help="cl4srec/mclrec mask augmentation: a dedicated token or the padding id")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on CUDA (default: on with the default preset, off with "
                        "paper and release, which reproduce in float32; never on CPU)")
    p.add_argument("--epochs", type=positive(int))
    p.add_argument("--batch-size", type=positive(int))
    p.add_argument("--lr", type=positive(float))
    p.add_argument("--max-len", type=positive(int))
    p.add_argument("--patience", type=positive(int))
    p.add_argument("--max-batches", type=positive(int),
                   help="train at most this many batches per epoch (smoke tests)")
    p.add_argument("--device", type=_device,
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=_seed, default=2024)
    p.add_argument("--no-compile", action="store_true",
                   help="run the training passes eagerly (default on CUDA: torch.compile)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode ('reduce-overhead' adds CUDA graphs)")
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
    if args.simthres is not None and args.method not in THRESHOLDED:
        p.error(f"argument --simthres: only applies to --method {', '.join(THRESHOLDED)}, "
                f"not {args.method}")
    for flag, field, method in METHOD_FLAGS:
        if getattr(args, field) is not None and args.method != method:
            p.error(f"argument {flag}: only applies to --method {method}, not {args.method}")
    if args.cache_dir is not None and args.method != "rcl":
        p.error(f"argument --cache-dir: only applies to --method rcl, not {args.method}")
    if args.contrast is not None and args.method not in ("duorec", "adaptiverec"):
        p.error(f"argument --contrast: only applies to duorec and adaptiverec, not {args.method}")
    return args


def build_config(args: argparse.Namespace, prog: str = PROG) -> TrainConfig:
    """The run's :class:`TrainConfig` from the flags; raises :class:`CLIError` if invalid."""
    synthetic = args.data is None
    try:
        preset_epochs = TrainConfig.preset_fields(args.preset, args.method).get("epochs")
    except ValueError as err:
        raise CLIError(f"argument --preset: {err}") from None
    overrides = {
        "method": args.method,
        # A preset's own epoch budget (DuoRec's release: 50) stands in for the protocol's.
        "epochs": args.epochs or (SYNTHETIC_EPOCHS if synthetic else preset_epochs or DATA_EPOCHS),
        "max_len": args.max_len or (SYNTHETIC_MAX_LEN if synthetic else DATA_MAX_LEN),
        "device": args.device,
        "seed": args.seed,
        "progress": not args.no_progress,
        "record_histograms": args.plots,
        "amp": torch.device(args.device).type == "cuda" and (
            args.amp if args.amp is not None else args.preset == "default"),
        # Compiling pays off on a GPU, where the step is launch-bound; on a CPU its minutes of
        # compilation would outweigh a short run. Data-parallel runs stay eager (DDP wraps the
        # plain module).
        "compile": (torch.device(args.device).type == "cuda" and not args.no_compile
                    and not args.distributed),
        "compile_mode": args.compile_mode,
    }
    for flag in ("contrast", "simthres", "batch_size", "lr", "patience", "max_batches",
                 "similarity", "temperature", "cl_weight", "stop_metric", "kstat_start",
                 "threshold_init", "threshold_detach", "mask_id",
                 *(field for _, field, _ in METHOD_FLAGS)):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    if args.simthres == "learnable-flat":
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
