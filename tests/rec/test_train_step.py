"""The training step built for a GPU: no host sync per step, one encoder pass per step, fused
Adam, and torch.compile giving the eager results."""

import argparse

import pytest
import torch

from adaptive_cl.rec import cli
from adaptive_cl.rec.data import leave_one_out
from adaptive_cl.rec.hostsync import HostSyncs
from adaptive_cl.rec.objectives import Batch
from adaptive_cl.rec.synthetic import make_synthetic
from adaptive_cl.rec.train import TrainConfig, Trainer

B = 16
METHODS = [dict(method="sasrec"), dict(method="cl4srec"), dict(method="duorec"),
           dict(method="adaptiverec"), dict(method="adaptiverec", simthres="learnable"),
           dict(method="rcl", rcl_weighting="row"), dict(method="mclrec")]
#: Rows of each encoder pass of one training step, in batches: every pass encodes all the
#: sequences it needs at once (MCLRec: encoder step, augmenter step without grad, encoder step).
PASSES = {"sasrec": [1], "cl4srec": [3], "duorec": [3], "adaptiverec": [3], "rcl": [3],
          "mclrec": [3, 2, 3]}


@pytest.fixture(scope="module")
def split():
    return leave_one_out(make_synthetic(num_users=60, num_items=30, mean_length=8.0), 8)


def tiny(**kw) -> TrainConfig:
    base = dict(max_len=8, hidden=16, inner=32, layers=1, heads=1, batch_size=B, epochs=1,
                holdout_size=16, progress=False, seed=5)
    return TrainConfig.from_preset("default", **{**base, **kw})


def fixed_batches(trainer: Trainer, n: int) -> None:
    trainer._batches = lambda: [torch.arange(i * B, (i + 1) * B, device=trainer.device)
                                for i in range(n)]


def test_the_detector_sees_what_waits_for_the_device():
    x = torch.randn(8)
    with HostSyncs() as syncs:
        y = (x * 2).exp().sum(0) + x.cumsum(0)[-1]  # none of these
        assert syncs.count == 0
        float(y)
        _ = x[x > 0]
        torch.nonzero(x)
        x.repeat_interleave(torch.ones(8, dtype=torch.long))
        x.repeat_interleave(torch.ones(8, dtype=torch.long), output_size=8)  # sized: no sync
        torch.unique(x)
    assert syncs.count == 5, syncs.found


def _epoch_syncs(trainer: Trainer, steps: int) -> int:
    fixed_batches(trainer, steps)
    with HostSyncs() as syncs:
        trainer.train_epoch()
    return syncs.count


@pytest.mark.parametrize("kw", METHODS, ids=lambda kw: "-".join(kw.values()))
def test_no_host_sync_inside_an_epoch(split, kw):
    # The fused loss (Triton's interpreter here) is what runs on CUDA; the CPU reference has a
    # boolean-mask index of its own (reference.py).
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("runs Triton's CPU interpreter; test_no_host_sync_on_cuda covers CUDA")
    trainer = Trainer(tiny(loss_backend="triton", **kw), split)
    one, two = _epoch_syncs(trainer, 1), _epoch_syncs(trainer, 2)
    assert one == two  # an extra step adds no sync: they all come from the epoch's end


def test_rcl_eq16_weighting_syncs_once_per_step(split):
    # Its in-batch Jaccard renumbers the batch's features with torch.unique (rcl.py says so).
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("runs Triton's CPU interpreter")
    trainer = Trainer(tiny(method="rcl", loss_backend="triton"), split)
    assert _epoch_syncs(trainer, 2) - _epoch_syncs(trainer, 1) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("kw", METHODS, ids=lambda kw: "-".join(kw.values()))
