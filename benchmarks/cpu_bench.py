"""CPU benchmark: the fused C++ backend against the eager reference and torch.compile of it.

    python benchmarks/cpu_bench.py                       # N = 512 1024 2048 4096, D = 64, float32
    python benchmarks/cpu_bench.py --N 512 4096 --repeats 9
    python benchmarks/cpu_bench.py --impls eager cpu cpu-stats hist --tag stats   # return_stats rows
    python benchmarks/cpu_bench.py --check results/cpu-<machine>-<date>.json   # the issue's targets

Each (impl, N) runs in a fresh subprocess, so one impl's allocations, compiled graphs and
thread pools never colour another's numbers. In it: inputs as ``impls.make_inputs`` builds them
(k near the 90th percentile, every other option default), the impl's warm-up (compilation for
``compiled``), then

- peak extra memory of one fwd+bwd call: the resident-set high-water mark (``VmHWM``) is reset
  to the current RSS through ``/proc/self/clear_refs`` just before the call and read right after
  it; the difference is what the call touched beyond what the process already held. glibc's
  mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) so large freed blocks go back to the OS
  between calls instead of being silently reused. Without clear_refs (non-Linux) the field is null.
- time: the median (and min) wall-clock of ``--repeats`` fwd+bwd calls, and their median CPU time.

Two more rows measure the statistics on CPU (``--impls cpu-stats hist``): ``cpu-stats`` is
``cpu`` with ``return_stats=True`` (2048-bin histogram and m_i counted in the forward pass) and
``hist`` is ``similarity_histogram`` alone (no loss, no backward: its mode is ``"hist"``), the
per-batch cost of the pipeline's statistical SimThres. Their peak extra memory shows that
neither holds anything N x N.

The setups of issue 24 (``--impls cpu-cross cpu-queue eager-cross eager-queue``): the two-tower
cross layout (B x B) and the views layout with a queue of M = N extra columns, each fused and in
the reference; compare with ``cpu`` at the same N (the cross layout does half its tiles).

Results go to ``benchmarks/results/cpu-<cpu>-<date>.json`` with the machine (CPU model, cores,
torch version, threads, the extension's vector ISA), the date, the load average around each
case (the machine may be shared) and the exact command; a markdown summary is written beside it.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from adaptive_cl.rec.atomic import atomic_write_text  # noqa: E402  (after the path is set)

IMPLS = ("eager", "compiled", "cpu", "cpu-stats", "hist", "cpu-cross", "cpu-queue", "eager-cross", "eager-queue")
#: The issue-24 setups (impls.setup_kwargs): the B x B cross layout and the views layout with a
#: queue of M = N rows, fused ("cpu-") and in the reference ("eager-").
SETUP_IMPLS = {"cpu-cross": ("cross", "cpu"), "cpu-queue": ("queue", "cpu"),
               "eager-cross": ("cross", "reference"), "eager-queue": ("queue", "reference")}
#: What the default run measures (the issue's targets); the statistics rows are asked for by name.
DEFAULT_IMPLS = ("eager", "compiled", "cpu")
MODE = "fwd+bwd"
#: Impls that time something other than MODE.
MODES = {"hist": "hist"}
#: The issue's "Done when", read at N = 4096 (speed and memory) and N = 512 (speed).
TARGETS = {"eager_speedup_4096": 3.0, "compiled_speedup_4096": 1.5, "memory_fraction_4096": 0.05,
           "eager_speedup_512": 1.0}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _step(impl: str, inputs):
    import torch

    from benchmarks.impls import make_step

    if impl in ("eager", "compiled"):
        return make_step(impl, inputs, MODE)
    from adaptive_cl import adaptive_info_nce, similarity_histogram

    if impl in SETUP_IMPLS:
        from benchmarks.impls import setup_kwargs

        setup, backend = SETUP_IMPLS[impl]
        kw = setup_kwargs(inputs, setup)
        return lambda: torch.autograd.grad(adaptive_info_nce(inputs.z, inputs.z_aug, inputs.k, backend=backend, **kw),
                                           (inputs.z, inputs.z_aug))

    if impl == "hist":
        return lambda: similarity_histogram(inputs.z, inputs.z_aug, backend="cpu")
    stats = impl == "cpu-stats"

    def step():
        out = adaptive_info_nce(inputs.z, inputs.z_aug, inputs.k, backend="cpu", return_stats=stats)
        loss = out[0] if stats else out
        return torch.autograd.grad(loss, (inputs.z, inputs.z_aug)), out[1] if stats else None

    return step


def worker(impl: str, n: int, d: int, repeats: int, threads: int) -> dict:
    """One case, in this (fresh) process."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from benchmarks.impls import make_inputs

    inputs = make_inputs(n, d, torch.float32, device="cpu")
    step = _step(impl, inputs)
    t0 = time.perf_counter()
    step()  # compiles for "compiled", builds or loads the extension for "cpu"
    first_s = time.perf_counter() - t0
    step()
    gc.collect()
    peak_mib = None
    rss0 = _status_kib("VmRSS")
    if _reset_peak():
        out = step()
        peak_mib = (_status_kib("VmHWM") - rss0) / 1024
        del out
    walls, cpus = [], []
    load = [os.getloadavg()[0]]
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        step()
        walls.append((time.perf_counter() - w) * 1e3)
        cpus.append((time.process_time() - c) * 1e3)
    load.append(os.getloadavg()[0])
    record = dict(impl=impl, N=n, D=d, dtype="float32", mode=MODES.get(impl, MODE), median_ms=statistics.median(walls),
                  min_ms=min(walls), cpu_median_ms=statistics.median(cpus), repeats=repeats,
                  peak_extra_mib=peak_mib, first_call_s=first_s, threads=torch.get_num_threads(),
                  loadavg_1min=load, fp32_precision=torch.get_float32_matmul_precision())
    if impl.startswith(("cpu", "hist")):
        from adaptive_cl.cpu import build

        record["extension"] = build.extension().build_info()
    return record


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    isa = [x for x in ("avx2", "fma", "avx512f", "avx512_bf16") if re.search(rf"\b{x}\b", flags)]
    return dict(cpu=_cpu_model(), machine=platform.machine(), cores=os.cpu_count(), isa_flags=isa,
                torch=torch.__version__, torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                threads=torch.get_num_threads(), python=platform.python_version())


