"""The implementations the benchmarks time: one registry shared by run.py and the pytest suite.

Each impl turns prepared inputs and a mode into a zero-argument callable (the thing timed):

- ``fused``    ``adaptive_info_nce(..., backend="triton")``: the fused Triton kernel.
- ``eager``    ``backend="reference"``: the PyTorch reference, materialising N x N.
- ``compiled`` ``backend="compiled"``: ``torch.compile(reference, dynamic=False)``; it compiles
               once per (N, D, dtype) on its first call (the harness warms it up untimed).
- ``sdpa``     ``scaled_dot_product_attention(Z, Z, Z)`` on Z = [z; z_aug] viewed (1, 1, N, D)
               with the flash backend forced: the floor proxy (one more matmul per tile than
               the loss's forward). Flash has no float32 kernel, so ``sdpa`` skips float32.
- ``sdpa-efficient`` the same call with the memory-efficient backend, which takes float32: a
               float32 point of comparison only, not the proxy of the targets.
- ``official-loop`` the authors' style: dense logits, soft targets built row by row in a Python
               loop (a ``nonzero`` per row, so a host sync per row), then the soft-label
               cross-entropy on the materialised logits. Default options, N <= 2048 only.
- ``fused-labels`` the fused kernel with (B,) labels as well (DuoRec's same-target positives:
               about two rows per label, plus the threshold).
- ``fused-soft``  the fused kernel with ``threshold="soft"`` (beta 0.05); ``fwd+bwd`` also takes
               the gradient of k (the row reduction of the backward).
- ``fused-stats`` the fused kernel with ``return_stats=True`` (2048-bin histogram of the
               similarities, per-row m_i). The three measure each option's cost over ``fused``.

Modes: ``"fwd"`` is the forward of a training step (inputs require grad, so the graph and the
saved tensors are built, as in training) and ``"fwd+bwd"`` adds the gradients with
``torch.autograd.grad`` (no ``.grad`` accumulation to time).

Inputs: z random normal, z_aug = z + noise (correlated views), both ``requires_grad``; k a (B,)
tensor near the 90th percentile of the candidates' cosines (SimThres' statistic), so about 10%
of the candidates cross it and the threshold path is exercised; every other option default.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, ROOT)

from adaptive_cl import adaptive_info_nce  # noqa: E402

IMPLS = ("fused", "eager", "compiled", "sdpa", "sdpa-efficient", "official-loop", "fused-labels", "fused-soft",
         "fused-stats", "auto-cross", "auto-queue")
#: The fused kernel with one option more (issue 15): each is compared with "fused".
OPTION_IMPLS = ("fused-labels", "fused-soft", "fused-stats")
#: The issue-24 setups through backend="auto" (the two-tower cross layout, a MoCo queue).
SETUP_IMPLS = ("auto-cross", "auto-queue")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GRID_N = (512, 2048, 8192, 16384, 32768, 65536)
GRID_D = (64, 128, 256)

#: Peak bytes of the dense impls per N x N float32 element, from the anchors (eager fwd+bwd:
#: 6.7 GB at N=16384, 26.6 GB at N=32768, i.e. about 6.2 float32 N x N temporaries); compiled
#: fuses most elementwise temporaries away (no anchor yet: 4 is a guess kept on the safe side).
NXN_TEMPS = {"eager": 7.0, "compiled": 4.0, "official-loop": 8.0,
             # "auto" takes the reference for the setups on CUDA (B x B, or N x 2N with the queue)
             "auto-cross": 2.0, "auto-queue": 14.0}
#: Measurements whose estimate exceeds this fraction of the GPU's memory are skipped, not run.
MEMORY_FRACTION = 0.85
OFFICIAL_LOOP_MAX_N = 2048
#: 90th percentile of a standard normal: cosines of random D-dim vectors are about N(0, 1/D).
Q90 = 1.2816


class Unavailable(RuntimeError):
    """The impl cannot run these inputs here (e.g. the Triton kernels are not installed)."""


@dataclass
class Inputs:
    n: int
    d: int
    dtype: torch.dtype
    z: torch.Tensor
    z_aug: torch.Tensor
    k: torch.Tensor
    stacked: torch.Tensor  # Z = [z; z_aug] as one (N, D) leaf for the sdpa impls
    grad_out: torch.Tensor  # upstream gradient of the sdpa output
    labels: torch.Tensor | None = None  # (B,) int64, about two rows per label (fused-labels)
    k_leaf: torch.Tensor | None = None  # k as a leaf that requires grad (fused-soft)


def make_inputs(n: int, d: int, dtype: torch.dtype, device="cuda", seed: int = 0) -> Inputs:
    if n % 2 or n < 4:
        raise ValueError(f"N must be even and >= 4; got {n}")
    b = n // 2
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(b, d, generator=g)
    z_aug = z + 0.7 * torch.randn(b, d, generator=g)
    k = Q90 / math.sqrt(d) * (1.0 + 0.1 * torch.rand(b, generator=g))
    stacked = torch.cat([z, z_aug])
    grad_out = torch.randn(1, 1, n, d, generator=g)
    labels = torch.randint(0, max(1, b // 2), (b,), generator=g)
    to = dict(device=device, dtype=dtype)
    return Inputs(
        n=n,
        d=d,
        dtype=dtype,
        z=z.to(**to).requires_grad_(True),
        z_aug=z_aug.to(**to).requires_grad_(True),
        k=k.to(device=device, dtype=torch.float32),
        stacked=stacked.to(**to).requires_grad_(True),
        grad_out=grad_out.to(**to),
        labels=labels.to(device),
        k_leaf=k.to(device=device, dtype=torch.float32).requires_grad_(True),
    )


def input_bytes(n: int, d: int, dtype: torch.dtype) -> int:
    """What make_inputs allocates on the device (excluded from the peak-memory delta)."""
    size = torch.empty((), dtype=dtype).element_size()
    return 3 * n * d * size + (n // 2) * (4 + 8 + 4)


def estimate_peak_bytes(impl: str, n: int, d: int, dtype: torch.dtype) -> int:
    """A rough upper estimate of the memory one call allocates beyond its inputs."""
    size = torch.empty((), dtype=dtype).element_size()
    linear = 8 * n * d * 4  # normalised copies, gradients, per-row statistics
    if impl in NXN_TEMPS:
        return int(NXN_TEMPS[impl] * 4 * n * n) + linear
    return linear + 4 * n * d * size


def skip_reason(impl: str, n: int, d: int, dtype: torch.dtype, mode: str, total_bytes: int | None = None) -> str | None:
    """Why (impl, N, D, dtype, mode) is not measured, or None when it is."""
    if impl not in IMPLS:
        return f"unknown impl {impl!r}"
    if mode not in MODES:
        return f"unknown mode {mode!r}"
    if impl == "sdpa" and dtype == torch.float32:
        return "SDPA's flash backend has no float32 kernel (float32 point of comparison: sdpa-efficient)"
    if impl in ("sdpa", "sdpa-efficient") and d > 256:
        return "SDPA fused backends take head dims <= 256"
    if impl == "official-loop" and n > OFFICIAL_LOOP_MAX_N:
        return f"official-loop is a per-row Python loop: measured only for N <= {OFFICIAL_LOOP_MAX_N}"
    if total_bytes is not None:
        need = estimate_peak_bytes(impl, n, d, dtype) + input_bytes(n, d, dtype)
        if need > MEMORY_FRACTION * total_bytes:
            return (
                f"needs about {need / 2**30:.1f} GiB (estimate) of {total_bytes / 2**30:.1f} GiB: "
                "skipped rather than run out of memory"
            )
    return None


def fused_unavailable_reason(inputs: Inputs, impl: str = "fused") -> str | None:
    """Why backend='triton' cannot run these inputs (kernels missing, options uncovered)."""
    from adaptive_cl import backends
    from adaptive_cl.contract import make_options, prepare

    try:
        labels = inputs.labels if impl == "fused-labels" else None
        opts = make_options(**SOFT) if impl == "fused-soft" else make_options()
        p = prepare(inputs.z, inputs.z_aug, inputs.k, labels, opts)
        return backends.triton_unavailable_reason(p)
    except Exception as err:  # noqa: BLE001 - any failure to import or prepare is a reason
        return f"{type(err).__name__}: {err}"


def _allow_many_compiles() -> None:
    """One compiled graph per (N, D, dtype): lift dynamo's recompile limits (default 8), which
    would otherwise make later shapes silently fall back to eager."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 1024))


