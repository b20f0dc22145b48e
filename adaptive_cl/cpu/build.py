"""Builds and loads the C++ extension (the sources in ``csrc/``) once per machine.

``torch.utils.cpp_extension.load`` compiles on first use with ninja and caches the result in
torch's extension directory (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``);
later processes only load it. The extension's name carries a digest of every source file, the
flags and the source location, so an edited header or an upgraded package never loads a stale
binary, and the vector ISA (so a home directory shared by different machines keeps one build
per ISA).

Vector code: ATen's ``at::vec::Vectorized`` picks its width from ``CPU_CAPABILITY_*`` macros.
On x86-64 the flags follow the capability torch itself dispatches to here
(``torch.backends.cpu.get_cpu_capability()``: AVX512 or AVX2, else the portable fallback); on
aarch64 NEON needs no flags. The ``CPU_CAPABILITY`` namespace gets a name of its own so the
extension's inline copies never clash with libtorch's.

The first build takes about a minute: it says so once on stderr, with the cache folder, and
``python -m adaptive_cl.cpu.build`` (console script ``adaptive-cl-build-cpu``) builds it ahead of
time (container images, CI), printing where it is cached.

Nothing here raises on a failed build: :func:`load_error` returns the reason (no compiler, no
ninja, ...) and the backend registry decides (``"auto"`` falls back to the reference with one
warning, ``"cpu"`` raises). ``ADAPTIVE_CL_CPU_EXTENSION=0`` turns the extension off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch

__all__ = ["DISABLE_ENV", "build_dir", "disabled", "extension", "load_error", "main", "source_dir"]

log = logging.getLogger(__name__)

#: Set to "0" to never build or load the extension ("auto" then uses the reference silently).
DISABLE_ENV = "ADAPTIVE_CL_CPU_EXTENSION"

_MAIN = "adaptive_info_nce_cpu.cpp"
_HEADERS = ("tiles.h", "normalize.h", "loss_terms.h", "histogram.h")

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "error": None}


def source_dir() -> Path | None:
    """The C++ sources: ``adaptive_cl/_csrc`` in an installed package, ``csrc/`` in a checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if (candidate / _MAIN).is_file() and all((candidate / h).is_file() for h in _HEADERS):
            return candidate
    return None


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1").strip() == "0"


def _isa_flags() -> tuple[str, list[str]]:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        capability = torch.backends.cpu.get_cpu_capability()
        if capability == "AVX512":
            return "avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                              "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=adaptive_cl_avx512"]
        if capability == "AVX2":
            return "avx2", ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2",
                            "-DCPU_CAPABILITY=adaptive_cl_avx2"]
        return "x86", ["-DCPU_CAPABILITY=adaptive_cl_default"]
    return machine or "cpu", ["-DCPU_CAPABILITY=adaptive_cl_default"]  # aarch64: NEON by default


def _build_args() -> tuple[str, list[str], list[str]]:
    isa, flags = _isa_flags()
    cflags = ["-O3", *flags]
    ldflags: list[str] = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is OpenMP in torch's Linux builds; the extension links libgomp by the
        # soname torch has already loaded, so both share one thread pool and set_num_threads.
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return isa, cflags, ldflags


def _name(src: Path, isa: str, cflags: list[str], ldflags: list[str]) -> str:
    digest = hashlib.sha256()
    for file in (_MAIN, *_HEADERS):
        digest.update((src / file).read_bytes())
    # the source path too: torch rebuilds a name whose include paths changed, so a checkout and
    # an installed copy sharing one name would rebuild each other's binary on every switch
    digest.update(" ".join([str(src), torch.__version__, *cflags, *ldflags]).encode())
    return f"adaptive_cl_cpu_{isa}_{digest.hexdigest()[:12]}"


def _ninja_on_path() -> None:
    """The ``ninja`` wheel's binary when ninja is not on PATH (a venv used without activating)."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def _load():
    src = source_dir()
    if src is None:
        raise FileNotFoundError("the C++ sources (csrc/) are not part of this installation")
    from torch.utils import cpp_extension

    _ninja_on_path()
    isa, cflags, ldflags = _build_args()
    name = _name(src, isa, cflags, ldflags)
    folder = build_dir(name)
    if not _built(folder, name):
        # once per build (this function runs once per process): a silent minute looks like a hang
        print(f"adaptive_cl: building the C++ CPU extension {name} (about a minute, once per machine "
              f"and version); cached in {folder}. Build it ahead with: python -m adaptive_cl.cpu.build",
              file=sys.stderr, flush=True)
    log.info("adaptive_cl: loading the CPU extension %s from %s", name, folder)
    return cpp_extension.load(
        name=name,
        sources=[str(src / _MAIN)],
        extra_include_paths=[str(src)],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        verbose=False,
    )


def build_dir(name: str) -> Path:
    """torch's build folder of the extension ``name`` ($TORCH_EXTENSIONS_DIR/<python-torch tag>/name)."""
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory(name, verbose=False))


def _built(folder: Path, name: str) -> bool:
    """A built library is there (torch then only loads it, unless its sources changed: the name
    carries their digest)."""
    return any(folder.glob(f"{name}*.so")) or any(folder.glob(f"{name}*.pyd"))


def _short(err: BaseException) -> str:
    """The compiler's or the shell's complaint when the message holds one, else its last line
    (a failed build's message starts with the whole compiler command line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("ninja: build stopped", "FAILED:"))]
    keys = ("error:", "not found", "no such file", "fatal")
    hits = [line for line in lines if any(key in line.lower() for key in keys)]
    head = (hits or lines or [""])[0]
    return f"{type(err).__name__}: {head}"[:400]


def _ensure() -> None:
    with _lock:
        if _state["tried"]:
            return
        _state["tried"] = True
        if disabled():
            _state["error"] = f"the CPU extension is disabled ({DISABLE_ENV}=0)"
            return
        try:
            _state["module"] = _load()
        except Exception as err:  # noqa: BLE001 - any build or load failure is reported, not raised
            _state["error"] = (f"the CPU extension could not be built or loaded ({_short(err)}); "
                               "it needs a C++ compiler and ninja (pip install ninja)")


def load_error() -> str | None:
    """None when the extension is loaded (building it on first call), else why it is not."""
    _ensure()
    return _state["error"]


def extension():
    """The loaded extension module; RuntimeError with the reason when it cannot be had."""
    _ensure()
    if _state["module"] is None:
        raise RuntimeError(_state["error"])
    return _state["module"]


def main(argv=None) -> int:
    """``python -m adaptive_cl.cpu.build`` / ``adaptive-cl-build-cpu``: build (or find) the
    extension now; prints its cache folder. Exit status 0 when it loads, 1 with the reason."""
    import argparse

    argparse.ArgumentParser(description="Build the adaptive_cl C++ CPU extension ahead of its first use "
                                        "(cached per machine; $TORCH_EXTENSIONS_DIR chooses the folder).").parse_args(argv)
    if disabled():
        print(f"adaptive_cl: the CPU extension is disabled ({DISABLE_ENV}=0): nothing built", file=sys.stderr)
        return 1
    error = load_error()
    if error is not None:
        print(f"adaptive_cl: {error}", file=sys.stderr)
        return 1
    module = _state["module"]
    print(f"adaptive_cl: CPU extension ready: {getattr(module, '__file__', module)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
