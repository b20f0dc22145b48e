"""The package's imports form no loop, and every module imports on its own.

Two checks:

- the import graph, read statically (``ast``; relative imports resolved; ``import a.b.c`` also
  runs the packages ``a.b`` it passes through), has no cycle: neither among the imports that run
  when a module is imported (module level, class bodies included) nor once the imports inside
  functions are added (a function-level import that closes a loop only hides it until the
  function runs). A cycle is printed as ``a -> b -> ... -> a``;
- each module imports in a fresh interpreter, with no other module of the package imported
  before it (a module that only works when something else was imported first fails here).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "adaptive_cl"

# Modules that are not imported in the fresh-interpreter check: importing them runs a program.
RUNS_ON_IMPORT = {"adaptive_cl.rec.__main__"}
# Third-party modules loaded before the children fork besides those the package imports by name:
# torch._dynamo comes in through an attribute (torch.compiler.disable), 3 s per child otherwise.
PRELOAD = ["torch._dynamo"]


def package_modules() -> dict[str, Path]:
    """Dotted name -> file, for every .py file of the package (a package is its __init__.py)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _type_checking_only(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """(node, at_module_level) for every import statement; class bodies run at import time,
    function bodies do not; ``if TYPE_CHECKING:`` blocks never run."""
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, not in_function
            elif isinstance(child, ast.If) and _type_checking_only(child):
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), in_function)
            else:
                inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                yield from walk(child, inner)
    yield from walk(tree, False)


def _with_parents(target: str, importer: str, modules) -> list[str]:
    """``target`` and the packages above it that importing it runs (those that contain the
    importer are already running and add no edge)."""
    parts = target.split(".")
    out = []
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in modules or name == importer:
            continue
        if i < len(parts) and (importer + ".").startswith(name + "."):
            continue  # an ancestor of the importer
        out.append(name)
    return out


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, function-level edges) between the package's modules."""
    modules = package_modules()
    top: dict[str, set[str]] = {m: set() for m in modules}
    inner: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if _is_package(path) else name.rpartition(".")[0]
        for node, at_top in _imports(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base_parts = package.split(".")
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for t in targets:
                if t.split(".")[0] != PACKAGE:
                    continue
                for m in _with_parents(t, name, modules):
                    (top if at_top else inner)[name].add(m)
    return top, inner


def third_party_imports() -> list[str]:
    """The modules outside the package (and the standard library's, left to the children) that
    the package imports at module level, sorted."""
    found = set()
    for path in package_modules().values():
        for node, at_top in _imports(ast.parse(path.read_text(), str(path))):
            if not at_top or (isinstance(node, ast.ImportFrom) and node.level):
                continue
            for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]):
                if name.split(".")[0] not in (PACKAGE, "__future__") and name.split(".")[0] not in sys.stdlib_module_names:
                    found.add(name)
    return sorted(found)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) through each strongly connected component that has one."""
    index, low, on_stack, stack, comps = {}, {}, set(), [], []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    cycles = []
    for comp in comps:
        start = min(comp)
        if len(comp) == 1 and start not in graph.get(start, ()):
            continue
        # the shortest path back to start, inside the component (breadth first)
        prev, frontier, found = {start: None}, [start], None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & comp):
                    if w == start:
                        found = v
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [start]
        v = found
        while v is not None and v != start:
            path.insert(1, v)
            v = prev[v]
        cycles.append(path + [start])
    return cycles


def _describe(cycles) -> str:
    return "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_reads_the_known_imports():
    """The reader sees what it should (so an empty cycle list is not an empty graph)."""
    top, inner = import_graph()
    assert "adaptive_cl.contract" in top["adaptive_cl.reference"]
    assert "adaptive_cl.functional" in top["adaptive_cl"]
    assert "adaptive_cl.cpu" in inner["adaptive_cl.backends"]  # built on first use
    # ``from .cpu.function import ...`` also runs adaptive_cl/cpu/__init__.py
    assert {"adaptive_cl.cpu", "adaptive_cl.cpu.function"} <= inner["adaptive_cl.ops"]


def test_find_cycles_prints_a_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert sorted(_describe(find_cycles(graph)).splitlines()) == ["a -> b -> c -> a", "d -> d"]


def test_no_import_cycle_at_module_level():
    top, _ = import_graph()
    cycles = find_cycles(top)
    assert not cycles, "import cycles among module-level imports:\n" + _describe(cycles)


def test_no_import_cycle_with_function_level_imports():
    top, inner = import_graph()
    both = {m: top[m] | inner[m] for m in top}
    cycles = find_cycles(both)
    assert not cycles, "import cycles once the imports inside functions are counted:\n" + _describe(cycles)


_FRESH_IMPORT = r"""
import importlib, json, os, sys
names, preload = sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]
for dep in preload:  # third-party modules, imported once for every child (none of the package)
    try:
        importlib.import_module(dep)
    except Exception:
        pass  # the child that needs it reports it
results = {}
for name in names:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        assert not any(m == "adaptive_cl" or m.startswith("adaptive_cl.") for m in sys.modules)
        try:
            importlib.import_module(name)
            msg = "ok"
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            msg = ("fail: " if top in ("", "adaptive_cl") else "missing: ") + repr(e)
        except BaseException as e:
            msg = "fail: " + repr(e)
        os.write(write, msg.encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while True:
        b = os.read(read, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(read)
    os.waitpid(pid, 0)
    results[name] = b"".join(chunks).decode() or "fail: the child died"
print(json.dumps(results))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_each_module_imports_in_a_fresh_interpreter():
    """Each module is imported in a child of one interpreter that has imported torch and no
    module of the package: nothing of the package is imported before it. A third-party
    dependency that is not installed (an optional one) is reported, not failed. The third-party
    modules that the package imports at module level are imported once before the children
    fork (torch alone takes seconds), so the check costs one interpreter start, not one per module."""
    import json

    names = [m for m in package_modules() if m not in RUNS_ON_IMPORT]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _FRESH_IMPORT, *names, "--", *third_party_imports(), *PRELOAD],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == set(names)
    failed = {m: r for m, r in results.items() if r.startswith("fail")}
    assert not failed, "modules that do not import on their own:\n" + "\n".join(f"{m}: {r}" for m, r in failed.items())
