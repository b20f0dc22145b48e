#!/usr/bin/env python3
"""Time the loss implementations on a CUDA GPU and record the results.

    python benchmarks/run.py                   # the default set, within --budget-s seconds
    python benchmarks/run.py --quick           # the target shapes only, fwd+bwd
    python benchmarks/run.py --full            # the whole grid (long: compiles every shape)
    python benchmarks/run.py --impls fused,sdpa --N 8192,32768 --D 64 --dtypes bfloat16
    python benchmarks/run.py --dry-run         # print the plan (works without a GPU)
    python benchmarks/run.py --check-targets   # the issue's "Done when" ratios from a results file

Each measurement: the callable from impls.make_step, called once untimed (compilation,
autotuning), then a do_bench-style median of CUDA-event timings over warmed-up repetitions,
and the peak memory of one more call as the ``max_memory_allocated`` delta over what was
allocated before it (the inputs excluded). Records go to
``benchmarks/results/<device-slug>-<YYYY-MM-DD>.json`` as ``{"records": [...]}``, merged with
the file's earlier records (a record with the same impl, N, D, dtype, mode, device and
fp32_precision is replaced), and the plots of time and memory against N to
``<same stem>-time.png`` / ``-memory.png``.

Exit status: 0 done; 1 a measurement raised an unexpected error, or (--check-targets) a target
failed or has no records; 2 nothing can be measured here (no CUDA device; nothing is written).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import re
import shlex
import statistics
import sys
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import impls  # noqa: E402

RESULTS_DIR = os.path.join(HERE, "results")
RECORD_FIELDS = (
    "impl", "N", "D", "dtype", "mode", "median_ms", "peak_mib",
    "device", "torch", "triton", "date", "command", "fp32_precision",
)
KEY_FIELDS = ("impl", "N", "D", "dtype", "mode", "device", "fp32_precision")

# The default set: the four targets' shapes first, then N-scaling at D=64, then D-scaling.
DEFAULT_IMPLS = ("fused", "eager", "compiled", "sdpa")
DEFAULT_N = (512, 2048, 8192, 16384, 32768)
DEFAULT_D = (64,)
WIDE_D = {"impls": ("fused", "sdpa"), "N": (2048, 8192, 32768), "D": (128, 256)}
QUICK = {"impls": ("fused", "eager", "compiled", "sdpa"), "N": (512, 16384, 32768), "D": (64,), "modes": ("fwd+bwd",)}
#: The fused kernel's options (labels, soft threshold, return_stats) next to "fused", default set
#: (the quick set: N = 32768 fwd+bwd only); the cost table divides each by "fused".
OPTIONS = {"impls": impls.OPTION_IMPLS, "N": (8192, 32768), "D": (64,)}
#: (N, D, dtype) groups the "Done when" targets read: measured first, whatever the budget.
TARGET_GROUPS = ((32768, 64, "bfloat16"), (32768, 64, "float32"), (512, 64, "float32"), (16384, 64, "float32"))


# ----------------------------------------------------------------------------- records
def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-device"


def today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).date().isoformat()


def results_path(device_name: str, date: str, results_dir: str = RESULTS_DIR) -> str:
    return os.path.join(results_dir, f"{device_slug(device_name)}-{date}.json")


def make_record(impl, n, d, dtype, mode, median_ms, peak_mib, *, device, torch_version, triton_version,
                date, command, fp32_precision) -> dict:
    """One record, with exactly RECORD_FIELDS and the JSON types the issue asks for."""
    if dtype not in impls.DTYPES:
        raise ValueError(f"dtype must be one of {sorted(impls.DTYPES)}; got {dtype!r}")
    if mode not in impls.MODES:
        raise ValueError(f"mode must be one of {impls.MODES}; got {mode!r}")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        raise ValueError(f"date must be YYYY-MM-DD; got {date!r}")
    return {
        "impl": str(impl), "N": int(n), "D": int(d), "dtype": dtype, "mode": mode,
        "median_ms": float(median_ms), "peak_mib": float(peak_mib), "device": str(device),
        "torch": str(torch_version), "triton": str(triton_version), "date": date,
        "command": str(command), "fp32_precision": str(fp32_precision),
    }


def record_key(r: dict) -> tuple:
    return tuple(r.get(f) for f in KEY_FIELDS)


def merge_records(old: list[dict], new: list[dict]) -> list[dict]:
    """old's records not replaced by a new record with the same key, then the new ones, sorted."""
    fresh = {record_key(r) for r in new}
    merged = [r for r in old if record_key(r) not in fresh] + list(new)
    order = {name: i for i, name in enumerate(impls.IMPLS)}
    merged.sort(key=lambda r: (r["dtype"], r["D"], r["mode"], r["N"], order.get(r["impl"], 99), r["impl"]))
    return merged


