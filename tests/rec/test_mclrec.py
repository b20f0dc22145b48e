"""MCLRec: augmenter shape, the regulariser against its equations, the losses, and which
parameters change in which step of the update."""

import itertools

import pytest
import torch

from adaptive_cl import adaptive_info_nce
from adaptive_cl.rec import mclrec
from adaptive_cl.rec.augment import Augmenter
from adaptive_cl.rec.mclrec import (
    MCLRecObjective,
    ViewAugmenter,
    margin_regularizer,
    pair_scores,
)
from adaptive_cl.rec.model import SASRec
from adaptive_cl.rec.objectives import Batch, ContrastiveTerm
from adaptive_cl.rec.simthres import LearnableSimThres, ThresholdNet

NUM_ITEMS, WIDTH, B, HIDDEN = 30, 8, 12, 16


def model() -> SASRec:
    torch.manual_seed(0)
    return SASRec(NUM_ITEMS, WIDTH, mask_token=True, hidden=HIDDEN, inner=32)


def batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, NUM_ITEMS + 1, (B, WIDTH), generator=g)
    x[: B // 2, :3] = 0
    return Batch(x, torch.randint(1, NUM_ITEMS + 1, (B,), generator=g))


def objective(**kw) -> MCLRecObjective:
    torch.manual_seed(5)
    term = kw.pop("term", None) or ContrastiveTerm(None)
    return MCLRecObjective(HIDDEN, Augmenter(NUM_ITEMS, 0.5, 0.5, 0.8), term, **kw)


def test_augmenter_is_the_papers_mlp():
    a = ViewAugmenter(64)
    assert [(l.in_features, l.out_features) for l in a.layers] == [(64, 32), (32, 16), (16, 64)]
    z = a(torch.randn(7, 64))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(7))


def _scores(a, b):
    views = torch.cat([a, b])
    n = len(views)
    pos, neg = [], []
    for i, j in itertools.product(range(n), range(n)):
        if j == (i + len(a)) % n:
            pos.append((i, float(views[i] @ views[j])))
        elif j != i:
            neg.append((i, float(views[i] @ views[j])))
    return pos, neg


def test_regularizer_follows_eqs_11_to_13_and_the_codes_rows():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    pos, neg = _scores(a, b)
    p, n = [s for _, s in pos], [s for _, s in neg]
    o_min, o_max = min(min(p), max(n)), max(min(p), max(n))
    expected = (sum(max(s - o_min, 0) for s in p) / len(p)
                + sum(max(o_max - s, 0) for s in n) / len(n))
    assert margin_regularizer(a, b, "batch").item() == pytest.approx(expected, rel=1e-5)
    # Per row: each row's own positive and hardest negative.
    rows = []
    for i in range(10):
        pi = [s for r, s in pos if r == i][0]
        ni = [s for r, s in neg if r == i]
        lo, hi = min(pi, max(ni)), max(pi, max(ni))
        rows.append((max(pi - lo, 0), sum(max(hi - s, 0) for s in ni)))
    expected_rows = sum(r[0] for r in rows) / 10 + sum(r[1] for r in rows) / len(n)
    assert margin_regularizer(a, b, "row").item() == pytest.approx(expected_rows, rel=1e-5)
    # Easy pairs (each view's partner far above its negatives) are made harder: a descent
    # step on R lowers the positive scores and raises the negatives.
    x = (3 * torch.eye(5, 4 + 4)).requires_grad_()  # orthogonal rows: negatives near 0
    y = x.detach() + 0.1 * torch.randn(5, 8, generator=g)
    before_pos, before_neg = pair_scores(x.detach(), y)
    assert before_pos.min() > before_neg.max()
    margin_regularizer(x, y, "batch").backward()
    after_pos, after_neg = pair_scores((x - 0.01 * x.grad).detach(), y)
    assert after_pos.mean() < before_pos.mean() and after_neg.mean() > before_neg.mean()
    with pytest.raises(ValueError, match="scope"):
        margin_regularizer(a, b, "column")


def test_losses_are_the_papers_sums():
    m, o = model().eval(), objective(lam=0.3, beta=0.2)
    b = batch()
    v1, v2, _ = o.data_augmenter.two_views(b.inputs, torch.Generator().manual_seed(2))
    out = o.encoder_loss(m, b, v1, v2)
    h1, h2 = m(v1), m(v2)
    z1, z2 = o.augmenters[0](h1), o.augmenters[1](h2)

    def nce(x, y):
        return adaptive_info_nce(x, y, None, normalize=False, positive_weight=1.0)

    torch.testing.assert_close(out.parts["cl1"], nce(h1, h2).detach())
    torch.testing.assert_close(out.parts["cl2"],
                               (nce(z1, z2) + nce(h1, z2) + nce(h2, z1)).detach())
    torch.testing.assert_close(out.parts["margin"], margin_regularizer(z1, z2).detach())
    expected = (out.parts["ce"] + 0.3 * out.parts["cl1"]
                + 0.2 * (out.parts["cl2"] + 0.1 * out.parts["margin"]))
    torch.testing.assert_close(out.loss.detach(), expected)
    code = objective(regularizer="code")
    code.augmenters.load_state_dict(o.augmenters.state_dict())
    got = code.encoder_loss(m, b, v1, v2).parts["margin"]
    want = sum(margin_regularizer(x, y, "row") for x, y in ((h1, z2), (h2, z1), (z1, z2)))
    torch.testing.assert_close(got, want.detach())


