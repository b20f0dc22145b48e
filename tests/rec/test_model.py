"""SASRec: causality, padding invariance, shapes, initialisation, argument checks."""

import math

import pytest
import torch

from adaptive_cl.rec.model import SASRec


def tiny(**kw) -> SASRec:
    torch.manual_seed(0)
    return SASRec(30, 12, hidden=16, heads=2, inner=32, **kw).eval()


def test_shapes_and_padding_column():
    model = tiny()
    x = torch.randint(1, 31, (5, 12))
    assert model(x).shape == (5, 16)
    assert model.encode(x).shape == (5, 12, 16)
    scores = model.score(x)
    assert scores.shape == (5, 31)
    assert torch.isinf(scores[:, 0]).all() and (scores[:, 0] < 0).all()
    assert torch.isfinite(scores[:, 1:]).all()


def test_causal_later_positions_do_not_change_earlier_outputs():
    model = tiny()
    x = torch.randint(1, 31, (4, 12))
    y = x.clone()
    y[:, 8:] = torch.randint(1, 31, (4, 4))
    a, b = model.encode(x), model.encode(y)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_extra_left_padding_does_not_change_representation():
    model = tiny()
    items = torch.randint(1, 31, (3, 5))
    short = torch.cat([torch.zeros(3, 2, dtype=torch.long), items], 1)  # width 7
    long = torch.cat([torch.zeros(3, 7, dtype=torch.long), items], 1)  # width 12
    torch.testing.assert_close(model(short), model(long), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(items), model(long), rtol=1e-5, atol=1e-5)


def test_all_padding_row_is_finite():
    model = tiny()
    x = torch.zeros(2, 12, dtype=torch.long)
    x[1, -3:] = torch.tensor([1, 2, 3])
    assert torch.isfinite(model(x)).all()


def test_init():
    torch.manual_seed(0)
    model = SASRec(2000, 50)
    w = model.item_emb.weight[1:]
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert torch.equal(model.item_emb.weight[0], torch.zeros(64))
    block = model.blocks[0]
    assert abs(block.ff_in.weight.std().item() - 0.02) < 0.002
    assert torch.equal(block.ff_in.bias, torch.zeros(256))
    for norm in (model.emb_norm, block.attn_norm, block.ff_norm):
        assert torch.equal(norm.weight, torch.ones(64)) and torch.equal(norm.bias, torch.zeros(64))
        assert norm.eps == 1e-12
    assert len(model.blocks) == 2 and block.heads == 2
    assert model.item_emb.num_embeddings == 2001 and model.mask_token is None
    assert SASRec(2000, 50, mask_token=True).mask_token == 2001


def test_loss_is_cross_entropy_over_real_items():
    model = tiny()
    x = torch.randint(1, 31, (6, 12))
    targets = torch.randint(1, 31, (6,))
    scores = model.score(x)
    expected = torch.nn.functional.cross_entropy(scores[:, 1:], targets - 1)
    torch.testing.assert_close(model.loss(model(x), targets), expected)
    assert math.isfinite(expected.item())


def test_dropout_only_in_training():
    model = tiny()
    x = torch.randint(1, 31, (4, 12))
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


@pytest.mark.parametrize("kw, name", [({"num_items": 0}, "num_items"), ({"hidden": 15}, "hidden"),
                                      ({"dropout": 1.0}, "dropout")])
def test_bad_arguments(kw, name):
    args = {"num_items": 10, "max_len": 5, **kw}
    with pytest.raises(ValueError, match=name):
        SASRec(args.pop("num_items"), args.pop("max_len"), **args)


def test_too_wide_input_rejected():
    with pytest.raises(ValueError, match="max_len"):
        tiny()(torch.ones(2, 13, dtype=torch.long))


def test_logits_stay_float32_under_bf16_autocast():
    """bf16 logits would tie many items in the full ranking: the output layer opts out."""
    model = tiny()
    x = torch.randint(1, 31, (4, 12))
    with torch.autocast("cpu", torch.bfloat16):
        h = model(x)
        logits = model.logits(h)
        scores = model.score(x)
    assert logits.dtype == torch.float32 and scores.dtype == torch.float32
    torch.testing.assert_close(logits, h.float() @ model.output_weight().T, rtol=0, atol=0)
    # Distinct items keep distinct scores (bf16 would round many of them together).
    assert len(torch.unique(scores[0, 1:])) == 30