def load_records(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise ValueError(f"{path}: expected an object {{'records': [...]}}")
    return data["records"]


def write_records(path: str, new: list[dict]) -> list[dict]:
    """Merge ``new`` into the file at ``path`` (created if absent); returns all its records."""
    old = load_records(path) if os.path.exists(path) else []
    merged = merge_records(old, new)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"records": merged}, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return merged


# ----------------------------------------------------------------------------- report
def markdown_table(records: list[dict]) -> str:
    """One table per (dtype, D, mode): a row per N, a column per impl, 'ms / MiB' cells."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["dtype"], r["D"], r["mode"], r.get("fp32_precision", "?"))].append(r)
    order = {name: i for i, name in enumerate(impls.IMPLS)}
    out = []
    for (dtype, d, mode, prec), rs in sorted(groups.items()):
        names = sorted({r["impl"] for r in rs}, key=lambda s: (order.get(s, 99), s))
        cells = {(r["N"], r["impl"]): r for r in rs}
        title = f"### {dtype}, D={d}, {mode}" + (f" (fp32 matmul precision: {prec})" if dtype == "float32" else "")
        out.append(title)
        out.append("")
        out.append("| N | " + " | ".join(f"{s} ms / MiB" for s in names) + " |")
        out.append("|---:|" + "---:|" * len(names))
        for n in sorted({r["N"] for r in rs}):
            row = []
            for s in names:
                r = cells.get((n, s))
                row.append("—" if r is None else f"{r['median_ms']:.3f} / {r['peak_mib']:.1f}")
            out.append(f"| {n} | " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def option_costs(records: list[dict]) -> str:
    """Each option impl's time over "fused" on the same (N, D, dtype, mode, device, precision):
    the measured counterpart of the predictions in NOTES.md. Empty when no pair was measured."""
    base = {(r["N"], r["D"], r["dtype"], r["mode"], r["device"], r.get("fp32_precision")): r
            for r in records if r["impl"] == "fused"}
    lines = []
    for r in records:
        key = (r["N"], r["D"], r["dtype"], r["mode"], r["device"], r.get("fp32_precision"))
        if r["impl"] in impls.OPTION_IMPLS and key in base and base[key]["median_ms"] > 0:
            ratio = r["median_ms"] / base[key]["median_ms"]
            lines.append(f"| {r['impl']} | {r['N']} | {r['D']} | {r['dtype']} | {r['mode']} | "
                         f"{r['median_ms']:.3f} | {base[key]['median_ms']:.3f} | {ratio:.2f} |")
    if not lines:
        return ""
    head = ["### Options over the plain fused kernel", "",
            "| impl | N | D | dtype | mode | ms | fused ms | ratio |", "|---|---:|---:|---|---|---:|---:|---:|"]
    return "\n".join(head + sorted(lines)) + "\n"


def plot(records: list[dict], stem: str) -> list[str]:
    """time-vs-N and memory-vs-N (log-log), a panel per (dtype, D), a line per (impl, mode)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("run.py: matplotlib is not installed: no plots", file=sys.stderr)
        return []
    dtypes = sorted({r["dtype"] for r in records})
    ds = sorted({r["D"] for r in records})
    order = {name: i for i, name in enumerate(impls.IMPLS)}
    names = sorted({r["impl"] for r in records}, key=lambda s: (order.get(s, 99), s))
    colors = {s: f"C{i}" for i, s in enumerate(names)}
    styles = {"fwd+bwd": "-", "fwd": "--"}
    written = []
    device = records[0]["device"] if records else ""
    for field, label, suffix in (("median_ms", "median time (ms)", "time"), ("peak_mib", "peak memory (MiB)", "memory")):
        fig, axes = plt.subplots(len(dtypes), len(ds), figsize=(4.6 * len(ds), 3.8 * len(dtypes)), squeeze=False)
        for i, dtype in enumerate(dtypes):
            for j, d in enumerate(ds):
                ax = axes[i][j]
                for s in names:
                    for mode, ls in styles.items():
                        pts = sorted((r["N"], r[field]) for r in records
                                     if r["impl"] == s and r["mode"] == mode and r["dtype"] == dtype and r["D"] == d)
                        if pts:
                            ax.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], ls, marker="o",
                                    markersize=3, color=colors[s], label=f"{s} {mode}")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(f"{dtype}, D={d}", fontsize=10)
                ax.set_xlabel("N = 2B")
                ax.set_ylabel(label)
                ax.grid(True, which="both", alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=6)
        fig.suptitle(f"{label} vs N — {device}", fontsize=11)
        fig.tight_layout()
        path = f"{stem}-{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------- targets
