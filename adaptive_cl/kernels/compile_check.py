"""Compile the package's kernel launches for a GPU (sm_90: H100/H200) on a machine without one.

    python -m adaptive_cl.kernels.compile_check                 # the default set, a table
    python -m adaptive_cl.kernels.compile_check --set ci        # the subset CI compiles
    python -m adaptive_cl.kernels.compile_check --set full --json out.json

Each variant runs ``function.prepare_rows`` / ``forward_rows`` / ``backward_rows`` exactly as a
call would, on CPU tensors of a representative size, with the launches recorded instead of
run; every recorded launch is bound through Triton's own argument binder (so the signature,
the constexprs and the divisibility specialisations are those of a CUDA launch with these
shapes and strides) and compiled with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))``.
ptxas and nvdisasm ship with the triton wheel. Reported per kernel: registers, spill bytes,
shared memory, and from the SASS the instructions on the interior path of the main loop (the
shortest path from the loop header to its back edge: the column tiles that hold no diagonal,
partner or padding), per similarity element (per thread: BLOCK_M BLOCK_N / (32 num_warps)
elements per tile), split into MUFU, FP32, MMA and the rest. Nested loops (the K-split of the
float32 FMA path, wide D) are counted once per outer iteration, so their per-element figures
are lower bounds.

Checks (exit status 1 when one fails): every launch compiles; no register spill in any
launch of the set (every dtype, path and D bucket; the options of issue 15 included: the soft
threshold has its own tiles, ``launch.SOFT_TABLE``); shared memory <= 227 KB; and for bfloat16
D = 64 with the default options the issue-12 targets on the interior path: backward <= 32
instructions and <= 1.0 MUFU per element, forward <= 18. Forward kernels with return_stats also
report the path through the histogram's increments (``per_element_hist``: the tiles above the
diagonal; the others skip the histogram).

This reaches into Triton internals (``create_function_from_signature``, ``JITFunction._pack_args``,
``knobs.nvidia.dump_ptxas_log``), checked on triton 3.6 and 3.9. It must run without
TRITON_INTERPRET (the kernels are then plain JIT functions): the CI test runs it in a
subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

SMEM_LIMIT = 227 * 1024  # bytes of shared memory one sm_90 block may use
TARGETS = {"bwd": {"instr": 32.0, "mufu": 1.0}, "fwd": {"instr": 18.0}}  # bf16 D=64, interior path


@dataclass
class Variant:
    dtype: torch.dtype
    path: str  # launch.PATHS
    d: int
    opts: dict = field(default_factory=dict)  # LossOptions fields
    k: str = "rows"  # "none", "scalar", "rows"
    b: int = 8192
    config: object = None  # a launch.LaunchConfig instead of the table's (exploring candidates)
    labels: bool = False  # (N,) int64 labels
    stats: int = 0  # return_stats with this many bins (0: none)

    @property
    def default_opts(self) -> bool:
        return not self.opts and self.k == "rows" and not self.labels and not self.stats

    @property
    def name(self) -> str:
        o = ",".join(f"{k}={v}" for k, v in sorted(self.opts.items()))
        extra = (" labels" if self.labels else "") + (f" stats={self.stats}" if self.stats else "")
        return f"{str(self.dtype).split('.')[-1]}/{self.path} D{self.d} k={self.k}" + (f" {o}" if o else "") + extra


_PRECISION = {"ieee": ("highest", "ieee"), "3xtf32": ("highest", "3xtf32"), "tf32": ("high", "ieee"),
              "native": ("highest", "ieee")}

# Options that change the kernels' code (each a constexpr): a covering set over the defaults.
OPTION_SETS = [
    ({}, "none"),
    (dict(denominator="all", weighting="unit", reduction="none"), "scalar"),
    (dict(temperature=0.02, denominator="all"), "rows"),
    (dict(normalize=False, weighting="unit", reduction="sum"), "rows"),
]
# The issue-15 options, each alone on the default path (their cost over it, NOTES.md), then
# combined: (opts, k, labels, stats bins).
FEATURE_SETS = [
    ({}, "rows", True, 0),
    ({}, "none", True, 0),
    (dict(threshold="soft"), "rows", False, 0),
    (dict(threshold="soft"), "scalar", False, 0),
    ({}, "rows", False, 2048),
    (dict(threshold="soft", denominator="all", weighting="unit"), "rows", True, 0),
    (dict(threshold="soft", temperature=0.02, normalize=False), "rows", True, 256),
]


def variant_set(name: str) -> list[Variant]:
    """"ci": default options of bfloat16 D = 64 (the targets), float16 and float32 tf32 at
    D = 128, the float32 default ("ieee") at D = 64, one option set, and the issue-15 options
    (soft threshold, labels, stats) on the cosine and the raw-dot paths (about a minute on 2
    cores); "default": every path at D in {64, 128} plus the option sets and the issue-15
    feature sets for bfloat16 D = 64; "full": also D in {32, 256, 320}, the option sets for
    "ieee", and soft + labels + stats on every path at D in {64, 128, 256}."""
    main = [(torch.bfloat16, "native"), (torch.float16, "native"), (torch.float32, "tf32"),
            (torch.float32, "ieee"), (torch.float32, "3xtf32")]
    features = [Variant(torch.bfloat16, "native", 64, o, k, labels=lab, stats=st) for o, k, lab, st in FEATURE_SETS]
    if name == "ci":
        return [Variant(torch.bfloat16, "native", 64), Variant(torch.float16, "native", 128),
                Variant(torch.float32, "tf32", 128), Variant(torch.float32, "ieee", 64),
                Variant(torch.bfloat16, "native", 64, *OPTION_SETS[1]),
                Variant(torch.bfloat16, "native", 64, dict(threshold="soft"), "rows", labels=True, stats=2048),
                Variant(torch.bfloat16, "native", 64, dict(threshold="soft", normalize=False, temperature=0.5),
                        "rows", labels=True, stats=256)]
    ds = (64, 128) if name == "default" else (32, 64, 128, 256, 320)
    out = [Variant(dt, p, d) for dt, p in main for d in ds]
    for dt, p in ((torch.bfloat16, "native"),) + (((torch.float32, "ieee"),) if name == "full" else ()):
        out += [Variant(dt, p, 64, o, k) for o, k in OPTION_SETS]
    out += features
    if name == "full":
        out += [Variant(dt, p, d, dict(threshold="soft"), "rows", labels=True, stats=2048)
                for dt, p in main for d in (64, 128, 256)]
    return out


# ------------------------------------------------------------------------ recording launches
@dataclass
class Launch:
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def recording(function_module):
    launches: list[Launch] = []
    saved = function_module.LAUNCHER

    def record(kernel, grid, args, kwargs):
        launches.append(Launch(kernel, grid, args, kwargs))

    function_module.LAUNCHER = record
    try:
        yield launches
    finally:
        function_module.LAUNCHER = saved


def launches_for(v: Variant) -> list[Launch]:
    """The launches one forward + backward of this variant makes (nothing runs)."""
    from ..contract import make_options
    from . import function

    precision, highest = _PRECISION[v.path]
    before = torch.get_float32_matmul_precision()
    env_before = os.environ.get("ADAPTIVE_CL_FP32_HIGHEST")
    torch.set_float32_matmul_precision(precision)
    os.environ["ADAPTIVE_CL_FP32_HIGHEST"] = highest
    try:
        o = make_options(**v.opts)
        z = torch.empty(v.b, v.d, dtype=v.dtype)
        za = torch.empty(v.b, v.d, dtype=v.dtype)
        k_rows = torch.empty(2 * v.b, dtype=torch.float32) if v.k == "rows" else None
        k_scalar = 0.3 if v.k == "scalar" else None
        labels = torch.empty(2 * v.b, dtype=torch.int64) if v.labels else None
        with recording(function) as launches:
            pr = function.prepare_rows(z, za, k_rows, k_scalar, o, labels_rows=labels, config=v.config)
            hist = function.hist_buffer(pr, v.stats) if v.stats else None
            loss, cnt, rs, wx, *ha = function.forward_rows(pr, o, hist=hist)
            grad = torch.empty(2 * v.b) if o.reduction == "none" else torch.ones(())
            soft_k = o.threshold == "soft" and k_rows is not None
            function.backward_rows(pr, o, cnt, rs, wx, grad, ha=ha[0] if ha else None,
                                   dk=torch.empty(2 * v.b) if soft_k else None)
        return launches
    finally:
        torch.set_float32_matmul_precision(before)
        if env_before is None:
            os.environ.pop("ADAPTIVE_CL_FP32_HIGHEST", None)
        else:
            os.environ["ADAPTIVE_CL_FP32_HIGHEST"] = env_before


# ------------------------------------------------------------------------------ compiling
_COMPILED: dict = {}  # one compile per distinct specialisation in a process


def compile_launch(launch: Launch, arch: int = 90):
    """(CompiledKernel, ptxas log) for one recorded launch, compiled for sm_<arch>."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs, debug=False)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    key = (fn.fn.__name__, arch, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
           repr(sorted(options.__dict__.items())))
    if key in _COMPILED:
        return _COMPILED[key]
    src = ASTSource(fn, signature, constexprs, attrs)
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cached kernel would come without its ptxas log
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        ck = triton.compile(src, target=target, options=options.__dict__)
    _COMPILED[key] = (ck, buf.getvalue())
    return _COMPILED[key]


