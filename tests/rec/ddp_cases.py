"""Worker side of tests/rec/test_ddp.py: each spawned gloo process trains data-parallel."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from adaptive_cl.rec import cli
from adaptive_cl.rec.data import leave_one_out
from adaptive_cl.rec.ddp import DataParallel
from adaptive_cl.rec.synthetic import make_synthetic
from adaptive_cl.rec.train import TrainConfig, train


def small_split():
    return leave_one_out(make_synthetic(num_users=120, num_items=40, mean_length=8.0), 10)


def config(**kw) -> TrainConfig:
    # No dropout: its masks are the only draws that differ between processes and one process.
    base = dict(epochs=2, batch_size=37, max_len=10, hidden=16, inner=32, lr=5e-3,
                holdout_size=64, progress=False, seed=3, dropout=0.0, attn_dropout=0.0)
    return TrainConfig.from_preset("default", **{**base, **kw})


# Odd global batches (uneven shares); the learnable threshold net sees the global batch and its
# soft threshold sends the loss's gradient to it; CL4SRec draws augmentations for every row.
CONFIGS = {
    "adaptiverec": dict(method="adaptiverec", simthres="learnable", threshold="soft"),
    "cl4srec": dict(method="cl4srec", batch_size=39, epochs=1),
}


class Interrupt(Exception):
    pass


def worker(rank: int, world: int, init_file: str, out: str, data_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        out_dir = Path(out)
        ddp = DataParallel()
        split = small_split()
        for name, kw in CONFIGS.items():
            results = train(config(**kw), split, out_dir / name, ddp=ddp)
            if rank == 0:
                (out_dir / f"{name}.json").write_text(json.dumps(results))

        # Interrupted after epoch 1 on every process, then resumed: as the uninterrupted run.
        def stop(row):
            if row["epoch"] == 1:
                raise Interrupt

        cfg = config(**CONFIGS["adaptiverec"])
        try:
            train(cfg, split, out_dir / "cut", ddp=ddp, callback=stop)
        except Interrupt:
            pass
        resumed = train(cfg, split, out_dir / "cut", ddp=ddp, resume=True)
        if rank == 0:
            (out_dir / "resumed.json").write_text(json.dumps(resumed))

        # The CLI under torchrun's environment (the group already exists here).
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT="1", LOCAL_RANK=str(rank))
        code = cli.main(["--data", data_path, "--epochs", "1", "--max-len", "10", "--batch-size", "37",
                         "--method", "sasrec", "--out", str(out_dir / "cli"), "--no-progress",
                         "--distributed"])
        assert code == 0, code
        dist.barrier()  # leave together (a teardown racing a busy peer can hang)
    finally:
        dist.destroy_process_group()