TARGETS = (
    # name, (impl, dtype, N), (impl, dtype, N), quantity, kind, limit
    ("bf16 N=32768 D=64 fwd+bwd: fused / sdpa-flash time", ("fused", "bfloat16", 32768), ("sdpa", "bfloat16", 32768), "median_ms", "<=", 1.5),
    ("fp32 N=32768 D=64 fwd+bwd: compiled / fused time", ("compiled", "float32", 32768), ("fused", "float32", 32768), "median_ms", ">=", 5.0),
    ("fp32 N=512 D=64 fwd+bwd: compiled / fused time", ("compiled", "float32", 512), ("fused", "float32", 512), "median_ms", ">=", 4.0),
    ("fp32 N=16384 D=64 fwd+bwd: fused / eager peak memory", ("fused", "float32", 16384), ("eager", "float32", 16384), "peak_mib", "<=", 0.01),
)
PRECISION_PREFERENCE = ("highest", "high", "medium")


def _find(records, impl, dtype, n, device=None, precision=None):
    found = [r for r in records if r["impl"] == impl and r["dtype"] == dtype and r["N"] == n and r["D"] == 64
             and r["mode"] == "fwd+bwd" and (device is None or r["device"] == device)
             and (precision is None or r.get("fp32_precision") == precision)]
    return found[-1] if found else None


def check_targets(records: list[dict]) -> list[dict]:
    """The four "Done when" ratios. Both sides of a ratio come from the same device and, for
    float32, the same fp32 matmul precision ("highest" preferred); a pair taken by different
    commands or on different dates is flagged, since the issue asks for one run."""
    results = []
    for name, num_key, den_key, field, kind, limit in TARGETS:
        best = None
        devices = sorted({r["device"] for r in records})
        precisions = sorted({r.get("fp32_precision") for r in records},
                            key=lambda p: PRECISION_PREFERENCE.index(p) if p in PRECISION_PREFERENCE else 9)
        for device in devices:
            for prec in precisions:
                a = _find(records, *num_key, device=device, precision=prec)
                b = _find(records, *den_key, device=device, precision=prec)
                if a and b:
                    best = (a, b)
                    break
            if best:
                break
        entry = {"target": name, "limit": f"{kind} {limit:g}", "ok": False, "ratio": None, "note": ""}
        if best is None:
            missing = [f"{k[0]} {k[1]} N={k[2]}" for k in (num_key, den_key)]
            entry["note"] = "missing records: needs " + " and ".join(missing) + " (D=64, fwd+bwd, one device)"
        else:
            a, b = best
            if b[field] <= 0:
                entry["note"] = f"denominator {field} is {b[field]}"
            else:
                ratio = a[field] / b[field]
                entry["ratio"] = ratio
                entry["ok"] = ratio <= limit if kind == "<=" else ratio >= limit
                entry["note"] = (f"{a[field]:.4g} / {b[field]:.4g} {'ms' if field == 'median_ms' else 'MiB'}"
                                 f" on {a['device']}, fp32_precision={a.get('fp32_precision')}")
                if (a["command"], a["date"]) != (b["command"], b["date"]):
                    entry["note"] += " [WARNING: the two records come from different runs]"
        results.append(entry)
    return results


