"""Worker side of tests/test_distributed.py: runs in each spawned gloo process.

Every rank builds the same global batch from a seed, computes the single-process reference loss
and gradients on it, then the distributed loss on its own shard, and compares its slices. A
failure raises in the worker; torch.multiprocessing.spawn re-raises it in the test.
"""

from __future__ import annotations

import datetime
import gc
import warnings

import torch
import torch.distributed as dist

from adaptive_cl import adaptive_info_nce, backends
from adaptive_cl.contract import make_options, prepare
from adaptive_cl.distributed import adaptive_info_nce_distributed
from helpers import assert_close_normwise, safe_threshold, similarity, views
from setup_cases import covering_cases, make_case

# float64 on both sides; the two differ only in the matmul's summation order and the order of
# the cross-rank sums: the suite's policy (helpers.tolerance) with N <= 20 columns, D = 5, and
# the largest of 1/tau and 1/beta (soft threshold, beta >= 0.05) as condition. Hard thresholds
# sit mid-gap between similarities (helpers.safe_threshold), so no decision flips.
TOL = dict(dtype=torch.float64, length=20 + 5, cond=20.0)
# The setups add a queue (M <= 13 columns) and a second direction: the same policy over their
# longest reduction.
SETUP_TOL = dict(dtype=torch.float64, length=2 * 20 + 13 + 5, cond=20.0)

# A covering set: every option value of the loss appears, and each k / labels layout.
CASES = [
    dict(k=None),
    dict(k="scalar", denominator="all", weighting="unit", positive_weight=0.3, reduction="sum"),
    dict(k="B", labels="B", temperature=0.5, reduction="none"),
    dict(k="N", labels="N", threshold="soft", threshold_scale=0.1, weighting="unit", positive_weight=0.4),
    dict(k="0d", normalize=False, denominator="all", reduction="sum"),
    dict(k="B", normalize=False, temperature=3.0),  # "negatives" without normalisation: warns
    dict(k=None, labels="B", reduction="none", positive_weight=1.0),
    dict(k="B", threshold="soft", temperature=2.0, denominator="all", reduction="none"),
    dict(k="0d", threshold="soft", labels="N", reduction="mean"),
    dict(k="rank_scalar", threshold="soft", threshold_scale=0.1, reduction="none"),
]


# The fused kernels (every option since issue 15), float32: compared with the same
# kernels in one process, which differ only in how the upstream gradient's 1/N is applied
# (per row here, once there) and in the cross-rank sums: float32 rounding, ~1e-7 relative.
TRITON_CASES = [
    dict(k="B"),
    dict(k="scalar", denominator="all", weighting="unit", positive_weight=0.3, reduction="none",
         temperature=0.5),
    dict(k=None, normalize=False, reduction="sum", temperature=2.0),
    dict(k="N", positive_weight=1.0, reduction="mean"),
    dict(k="B", labels="B", temperature=0.5, reduction="none"),
    dict(k="N", labels="N", threshold="soft", threshold_scale=0.1, weighting="unit", positive_weight=0.4),
    dict(k="0d", threshold="soft", labels="N", denominator="all"),
    # a different float on each rank (each rank's k is its own rows'): a row's backward
    # re-evaluates every column's decision, so it needs the other ranks' floats too
    dict(k="rank_scalar"),
    dict(k="rank_scalar", threshold="soft", threshold_scale=0.1, reduction="sum", labels="B"),
    dict(k="scalar", threshold="soft", weighting="unit", positive_weight=0.3),
]
TRITON_TOL = dict(dtype=torch.float32, length=20 + 5, cond=20.0)


def _own(x: torch.Tensor, sizes, rank: int) -> torch.Tensor:
    """This rank's slice of a global (B,) / (B, D) tensor, or of an (N,) one (both halves)."""
    b = sum(sizes)
    off = sum(sizes[:rank])
    if x.shape[0] == b:
        return x[off: off + sizes[rank]]
    return torch.cat([x[off: off + sizes[rank]], x[b + off: b + off + sizes[rank]]])


