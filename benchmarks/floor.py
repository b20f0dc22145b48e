#!/usr/bin/env python3
"""Lower bounds on the fused loss's time per shape, from work counts and H100 SXM peak rates.

    python benchmarks/floor.py            # markdown tables for the benchmark grid
    python benchmarks/floor.py --N 32768 --D 64

Work of the fused kernel (see the kernels' module docstrings), per call on N = 2B rows of width D:
- exponentials: forward N^2 (one per logit), backward N^2 (the fixed shift 1/tau makes one
  exponential per tile element serve both G_IJ and G_JI^T);
- matmul FLOPs: forward one N x N x D product (S = Z Z^T), backward two (recompute S, then
  (G + G^T) Z), each 2 N^2 D;
- HBM bytes: Z read by each pass, dZ written, O(N) per-row statistics: tiny next to the rest;
- other FP32 arithmetic per logit (scale, compare with k, masks, selects, sums): not a peak
  rate bound but an estimate, ALU_OPS per element at half the FMA FLOP rate (one op per lane
  per clock).
A time floor is the largest of the bounds that must all be paid (they can overlap, so the max,
not the sum). The SDPA flash proxy does 2 matmuls forward and 5 backward, and N^2 exponentials
each way.
"""

from __future__ import annotations

import argparse

# H100 SXM5 peak rates (dense, no sparsity).
MUFU_EXP_PER_S = 3.9e12  # 16 MUFU ops/clk/SM x 132 SMs x ~1.83 GHz
BF16_FLOPS = 989e12
TF32_FLOPS = 495e12
FP32_FMA_FLOPS = 67e12  # CUDA cores; one FMA = 2 FLOP
FP32_OPS_PER_S = FP32_FMA_FLOPS / 2  # non-FMA arithmetic: one op per lane per clock
HBM_BYTES_PER_S = 3.35e12

#: Estimated non-matmul FP32 operations per logit element (see the module docstring).
ALU_OPS = {"fwd": 8, "fwd+bwd": 8 + 14}
GRID_N = (512, 2048, 8192, 16384, 32768, 65536)
GRID_D = (64, 128, 256)
STATS_BYTES_PER_ROW = 32  # LSE, m, sum over A, partner logit, k, label, loss, upstream


def counts(n: int, d: int, mode: str = "fwd+bwd", elem_bytes: int = 2) -> dict:
    """Exponentials, matmul FLOPs, HBM bytes and other FP32 ops of one fused call."""
    passes = 1 if mode == "fwd" else 2
    matmuls = 1 if mode == "fwd" else 3
    z_bytes = n * d * elem_bytes
    hbm = passes * (z_bytes + STATS_BYTES_PER_ROW * n) + (z_bytes if mode == "fwd+bwd" else 0)
    return {
        "exps": passes * n * n,
        "matmul_flops": matmuls * 2 * n * n * d,
        "bytes": hbm,
        "alu_ops": ALU_OPS[mode] * n * n,
    }


def times_ms(n: int, d: int, mode: str = "fwd+bwd", elem_bytes: int = 2) -> dict:
    """Each bound in ms, and the floors: bf16; float32 at "highest" with ieee FMA or tf32x3
    (three tensor-core passes); float32 at "high" (one tf32 pass)."""
    c = counts(n, d, mode, elem_bytes)
    t = {
        "exp": c["exps"] / MUFU_EXP_PER_S * 1e3,
        "mm_bf16": c["matmul_flops"] / BF16_FLOPS * 1e3,
        "mm_fp32_ieee": c["matmul_flops"] / FP32_FMA_FLOPS * 1e3,
        "mm_tf32x3": 3 * c["matmul_flops"] / TF32_FLOPS * 1e3,
        "mm_tf32": c["matmul_flops"] / TF32_FLOPS * 1e3,
        "hbm": c["bytes"] / HBM_BYTES_PER_S * 1e3,
        "alu_est": c["alu_ops"] / FP32_OPS_PER_S * 1e3,
    }
    t["floor_bf16"] = max(t["exp"], t["mm_bf16"], t["hbm"])
    t["floor_fp32_ieee"] = max(t["exp"], t["mm_fp32_ieee"], t["hbm"])
    t["floor_fp32_tf32x3"] = max(t["exp"], t["mm_tf32x3"], t["hbm"])
    t["floor_fp32_tf32"] = max(t["exp"], t["mm_tf32"], t["hbm"])
    return t