def _snapshot(modules):
    return [p.detach().clone() for mod in modules for p in mod.parameters()]


def _changed(before, after):
    return any(not torch.equal(x, y) for x, y in zip(before, after))


def _record_steps(monkeypatch, m, o):
    """Parameters of the encoder and the augmenters after each optimisation step."""
    steps = []
    descend = mclrec._descend

    def recording(optimizer, loss):
        descend(optimizer, loss)
        steps.append((_snapshot([m]), _snapshot([o.augmenters])))

    monkeypatch.setattr(mclrec, "_descend", recording)
    return steps


def test_alternating_update_order(monkeypatch):
    m, o = model(), objective()
    optimizer = torch.optim.Adam([*m.parameters(), *o.main_parameters()], lr=1e-2)
    assert not {id(p) for p in o.augmenters.parameters()} & {id(p) for p in o.main_parameters()}
    start = (_snapshot([m]), _snapshot([o.augmenters]))
    steps = _record_steps(monkeypatch, m, o)
    out = o.train_step(m, batch(), torch.Generator().manual_seed(0), optimizer)
    assert len(steps) == 3
    previous = start
    changes = []
    for encoder, augmenters in steps:
        changes.append((_changed(previous[0], encoder), _changed(previous[1], augmenters)))
        previous = (encoder, augmenters)
    # 1: encoder only; 2: augmenters only (own Adam); 3: encoder only.
    assert changes == [(True, False), (False, True), (True, False)]
    assert set(out.parts) == {"ce", "cl1", "cl2", "margin", "augmenter"}
    assert all(p.requires_grad for p in o.augmenters.parameters())  # unfrozen afterwards
    state = o.state_dict()["_extra_state"]["augmenter_optimizer"]
    assert len(state["state"]) == len(list(o.augmenters.parameters()))


def test_augmenter_step_reencodes_with_the_updated_encoder(monkeypatch):
    m, o = model(), objective()
    optimizer = torch.optim.Adam([*m.parameters(), *o.main_parameters()], lr=1e-2)
    seen = []
    loss = o.augmenter_loss

    def spy(model_, v1, v2):
        seen.append(_snapshot([model_]))
        return loss(model_, v1, v2)

    monkeypatch.setattr(o, "augmenter_loss", spy)
    steps = _record_steps(monkeypatch, m, o)
    o.train_step(m, batch(), torch.Generator().manual_seed(0), optimizer)
    assert not _changed(seen[0], steps[0][0])  # the encoder as the first step left it


def test_joint_update_moves_both_in_one_step(monkeypatch):
    m, o = model(), objective(update="joint")
    assert o.optimizer is None and o.state_dict()["_extra_state"] == {}
    optimizer = torch.optim.Adam([*m.parameters(), *o.main_parameters()], lr=1e-2)
    start = (_snapshot([m]), _snapshot([o.augmenters]))
    steps = _record_steps(monkeypatch, m, o)
    o.train_step(m, batch(), torch.Generator().manual_seed(0), optimizer)
    assert len(steps) == 1
    assert _changed(start[0], steps[0][0]) and _changed(start[1], steps[0][1])


def test_threshold_on_top_and_bad_arguments():
    simthres = LearnableSimThres(ThresholdNet(HIDDEN))
    simthres.update(0.3)
    o = objective(term=ContrastiveTerm(simthres, normalize=True))
    out = o(model(), batch(), torch.Generator().manual_seed(0))
    assert out.k.shape == (B,) and out.parts["reg"] > 0
    assert {id(p) for p in simthres.parameters()} <= {id(p) for p in o.main_parameters()}
    with pytest.raises(ValueError, match="mask_token"):
        objective()(SASRec(NUM_ITEMS, WIDTH, hidden=HIDDEN, inner=32), batch())
    with pytest.raises(ValueError, match="regularizer"):
        objective(regularizer="rows")
    with pytest.raises(ValueError, match="update"):
        objective(update="meta")
    with pytest.raises(ValueError, match="cosine"):
        ContrastiveTerm(simthres, normalize=False)
