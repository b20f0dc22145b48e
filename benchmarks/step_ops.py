#!/usr/bin/env python3
"""Operator calls and host syncs per training step of each method, counted on the CPU.

    python benchmarks/step_ops.py                      # eager
    python benchmarks/step_ops.py --compile            # the encoder through torch.compile
    python benchmarks/step_ops.py --code /path/to/old  # another checkout's package (before/after)

On a GPU each operator call launches about one kernel, and a launch-bound step costs its number
of launches; this counts them where no GPU is. A step's count is the difference between epochs
of ``k + 1`` and ``k`` identical batches (torch.profiler, CPU activity), so per-epoch work
(percentiles, the scheduler) cancels and the script needs only ``Trainer(config, split)``,
``Trainer._batches`` and ``Trainer.train_epoch``, present in every version of the pipeline.

Columns: **aten ops**: top-level ATen operator calls (those not made by another ATen operator:
from Python, the autograd engine or a compiled graph; an operator implemented by others counts
once); **Inductor kernels**: the fused kernels of compiled graphs (``cpp_fused_*`` on the CPU,
whose counterparts on CUDA are Triton kernels); **host syncs**: calls that on CUDA wait for
the device (:mod:`adaptive_cl.rec.hostsync`, loaded from this checkout). Views and ``detach``
are counted as aten ops although they launch nothing, the same before and after. The
contrastive loss runs on ``--loss-backend`` (default: the PyTorch reference, about 60 ops forward
and backward, and one boolean-mask index: 2 of the host syncs); on CUDA the fused Triton kernel
replaces it with a handful of launches and no sync (tests/rec/test_train_step.py checks that
under Triton's interpreter).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _hostsync():
    """HostSyncs from this checkout, whichever package --code imports."""
    spec = importlib.util.spec_from_file_location(
        "_hostsync", os.path.join(ROOT, "adaptive_cl", "rec", "hostsync.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HostSyncs


def count(trainer, batches, HostSyncs, torch, syncs: bool) -> tuple[int, int, int]:
    """(top-level aten ops, Inductor kernels, host syncs or 0) of one ``train_epoch`` over
    ``batches``."""
    from torch.profiler import ProfilerActivity, profile

    trainer._batches = lambda: list(batches)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_epoch()
    found = 0
    if syncs:  # a pass of its own: a dispatch mode changes what is dispatched
        with HostSyncs() as detector:
            trainer.train_epoch()
        found = detector.count
    ops = kernels = 0
    for e in prof.events():
        if e.name.startswith("aten::"):
            parent = e.cpu_parent
            ops += parent is None or not parent.name.startswith("aten::")
        elif "cpp_fused" in e.name or e.name.startswith("triton_"):
            kernels += 1
    return ops, kernels, found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+",
                    default=["sasrec", "cl4srec", "duorec", "adaptiverec", "rcl", "mclrec"])
    ap.add_argument("--compile", action="store_true", help="TrainConfig(compile=True)")
    ap.add_argument("--code", help="import adaptive_cl from this checkout instead")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--steps", type=int, default=2, help="k: epochs of k and k + 1 steps")
    ap.add_argument("--loss-backend", default="reference",
                    help="the contrastive loss's backend (default: the PyTorch reference, as "
                         "in NOTES.md's table; 'auto' picks the C++ extension on a CPU)")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.code) if args.code else ROOT)

    import torch

    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # name each fused kernel in the trace
    from adaptive_cl.rec import train as train_module
    from adaptive_cl.rec.data import leave_one_out
    from adaptive_cl.rec.synthetic import make_synthetic

    HostSyncs = _hostsync()
    torch.set_num_threads(1)
    split = leave_one_out(make_synthetic(), args.max_len)
    b = args.batch_size
    batches = [torch.arange(i * b, (i + 1) * b) for i in range(args.steps + 1)]
    code = os.path.abspath(args.code) if args.code else ROOT
    print(f"# aten ops per training step, {'compiled' if args.compile else 'eager'}; "
          f"torch {torch.__version__}; batch {b}, max_len {args.max_len}, SASRec 2x64; "
          f"package from {code}")
    print("\n| method | aten ops | Inductor kernels | host syncs | (first epoch s) |")
    print("|---|---:|---:|---:|---:|")
    for method in args.methods:
        if method not in train_module.METHODS:
            print(f"| {method} | not in this version | | | |")
            continue
        extra = {"compile": True} if args.compile else {}
        config = train_module.TrainConfig.from_preset(
            "default", method=method, max_len=args.max_len, batch_size=b, epochs=1,
            progress=False, loss_backend=args.loss_backend, **extra)
        trainer = train_module.Trainer(config, split)
        start = time.perf_counter()
        # Dynamo gives up on code run under a dispatch mode: host syncs are counted eagerly
        # only (on CUDA, benchmarks/train_speed.py checks the compiled step).
        syncs = not args.compile
        count(trainer, batches[:1], HostSyncs, torch, syncs)  # warm-up (compiles)
        first = time.perf_counter() - start
        small = count(trainer, batches[:-1], HostSyncs, torch, syncs)
        large = count(trainer, batches, HostSyncs, torch, syncs)
        ops, kernels, found = (x - y for x, y in zip(large, small))
        print(f"| {method} | {ops} | {kernels} | {found if syncs else '—'} | {first:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
