"""Contrastive training on the global batch of several processes: DDP + the distributed loss.

    torchrun --standalone --nproc_per_node 2 examples/ddp_contrastive.py                 # CPU, gloo
    torchrun --standalone --nproc_per_node 4 examples/ddp_contrastive.py --device cuda   # a GPU per rank, NCCL
    torchrun --standalone --nproc_per_node 3 examples/ddp_contrastive.py --check         # compare with 1 process

Every step each rank encodes its share of a global batch of sequences' two views (shares may be
uneven: 3 ranks and a batch of 64 give 22, 21, 21) and calls ``adaptive_info_nce_distributed``:
every row is contrasted with all 2B views of all ranks, and the loss is the single-process loss
of the global batch. DDP averages parameter gradients over the W ranks while the loss already
gives each rank the gradient of the global loss, so the loss is scaled by W before backward.

``--check``: rank 0 then trains a copy of the initial model in one process on the same global
batches with ``adaptive_info_nce`` and prints the largest parameter difference (float64, so the
two runs differ only by summation order).
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from adaptive_cl import adaptive_info_nce
from adaptive_cl.distributed import adaptive_info_nce_distributed


def make_encoder(dim_in: int, dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim_in, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


def global_batch(step: int, batch: int, dim_in: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The same two views on every rank (seeded by the step): items of 8 latent clusters, so
    same-cluster rows are the false negatives the threshold turns into positives."""
    g = torch.Generator().manual_seed(1000 + step)
    centers = torch.randn(8, dim_in, generator=g, dtype=torch.float64)
    x = centers[torch.randint(0, 8, (batch,), generator=g)] + 0.3 * torch.randn(batch, dim_in, generator=g, dtype=torch.float64)
    x_aug = x + 0.2 * torch.randn(batch, dim_in, generator=g, dtype=torch.float64)
    return x.to(dtype), x_aug.to(dtype)


LOSS_OPTIONS = dict(temperature=0.5, denominator="all")
THRESHOLD = 0.6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64, help="global batch B (split over the ranks)")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    ap.add_argument("--check", action="store_true", help="compare with one process on the global batch")
    args = ap.parse_args()

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # one core per rank
    dtype = torch.float64 if args.check else torch.float32

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    initial = make_encoder(16, args.dim).to(dtype)
    model = DDP(copy.deepcopy(initial).to(device), device_ids=[device.index] if cuda else None)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    share = torch.arange(args.batch).tensor_split(world)[rank]  # this rank's rows (uneven allowed)

    for step in range(args.steps):
        x, x_aug = global_batch(step, args.batch, 16, dtype)
        z = model(x[share].to(device))
        z_aug = model(x_aug[share].to(device))
        loss = adaptive_info_nce_distributed(z, z_aug, THRESHOLD, **LOSS_OPTIONS)
        opt.zero_grad()
        (loss * world).backward()  # DDP averages over the ranks: undo it (module docstring)
        opt.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  global loss {loss.item():.6f}  ({world} ranks, B={args.batch})", flush=True)

    if args.check and rank == 0:
        single = initial.to(device)
        opt1 = torch.optim.SGD(single.parameters(), lr=args.lr)
        for step in range(args.steps):
            x, x_aug = global_batch(step, args.batch, 16, dtype)
            loss1 = adaptive_info_nce(single(x.to(device)), single(x_aug.to(device)), THRESHOLD, **LOSS_OPTIONS)
            opt1.zero_grad()
            loss1.backward()
            opt1.step()
        diff = max((a - b).abs().max().item() for a, b in zip(model.module.parameters(), single.parameters()))
        print(f"check: one process, same global batches: final loss {loss1.item():.6f}, "
              f"largest parameter difference {diff:.3e}", flush=True)
        if not diff < 1e-9:  # float64: summation-order differences are ~1e-15 per step
            raise SystemExit(f"check failed: parameters differ by {diff:.3e} from one-process training")
    # Leave together: a rank tearing down its gloo connections while another still works can
    # hang in the teardown (seen with torch 2.13 on CPU).
    del model
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