def _loss_callable(backend: str) -> Callable[[Inputs], torch.Tensor]:
    def loss(x: Inputs) -> torch.Tensor:
        return adaptive_info_nce(x.z, x.z_aug, x.k, backend=backend)

    return loss


def official_loop_loss(z: torch.Tensor, z_aug: torch.Tensor, k: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """The released code's structure for the loss's default options (cosine, tau = 1, "negatives",
    "normalized", hard threshold): materialise the logits, fill a soft-target matrix one row at
    a time in Python, then a soft-label cross-entropy over the materialised matrix."""
    zs = torch.nn.functional.normalize(torch.cat([z, z_aug]).float(), dim=1)
    n = zs.shape[0]
    b = n // 2
    logits = (zs @ zs.T).clamp(-1.0, 1.0)
    k_rows = torch.cat([k, k]).float()
    targets = torch.zeros_like(logits)
    in_den = torch.zeros(n, n, dtype=torch.bool, device=logits.device)
    with torch.no_grad():
        for i in range(n):
            p = (i + b) % n
            above = logits[i] > k_rows[i]
            above[i] = False
            above[p] = False
            pos = above.nonzero().squeeze(1)  # a host sync per row, as in the released loop
            targets[i, p] = alpha
            if pos.numel() > 0:
                targets[i, pos] = (1.0 - alpha) / pos.numel()
            row_den = ~above
            row_den[i] = False
            in_den[i] = row_den
    masked = logits.masked_fill(~in_den, float("-inf"))
    lse = torch.logsumexp(masked, dim=1, keepdim=True)
    return (targets * (lse - logits)).sum(dim=1).mean()


def _sdpa_callable(backend_name: str) -> Callable[[Inputs], torch.Tensor]:
    def attention(x: Inputs) -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q = x.stacked.view(1, 1, x.n, x.d)
        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    return attention


#: The soft threshold's options in fused-soft.
SOFT = dict(threshold="soft", threshold_scale=0.05)


def _fused_labels(x: Inputs) -> torch.Tensor:
    return adaptive_info_nce(x.z, x.z_aug, x.k, labels=x.labels, backend="triton")


def _fused_soft(x: Inputs) -> torch.Tensor:
    return adaptive_info_nce(x.z, x.z_aug, x.k_leaf, backend="triton", **SOFT)


def _fused_stats(x: Inputs) -> torch.Tensor:
    loss, stats = adaptive_info_nce(x.z, x.z_aug, x.k, backend="triton", return_stats=True)
    return loss


#: The issue-24 setups' cases: the queue has M = QUEUE_FACTOR * N rows (columns N + M).
QUEUE_FACTOR = 1


def setup_kwargs(x: Inputs, setup: str) -> dict:
    """adaptive_info_nce's keyword arguments of a setup case: "cross" (B x B two-tower rows and
    columns, logQ and accidental-hit exclusion off, the threshold on) or "queue" (views layout
    with an (M, D) queue of extra columns)."""
    if setup == "cross":
        return dict(layout="cross")
    g = torch.Generator(device="cpu").manual_seed(1)
    queue = torch.randn(QUEUE_FACTOR * x.n, x.d, generator=g).to(device=x.z.device, dtype=x.z.dtype)
    return dict(negatives=queue)


def _setup_callable(setup: str, backend: str) -> Callable[[Inputs], torch.Tensor]:
    cache: dict = {}

    def loss(x: Inputs) -> torch.Tensor:
        if "kw" not in cache:  # built once, outside the timed calls' allocations
            cache["kw"] = setup_kwargs(x, setup)
        return adaptive_info_nce(x.z, x.z_aug, x.k, backend=backend, **cache["kw"])

    return loss


FORWARDS: dict[str, Callable[[Inputs], torch.Tensor]] = {
    "fused-labels": _fused_labels,
    "fused-soft": _fused_soft,
    "fused-stats": _fused_stats,
    # the setups through backend="auto": on CUDA the reference until the kernels implement them
    "auto-cross": _setup_callable("cross", "auto"),
    "auto-queue": _setup_callable("queue", "auto"),
    "fused": _loss_callable("triton"),
    "eager": _loss_callable("reference"),
    "compiled": _loss_callable("compiled"),
    "sdpa": _sdpa_callable("FLASH_ATTENTION"),
    "sdpa-efficient": _sdpa_callable("EFFICIENT_ATTENTION"),
    "official-loop": lambda x: official_loop_loss(x.z, x.z_aug, x.k),
}


def make_step(impl: str, inputs: Inputs, mode: str) -> Callable[[], object]:
    """The callable to time for (impl, mode) on these inputs. Raises ValueError for an
    unknown impl or mode and Unavailable when the impl cannot run here (e.g. no kernels)."""
    if impl not in FORWARDS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if impl == "fused" or impl in OPTION_IMPLS:
        reason = fused_unavailable_reason(inputs, impl)
        if reason is not None:
            raise Unavailable(f"{impl} (backend='triton') unavailable: {reason}")
    if impl == "compiled":
        _allow_many_compiles()
    forward = FORWARDS[impl]
    sdpa = impl.startswith("sdpa")
    leaves = (inputs.stacked,) if sdpa else (inputs.z, inputs.z_aug)
    if impl == "fused-soft":
        leaves = leaves + (inputs.k_leaf,)  # dL/dk: the soft threshold's row reduction

    if mode == "fwd":
        def step():
            return forward(inputs)
    else:
        def step():
            out = forward(inputs)
            return torch.autograd.grad(out, leaves, inputs.grad_out if sdpa else None)

    return step