#: 3xtf32: tt.dot ops allowed to take another dot's result as accumulator. The S tile (both
#: passes) none: its cross products are summed order-independently (c_ij == c_ji). The backward's
#: G' Z^_J product chains its three passes on purpose (no transposed twin): 2.
CHAINED_DOTS_ALLOWED = {"fwd": 0, "bwd": 2}


def specialization_key(launch: Launch, arch: int = 90) -> str:
    """What Triton keys a compiled kernel on for this launch (signature, constexprs,
    specialisation attributes, options): two launches with equal keys share one binary."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs, debug=False)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return repr((signature, sorted(constexprs.items()), sorted(attrs.items()), sorted(options.__dict__.items())))


def batch_specializations(v: Variant, batches=(8192, 8191, 4096, 1000), arch: int = 90) -> dict:
    """{kernel role: distinct specialisation keys} over the launches of one forward + backward
    at each batch size of ``batches`` (same D, dtype, options): 1 per kernel when the batches
    reuse one set of binaries."""
    keys: dict = {}
    for b in batches:
        for launch in launches_for(Variant(v.dtype, v.path, v.d, v.opts, v.k, b=b, labels=v.labels, stats=v.stats)):
            keys.setdefault(kernel_role(launch), set()).add(specialization_key(launch, arch))
    return {role: len(k) for role, k in keys.items()}


def chained_dots(ttir: str) -> int:
    """``tt.dot`` ops whose accumulator operand is another ``tt.dot``'s result: Triton's combine
    pass folds ``dot(a, b) + d`` into ``dot(a, b, d)``, so two products meant to be summed
    independently become one order-dependent chain (issue 23: 3xtf32's c_ij != c_ji)."""
    results = set()
    chained = 0
    for line in ttir.splitlines():
        m = re.match(r"\s*(%[\w#]+)\s*=\s*tt\.dot\s+(%[\w#]+),\s*(%[\w#]+),\s*(%[\w#]+)", line)
        if m:
            chained += m.group(4) in results
            results.add(m.group(1))
    return chained


_PTXAS = {"regs": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
          "spill_loads": r"(\d+) bytes spill loads", "stack": r"(\d+) bytes stack frame"}


def parse_ptxas(log: str) -> dict:
    out = {}
    for key, pattern in _PTXAS.items():
        m = re.search(pattern, log)
        out[key] = int(m.group(1)) if m else None
    return out


# --------------------------------------------------------------------------- reading SASS
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:\{\s*)?(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)(.*?);")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_FP32 = {"FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FSWZADD"}
#: The histogram's increments: shared-memory atomics (tl.histogram on triton >= 3.9), global
#: reductions / atomics ("atomic" mode), or warp votes (tl.histogram's ballots on older triton).
HIST_OPS = ("ATOMS", "RED", "REDG", "ATOMG", "ATOM", "VOTE")


def classify(op: str) -> str:
    if op in ("HGMMA", "HMMA", "WARPGROUP"):
        return "mma"
    if op == "MUFU":
        return "mufu"
    if op in _FP32:
        return "fp32"
    if op in ("LDL", "STL"):
        return "local"
    if op in ("LDG", "STG", "LDS", "LDSM", "STS", "STSM", "LDGSTS", "LDGDEPBAR", "DEPBAR", "SYNCS") or op.startswith("UTMA"):
        return "memory"
    return "other"


def parse_sass(text: str):
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(line)
        if m:
            for lab in pending:
                labels[lab] = len(instrs)
            pending = []
            instrs.append(((m.group(2) or "").strip(), m.group(3), m.group(5)))
    return instrs, labels


def interior_path(text: str, through: tuple[str, ...] = ()) -> dict | None:
    """Instruction classes on the shortest path through the outermost loop (header -> latch),
    or None when the kernel has no loop. ``through``: the shortest such path that passes a
    block holding one of these opcodes (the histogram's atomics: its tiles are the ones above
    the diagonal, not the shortest way round the loop); None when no path does."""
    instrs, labels = parse_sass(text)
    n = len(instrs)
    leaders = {0}
    for i, (pred, op, rest) in enumerate(instrs):
        if op in ("BRA", "EXIT", "RET", "BRX", "JMP"):
            t = _TARGET.search(rest)
            if t and t.group(1) in labels:
                leaders.add(labels[t.group(1)])
            if i + 1 < n:
                leaders.add(i + 1)
    starts = sorted(leaders)
    blocks = [(s, starts[j + 1] if j + 1 < len(starts) else n) for j, s in enumerate(starts)]
    index = {s: j for j, (s, _) in enumerate(blocks)}
    succ = []
    for j, (s, e) in enumerate(blocks):
        pred, op, rest = instrs[e - 1]
        out = []
        conditional = bool(pred) and pred != "@PT"
        t = _TARGET.search(rest) if op == "BRA" else None
        if t and t.group(1) in labels:
            out.append(index[labels[t.group(1)]])
        falls = op not in ("BRA", "EXIT", "RET", "BRX", "JMP") or conditional or (op == "BRA" and re.match(r"\s*!?U?P\d", rest))
        if falls and e < n:
            out.append(j + 1)
        succ.append(out)
    back = [(j, t) for j, ts in enumerate(succ) for t in ts if t <= j]
    if not back:
        return None
    latch, header = max(back, key=lambda x: x[0] - x[1])
    marked = {j for j, (s, e) in enumerate(blocks) if any(instrs[i][1] in through for i in range(s, e))}
    need = bool(through)
    # Shortest header -> latch path in the loop body without back edges (a DAG in block order),
    # with a flag: has the path passed a marked block yet.
    inf = float("inf")
    start = (header, header in marked)
    cost = {start: blocks[header][1] - blocks[header][0]}
    prev = {start: None}
    for j in range(header, latch + 1):
        for flag in (False, True):
            if (j, flag) not in cost:
                continue
            for t in succ[j]:
                if header < t <= latch and t > j:
                    state = (t, flag or t in marked)
                    c = cost[(j, flag)] + blocks[t][1] - blocks[t][0]
                    if c < cost.get(state, inf):
                        cost[state], prev[state] = c, (j, flag)
    end = (latch, True) if need else min(((latch, f) for f in (False, True) if (latch, f) in cost),
                                         key=lambda st: cost[st], default=None)
    if end is None or end not in cost:
        return None
    path, st = [], end
    while st is not None:
        path.append(st[0])
        st = prev[st]
    counts = {"instr": 0, "mufu": 0, "fp32": 0, "mma": 0, "memory": 0, "local": 0, "other": 0}
    for j in path:
        for i in range(*blocks[j]):
            counts["instr"] += 1
            counts[classify(instrs[i][1])] += 1
    inner = sum(1 for (l, h) in back if header <= h and l <= latch and (l, h) != (latch, header))
    counts["inner_loops"] = inner
    return counts


def disassemble(cubin: bytes) -> str:
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.check_output([knobs.nvidia.nvdisasm.path, "-c", f.name], text=True)


# ------------------------------------------------------------------------------- reporting
def kernel_role(launch: Launch) -> str:
    name = launch.kernel.fn.__name__ if hasattr(launch.kernel, "fn") else str(launch.kernel)
    return {"_row_stats_kernel": "rowstats", "_fwd_kernel": "fwd", "_bwd_rows_kernel": "bwdrows",
            "_bwd_kernel": "bwd"}.get(name, name)


def check_variant(v: Variant, arch: int = 90) -> list[dict]:
    rows = []
    for launch in launches_for(v):
        role = kernel_role(launch)
        kw = launch.kwargs
        rec = dict(variant=v.name, role=role, dtype=str(v.dtype).split(".")[-1], path=v.path, D=v.d,
                   default=v.default_opts, block_m=kw.get("BLOCK_M"), block_n=kw.get("BLOCK_N"),
                   num_warps=kw.get("num_warps", 4), num_stages=kw.get("num_stages", 3), k_chunk=kw.get("K_CHUNK"))
        t0 = time.monotonic()
        try:
            ck, log = compile_launch(launch, arch)
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[-1500:]}")
            rows.append(rec)
            continue
        rec.update(ok=True, compile_s=round(time.monotonic() - t0, 1), shared=ck.metadata.shared, **parse_ptxas(log))
        if role in ("fwd", "bwd"):
            rec["dots"] = ck.asm["ttir"].count("tt.dot ")
            rec["chained_dots"] = chained_dots(ck.asm["ttir"])
        if rec["regs"] is None:
            rec.update(ok=False, error="no ptxas report (registers / spills) in the compile log")
        if role in ("fwd", "bwd"):
            sass = disassemble(ck.asm["cubin"])
            path = interior_path(sass)
            per = rec["block_m"] * rec["block_n"] / (32 * rec["num_warps"])
            if path:
                rec["per_element"] = {k: round(c / per, 3) for k, c in path.items() if k != "inner_loops"}
                rec["inner_loops"] = path["inner_loops"]
            if role == "fwd" and v.stats:
                # The tiles above the diagonal also count the histogram: report that path too.
                hpath = interior_path(sass, through=HIST_OPS)
                if hpath:
                    rec["per_element_hist"] = {k: round(c / per, 3) for k, c in hpath.items() if k != "inner_loops"}
            rec["mma"] = sorted(set(re.findall(r"\b(HGMMA|HMMA)\.[A-Z0-9x.]+", sass)))[:2]
        rows.append(rec)
    return rows


