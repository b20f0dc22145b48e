"""The training CLI: train SASRec with a contrastive objective and compare it with the popularity
baseline.

    adaptive-cl-train                                   # AdaptiveRec on the synthetic demo data
    adaptive-cl-train --data Beauty.txt --method duorec --epochs 100 --out runs/x
    python -m adaptive_cl.rec ...                       # the same, without the console script
    torchrun --standalone --nproc_per_node 2 -m adaptive_cl.rec --distributed ...   # DDP (rec/ddp.py)

(``examples/train_sasrec.py`` is a thin wrapper around :func:`main`.)

Without ``--data`` it trains on the embedded synthetic dataset (planted sequential structure,
sequences of ~12 items) with a short schedule (``--epochs 3``, ``--max-len 20``) that finishes
in under three minutes on a 2-core CPU; with ``--data`` the defaults are the protocol's
(``--epochs 100``, ``--max-len 50``, early stopping with patience 10).

Metrics rank ties pessimistically (an item scoring as high as the target counts as above it), so
tied scores can only lower them; the popularity baseline, whose integer counts tie often, is
measured the same way. On a CPU shared with other jobs, ``--threads 1`` is often several times
faster than PyTorch's default of one thread per core (its small operations then wait on each
other's preempted threads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .data import FORMATS, DataFormatError, leave_one_out, load_dataset
from .metrics import evaluate_popularity
from .objectives import CONTRASTS
from .synthetic import make_synthetic
from .ddp import DataParallel
from .train import METHODS, PRESETS, SIMTHRES, Trainer, TrainConfig

SYNTHETIC_EPOCHS, SYNTHETIC_MAX_LEN = 3, 20
DATA_EPOCHS, DATA_MAX_LEN = 100, 50
TABLE_METRICS = ("NDCG@5", "NDCG@10", "NDCG@20", "Recall@5", "Recall@10", "Recall@20",
                 "MRR@10")


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value
    return parse


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine")
    return text


PROG = "adaptive-cl-train"


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="interaction file (default: synthetic data)")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    p.add_argument("--method", default="adaptiverec", choices=METHODS)
    p.add_argument("--contrast", choices=CONTRASTS, help="DuoRec/AdaptiveRec pair (us_x)")
    p.add_argument("--simthres", choices=SIMTHRES,
                   help="AdaptiveRec threshold (default: statistical; paper: learnable-flat)")
    p.add_argument("--preset", default="default", choices=PRESETS)
    p.add_argument("--epochs", type=_positive(int))
    p.add_argument("--batch-size", type=_positive(int))
    p.add_argument("--lr", type=_positive(float))
    p.add_argument("--max-len", type=_positive(int))
    p.add_argument("--patience", type=_positive(int))
    p.add_argument("--device", type=_device,
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--threads", type=_positive(int),
                   help="CPU threads for PyTorch (default: PyTorch's, one per core)")
    p.add_argument("--out", type=Path, help="directory for results.json and checkpoint.pt")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--plots", action="store_true", help="write PNG figures into OUT")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over the processes torchrun starts (gloo on CPU, NCCL on "
                        "CUDA: one GPU per process); --batch-size stays the global batch")
    args = p.parse_args(argv)
    if args.data is not None and not args.data.is_file():
        p.error(f"argument --data: no such file: {args.data}")
    if args.resume and args.out is None:
        p.error("argument --resume: needs --out DIR holding checkpoint.pt")
    if args.plots and args.out is None:
        p.error("argument --plots: needs --out DIR for the figures")
    if args.simthres is not None and args.method != "adaptiverec":
        p.error(f"argument --simthres: only applies to --method adaptiverec, not {args.method}")
    if args.contrast is not None and args.method not in ("duorec", "adaptiverec"):
        p.error(f"argument --contrast: only applies to duorec and adaptiverec, not {args.method}")
    return args


def build_config(args: argparse.Namespace, prog: str = PROG) -> TrainConfig:
    synthetic = args.data is None
    overrides = {
        "method": args.method,
        "epochs": args.epochs or (SYNTHETIC_EPOCHS if synthetic else DATA_EPOCHS),
        "max_len": args.max_len or (SYNTHETIC_MAX_LEN if synthetic else DATA_MAX_LEN),
        "device": args.device,
        "seed": args.seed,
        "progress": not args.no_progress,
        "record_histograms": args.plots,
        "amp": torch.device(args.device).type == "cuda",
    }
    for flag in ("contrast", "simthres", "batch_size", "lr", "patience"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    if args.simthres == "learnable-flat":
        overrides["drop_last"] = True  # the flattened threshold net has a fixed batch size
    try:
        return TrainConfig.from_preset(args.preset, **overrides)
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def table(rows: dict[str, dict[str, float]]) -> str:
    width = max(len(name) for name in rows)
    lines = [" " * width + "".join(f"{m:>11}" for m in TABLE_METRICS)]
    for name, metrics in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{metrics[m]:>11.4f}" for m in TABLE_METRICS))
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``); returns the exit code. ``prog`` only
    names the command in messages."""
    args = parse_args(argv, prog)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ddp = None
    if args.distributed:
        try:
            ddp, args.device = DataParallel.from_torchrun(args.device)
        except RuntimeError as err:
            print(f"{prog}: error: argument --distributed: {err}", file=sys.stderr)
            return 2
    try:
        code = _run(args, prog, ddp)
        if ddp is not None:
            # Leave together (process 0 writes the results last): a process tearing down its
            # gloo connections while another still works can hang in the teardown.
            torch.distributed.barrier()
        return code
    finally:
        if ddp is not None and ddp.owns_group:
            torch.distributed.destroy_process_group()


def _run(args: argparse.Namespace, prog: str, ddp: DataParallel | None) -> int:
    main_process = ddp is None or ddp.rank == 0  # only process 0 prints and writes files
    config = build_config(args, prog)
    if ddp is not None:
        try:
            DataParallel.check_backend(config.loss_backend)
        except ValueError as err:
            print(f"{prog}: error: argument --distributed: {err}", file=sys.stderr)
            return 2
    start = time.perf_counter()
    try:
        data = make_synthetic() if args.data is None else load_dataset(args.data, args.format)
        # Raises when no user keeps the 3 interactions a leave-one-out split needs (for
        # example after the 5-core filter).
        split = leave_one_out(data, max_len=config.max_len)
    except (DataFormatError, ValueError) as err:
        print(f"{prog}: error: argument --data: {err}", file=sys.stderr)
        return 2
    where = config.device if ddp is None else f"{ddp.world} processes ({config.device} on process 0)"
    if main_process:
        print(f"{data.name}: {data.num_users} users, {data.num_items} items, "
              f"{split.num_train} training samples; {config.method} ({config.preset} preset) on "
              f"{where}", flush=True)
    trainer = Trainer(config, split, args.out, dataset=data.name, ddp=ddp)
    if args.resume:
        try:
            trainer.resume()
        except ValueError as err:
            print(f"{prog}: error: argument --resume: {err}", file=sys.stderr)
            return 2
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
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        (args.out / "popularity.json").write_text(json.dumps(popularity, indent=1))
        if args.plots:
            from .plots import plot_results

            for path in plot_results(results, args.out):
                print(f"wrote {path}")
    print(f"\ntest metrics ({data.name}, best epoch of {results['epochs']}, "
          f"{results['train_seconds']:.0f}s training, {time.perf_counter() - start:.0f}s total)")
    print(table({config.method: results["test"], "popularity": popularity["test"]}))
    return 0
