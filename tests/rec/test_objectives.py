"""Objectives: finite losses, gradients reaching the encoder, and the InfoNCE conventions."""

import math

import pytest
import torch
import torch.nn.functional as F

from adaptive_cl.rec.augment import Augmenter
from adaptive_cl.rec.model import SASRec
from adaptive_cl.rec.objectives import (
    AdaptiveRecObjective,
    Batch,
    CL4SRecObjective,
    DuoRecObjective,
    SASRecObjective,
)
from adaptive_cl.rec.simthres import LearnableSimThres, StatisticalSimThres, ThresholdNet

NUM_ITEMS, WIDTH, B = 40, 8, 16


def model(mask_token: bool = False) -> SASRec:
    torch.manual_seed(0)
    return SASRec(NUM_ITEMS, WIDTH, mask_token=mask_token, hidden=16, inner=32)


def batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, NUM_ITEMS + 1, (B, WIDTH), generator=g)
    x[: B // 2, :3] = 0
    return Batch(x, torch.randint(1, NUM_ITEMS + 1, (B,), generator=g),
                 torch.randint(1, NUM_ITEMS + 1, (B, WIDTH), generator=g))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Independent NT-Xent over the 2B views (tau = 1)."""
    z = torch.cat([z1, z2])
    if normalize:
        z = F.normalize(z, dim=1)
    s = (z @ z.T).masked_fill(torch.eye(len(z), dtype=torch.bool), -math.inf)
    partner = (torch.arange(len(z)) + len(z1)) % len(z)
    return F.cross_entropy(s, partner)


OBJECTIVES = {
    "sasrec": lambda: SASRecObjective(),
    "cl4srec": lambda: CL4SRecObjective(Augmenter(NUM_ITEMS)),
    "duorec-un": lambda: DuoRecObjective("un"),
    "duorec-su": lambda: DuoRecObjective("su"),
    "duorec-us_x": lambda: DuoRecObjective("us_x"),
    "adaptiverec-none": lambda: AdaptiveRecObjective(None),
    "adaptiverec-statistical": lambda: AdaptiveRecObjective(StatisticalSimThres()),
    "adaptiverec-learnable": lambda: AdaptiveRecObjective(LearnableSimThres(ThresholdNet(16))),
    "adaptiverec-soft-all": lambda: AdaptiveRecObjective(
        LearnableSimThres(ThresholdNet(16)), threshold="soft", denominator="all"),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_finite_loss_and_gradients_reach_the_encoder(name):
    m = model(mask_token=name == "cl4srec")
    objective = OBJECTIVES[name]()
    out = objective(m, batch(), torch.Generator().manual_seed(2))
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(v) for v in out.parts.values())
    out.loss.backward()
    for param in (m.item_emb.weight, m.pos_emb.weight, m.blocks[0].qkv.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    if name != "sasrec":
        z1, z2 = out.views
        assert z1.shape == z2.shape == (B, 16)
        expected = out.parts["ce"] + 0.1 * out.parts["cl"] + out.parts.get("reg", 0)
        torch.testing.assert_close(out.loss.detach(), expected)


def test_duorec_contrast_is_nt_xent_with_dot_similarity():
    m = model()
    torch.manual_seed(5)
    out = DuoRecObjective("us_x")(m, batch())
    torch.testing.assert_close(out.parts["cl"], nt_xent(*out.views, normalize=False).detach())


def test_cl4srec_contrast_is_cosine_nt_xent_and_needs_a_mask_row():
    out = CL4SRecObjective(Augmenter(NUM_ITEMS))(model(True), batch(), torch.Generator())
    torch.testing.assert_close(out.parts["cl"], nt_xent(*out.views, normalize=True).detach())
    with pytest.raises(ValueError, match="mask_token"):
        CL4SRecObjective(Augmenter(NUM_ITEMS))(model(False), batch())


def test_adaptiverec_without_threshold_is_alpha_times_duorec_us_x():
    """k=None, alpha=0.5, "normalized": no extra positives, so 0.5 * NT-Xent."""
    m = model()
    torch.manual_seed(3)
    duo = DuoRecObjective("us_x", normalize=True)(m, batch())
    torch.manual_seed(3)  # same dropout masks
    ada = AdaptiveRecObjective(None)(m, batch())
    torch.testing.assert_close(duo.views[0], ada.views[0])
    torch.testing.assert_close(ada.parts["cl"], 0.5 * duo.parts["cl"])
    torch.testing.assert_close(ada.parts["ce"], duo.parts["ce"])


def test_a_threshold_above_every_similarity_changes_nothing_else():
    m = model()
    torch.manual_seed(4)
    base = AdaptiveRecObjective(None)(m, batch())
    torch.manual_seed(4)
    high = StatisticalSimThres()
    high.update(1.01)  # no cosine exceeds it: no extra positives
    out = AdaptiveRecObjective(high)(m, batch())
    torch.testing.assert_close(out.parts["cl"], base.parts["cl"])
    torch.manual_seed(4)
    low = StatisticalSimThres()
    low.update(-1.01)  # every candidate positive
    assert not torch.allclose(AdaptiveRecObjective(low)(m, batch()).parts["cl"], base.parts["cl"])


def test_us_x_first_pass_feeds_ce_and_views_are_second_pass_and_positive():
    m = model().eval()  # no dropout: passes are reproducible
    b = batch()
    out = DuoRecObjective("us_x")(m, b)
    torch.testing.assert_close(out.views[0], m(b.inputs))
    torch.testing.assert_close(out.views[1], m(b.positives))
    torch.testing.assert_close(out.parts["ce"], m.loss(m(b.inputs), b.targets).detach())


def test_learnable_regularizer_joins_the_loss_after_the_first_epoch():
    m = model()
    simthres = LearnableSimThres(ThresholdNet(16))
    objective = AdaptiveRecObjective(simthres)
    assert objective(m, batch()).parts["reg"].item() == 0.0
    simthres.update(0.5)
    out = objective(m, batch())
    assert out.parts["reg"].item() > 0 and out.k.shape == (B,)
    out.loss.backward()
    assert simthres.net.mlp[0].weight.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="contrast"):
        DuoRecObjective("xx")
    with pytest.raises(ValueError, match="weight"):
        DuoRecObjective(weight=-1)
    with pytest.raises(ValueError, match="soft"):
        AdaptiveRecObjective(None, threshold="soft")
    with pytest.raises(ValueError, match="denominator"):
        AdaptiveRecObjective(None, denominator="some")
    with pytest.raises(ValueError, match="positive_weight"):
        AdaptiveRecObjective(None, positive_weight=0.0)
    with pytest.raises(ValueError, match="positives"):
        DuoRecObjective("su")(model(), Batch(batch().inputs, batch().targets))
