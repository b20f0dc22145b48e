"""MCLRec: meta-optimised contrastive learning with learnable augmenters (Qin et al., SIGIR
2023, arXiv 2304.07763).

Per batch: two data-augmented views of each sequence (two distinct operations among crop,
mask, reorder; MCLRec's rates keep 50% / mask 50% / shuffle 80%) are encoded to ``h1, h2``; two
learnable augmenters (MLP hidden -> hidden/2 -> hidden/4 -> hidden, GELU, L2-normalised output:
64-32-16-64 in the paper) give the model-augmented views ``z1 = w1(h1)``, ``z2 = w2(h2)``.
With ``L(x, y)`` InfoNCE over the 2B views (inner product, tau = 1; Eq. 8):

    L_cl1 = L(h1, h2)                                                    (Eq. 7)
    L_cl2 = L(z1, z2) + L(h1, z2) + L(h2, z1)                            (Eq. 9)
    L0    = L_rec + lambda L_cl1 + beta L_cl2 + gamma R    (encoder, Eq. 14)
    L1    = L_cl2 + gamma R                                (augmenters, Eq. 15)

with gamma = 0.1 beta (Section 4.1.4; ``reg_weight`` is that 0.1). The contrastive
regulariser R (Eqs. 11-13) on the inner products of ``(z1, z2)``, positives sigma+ (a view and
its partner) and negatives sigma- (every other pair but a view with itself):

    o_min = min(min sigma+, max sigma-),  o_max = max(min sigma+, max sigma-)
    R = mean [sigma+ - o_min]_+ + mean [o_max - sigma-]_+

R pulls the positive scores down to the hardest one and the negative scores up to the hardest
one: it keeps the augmented pairs from becoming trivially easy (collapsed views), it does not
separate positives from negatives (the InfoNCE terms do that).

Update order (``update="alternating"``, the paper's Algorithm 1 as the released code runs it):
an encoder step on L0 with the augmenters frozen (gradients pass through them, they do not
change), an augmenter step on L1 with their own Adam (the encoder re-encodes the same
augmented sequences after its update, with fresh dropout, and does not change), and a second
encoder step on L0. ``update="joint"`` is a labelled deviation: one step on L0 over the encoder
and the augmenters together (the released code's ``joint=1``).

``regularizer="code"`` is the released code's variant: R computed per row (each row's own
positive and hardest negative) and summed over the three pairs of L_cl2, weighted gamma = 0.1
beta in the encoder loss but a fixed 0.1 in the augmenter loss. Other differences from the code,
deliberately: the code's mask operation writes the padding id (the item drops out of attention)
where this one writes CL4SRec's mask token, and the code's L_con averages the two directions
over the 2B rows where Eq. 8 adds them (a factor of 2 that lambda and beta absorb; the published
weights, lambda 0 and beta 0.05 on Beauty, are the code's).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import Augmenter
from .model import SASRec
from .objectives import Batch, ContrastiveTerm, ObjectiveOutput, _check_weight, encode

REGULARIZERS = ("paper", "code")
UPDATES = ("alternating", "joint")


class ViewAugmenter(nn.Module):
    """A learnable model augmenter: a three-layer MLP with GELU, L2-normalised output."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be an integer >= 1, got {hidden!r}")
        widths = (hidden, max(hidden // 2, 1), max(hidden // 4, 1), hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.gelu(x)
        return F.normalize(x, dim=1)


def pair_scores(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inner products over the 2B views ``[a; b]`` in float32: each view's score with its
    partner ``(N,)`` and with every other view but itself ``(N, N - 2)``."""
    if a.dim() != 2 or a.shape != b.shape or len(a) < 2:
        raise ValueError(f"a and b must be equal (B, D) with B >= 2, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    views = torch.cat([a, b]).float()
    with torch.autocast(a.device.type, enabled=False):
        s = views @ views.T
    n, half = len(views), len(a)
    rows = torch.arange(n, device=a.device)[:, None]
    positive = s[rows[:, 0], (rows[:, 0] + half) % n]
    # Row i takes columns (i + 1 + t) mod N for t = 0..N-2 (all but itself); its partner sits
    # at t = B - 1, which is left out.
    t = torch.cat([torch.arange(half - 1, device=a.device),
                   torch.arange(half, n - 1, device=a.device)])
    return positive, s.gather(1, (rows + 1 + t[None, :]) % n)


def margin_regularizer(a: torch.Tensor, b: torch.Tensor, scope: str = "batch") -> torch.Tensor:
    """MCLRec's R (Eqs. 11-13) on the views ``(a, b)``: ``scope="batch"`` takes the extremes
    over the whole batch (the paper's sets sigma+ and sigma-), ``"row"`` per row (the code)."""
    positive, negative = pair_scores(a, b)
    if scope == "batch":
        hardest_positive, hardest_negative = positive.min(), negative.max()
    elif scope == "row":
        hardest_positive, hardest_negative = positive, negative.max(1).values
    else:
        raise ValueError(f"scope must be 'batch' or 'row', got {scope!r}")
    low = torch.minimum(hardest_positive, hardest_negative)
    high = torch.maximum(hardest_positive, hardest_negative)
    if scope == "row":
        high = high[:, None]
    return F.relu(positive - low).mean() + F.relu(high - negative).mean()


@contextmanager
def frozen(module: nn.Module):
    """Parameters of ``module`` get no gradient inside (it still passes gradients through)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class MCLRecObjective(nn.Module):
    """MCLRec's losses and its three-step update (see the module docstring).

    Args:
        hidden: the encoder's width (the augmenters map it to itself).
        augmenter: the data augmentations (MCLRec: ``Augmenter(n, 0.5, 0.5, 0.8)``).
        term: the InfoNCE setting of every contrastive term (inner product and tau = 1 in the
            paper; with a SimThres, AdaptiveRec's threshold on top of each term).
        lam, beta: lambda and beta of Eq. 14 (Beauty: 0 and 0.05).
        reg_weight: gamma / beta (the paper's 0.1).
        regularizer: ``"paper"`` or ``"code"`` (see the module docstring).
        update: ``"alternating"`` (encoder / augmenters / encoder per batch) or ``"joint"``.
        lr, weight_decay: the augmenters' Adam (alternating only; the paper's l' = 1e-3).
    """

    needs_positives = False

    def __init__(
        self,
        hidden: int,
        augmenter: Augmenter,
        term: ContrastiveTerm,
        lam: float = 0.0,
        beta: float = 0.05,
        reg_weight: float = 0.1,
        regularizer: str = "paper",
        update: str = "alternating",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {regularizer!r}")
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        self.data_augmenter = augmenter
        self.augmenters = nn.ModuleList([ViewAugmenter(hidden), ViewAugmenter(hidden)])
        self.term = term
        self.lam = _check_weight(lam)
        self.beta = _check_weight(beta)
        self.reg_weight = _check_weight(reg_weight)
        self.regularizer = regularizer
        self.update = update
        self.optimizer = (
            # fused: one kernel, and no per-parameter step counter read on the host
            torch.optim.Adam(self.augmenters.parameters(), lr=lr, weight_decay=weight_decay,
                             fused=True)
            if update == "alternating" else None
        )

    @property
    def simthres(self):
        return self.term.simthres

    def main_parameters(self) -> list[nn.Parameter]:
        """What the Trainer's optimizer updates: everything but the augmenters when they have
        their own Adam (a learnable threshold net, if any, belongs to the encoder side)."""
        if self.update == "joint":
            return list(self.parameters())
        own = {id(p) for p in self.augmenters.parameters()}
        return [p for p in self.parameters() if id(p) not in own]

    # Checkpoints carry the augmenters' Adam inside the objective's state dict.
    def get_extra_state(self) -> dict:
        if self.optimizer is None:
            return {}
        return {"augmenter_optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        if self.optimizer is not None:
            if "augmenter_optimizer" not in state:
                raise ValueError("the checkpoint has no state for MCLRec's augmenter optimizer")
            self.optimizer.load_state_dict(state["augmenter_optimizer"])

    # ------------------------------------------------------------------------------ losses

    def _cl2_and_reg(
        self, h1: torch.Tensor, h2: torch.Tensor, k: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z1, z2 = self.augmenters[0](h1), self.augmenters[1](h2)
        cl2 = self.term(z1, z2, k) + self.term(h1, z2, k) + self.term(h2, z1, k)
        if self.regularizer == "paper":
            reg = margin_regularizer(z1, z2, "batch")
        else:
            reg = sum(margin_regularizer(x, y, "row") for x, y in ((h1, z2), (h2, z1), (z1, z2)))
        return cl2, reg

    def encoder_loss(
        self, model: SASRec, batch: Batch, v1: torch.Tensor, v2: torch.Tensor
    ) -> ObjectiveOutput:
        """L0 (Eq. 14) on the augmented inputs ``v1, v2``; CE on the unaugmented sequence."""
        h, h1, h2 = encode(model, batch.inputs, v1, v2)
        ce = model.loss(h, batch.targets)
        k = self.term.threshold(h1)
        cl1 = self.term(h1, h2, k)
        cl2, reg = self._cl2_and_reg(h1, h2, k)
        loss = ce + self.lam * cl1 + self.beta * (cl2 + self.reg_weight * reg)
        parts = {"ce": ce.detach(), "cl1": cl1.detach(), "cl2": cl2.detach(),
                 "margin": reg.detach()}
        threshold_reg = self.term.regularizer(k)
        if threshold_reg is not None:
            loss = loss + threshold_reg
            parts["reg"] = threshold_reg.detach()
        return ObjectiveOutput(loss, parts, (h1, h2), k)

    def augmenter_loss(self, model: SASRec, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        """L1 (Eq. 15): re-encode with the current encoder, which gets no gradient (L_cl1,
        which the code also adds here, has no gradient in the augmenters and is skipped)."""
        with torch.no_grad():
            h1, h2 = encode(model, v1, v2)
            k = self.term.threshold(h1)
        cl2, reg = self._cl2_and_reg(h1, h2, k)
        weight = self.reg_weight * (self.beta if self.regularizer == "paper" else 1.0)
        return cl2 + weight * reg

    def _check(self, model: SASRec) -> None:
        if not self.data_augmenter.fits(model):
            raise ValueError("MCLRec's mask augmentation needs SASRec(mask_token=True)")

    def forward(
        self, model: SASRec, batch: Batch, generator: torch.Generator | None = None
    ) -> ObjectiveOutput:
        """L0 on fresh augmented views (the joint update's loss)."""
        self._check(model)
        v1, v2, _ = self.data_augmenter.two_views(batch.inputs, generator)
        return self.encoder_loss(model, batch, v1, v2)

    # -------------------------------------------------------------------------- the update

    def train_step(
        self,
        model: SASRec,
        batch: Batch,
        generator: torch.Generator | None,
        optimizer: torch.optim.Optimizer,
        autocast: Callable = nullcontext,
    ) -> ObjectiveOutput:
        """One batch of training: the joint step or the three alternating steps. Returns the
        first step's L0 and parts (plus ``"augmenter"``: L1 of the second step).
        ``autocast`` is a factory of the caller's mixed-precision context."""
        self._check(model)
        # One pair of augmented sequences per batch, shared by all three steps (the released
        # code draws them in its data loader).
        v1, v2, _ = self.data_augmenter.two_views(batch.inputs, generator)
        if self.update == "joint":
            with autocast():
                out = self.encoder_loss(model, batch, v1, v2)
            _descend(optimizer, out.loss)
            return out
        with frozen(self.augmenters):
            with autocast():
                out = self.encoder_loss(model, batch, v1, v2)
            _descend(optimizer, out.loss)
        with autocast():
            aug = self.augmenter_loss(model, v1, v2)
        _descend(self.optimizer, aug)
        with frozen(self.augmenters):
            with autocast():
                again = self.encoder_loss(model, batch, v1, v2)
            _descend(optimizer, again.loss)
        out.parts["augmenter"] = aug.detach()
        return out


def _descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
