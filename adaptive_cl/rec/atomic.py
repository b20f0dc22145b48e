"""Files written so that a crash or a kill never leaves a partial one: results, checkpoints,
caches and figures all go through :func:`atomic_write`.

The bytes go to a temporary file in the target's directory, which is flushed and fsynced, then
``os.replace``-d over the target (atomic on POSIX), and the directory is fsynced so the rename
itself survives a power cut. A reader sees the old file or the new one, never a mix; a failed
write removes its temporary file and leaves the old file as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_text", "atomic_save", "atomic_savez", "atomic_savefig"]


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a binary file that becomes ``path`` only once it is complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_save(obj: object, path: str | Path) -> None:
    """``torch.save(obj, path)``, atomically."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_savez(path: str | Path, **arrays) -> None:
    """``numpy.savez(path, **arrays)``, atomically (``path`` is used as given: name it .npz)."""
    import numpy as np

    atomic_write(path, lambda f: np.savez(f, **arrays))


def atomic_savefig(fig, path: str | Path, **kwargs) -> None:
    """``fig.savefig(path, **kwargs)``, atomically; the format comes from ``path``'s suffix."""
    fmt = kwargs.pop("format", None) or Path(path).suffix.lstrip(".") or None
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, **kwargs))