def format_targets(results: list[dict]) -> str:
    lines = ["| target | limit | ratio | pass | detail |", "|---|---|---:|---|---|"]
    for e in results:
        ratio = "—" if e["ratio"] is None else f"{e['ratio']:.4g}"
        lines.append(f"| {e['target']} | {e['limit']} | {ratio} | {'PASS' if e['ok'] else 'FAIL'} | {e['note']} |")
    return "\n".join(lines)


def latest_results_file(results_dir: str = RESULTS_DIR) -> str | None:
    files = [os.path.join(results_dir, f) for f in os.listdir(results_dir) if f.endswith(".json")] if os.path.isdir(results_dir) else []
    return max(files, key=os.path.getmtime) if files else None


# ----------------------------------------------------------------------------- timing
def bench_ms(fn, *, rep_ms: float = 100.0, warmup_ms: float = 25.0, min_reps: int = 5, max_reps: int = 500,
             flush_l2: bool = False) -> float:
    """Median milliseconds of ``fn`` by CUDA events, triton.testing.do_bench style: one untimed
    call (compilation), an estimate from 3 calls, ~warmup_ms of warm-up, then ~rep_ms of reps,
    each between its own pair of events (so host overhead between launches counts)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 3, 1e-3)
    n_warm = int(min(max(warmup_ms / est, 1), 200))
    n_rep = int(min(max(rep_ms / est, min_reps), max_reps))
    cache = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda") if flush_l2 else None
    for _ in range(n_warm):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        if cache is not None:
            cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def peak_mib(fn) -> float:
    """Peak memory of one call of ``fn`` beyond what was allocated before it, in MiB."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def cuda_alive() -> bool:
    """False once a kernel fault has poisoned the CUDA context (every later call would fail)."""
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
        return True
    except Exception:  # noqa: BLE001 - any failure here means the context is unusable
        return False


# ----------------------------------------------------------------------------- plan
def _csv(kind, choices=None):
    def parse(text):
        items = [x.strip() for x in text.split(",") if x.strip()]
        out = [kind(x) for x in items]
        if choices is not None:
            bad = [x for x in out if x not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad} not among {list(choices)}")
        return tuple(out)
    return parse


