"""The distributed global-batch loss against the single-process loss, on gloo (CPU).

One spawn per world size; each worker runs every case of tests/distributed_cases.py (a spawn
costs a torch import per process, the cases themselves are tiny).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_cases

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


@pytest.mark.parametrize("layouts", [[(3, 5)], [(4, 1, 3), (2, 0, 3)]],
                         ids=["2 ranks", "3 ranks, uneven and one empty"])
def test_global_batch_equals_one_process(tmp_path, layouts):
    # A file-store rendezvous: no port to pick, so no race with other jobs for a free port.
    world = len(layouts[0])
    mp.spawn(distributed_cases.worker, args=(world, str(tmp_path / "store"), layouts), nprocs=world, join=True)


def test_module_distributed_mode_under_ddp_trains_like_one_process(tmp_path):
    """issue 23: AdaptiveInfoNCE(distributed=True) under DDP (gloo, 2 ranks, uneven shares)
    gives the single-process parameter gradients; see distributed_cases.ddp_module_worker."""
    mp.spawn(distributed_cases.ddp_module_worker, args=(2, str(tmp_path / "store"), (3, 4)), nprocs=2, join=True)


def test_module_distributed_mode_checks_its_arguments():
    from adaptive_cl import AdaptiveInfoNCE

    with pytest.raises(ValueError, match="distributed must be a bool"):
        AdaptiveInfoNCE(distributed="yes")
    with pytest.raises(ValueError, match="group is only used with distributed=True"):
        AdaptiveInfoNCE(group=object())
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            AdaptiveInfoNCE(distributed=True)(torch.randn(3, 2), torch.randn(3, 2))


def test_needs_an_initialised_group():
    from adaptive_cl.distributed import adaptive_info_nce_distributed

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        adaptive_info_nce_distributed(torch.randn(3, 2), torch.randn(3, 2))


def test_label_limit_is_checked_on_the_global_batch(monkeypatch):
    """The kernels compare label ids as float32 (exact to 2^24 rows): a rank's own rows may be
    under the limit while the gathered batch is over it; "auto" then takes the reference on every
    rank, an explicit "triton" raises naming the global N (the limit lowered to 8 here)."""
    pytest.importorskip("triton")
    from adaptive_cl import kernels
    from adaptive_cl.contract import make_options, prepare
    from adaptive_cl.distributed import HOOKS, _label_rows_limit

    monkeypatch.setattr(kernels, "MAX_LABEL_ROWS", 8)
    z = torch.randn(3, 4)
    with_labels = prepare(z, z, None, torch.arange(3), make_options())
    fused, ref = HOOKS["triton"], HOOKS["reference"]
    assert _label_rows_limit(fused, "auto", with_labels, 8) is fused
    assert _label_rows_limit(fused, "auto", with_labels, 10) is ref
    with pytest.raises(ValueError, match=r"backend='triton' cannot run these inputs: labels with N = 10 > 8 rows"):
        _label_rows_limit(fused, "triton", with_labels, 10)
    without = prepare(z, z, None, None, make_options())
    assert _label_rows_limit(fused, "triton", without, 10) is fused
    assert _label_rows_limit(ref, "reference", with_labels, 10) is ref


def test_unwired_backend_is_named():
    from adaptive_cl.distributed import adaptive_info_nce_distributed

    with pytest.raises(ValueError, match="backend='compiled' has no distributed implementation.*'reference'"):
        adaptive_info_nce_distributed(torch.randn(3, 2), torch.randn(3, 2), backend="compiled")
    with pytest.raises(ValueError, match="backend='triton' cannot run these inputs"):
        adaptive_info_nce_distributed(torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64),
                                      backend="triton")


def test_ddp_example_trains_like_one_process():
    """examples/ddp_contrastive.py under torchrun (2 ranks, uneven shares): its --check retrains
    in one process and exits non-zero if the parameters differ."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "examples" / "ddp_contrastive.py"), "--steps", "3", "--batch", "33", "--check"]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "largest parameter difference" in done.stdout


@pytest.mark.parametrize("options", [dict(), dict(threshold="soft", denominator="all", weighting="unit",
                                                  positive_weight=0.3, normalize=False, temperature=0.2)])
def test_row_block_equals_the_dense_rows(options):
    """reference.row_block_losses (the distributed reference path) on any row subset equals
    the dense reference's rows, labels compared with every column."""
    import warnings

    from adaptive_cl.contract import make_options, prepare
    from adaptive_cl.reference import row_block_losses, row_losses
    from helpers import safe_threshold, views

    z, z_aug = views(6, 5, seed=4)
    k, _ = safe_threshold(z, z_aug, "N", seed=5)  # hard decisions mid-gap: none can flip
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = prepare(z, z_aug, k, labels, make_options(**options))
    rows = torch.tensor([7, 0, 11, 3])
    got = row_block_losses(z, z_aug, rows, p.k_rows[rows], p.labels_rows, p.options)
    torch.testing.assert_close(got, row_losses(p)[rows], rtol=1e-12, atol=1e-12)