def test_no_host_sync_on_cuda(split, kw):
    trainer = Trainer(tiny(device="cuda", amp=True, **kw), split)
    fixed_batches(trainer, 2)
    trainer.train_epoch()  # warm-up: allocator, autotuning, cuBLAS handles
    torch.cuda.set_sync_debug_mode("error")  # raises on any synchronising call
    try:
        for idx in trainer._batches():  # train_epoch's steps, without the epoch's read-back
            trainer.train_batch(idx)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("kw", METHODS, ids=lambda kw: "-".join(kw.values()))
def test_a_step_outside_the_epoch_runs_every_method(split, kw):
    # What the CUDA sync check and benchmarks/train_speed.py run between epochs. Their own copy
    # of the step built a Batch without the sample indices, which RCL needs (a ValueError).
    trainer = Trainer(tiny(**kw), split)
    fixed_batches(trainer, 1)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    out = trainer.train_batch(trainer._batches()[0])
    assert torch.isfinite(out.loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    assert trainer.stats.num_batches == (out.views is not None)


@pytest.mark.parametrize("kw", METHODS, ids=lambda kw: "-".join(kw.values()))
def test_one_encoder_pass_per_step(split, kw):
    trainer = Trainer(tiny(**kw), split)
    rows = []
    trainer.model.register_forward_hook(
        lambda module, args, out: rows.append(len(args[0])) if module.training else None)
    fixed_batches(trainer, 2)
    trainer.train_epoch()  # then its geometry and evaluation run in eval mode
    assert rows == [n * B for n in PASSES[kw["method"]]] * 2


def test_adam_is_the_fused_kernel(split):
    assert Trainer(tiny(), split).optimizer.defaults["fused"] is True


def test_compiled_training_equals_eager(split):
    # Dropout off: Inductor draws its own random numbers, so with dropout the two runs would
    # differ by sampling, not by computation.
    kw = dict(method="adaptiverec", dropout=0.0, attn_dropout=0.0, lr=1e-2)
    eager = Trainer(tiny(**kw), split)
    compiled = Trainer(tiny(compile=True, **kw), split)
    assert compiled.step_model is not compiled.model and eager.step_model is eager.model
    rows = []
    for trainer in (eager, compiled):
        fixed_batches(trainer, 3)
        rows.append([trainer.train_epoch() for _ in range(2)])
    for a, b in zip(*rows):
        for key in ("loss", "ce", "cl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5)
    # Norm-wise: Adam turns rounding-level differences of near-zero gradient entries into
    # updates of up to lr each, so single entries may differ by ~lr * 1e-3 while a real
    # difference in the computation moves the whole tensor.
    for name, value in eager.model.state_dict().items():
        diff = (compiled.model.state_dict()[name] - value).norm() / value.norm().clamp_min(1e-12)
        assert diff <= 1e-3, (name, float(diff))
    # The checkpoint holds the plain module's state (no torch.compile prefixes).
    assert set(compiled.state_dict()["model"]) == set(eager.state_dict()["model"])
    # An epoch's partial last batch runs eagerly rather than compiling a graph of its own.
    idx = torch.arange(B)
    full = Batch(compiled.train_inputs[idx], compiled.train_targets[idx])
    part = Batch(compiled.train_inputs[idx[:3]], compiled.train_targets[idx[:3]])
    assert compiled._model_for(full) is compiled.step_model
    assert compiled._model_for(part) is compiled.model


def test_cli_compiles_on_cuda_unless_told_not_to():
    args = cli.parse_args([])
    assert not cli.build_config(args).compile  # CPU: no compile
    cuda = argparse.Namespace(**{**vars(args), "device": "cuda"})
    config = cli.build_config(cuda)
    assert config.compile and config.amp and config.compile_mode == "default"
    cuda.no_compile, cuda.compile_mode = True, "reduce-overhead"
    config = cli.build_config(cuda)
    assert not config.compile and config.compile_mode == "reduce-overhead"
    cuda.no_compile, cuda.distributed = False, True  # data-parallel runs stay eager
    assert not cli.build_config(cuda).compile
    with pytest.raises(ValueError, match="compile_mode"):
        tiny(compile_mode="fastest")