def serial_ms(n: int, d: int, mode: str = "fwd+bwd") -> dict:
    """No-overlap model: exponentials + other FP32 ops + matmuls, one after another (a first
    kernel that does not overlap MUFU, ALU and tensor-core work). The basis of v1's prediction."""
    t = times_ms(n, d, mode, elem_bytes=4)
    rest = t["exp"] + t["alu_est"]
    return {"bf16": rest + t["mm_bf16"], "fp32_tf32x3": rest + t["mm_tf32x3"], "fp32_ieee": rest + t["mm_fp32_ieee"]}


#: Instruction issue: 4 schedulers per SM, one warp instruction per clock each (H100 SXM,
#: 132 SMs at ~1.83 GHz): thread instructions per second when every lane is busy.
ISSUE_THREAD_INSTR_PER_S = 4 * 132 * 1.83e9 * 32


def issue_ms(n: int, instr_per_elem: float) -> float:
    """Time to issue ``instr_per_elem`` thread instructions per similarity element (the SASS
    count on a kernel's interior path, from adaptive_cl.kernels.compile_check) over N^2
    elements: the bound of an issue-limited pass (an estimate: no stalls, full occupancy)."""
    return n * n * instr_per_elem / ISSUE_THREAD_INSTR_PER_S * 1e3


def sdpa_floor_ms(n: int, d: int, mode: str = "fwd+bwd") -> float:
    """The bf16 flash-attention floor on (1, 1, N, D): 2 (+5) matmuls, N^2 (+N^2) exps."""
    matmuls = 2 if mode == "fwd" else 7
    exps = n * n if mode == "fwd" else 2 * n * n
    return max(exps / MUFU_EXP_PER_S, matmuls * 2 * n * n * d / BF16_FLOPS) * 1e3


def fmt(v: float) -> str:
    """3 significant digits without exponents for the magnitudes in these tables."""
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def tables(ns=GRID_N, ds=GRID_D) -> str:
    out = ["### Work per fused call (fwd+bwd)", "",
           "| N | D | exps | matmul GFLOP | HBM MB (bf16 / fp32) | other FP32 ops (est.) |",
           "|---:|---:|---:|---:|---:|---:|"]
    for n in ns:
        for d in ds:
            c2, c4 = counts(n, d, elem_bytes=2), counts(n, d, elem_bytes=4)
            out.append(f"| {n} | {d} | {c2['exps']:.3g} | {c2['matmul_flops'] / 1e9:.4g} | "
                       f"{c2['bytes'] / 1e6:.3g} / {c4['bytes'] / 1e6:.3g} | {c2['alu_ops']:.3g} |")
    for mode in ("fwd+bwd", "fwd"):
        out += ["", f"### Bounds and floors in µs, {mode} (H100 SXM peak rates)", "",
                "| N | D | exp (MUFU) | mm bf16 | mm fp32 ieee | mm tf32x3 | HBM (fp32) | other FP32 ops (est.) "
                "| **floor bf16** | **floor fp32 tf32x3** | **floor fp32 ieee** | SDPA-flash bf16 floor |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n in ns:
            for d in ds:
                t = {k: v * 1e3 for k, v in times_ms(n, d, mode, elem_bytes=4).items()}  # µs
                t["floor_bf16"] = times_ms(n, d, mode, elem_bytes=2)["floor_bf16"] * 1e3
                cols = ("exp", "mm_bf16", "mm_fp32_ieee", "mm_tf32x3", "hbm", "alu_est")
                floors = ("floor_bf16", "floor_fp32_tf32x3", "floor_fp32_ieee")
                out.append(f"| {n} | {d} | " + " | ".join(fmt(t[c]) for c in cols) + " | "
                           + " | ".join(f"**{fmt(t[c])}**" for c in floors)
                           + f" | {fmt(sdpa_floor_ms(n, d, mode) * 1e3)} |")
    out += ["", "### No-overlap model in µs (exp + other FP32 ops + matmul, serial), fwd+bwd", "",
            "| N | D | bf16 | fp32 tf32x3 | fp32 ieee |", "|---:|---:|---:|---:|---:|"]
    for n in ns:
        for d in ds:
            m = serial_ms(n, d)
            out.append(f"| {n} | {d} | {fmt(m['bf16'] * 1e3)} | {fmt(m['fp32_tf32x3'] * 1e3)} | {fmt(m['fp32_ieee'] * 1e3)} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Print the FLOP/exp/byte floors of the fused loss.")
    ap.add_argument("--N", type=lambda s: tuple(int(x) for x in s.split(",")), default=GRID_N)
    ap.add_argument("--D", type=lambda s: tuple(int(x) for x in s.split(",")), default=GRID_D)
    args = ap.parse_args(argv)
    print(tables(args.N, args.D))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
