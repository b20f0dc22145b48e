"""Each method as its authors released it: the presets, the flags that reach them, the warm-up
cosine schedule, the flattened threshold network's initialisation and layout, the padding-id
mask, and the two CPU-step changes that must not change the model (byte dropout masks, the
last block computing only the last position)."""

import math

import pytest
import torch

from adaptive_cl.rec import cli
from adaptive_cl.rec.augment import Augmenter
from adaptive_cl.rec.data import leave_one_out
from adaptive_cl.rec.dropout import Dropout, dropout
from adaptive_cl.rec.model import SASRec
from adaptive_cl.rec.simthres import FlattenedThresholdNet
from adaptive_cl.rec.synthetic import make_synthetic
from adaptive_cl.rec.train import METHODS, Trainer, TrainConfig, lr_scheduler


def config_of(argv):
    return cli.build_config(cli.parse_args(argv))


@pytest.mark.parametrize("method", METHODS)
def test_release_preset_of_every_method(method):
    c = TrainConfig.from_preset("release", method=method)
    assert c.preset == "release"
    expected = {
        "sasrec": dict(similarity="auto", batch_size=256, stop_metric="NDCG@10"),
        "duorec": dict(similarity="dot", batch_size=256, epochs=50, stop_metric="MRR@10"),
        "cl4srec": dict(similarity="dot"),
        "adaptiverec": dict(batch_size=1024, drop_last=True, lr_schedule="warmup-cosine",
                            simthres="learnable-flat", threshold_init="normal",
                            threshold_detach=False, denominator="all",
                            kstat_method="batch_mean", similarity="cos"),
        "mclrec": dict(mclrec_regularizer="code", mask_id="padding", stop_metric="MRR@10"),
        "rcl": dict(rcl_ngram=2),
    }[method]
    assert {k: getattr(c, k) for k in expected} == expected
    assert c.normalize == (method not in ("duorec", "cl4srec", "rcl", "mclrec"))


def test_paper_preset_is_adaptiverecs_release_for_it_and_its_duorec_baseline():
    ar = TrainConfig.from_preset("paper", method="adaptiverec")
    assert ar == TrainConfig.from_preset("release", method="adaptiverec").__class__(
        **{**TrainConfig.from_preset("release", method="adaptiverec").to_dict(), "preset": "paper"})
    duo = TrainConfig.from_preset("paper", method="duorec")
    # The same training configuration, cosine similarity, DuoRec's loss (no threshold).
    assert (duo.batch_size, duo.drop_last, duo.lr_schedule, duo.lr_floor, duo.warmup_epochs,
            duo.normalize) == (1024, True, "warmup-cosine", 1e-4, 5, True)
    with pytest.raises(ValueError, match="preset 'paper'.*sasrec"):
        TrainConfig.from_preset("paper", method="sasrec")


def test_flags_reach_the_config(tmp_path):
    base = ["--data", str(tmp_path)]  # parse_args checks the file only when given one
    c = config_of(["--method", "duorec", "--preset", "paper", "--similarity", "dot",
                   "--temperature", "0.5", "--cl-weight", "0.2", "--stop-metric", "MRR@10"])
    assert (c.similarity, c.temperature, c.cl_weight, c.stop_metric, c.normalize) == (
        "dot", 0.5, 0.2, "MRR@10", False)
    c = config_of(["--method", "adaptiverec", "--kstat-start", "zero"])
    assert c.kstat_start == "zero" and TrainConfig().kstat_start == "running"
    c = config_of(["--preset", "paper", "--threshold-init", "default", "--threshold-detach"])
    assert (c.threshold_init, c.threshold_detach) == ("default", True)
    c = config_of(["--method", "cl4srec", "--mask-id", "padding"])
    assert c.mask_id == "padding"
    # A preset's own epoch budget stands unless --epochs is given (with --data; the synthetic
    # demo keeps its short schedule).
    data = tmp_path / "d.txt"
    data.write_text("1 1 2 3 4 5\n")
    assert config_of(["--data", str(data), "--method", "duorec", "--preset", "release"]).epochs == 50
    assert config_of(["--data", str(data), "--method", "duorec", "--preset", "release",
                      "--epochs", "7"]).epochs == 7
    assert config_of(["--data", str(data), "--method", "duorec"]).epochs == cli.DATA_EPOCHS
    del base