def _run_case(case: dict, sizes, rank: int, seed: int, backend: str = "reference",
              dtype=torch.float64, tol=TOL) -> None:
    case = dict(case)
    k_kind = case.pop("k")
    label_kind = case.pop("labels", None)
    b = sum(sizes)
    z, z_aug = views(b, 5, seed=seed, dtype=dtype)
    normalize = case.get("normalize", True)
    g = torch.Generator().manual_seed(seed + 2)
    labels = None
    if label_kind is not None:
        labels = torch.randint(0, 3, (b if label_kind == "B" else 2 * b,), generator=g)
    k = None
    if k_kind == "rank_scalar":  # rank q passes the float rank_k[q] for its rows
        soft_scale = case.get("threshold_scale", 0.05) if case.get("threshold") == "soft" else None
        rank_k = [safe_threshold(z, z_aug, "scalar", normalize=normalize, seed=seed + 1 + q,
                                 soft_scale=soft_scale, labels=labels)[0] for q in range(len(sizes))]
        k = torch.tensor([v for v, size in zip(rank_k, sizes) for _ in range(size)], dtype=dtype)
    elif k_kind is not None:
        k, _ = safe_threshold(z, z_aug, k_kind, normalize=normalize, seed=seed + 1)
    upstream = (torch.rand(2 * b, generator=g, dtype=torch.float64) + 0.5).to(_loss_dtype(dtype))
    soft_k = isinstance(k, torch.Tensor) and case.get("threshold") == "soft" and k_kind != "rank_scalar"

    # single process, whole batch
    zg, zag = z.clone().requires_grad_(True), z_aug.clone().requires_grad_(True)
    kg = k.clone().requires_grad_(True) if soft_k else k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full, full_stats = adaptive_info_nce(zg, zag, kg, labels=labels, backend=backend, return_stats=True,
                                             stats_bins=STATS_BINS, **case)
    up_full = upstream if case.get("reduction") == "none" else torch.tensor(0.7, dtype=full.dtype)
    inputs = [zg, zag] + ([kg] if soft_k else [])
    grads_full = torch.autograd.grad(full, inputs, up_full)

    # this rank's shard
    zl = _own(z, sizes, rank).clone().requires_grad_(True)
    zal = _own(z_aug, sizes, rank).clone().requires_grad_(True)
    kl = k
    if k_kind == "rank_scalar":
        kl = rank_k[rank]
    elif isinstance(k, torch.Tensor) and k.dim() == 1:
        kl = _own(k, sizes, rank)
    if soft_k:
        kl = kl.clone().requires_grad_(True)
    labels_l = None if labels is None else _own(labels, sizes, rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, got_stats = adaptive_info_nce_distributed(zl, zal, kl, labels=labels_l, backend=backend,
                                                       return_stats=True, stats_bins=STATS_BINS, **case)
    assert_close_normwise(got_stats.m, _own(full_stats.m, sizes, rank), **tol)
    # every rank holds the global histogram; float32 similarities may land on the other side of
    # a bin edge than in one process (different tiles), never more than the values near edges
    slack = 0 if dtype == torch.float64 else _near_edges(z, z_aug, normalize)
    assert int(got_stats.histogram.sum()) == int(full_stats.histogram.sum()) == 2 * b * (2 * b - 2)
    assert int((got_stats.histogram - full_stats.histogram).abs().sum()) <= 2 * slack
    if case.get("reduction") == "none":
        assert_close_normwise(got, _own(full, sizes, rank), **tol)
        up = _own(upstream, sizes, rank)
    else:
        assert_close_normwise(got, full, **tol)
        up = up_full
    grads = torch.autograd.grad(got, [zl, zal] + ([kl] if soft_k else []), up)
    assert_close_normwise(grads[0], _own(grads_full[0], sizes, rank), **tol)
    assert_close_normwise(grads[1], _own(grads_full[1], sizes, rank), **tol)
    if soft_k:
        expected_dk = grads_full[2] if k.dim() == 0 else _own(grads_full[2], sizes, rank)
        if k.dim() == 0:  # each rank's 0-d k reaches only its own rows: the ranks' dk sum to it
            total = grads[2].clone()
            dist.all_reduce(total)
            assert_close_normwise(total, expected_dk, **tol)
        else:
            assert_close_normwise(grads[2], expected_dk, **tol)


STATS_BINS = 16


def _run_setup_case(case: dict, sizes, rank: int, seed: int) -> None:
    """An issue-24 setup (tests/setup_cases.py's covering design: cross, symmetric, a queue, log_q,
    exclusion, a mask, a tensor temperature) on the reference hook against one process."""
    b = sum(sizes)
    case = dict(case, shape=(b, case["shape"][1]))
    z, z_aug, k, kw = make_case(case, seed)
    m = case["queue"]
    upstream = torch.rand(2 * b, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5

    def leaves(tensors):
        return [t.clone().requires_grad_(True) for t in tensors]

    def run(zz, zza, kk, tau):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return adaptive_info_nce(zz, zza, kk, backend="reference", return_stats=True, stats_bins=STATS_BINS,
                                     stats_range=(-3.0, 3.0), temperature=tau, **kw)

    tau = kw.pop("temperature")
    tau = tau if isinstance(tau, float) else tau.clone().requires_grad_(True)
    soft_k = isinstance(k, torch.Tensor)
    zg, zag = leaves([z, z_aug])
    kg = k.clone().requires_grad_(True) if soft_k else k
    full, full_stats = run(zg, zag, kg, tau)
    inputs = [zg, zag] + ([kg] if soft_k else []) + ([tau] if isinstance(tau, torch.Tensor) else [])
    up_full = upstream[: full.shape[0]] if full.dim() else torch.tensor(0.7, dtype=full.dtype)
    grads_full = torch.autograd.grad(full, inputs, up_full)

    own = dict(kw)
    for name in ("labels", "log_q"):
        if name in kw:
            t = kw[name]
            n_own = 2 * b if (name == "labels" and case["layout"] == "views" and t.shape[0] >= 2 * b) else b
            own[name] = torch.cat([_own(t[:n_own], sizes, rank), t[n_own:]])
    if "mask" in kw:
        own["mask"] = _own(kw["mask"], sizes, rank)
    zl, zal = leaves([_own(z, sizes, rank), _own(z_aug, sizes, rank)])
    kl = _own(k, sizes, rank).clone().requires_grad_(True) if soft_k else k
    taul = tau.detach().clone().requires_grad_(True) if isinstance(tau, torch.Tensor) else tau
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, got_stats = adaptive_info_nce_distributed(
            zl, zal, kl, backend="reference", return_stats=True, stats_bins=STATS_BINS, stats_range=(-3.0, 3.0),
            temperature=taul, **own)
    def own_rows(x):  # (B,) or (2B,) rows: this rank's, ordered as the distributed "none"
        return _own(x, sizes, rank)

    assert_close_normwise(got_stats.m, own_rows(full_stats.m), **SETUP_TOL)
    assert torch.equal(got_stats.histogram, full_stats.histogram)
    if case["reduction"] == "none":
        assert_close_normwise(got, own_rows(full), **SETUP_TOL)
        up = own_rows(up_full)
    else:
        assert_close_normwise(got, full, **SETUP_TOL)
        up = up_full
    got_inputs = [zl, zal] + ([kl] if soft_k else []) + ([taul] if isinstance(taul, torch.Tensor) else [])
    grads = torch.autograd.grad(got, got_inputs, up)
    assert_close_normwise(grads[0], _own(grads_full[0], sizes, rank), **SETUP_TOL)
    assert_close_normwise(grads[1], _own(grads_full[1], sizes, rank), **SETUP_TOL)
    if soft_k:
        assert_close_normwise(grads[2], _own(grads_full[2], sizes, rank), **SETUP_TOL)
    if isinstance(taul, torch.Tensor):
        assert_close_normwise(grads[-1], grads_full[-1], **SETUP_TOL)


#: the issue-24 setups: the covering design's cases (B set by the layout's shard sizes)
SETUP_CASES = covering_cases()


def _near_edges(z, z_aug, normalize: bool) -> int:
    """Candidate similarities (float64) within 1e-5 of a bin edge of the statistics' histogram."""
    c = similarity(z, z_aug, normalize)
    n = c.shape[0]
    keep = ~torch.eye(n, dtype=torch.bool)
    keep[torch.arange(n), (torch.arange(n) + n // 2) % n] = False
    pos = (c[keep] + 1.0) * (STATS_BINS / 2.0)
    return int(((pos - pos.round()).abs() < 1e-5 * STATS_BINS / 2.0).sum())


def _loss_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _triton_here() -> bool:
    z = torch.zeros(2, 2)
    return backends.triton_unavailable_reason(prepare(z, z, None, None, make_options())) is None


def _non_finite(sizes, rank: int, backend: str = "reference", dtype=torch.float64) -> None:
    """A NaN or inf in one rank's rows: NaN loss and NaN gradients on every rank."""
    for bad in (float("nan"), float("-inf")):
        z, z_aug = views(sum(sizes), 4, seed=5, dtype=dtype)
        z[sum(sizes) - 1, 2] = bad  # a row of the last rank
        zl = _own(z, sizes, rank).clone().requires_grad_(True)
        zal = _own(z_aug, sizes, rank).clone().requires_grad_(True)
        for reduction in ("mean", "none"):
            loss, st = adaptive_info_nce_distributed(zl, zal, 0.1, normalize=False, denominator="all",
                                                     reduction=reduction, backend=backend, return_stats=True)
            assert torch.isnan(loss).all(), (bad, reduction, loss)
            assert torch.isnan(st.m).all() and st.m.shape == (2 * sizes[rank],) and not st.histogram.any()
            dz, dza = torch.autograd.grad(loss.sum(), [zl, zal])
            assert torch.isnan(dz).all() and torch.isnan(dza).all(), (bad, reduction)


def _disagreement(rank: int) -> None:
    """Ranks passing different options all get the same clear error (no hang, no silent mix)."""
    z, z_aug = views(3, 4, seed=rank)
    try:
        adaptive_info_nce_distributed(z, z_aug, temperature=0.5 + rank)
    except ValueError as err:
        assert "every rank must pass the same options" in str(err), err
    else:
        raise AssertionError("mismatched options across ranks were accepted")


def worker(rank: int, world: int, init_file: str, layouts) -> None:
    """Every case for each layout (the B_r of every rank), then the error paths."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for sizes in layouts:
            for i, case in enumerate(CASES):
                try:
                    _run_case(case, sizes, rank, seed=10 * i)
                except Exception as err:
                    raise AssertionError(f"rank {rank}, sizes {sizes}, case {case}: {err}") from err
        for sizes in layouts:
            for i, case in enumerate(SETUP_CASES):
                try:
                    _run_setup_case(case, sizes, rank, seed=200 + i)
                except Exception as err:
                    raise AssertionError(f"setup, rank {rank}, sizes {sizes}, case {case}: {err}") from err
        _non_finite(layouts[0], rank)
        if _triton_here():  # the fused kernels over row ranges (Triton's interpreter on a CPU)
            for sizes in layouts:
                for i, case in enumerate(TRITON_CASES):
                    try:
                        _run_case(case, sizes, rank, seed=100 + 10 * i, backend="triton",
                                  dtype=torch.float32, tol=TRITON_TOL)
                    except Exception as err:
                        raise AssertionError(f"triton, rank {rank}, sizes {sizes}, case {case}: {err}") from err
            _non_finite(layouts[0], rank, "triton", torch.float32)
        _disagreement(rank)
        dist.barrier()  # leave together (a teardown racing a busy peer can hang)
    finally:
        dist.destroy_process_group()


def ddp_module_worker(rank: int, world: int, init_file: str, sizes) -> None:
    """AdaptiveInfoNCE(distributed=True) under DDP: a Linear encoder, each rank its own rows of
    a global batch; after backward (DDP averages) the parameter gradients equal one process's on
    the whole batch with the plain Module, and the returned value is the global loss. The
    direct adaptive_info_nce_distributed call, without the Module's scaling, gives 1/W of it
    (the trap the mode removes)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from adaptive_cl import AdaptiveInfoNCE
    from helpers import assert_close_normwise

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        b, d = sum(sizes), 6
        x, xa = views(b, d, seed=41, dtype=torch.float64)
        torch.manual_seed(0)
        base = torch.nn.Linear(d, d).double()
        opts = dict(temperature=0.5, threshold="soft", threshold_scale=0.1)
        k = 0.2
        one = torch.nn.Linear(d, d).double()
        one.load_state_dict(base.state_dict())
        full = AdaptiveInfoNCE(**opts)(one(x), one(xa), k)
        full.backward()
        want = [p.grad for p in one.parameters()]

        for scaled in (True, False):
            model = torch.nn.Linear(d, d).double()
            model.load_state_dict(base.state_dict())
            ddp = DDP(model)
            xl, xal = _own(x, sizes, rank), _own(xa, sizes, rank)
            if scaled:
                loss = AdaptiveInfoNCE(distributed=True, **opts)(ddp(xl), ddp(xal), k)
                assert_close_normwise(loss.detach(), full.detach(), dtype=torch.float64, length=2 * b + d)
            else:
                loss = adaptive_info_nce_distributed(ddp(xl), ddp(xal), k, **opts)
            loss.backward()
            got = [p.grad for p in model.parameters()]
            for g, w in zip(got, want):
                if scaled:
                    assert_close_normwise(g, w, dtype=torch.float64, length=2 * b + d, what="DDP gradient")
                else:
                    assert_close_normwise(g * world, w, dtype=torch.float64, length=2 * b + d)
            # Free DDP (its reducer holds the process group) while the group is still
            # registered: released last, by the function's return, the reducer destroys the
            # gloo group from the main thread holding the GIL while gloo's worker thread frees a
            # finished work's tensor and waits for the GIL (a deadlock seen under load in CI).
            del ddp, loss, got
            gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
