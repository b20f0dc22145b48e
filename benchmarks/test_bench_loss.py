"""pytest-benchmark suite: impl x N x D x dtype x mode, on a CUDA GPU.

    pytest benchmarks/ --benchmark-only                       # everything that fits
    pytest benchmarks/ --benchmark-only -k "fused and 32768"  # a slice
    pytest benchmarks/ --benchmark-only --benchmark-json=out.json

Times are wall-clock per call with a ``torch.cuda.synchronize()`` inside the timed function
(pytest-benchmark's timer); ``benchmarks/run.py`` times with CUDA events and writes the
recorded results. Peak memory (max_memory_allocated delta over the inputs, one call after
warm-up) goes to ``extra_info["peak_mib"]``. Combinations that cannot run (no flash float32,
estimated memory above the GPU's) are skipped with the reason; without CUDA the whole module
is skipped.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("benchmarks need a CUDA GPU (torch.cuda.is_available() is False)", allow_module_level=True)

import impls  # noqa: E402
from run import bench_ms, peak_mib  # noqa: E402

WARMUP_CALLS = 3


@pytest.fixture(scope="module")
def inputs_cache():
    cache: dict[tuple, impls.Inputs] = {}
    yield cache
    cache.clear()
    torch.cuda.empty_cache()


def get_inputs(cache, n, d, dtype):
    key = (n, d, dtype)
    if key not in cache:
        cache.clear()  # one shape alive at a time
        torch.cuda.empty_cache()
        cache[key] = impls.make_inputs(n, d, impls.DTYPES[dtype])
    return cache[key]


@pytest.mark.parametrize("mode", impls.MODES)
@pytest.mark.parametrize("dtype", tuple(impls.DTYPES))
@pytest.mark.parametrize("d", impls.GRID_D, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("n", impls.GRID_N, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("impl", impls.IMPLS)
def test_loss(benchmark, inputs_cache, impl, n, d, dtype, mode):
    total = torch.cuda.get_device_properties(0).total_memory
    reason = impls.skip_reason(impl, n, d, impls.DTYPES[dtype], mode, total)
    if reason is not None:
        pytest.skip(reason)
    x = get_inputs(inputs_cache, n, d, dtype)
    try:
        step = impls.make_step(impl, x, mode)
    except impls.Unavailable as err:
        pytest.skip(str(err))

    def synced():
        step()
        torch.cuda.synchronize()

    for _ in range(WARMUP_CALLS):  # compilation, autotuning
        synced()
    est_ms = bench_ms(step, rep_ms=20, warmup_ms=5, min_reps=3, max_reps=50)
    rounds = int(min(max(200.0 / max(est_ms, 1e-3), 5), 200))
    benchmark.extra_info.update(
        impl=impl, N=n, D=d, dtype=dtype, mode=mode, peak_mib=peak_mib(step),
        device=torch.cuda.get_device_name(0), fp32_precision=torch.get_float32_matmul_precision(),
    )
    benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=1)