def test_amp_flag_and_preset_default(monkeypatch):
    # bf16 autocast only ever applies on CUDA; reproduction presets default to float32 there.
    assert config_of(["--amp"]).amp is False  # CPU: never
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    parsed = lambda argv: cli.build_config(cli.parse_args([*argv, "--device", "cuda"]))  # noqa: E731
    assert parsed([]).amp is True
    assert parsed(["--no-amp"]).amp is False
    assert parsed(["--preset", "paper"]).amp is False
    assert parsed(["--preset", "paper", "--amp"]).amp is True


@pytest.mark.parametrize("argv, flag", [
    (["--similarity", "l2"], "--similarity"),
    (["--temperature", "0"], "--temperature"),
    (["--stop-metric", "HR@10"], "--stop-metric"),
    (["--method", "sasrec", "--preset", "paper"], "--preset"),
    (["--method", "duorec", "--mask-id", "padding"], "--mask-id: only applies to --method cl4srec"),
])
def test_bad_flags_name_the_flag(argv, flag, capsys):
    assert cli.main(argv) == 2
    assert flag in capsys.readouterr().err


def test_warmup_cosine_schedule_per_epoch():
    c = TrainConfig.from_preset("paper", method="adaptiverec", epochs=20)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    sched = lr_scheduler(opt, c)
    seen = []
    for _ in range(c.epochs):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lr, floor, w, e = c.lr, c.lr_floor, c.warmup_epochs, c.epochs
    expected = [floor + (lr - floor) * i / w if i < w else
                floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * i / e)) for i in range(e)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[0] == pytest.approx(1e-4) and max(seen) <= lr and min(seen) >= floor
    # Resumable: a fresh scheduler loaded from the state continues the same sequence.
    again = lr_scheduler(torch.optim.Adam(model.parameters(), lr=c.lr), c)
    again.load_state_dict(sched.state_dict())
    assert again.last_epoch == sched.last_epoch
    with pytest.raises(ValueError, match="lr_floor"):
        TrainConfig.from_preset("paper", method="duorec", lr_floor=1e-2)


def test_flattened_threshold_net_init_and_gradient_layout():
    torch.manual_seed(0)
    net = FlattenedThresholdNet(32, 8, init="normal")
    first, second = net.net
    for layer in (first, second):
        assert abs(layer.weight.std().item() - 0.02) < 0.002 and not layer.bias.any()
    # The same function as nn.Linear's x @ W.T, with the weight gradient in W's own layout.
    h = torch.randn(32, 8, dtype=torch.float64)
    net = net.double()
    ref = 1.05 * (2 * torch.sigmoid(second(first(h.reshape(1, -1))).squeeze(0)) - 1)
    torch.testing.assert_close(net(h), ref, rtol=0, atol=4 * torch.finfo(torch.float64).eps)
    plain = [p.detach().clone().requires_grad_() for p in (first.weight, first.bias,
                                                          second.weight, second.bias)]
    hp = h.clone().requires_grad_()
    y = 1.05 * (2 * torch.sigmoid(torch.nn.functional.linear(torch.nn.functional.linear(
        hp.reshape(1, -1), plain[0], plain[1]), plain[2], plain[3]).squeeze(0)) - 1)
    for _ in range(2):  # the second pass accumulates, as autograd's would
        hn = h.clone().requires_grad_()
        net(hn).square().sum().backward()
        y.square().sum().backward(retain_graph=True)
        torch.testing.assert_close(hn.grad, hp.grad / (_ + 1))
    for mine, ref in zip((first.weight, first.bias, second.weight, second.bias), plain):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-12, atol=1e-15)
    assert first.weight.grad.stride() == first.weight.stride()
    kept = first.weight.grad.data_ptr()
    first.weight.grad = None  # zero_grad(set_to_none=True): the buffer is reused
    net(h).square().sum().backward()
    assert first.weight.grad.data_ptr() == kept
    with pytest.raises(ValueError, match="init"):
        FlattenedThresholdNet(4, 8, init="xavier")


