"""Data-parallel training of the pipeline (``--distributed`` under torchrun, DDP).

The run is the single-process run on the same global batches, split over W processes:

- every process holds the whole training set and draws the same global batches: the generator
  that shuffles, samples same-target partners and draws augmentations is seeded alike
  everywhere and always draws for the whole global batch; process r then computes the rows
  ``rows(n)`` of a global batch of n samples (shares differ by at most one row; a share may be
  empty when n < W);
- each loss term becomes a *share*, and the shares of all processes sum to the single-process
  term: the cross-entropy as the own rows' sum / n; the contrastive loss as the own rows' losses
  of :func:`adaptive_cl.distributed.adaptive_info_nce_distributed` / 2n (every row meets the
  negatives of every process); a term every process computes identically (the learnable
  threshold's regulariser) as value / W;
- each process back-propagates W x its share: DDP averages gradients over the W processes,
  and the distributed loss already hands each process the gradient of the whole batch's loss
  for its rows. The parameter update is then the single-process one;
- the threshold network sees the gathered global batch, and SimThres's similarity statistics
  are taken over the gathered global views, as in one process;
- parameters stay identical on every process, so every process evaluates the same metrics and
  takes the same early-stopping decisions with no communication; process 0 writes the
  checkpoint (holding every process's random state) and the results.

Methods: sasrec, cl4srec, duorec and adaptiverec (``METHODS``); RCL and MCLRec are refused
with a clear error (their objectives and MCLRec's own update order compute the whole batch).

With dropout switched off the run equals the single-process run up to float summation order.
Dropout masks come from per-process random streams (process 0 keeps the single-process
stream), so with dropout the runs agree in distribution, not draw for draw.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..distributed import HOOKS, Shard, adaptive_info_nce_distributed

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: The methods whose objectives compute their own rows' shares (rec/objectives.py). RCL and
#: MCLRec still compute the whole batch on every process.
METHODS = ("sasrec", "cl4srec", "duorec", "adaptiverec")


class DataParallel:
    """This process's place in the group and the few collectives the trainer needs."""

    def __init__(self, group=None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DataParallel needs torch.distributed initialised "
                               "(DataParallel.from_torchrun, or dist.init_process_group)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.owns_group = False  # whether from_torchrun created the group (then the CLI ends it)

    @classmethod
    def from_torchrun(cls, device: str) -> tuple[DataParallel, str]:
        """Join the job torchrun started (gloo on CPU, NCCL on CUDA). Returns the context and
        this process's device ("cuda:LOCAL_RANK" for a CUDA run)."""
        missing = [name for name in _TORCHRUN_ENV if name not in os.environ]
        if missing:
            raise RuntimeError(
                "--distributed runs under torchrun (e.g. torchrun --standalone --nproc_per_node 2 "
                f"-m adaptive_cl.rec --distributed ...); missing environment: {', '.join(missing)}")
        cuda = torch.device(device).type == "cuda"
        if cuda:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if cuda else "gloo")
        ctx = cls()
        ctx.owns_group = owns
        return ctx, device

    def sizes(self, n: int) -> list[int]:
        """Rows of a global batch of n samples on each process (the first n % W get one more)."""
        return [n // self.world + (r < n % self.world) for r in range(self.world)]

    def rows(self, n: int) -> slice:
        sizes = self.sizes(n)
        start = sum(sizes[: self.rank])
        return slice(start, start + sizes[self.rank])

    def gather(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Every process's rows of a global batch of n, in order (no gradient)."""
        return Shard(self.group, self.rank, tuple(self.sizes(n))).gather(x.detach())

    def ce_share(self, model, h: torch.Tensor, targets: torch.Tensor, n: int) -> torch.Tensor:
        """This process's share of the batch's mean cross-entropy: own rows' sum / n."""
        if len(targets) == 0:
            return h.sum() * 0.0  # an empty share: zero, still in the graph DDP expects
        return model.loss(h, targets) * (len(targets) / n)

    def info_nce_share(self, z1: torch.Tensor, z2: torch.Tensor, k, n: int, **options) -> torch.Tensor:
        """This process's share of the global batch's contrastive loss (own rows' sum / 2n)."""
        rows = adaptive_info_nce_distributed(z1, z2, k, reduction="none", group=self.group, **options)
        return rows.sum() / (2 * n)

    def replicated_share(self, value: torch.Tensor) -> torch.Tensor:
        """The share of a term every process computes identically."""
        return value / self.world

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    @staticmethod
    def check_config(config) -> None:
        """Raise ValueError for what data-parallel training does not cover yet."""
        if config.method not in METHODS:
            raise ValueError(f"method {config.method!r} does not train data-parallel yet "
                             f"(its objective computes the whole batch); these do: {', '.join(METHODS)}")
        if config.simthres == "learnable-flat":
            # Its weight gradient is written outside autograd (simthres.FlattenedThresholdNet),
            # where DDP's gradient hooks would not see it.
            raise ValueError("simthres='learnable-flat' does not train data-parallel; use "
                             "'learnable' (any batch size) or train in one process")
        if config.loss_backend != "auto" and config.loss_backend not in HOOKS:
            raise ValueError(f"loss_backend={config.loss_backend!r} has no distributed implementation "
                             f"yet; data-parallel training runs 'auto' or one of {sorted(HOOKS)}")
