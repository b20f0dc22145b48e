"""Two-tower retrieval with the adaptive loss: a SASRec user tower against the item embedding
table as item tower, trained with in-batch negatives (``layout="cross"``).

Each training sample is (a user's history, the next item). A batch of B samples gives B user
vectors h_i (SASRec over the history) and B item vectors e_j (the target items' embeddings,
the same table SASRec reads its inputs from); row i's positive is its own target, every other
target in the batch is a candidate. Three corrections of in-batch retrieval, all options of
:func:`adaptive_cl.adaptive_info_nce`:

- logQ (``log_q``): a popular item appears as an in-batch negative more often than a rare one,
  in proportion to its share q_j of the training targets, so its logit is lowered by log q_j
  (Yi et al. 2019, TFRS's ``candidate_sampling_probability``);
- accidental hits (``labels`` = item ids, ``same_label="exclude"``): another row whose target is
  the same item is not a negative; it is dropped from the row;
- the adaptive threshold ``k``: candidates more similar to the user than k become extra,
  down-weighted positives (AdaptiveRec's false-negative rule); k is the previous epoch's
  ``quantile`` of the candidate similarities, counted by the loss itself (``return_stats``),
  and off during the first epoch.

Ranking scores the user vector against every item by cosine (the loss's similarity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import adaptive_info_nce, histogram_percentile
from .data import LeaveOneOutSplit
from .metrics import evaluate_full_ranking
from .model import SASRec

#: Histogram of the candidate similarities that sets the next epoch's threshold.
STATS_BINS = 2048


def item_log_q(train_targets: torch.Tensor, num_items: int) -> torch.Tensor:
    """(num_items + 1,) float32 log sampling probability of each item as an in-batch column:
    log of its share of the training targets (an item never a target gets the share of one
    occurrence; it never appears as a column, so its value only has to be finite)."""
    counts = torch.bincount(train_targets.to(torch.int64), minlength=num_items + 1).double()
    return torch.log(counts.clamp(min=1.0) / counts.sum()).float()


@dataclass
class TwoTowerHistory:
    """What training did, per epoch: the mean loss and the threshold used (None: off)."""

    losses: list[float] = field(default_factory=list)
    thresholds: list[float | None] = field(default_factory=list)


def train_two_tower(
    split: LeaveOneOutSplit,
    *,
    epochs: int = 10,
    batch_size: int = 256,
    hidden: int = 64,
    layers: int = 2,
    dropout: float = 0.2,
    temperature: float = 0.1,
    quantile: float = 0.99,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    backend: str = "auto",
    log=print,
) -> tuple[SASRec, TwoTowerHistory]:
    """Train the towers on ``split``'s training samples; returns (the model, its history).

    ``quantile``: the threshold's percentile of the candidate similarities (None: no
    threshold). ``max_batches``: stop each epoch after this many batches (tests)."""
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (in-batch negatives); got {batch_size}")
    torch.manual_seed(seed)
    model = SASRec(split.num_items, split.max_len, hidden=hidden, layers=layers, heads=2, inner=4 * hidden,
                   dropout=dropout, attn_dropout=dropout).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    log_q_items = item_log_q(split.train_targets, split.num_items).to(device)
    inputs, targets = split.train_inputs.to(device), split.train_targets.to(device)
    g = torch.Generator().manual_seed(seed)
    history = TwoTowerHistory()
    k = None
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(targets), generator=g).to(device)
        counts = torch.zeros(STATS_BINS, dtype=torch.int64, device=device)
        total, batches = torch.zeros((), device=device), 0
        for start in range(0, len(order) - batch_size + 1, batch_size):  # full batches only
            idx = order[start:start + batch_size]
            items = targets[idx]
            users = model(inputs[idx])
            loss, stats = adaptive_info_nce(
                users, model.item_emb(items), k, layout="cross", temperature=temperature,
                log_q=log_q_items[items], labels=items, same_label="exclude", backend=backend,
                return_stats=True, stats_bins=STATS_BINS)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            counts += stats.histogram
            total += loss.detach()
            batches += 1
            if max_batches is not None and batches >= max_batches:
                break
        if batches == 0:
            raise ValueError(f"fewer training samples ({len(targets)}) than one batch ({batch_size})")
        history.losses.append(float(total) / batches)
        history.thresholds.append(k)
        log(f"epoch {epoch + 1}: loss {history.losses[-1]:.4f}"
            + ("" if k is None else f", threshold k = {k:.3f}"))
        if quantile is not None:
            k = float(histogram_percentile(counts, quantile))
            if math.isnan(k):
                k = None
    return model, history


@torch.no_grad()
def evaluate_two_tower(model: SASRec, split: LeaveOneOutSplit, which: str = "test", **kw) -> dict[str, float]:
    """Full-ranking metrics (``evaluate_full_ranking``) of cosine(user vector, item vector)."""
    model.eval()
    items = F.normalize(model.output_weight().float(), dim=1)

    def scores(batch: torch.Tensor) -> torch.Tensor:
        s = F.normalize(model(batch).float(), dim=1) @ items.T
        return F.pad(s, (1, 0), value=-math.inf)  # column 0 is padding

    inputs, targets = split.eval_tensors(which)
    return evaluate_full_ranking(scores, inputs, targets, device=next(model.parameters()).device, **kw)