def run_case(impl: str, n: int, d: int, repeats: int, threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, str(n), str(d), str(repeats), str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return dict(impl=impl, N=n, D=d, dtype="float32", mode=MODES.get(impl, MODE), error=res.stderr.strip()[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def targets(records: list[dict]) -> dict:
    """The issue's ratios from one run's records (None where a record is missing)."""
    by = {(r["impl"], r["N"]): r for r in records if "error" not in r}

    def ratio(a, b, n, field="median_ms"):
        ra, rb = by.get((a, n)), by.get((b, n))
        if ra is None or rb is None or ra.get(field) is None or rb.get(field) is None or rb[field] == 0:
            return None
        return ra[field] / rb[field]

    got = {"eager_speedup_4096": ratio("eager", "cpu", 4096),
           "compiled_speedup_4096": ratio("compiled", "cpu", 4096),
           "memory_fraction_4096": ratio("cpu", "eager", 4096, "peak_extra_mib"),
           "eager_speedup_512": ratio("eager", "cpu", 512)}
    passed = {}
    for key, value in got.items():
        bound = TARGETS[key]
        passed[key] = None if value is None else (value <= bound if key.startswith("memory") else value >= bound)
    return dict(values=got, bounds=TARGETS, passed=passed)


def summary_markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"# CPU benchmark, {doc['date']}", "",
             f"{m['cpu']} ({m['machine']}, {m['cores']} cores, {doc['records'][0].get('threads', '?')} threads; "
             f"torch {m['torch']}, "
             f"capability {m['torch_cpu_capability']}); N = 2B rows, D = {doc['D']}, float32, mode fwd+bwd "
             "(hist: similarity_histogram alone).", "",
             f"Command: `{doc['command']}`", "",
             "| N | impl | mode | median ms | min ms | CPU ms | peak extra MiB | load (1 min) |",
             "|---:|---|---|---:|---:|---:|---:|---|"]
    for r in doc["records"]:
        if "error" in r:
            lines.append(f"| {r['N']} | {r['impl']} | {r.get('mode', MODE)} | error | | | | |")
            continue
        mem = "n/a" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}"
        lines.append(f"| {r['N']} | {r['impl']} | {r.get('mode', MODE)} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | "
                     f"{r['cpu_median_ms']:.2f} | {mem} | {r['loadavg_1min'][0]:.1f} → {r['loadavg_1min'][1]:.1f} |")
    t = doc["targets"]
    lines += ["", "| target | bound | measured | pass |", "|---|---:|---:|---|"]
    for key, bound in t["bounds"].items():
        value = t["values"][key]
        shown = "n/a" if value is None else f"{value:.3g}"
        lines.append(f"| {key} | {'<=' if key.startswith('memory') else '>='} {bound} | {shown} | {t['passed'][key]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--N", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(DEFAULT_IMPLS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each case (0: torch's default)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="", help="appended to the result files' name (e.g. 'stats')")
    ap.add_argument("--check", metavar="JSON", help="print the targets of a recorded run and exit")
    ap.add_argument("--worker", nargs=5, metavar=("IMPL", "N", "D", "REPEATS", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        impl, n, d, repeats, threads = args.worker
        print(json.dumps(worker(impl, int(n), int(d), int(repeats), int(threads))))
        return 0
    if args.check:
        with open(args.check) as f:
            doc = json.load(f)
        t = targets(doc["records"])
        print(json.dumps(t, indent=2))
        return 0 if all(v is True for v in t["passed"].values()) else 1
    import torch  # noqa: F401  (machine() needs it; workers import their own)

    date = datetime.date.today().isoformat()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    records = []
    for n in args.N:
        for impl in args.impls:
            r = run_case(impl, n, args.D, args.repeats, args.threads)
            records.append(r)
            shown = r.get("error", "").splitlines()[-1:] if "error" in r else \
                f"{r['median_ms']:.2f} ms, peak +{r['peak_extra_mib']} MiB, load {r['loadavg_1min']}"
            print(f"N={n} {impl}: {shown}", flush=True)
    doc = dict(date=date, command=command, D=args.D, machine=machine(), records=records)
    doc["targets"] = targets(records)
    slug = re.sub(r"[^a-z0-9]+", "-", doc["machine"]["cpu"].lower()).strip("-")
    if args.threads > 0:
        slug += f"-{args.threads}t"
    if args.tag:
        slug += "-" + re.sub(r"[^a-z0-9]+", "-", args.tag.lower()).strip("-")
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"cpu-{slug}-{date}")
    # never a partial record: a kill mid-write leaves the previous file (or none)
    atomic_write_text(base + ".json", json.dumps(doc, indent=1))
    atomic_write_text(base + ".md", summary_markdown(doc))
    print(summary_markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