def build_plan(args) -> list[tuple]:
    """(impl, N, D, dtype, mode) in measuring order: target groups first, then by size."""
    if args.full:
        combos = {(i, n, d, t, m) for i in (args.impls or impls.IMPLS) for n in (args.N or impls.GRID_N)
                  for d in (args.D or impls.GRID_D) for t in (args.dtypes or tuple(impls.DTYPES))
                  for m in (args.modes or impls.MODES)}
    elif args.quick:
        combos = {(i, n, d, t, m) for i in (args.impls or QUICK["impls"]) for n in (args.N or QUICK["N"])
                  for d in (args.D or QUICK["D"]) for t in (args.dtypes or tuple(impls.DTYPES))
                  for m in (args.modes or QUICK["modes"])}
        if not (args.N or args.D or args.impls):
            combos |= {(i, 32768, 64, t, "fwd+bwd") for i in OPTIONS["impls"]
                       for t in (args.dtypes or tuple(impls.DTYPES))}
    else:
        sel_impls = args.impls or DEFAULT_IMPLS
        dtypes = args.dtypes or tuple(impls.DTYPES)
        modes = args.modes or impls.MODES
        combos = {(i, n, d, t, m) for i in sel_impls for n in (args.N or DEFAULT_N) for d in (args.D or DEFAULT_D)
                  for t in dtypes for m in modes}
        if not (args.N or args.D or args.impls):
            combos |= {(i, n, d, t, m) for i in WIDE_D["impls"] for n in WIDE_D["N"] for d in WIDE_D["D"]
                       for t in dtypes for m in modes}
            combos |= {(i, n, d, t, m) for i in OPTIONS["impls"] for n in OPTIONS["N"] for d in OPTIONS["D"]
                       for t in dtypes for m in modes}
    order = {name: i for i, name in enumerate(impls.IMPLS)}

    needed = {(num[0], num[2], 64, num[1], "fwd+bwd") for _, num, _, _, _, _ in TARGETS}
    needed |= {(den[0], den[2], 64, den[1], "fwd+bwd") for _, _, den, _, _, _ in TARGETS}

    def priority(c):
        i, n, d, t, m = c
        g = (n, d, t)
        first = 0 if c in needed else 1  # the records the targets read come before all else
        rank = TARGET_GROUPS.index(g) if g in TARGET_GROUPS else len(TARGET_GROUPS)
        return (first, rank, d, n, t, order.get(i, 99), impls.MODES.index(m))

    return sorted(combos, key=priority)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--impls", type=_csv(str, impls.IMPLS), help=f"comma list of {', '.join(impls.IMPLS)}")
    ap.add_argument("--N", type=_csv(int), help="comma list of N = 2B")
    ap.add_argument("--D", type=_csv(int), help="comma list of D")
    ap.add_argument("--dtypes", type=_csv(str, tuple(impls.DTYPES)), help="float32,bfloat16")
    ap.add_argument("--modes", type=_csv(str, impls.MODES), help="fwd,fwd+bwd")
    ap.add_argument("--quick", action="store_true", help="the target shapes only (N 512, 16384, 32768; D 64; fwd+bwd)")
    ap.add_argument("--full", action="store_true", help="the whole grid: all impls, N, D, dtypes, modes")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="stop starting measurements after this many seconds, compilation included (default 300)")
    ap.add_argument("--compile-reserve-s", type=float, default=45.0,
                    help="skip a not-yet-compiled 'compiled' shape when less than this is left (default 45)")
    ap.add_argument("--rep-ms", type=float, default=100.0, help="timed milliseconds per measurement (default 100)")
    ap.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up milliseconds per measurement (default 25)")
    ap.add_argument("--flush-l2", action="store_true", help="zero a 256 MiB buffer before each timed rep")
    ap.add_argument("--fp32-precision", choices=("highest", "high", "medium"), default="highest",
                    help="torch.set_float32_matmul_precision for the run (default highest); recorded per record")
    ap.add_argument("--output", help="results JSON (default results/<device-slug>-<date>.json)")
    ap.add_argument("--no-plot", action="store_true", help="write no PNGs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="print the plan with skip reasons; measure nothing")
    ap.add_argument("--assume-gib", type=float, default=80.0, help="GPU memory assumed by --dry-run without a GPU")
    ap.add_argument("--check-targets", action="store_true", help="print the 'Done when' ratios from --results and exit")
    ap.add_argument("--results", help="results JSON for --check-targets (default: the newest in results/)")
    args = ap.parse_args(argv)
    if args.quick and args.full:
        ap.error("--quick and --full exclude each other")
    return args


def run_check_targets(path: str | None) -> int:
    path = path or latest_results_file()
    if path is None or not os.path.exists(path):
        print(f"run.py --check-targets: no results file ({path or 'results/ is empty'})", file=sys.stderr)
        return 1
    results = check_targets(load_records(path))
    print(f"Targets from {path}:\n")
    print(format_targets(results))
    failed = [e for e in results if not e["ok"]]
    print(f"\n{len(results) - len(failed)}/{len(results)} targets pass")
    return 1 if failed else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check_targets:
        return run_check_targets(args.results)

    plan = build_plan(args)
    cuda = torch.cuda.is_available()
    if args.dry_run:
        total = torch.cuda.get_device_properties(0).total_memory if cuda else int(args.assume_gib * 2**30)
        for impl, n, d, dt, mode in plan:
            reason = impls.skip_reason(impl, n, d, impls.DTYPES[dt], mode, total)
            print(f"{impl:>14} N={n:<6} D={d:<4} {dt:<9} {mode:<8} {'skip: ' + reason if reason else 'measure'}")
        return 0
    if not cuda:
        print("run.py: no CUDA device (torch.cuda.is_available() is False): nothing measured, nothing written. "
              "Run it on a machine with an NVIDIA GPU (see benchmarks/README.md); --dry-run shows the plan.",
              file=sys.stderr)
        return 2

    torch.set_float32_matmul_precision(args.fp32_precision)
    props = torch.cuda.get_device_properties(0)
    device = torch.cuda.get_device_name(0)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    date = today()
    rel = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT) if argv is None else "benchmarks/run.py"
    command = "python " + shlex.join([rel] + list(sys.argv[1:] if argv is None else argv))
    meta = dict(device=device, torch_version=torch.__version__, triton_version=triton_version, date=date,
                command=command, fp32_precision=torch.get_float32_matmul_precision())
    print(f"# {device}, torch {torch.__version__}, triton {triton_version}, fp32 precision "
          f"{meta['fp32_precision']}, {len(plan)} planned, budget {args.budget_s:.0f} s", flush=True)

    deadline = time.monotonic() + args.budget_s
    records, skipped, errors = [], [], []
    compiled_shapes: set[tuple] = set()
    inputs_key, inputs = None, None
    for index, (impl, n, d, dt, mode) in enumerate(plan):
        dtype = impls.DTYPES[dt]
        tag = f"{impl} N={n} D={d} {dt} {mode}"
        left = deadline - time.monotonic()
        if left <= 0:
            rest = plan[index:]
            skipped += [(f"{c[0]} N={c[1]} D={c[2]} {c[3]} {c[4]}", "time budget spent") for c in rest]
            print(f"  time budget spent: {len(rest)} measurements not taken (from {tag} on)", flush=True)
            break
        reason = impls.skip_reason(impl, n, d, dtype, mode, props.total_memory)
        if reason is None and impl == "compiled" and (n, d, dt) not in compiled_shapes and left < args.compile_reserve_s:
            reason = f"only {left:.0f} s left: not enough to compile a new shape"
        if reason is not None:
            skipped.append((tag, reason))
            print(f"  skip {tag}: {reason}", flush=True)
            continue
        if inputs_key != (n, d, dt):
            inputs = None
            gc.collect()
            torch.cuda.empty_cache()
            inputs = impls.make_inputs(n, d, dtype, seed=args.seed)
            inputs_key = (n, d, dt)
        t0 = time.monotonic()
        try:
            step = impls.make_step(impl, inputs, mode)
            ms = bench_ms(step, rep_ms=args.rep_ms, warmup_ms=args.warmup_ms, flush_l2=args.flush_l2)
            mib = peak_mib(step)
        except torch.cuda.OutOfMemoryError as err:
            skipped.append((tag, f"out of memory ({str(err).splitlines()[0][:120]})"))
            print(f"  skip {tag}: out of memory", flush=True)
            step = None
            gc.collect()
            torch.cuda.empty_cache()
            continue
        except impls.Unavailable as err:
            skipped.append((tag, str(err)))
            print(f"  skip {tag}: {err}", flush=True)
            continue
        except Exception as err:  # noqa: BLE001 - report and go on with the other measurements
            errors.append((tag, f"{type(err).__name__}: {err}"))
            print(f"  ERROR {tag}: {type(err).__name__}: {err}", flush=True)
            if not cuda_alive():
                print("  the CUDA context is broken (e.g. an illegal memory access): stopping here", flush=True)
                break
            continue
        if impl == "compiled":
            compiled_shapes.add((n, d, dt))
        records.append(make_record(impl, n, d, dt, mode, ms, mib, **meta))
        print(f"  {tag}: {ms:.4f} ms, {mib:.1f} MiB ({time.monotonic() - t0:.1f} s)", flush=True)
        # on disk after every measurement: a run stopped at its time limit keeps what it measured
        write_records(args.output or results_path(device, date), records)

    print(f"\n{len(records)} measured, {len(skipped)} skipped, {len(errors)} errors")
    if not records:
        print("nothing measured: nothing written")
        return 1 if errors else 0
    path = args.output or results_path(device, date)
    merged = write_records(path, records)
    print(f"wrote {len(records)} records to {path} ({len(merged)} in the file)\n")
    print(markdown_table(records))
    costs = option_costs(merge_records([r for r in load_records(path) if r["device"] == device], []))
    if costs:
        print(costs)
    if not args.no_plot:
        mine = [r for r in merged if r["device"] == device]
        for p in plot(mine, os.path.splitext(path)[0]):
            print(f"wrote {p}")
    for tag, err in errors:
        print(f"ERROR {tag}: {err}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