def problems(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        where = f"{r['role']} {r['variant']}"
        if not r["ok"]:
            out.append(f"{where}: compile error: {r['error'][:300]}")
            continue
        spill = (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0)
        if spill:  # every launch the package makes, options included
            out.append(f"{where}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads")
        if r["path"] == "3xtf32" and (r.get("chained_dots") or 0) > CHAINED_DOTS_ALLOWED.get(r["role"], 0):
            out.append(f"{where}: {r['chained_dots']} tt.dot accumulate onto another dot (3xtf32's S tile must "
                       "sum its independent cross products symmetrically)")
        if (r.get("shared") or 0) > SMEM_LIMIT:
            out.append(f"{where}: shared memory {r['shared']} B > {SMEM_LIMIT} B")
        if r["default"] and r["dtype"] == "bfloat16" and r["D"] == 64 and r["role"] in TARGETS:
            pe = r.get("per_element") or {}
            for key, limit in TARGETS[r["role"]].items():
                if key not in pe or pe[key] > limit:
                    out.append(f"{where}: {key} per element {pe.get(key)} > {limit}")
    return out


def markdown(rows: list[dict]) -> str:
    head = ("| kernel | variant | BMxBN w s K | regs | spill st/ld B | smem B | MMA | instr/el | MUFU/el | FP32/el "
            "| MMA-instr/el | mem/el | other/el |")
    out = [head, "|" + "---|" * 13]
    for r in rows:
        if not r["ok"]:
            out.append(f"| {r['role']} | {r['variant']} | | | | | compile error | | | | | | |")
            continue
        pe = r.get("per_element") or {}
        if r.get("per_element_hist"):  # stats: the histogram's path, "shortest / with histogram"
            pe = {k: f"{v} / {r['per_element_hist'][k]}" for k, v in pe.items()}
        cfg = (f"{r['block_m']}x{r['block_n']} w{r['num_warps']} s{r['num_stages']} K{r['k_chunk']}"
               if r["block_m"] else "-")
        cells = [pe.get(k, "-") for k in ("instr", "mufu", "fp32", "mma", "memory", "other")]
        out.append(f"| {r['role']} | {r['variant']} | {cfg} | {r['regs']} | {r['spill_stores']}/{r['spill_loads']} | "
                   f"{r['shared']} | {' '.join(r.get('mma', [])) or '-'} | " + " | ".join(map(str, cells)) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Compile the package's kernels for sm_90 without a GPU.")
    ap.add_argument("--set", default="default", choices=("ci", "default", "full"))
    ap.add_argument("--json", default=None, help="write every record to this file")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--variants", default=None,
                    help="only these variants: comma-separated dtype/path/D, e.g. float32/3xtf32/64")
    ap.add_argument("--batch-keys", default=None, metavar="B,B,...",
                    help="instead of compiling, report the distinct specialisation keys per kernel over these "
                         "batch sizes (e.g. 8192,8191,4096,1000: does a partial batch recompile?)")
    args = ap.parse_args(argv)
    from . import adaptive_info_nce_fwd as fwd

    if fwd.INTERPRET:
        print("compile_check: unset TRITON_INTERPRET (the kernels must be JIT functions, not interpreted)",
              file=sys.stderr)
        return 2
    import triton

    print(f"# triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}", flush=True)
    variants = variant_set(args.set)
    if args.variants:
        variants = []
        for spec in args.variants.split(","):
            dt, path, d = spec.split("/")
            variants.append(Variant(getattr(torch, dt), path, int(d)))
    if args.batch_keys:
        batches = tuple(int(b) for b in args.batch_keys.split(","))
        facts = {v.name: batch_specializations(v, batches, arch=args.arch) for v in variants}
        for name, per in facts.items():
            print(f"{name}: " + ", ".join(f"{role} {n}" for role, n in per.items()))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(triton=triton.__version__, batches=batches, batch_keys=facts), f, indent=1)
        return 0
    rows = []
    for v in variants:
        t0 = time.monotonic()
        got = check_variant(v, args.arch)
        rows += got
        print(f"# {v.name}: {len(got)} kernels, {time.monotonic() - t0:.0f} s", flush=True)
    print(markdown(rows))
    bad = problems(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, torch=torch.__version__, arch=args.arch, records=rows,
                           problems=bad), f, indent=1)
    for p in bad:
        print("FAIL", p)
    print(f"{len(rows)} kernels compiled; {len(bad)} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
