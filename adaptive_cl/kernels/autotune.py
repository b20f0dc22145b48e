"""Opt-in tuning of the launch table on a GPU: time candidate configurations, print a table.

    python -m adaptive_cl.kernels.autotune                      # D 64/128/256, every dtype/path
    python -m adaptive_cl.kernels.autotune --quick              # D 64, bf16 + float32 paths
    python -m adaptive_cl.kernels.autotune --n 32768 --out table.py

The package never tunes at run time (``launch.py``): this tool measures forward + backward of
one call (row stats, forward, per-row backward, backward: what a training step pays) for each
candidate (BLOCK_M, BLOCK_N, warps, stages, K chunk) at one N (default 16384), with CUDA-event
timing (``triton.testing.do_bench``, median), checks each candidate's loss and gradients against
the current table's within the dtype's tolerance (a faster wrong configuration is rejected), and
prints the fastest per key as a ``TABLE`` to paste into launch.py, plus every timing. Candidates
that do not compile or do not fit (shared memory, registers) are reported and skipped.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import launch
from .launch import LaunchConfig as C

CANDIDATES = [C(64, 64, 4, 2), C(128, 64, 8, 2), C(64, 128, 4, 2), C(128, 128, 8, 2), C(64, 32, 4, 2),
              C(32, 32, 4, 2), C(128, 64, 8, 3), C(64, 64, 4, 3), C(32, 32, 4, 1)]
IEEE_CANDIDATES = [C(64, 32, 4, 1, 16), C(32, 32, 4, 1, 16), C(64, 16, 4, 1, 16), C(64, 32, 4, 1, 32),
                   C(128, 32, 8, 1, 16), C(64, 64, 4, 1, 16)]
_PRECISION = {"ieee": ("highest", "ieee"), "3xtf32": ("highest", "3xtf32"), "tf32": ("high", "ieee"),
              "native": ("highest", "ieee")}
_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
_D_OF_BUCKET = {16: 16, 32: 32, 64: 64, 128: 128, 256: 256, "wide": 384}


def _step(z, za, k, o, cfg, grad):
    from . import function

    pr = function.prepare_rows(z, za, k, None, o, config=cfg)
    loss, cnt, rs, wx = function.forward_rows(pr, o)
    dz = function.backward_rows(pr, o, cnt, rs, wx, grad)
    return loss, dz


def measure(bucket, dtype, path, n, candidates=None, limit=None, log=print):
    """[(config, median ms or None, note)] for one table key, and the best config."""
    import os

    import triton.testing

    from ..contract import make_options

    precision, highest = _PRECISION[path]
    torch.set_float32_matmul_precision(precision)
    os.environ["ADAPTIVE_CL_FP32_HIGHEST"] = highest
    d = _D_OF_BUCKET[bucket]
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(n // 2, d, generator=g, device="cuda").to(dtype)
    za = (z.float() + 0.7 * torch.randn(n // 2, d, generator=g, device="cuda")).to(dtype)
    k = torch.full((n,), 1.28 / d ** 0.5, device="cuda")  # ~10 % extra positives
    o = make_options(temperature=0.1)
    grad = torch.ones((), device="cuda")
    ref_loss, ref_dz = _step(z, za, k, o, launch.lookup(d, dtype, path), grad)
    cands = (candidates or (IEEE_CANDIDATES if path == "ieee" else CANDIDATES))[:limit]
    results = []
    for cfg in cands:
        try:
            loss, dz = _step(z, za, k, o, cfg, grad)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a candidate that does not compile or fit
            results.append((cfg, None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
            continue
        err_l = float((loss - ref_loss).norm() / ref_loss.norm())
        err_g = float((dz.float() - ref_dz.float()).norm() / ref_dz.float().norm())
        if not (err_l <= _TOL[dtype] and err_g <= _TOL[dtype]):
            results.append((cfg, None, f"disagrees with the table's config: loss {err_l:.1e}, grad {err_g:.1e}"))
            continue
        ms = triton.testing.do_bench(lambda: _step(z, za, k, o, cfg, grad), warmup=25, rep=100)
        results.append((cfg, ms, ""))
        log(f"  {bucket} {launch.dtype_name(dtype)} {path} {cfg.as_tuple()}: {ms:.3f} ms")
    timed = [(ms, i) for i, (cfg, ms, _) in enumerate(results) if ms is not None]
    best = results[min(timed)[1]][0] if timed else None
    return results, best


def format_table(table: dict) -> str:
    lines = ["TABLE: dict[tuple, LaunchConfig] = {"]
    for key, c in table.items():
        kc = "" if c.k_chunk is None and c.d_chunk is None else f", {c.k_chunk}"
        kc += "" if c.d_chunk is None else f", {c.d_chunk}"
        lines.append(f"    {key!r}: _C({c.block_m}, {c.block_n}, {c.num_warps}, {c.num_stages}{kc}),")
    lines.append("}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Time launch configurations on a GPU and print a launch table.")
    ap.add_argument("--n", type=int, default=16384, help="rows N = 2B of the timed call (default 16384)")
    ap.add_argument("--buckets", default="64,128,256", help="D buckets, comma-separated (16,32,64,128,256,wide)")
    ap.add_argument("--quick", action="store_true",
                    help="D 64 only; bfloat16 and the three float32 paths; the first 4 candidates each")
    ap.add_argument("--out", default=None, help="also write the report (markdown with the table) here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("autotune: needs a CUDA GPU (nothing measured)", file=sys.stderr)
        return 2
    buckets = [b if b == "wide" else int(b) for b in args.buckets.split(",")]
    keys = [(dt, p) for dt, p in (("bfloat16", "native"), ("float16", "native"), ("float32", "tf32"),
                                  ("float32", "3xtf32"), ("float32", "ieee"))]
    if args.quick:
        buckets, keys = [64], [k for k in keys if k[0] != "float16"]
    before = torch.get_float32_matmul_precision()
    table = dict(launch.TABLE)
    report = [f"# launch table measured on {torch.cuda.get_device_name(0)}, N = {args.n}", ""]

    def emit(lines: list[str], mode: str = "a") -> None:
        """Print a section and append it to --out at once: a run stopped by its time limit keeps
        every combination measured so far (issue 23: the report used to be written at the end)."""
        text = "\n".join(lines)
        print(text, flush=True)
        if args.out:
            with open(args.out, mode) as f:
                f.write(text + "\n")

    emit(report, "w")
    t0 = time.monotonic()
    try:
        for bucket in buckets:
            for dt, path in keys:
                dtype = getattr(torch, dt)
                results, best = measure(bucket, dtype, path, args.n, limit=4 if args.quick else None)
                section = [f"## D bucket {bucket}, {dt}, {path}"]
                section += [f"- {c.as_tuple()}: " + (f"{ms:.3f} ms" if ms is not None else f"skipped ({note})")
                            for c, ms, note in results]
                if best is not None:
                    table[(bucket, dt, path)] = best
                    section.append(f"- best: {best.as_tuple()}")
                emit(section + [""])
    finally:
        torch.set_float32_matmul_precision(before)
    emit(["```python", format_table(table), "```", f"({time.monotonic() - t0:.0f} s)"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
