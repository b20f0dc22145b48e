"""Compatibility shim for Triton's CPU interpreter, applied by tests/conftest.py.

Triton 3.6's interpreter turns a scalar tensor into a Python int with ``int(handle.data)``,
where ``data`` is a one-element 1-D numpy array. NumPy 2.4 made that conversion an error
("only 0-dimensional arrays can be converted to Python scalars"), so every kernel with a
``range(0, D, BLOCK)`` loop fails under the interpreter with triton 3.6 and numpy >= 2.4 (the
GPU machine's triton with a current numpy). Triton 3.9 reads the element with ``.squeeze()``.

The fix is the narrowest one that works: re-register ``__index__`` with a 0-d reshape, only
when a probe shows the installed interpreter has the problem (so nothing changes on versions
that are fine, and the shim disappears with the bug). No numpy pin is needed.
"""

from __future__ import annotations

import operator
from types import SimpleNamespace


def _index_is_broken(interpreter) -> bool:
    import numpy as np

    class Probe:
        pass

    scope = interpreter._LangPatchScope()
    try:
        interpreter._patch_lang_tensor(Probe, scope)
        probe = Probe()
        probe.handle = SimpleNamespace(data=np.array([3], dtype=np.int32))
        try:
            return operator.index(probe) != 3
        except TypeError:
            return True
    finally:
        scope.restore()


def patch_interpreter_index() -> bool:
    """Apply the shim if needed; True when it was applied."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    if not (hasattr(interpreter, "_patch_lang_tensor") and hasattr(interpreter, "_LangPatchScope")):
        return False  # a Triton whose interpreter is organised differently: leave it alone
    if not _index_is_broken(interpreter):
        return False
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    interpreter._patch_lang_tensor = patched
    return True