def test_threshold_detach_reaches_the_encoder():
    split = leave_one_out(make_synthetic(num_users=80, num_items=30, mean_length=8.0), 8)
    grads = {}
    for detach in (True, False):
        c = TrainConfig.from_preset(
            "paper", method="adaptiverec", batch_size=16, max_len=8, hidden=16, inner=32,
            layers=1, heads=1, threshold_detach=detach, cl_weight=0.0, reg_weight=1.0,
            progress=False, holdout_size=8)
        trainer = Trainer(c, split)
        trainer.simthres.update(0.0)  # the regulariser is on from the second epoch
        z = trainer.model(trainer.train_inputs[:c.batch_size])
        trainer.simthres.regularizer(trainer.simthres(z)).backward()
        grads[detach] = trainer.model.item_emb.weight.grad
    assert grads[True] is None or not grads[True].any()  # g alone learns from the regulariser
    assert grads[False] is not None and grads[False].any()  # as released: the encoder too


def test_padding_id_mask_needs_no_mask_row():
    x = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    aug = Augmenter(10, mask=0.5, mask_id="padding")
    out = aug.mask(x, torch.Generator().manual_seed(0))
    assert aug.mask_token == 0 and ((out == 0).sum(1) == torch.tensor([4, 3])).all()
    assert aug.fits(SASRec(10, 6)) and not Augmenter(10).fits(SASRec(10, 6))
    c = TrainConfig.from_preset("release", method="mclrec")
    split = leave_one_out(make_synthetic(num_users=60, num_items=30, mean_length=8.0), 8)
    trainer = Trainer(TrainConfig(**{**c.to_dict(), "max_len": 8, "hidden": 16, "inner": 32,
                                     "layers": 1, "heads": 1, "progress": False,
                                     "holdout_size": 8}), split)
    assert trainer.model.mask_token is None


@pytest.mark.parametrize("p", [0.5, 0.3, 1 / 3, 0.0])
def test_byte_dropout_keeps_the_distribution(p):
    """P(keep) = 1 - p and kept entries scaled by 1 / (1 - p), within a binomial 6-sigma band
    (byte masks for multiples of 1/256, two-byte ones for 1/65536, a float draw otherwise)."""
    torch.manual_seed(1)
    n = 400_000
    x = torch.ones(n)
    y = dropout(x, p)
    kept = y != 0
    assert torch.all(y[kept] == torch.tensor(1 / (1 - p)))
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept.sum().item() - n * (1 - p)) <= 6 * sigma + 1e-9
    # Consecutive entries are independent (the bytes of one draw are not correlated).
    a, b = kept[:-1].double(), kept[1:].double()
    if 0 < p < 1:
        corr = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
        assert abs(corr.item()) <= 6 / math.sqrt(n)
    assert torch.equal(dropout(x, p, training=False), x)
    assert Dropout(p).eval()(x) is x


def test_dropout_masks_follow_the_seed_and_the_gradient_uses_the_mask():
    x = torch.randn(3, 50, 64, requires_grad=True)
    torch.manual_seed(7)
    a = dropout(x, 0.5)
    torch.manual_seed(7)
    b = dropout(x, 0.5)
    assert torch.equal(a, b)
    a.sum().backward()
    torch.testing.assert_close(x.grad, (a != 0).float() * 2.0 * (x != 0), rtol=0, atol=0)


def test_last_block_on_the_last_position_only_is_the_same_function():
    torch.manual_seed(0)
    model = SASRec(40, 12, hidden=16, heads=2, inner=32).double().eval()
    x = torch.randint(1, 41, (9, 12))
    x[:3, :5] = 0
    x[4, :-1] = 0  # one real item
    full = model.encode(x)[:, -1]
    eps = torch.finfo(torch.float64).eps
    err = (model(x) - full).norm() / full.norm()
    assert err <= 64 * eps  # two blocks of length-16 reductions: rounding only
    assert model.encode(x, last_only=True).shape == (9, 1, 16)
