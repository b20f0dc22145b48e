"""Test-session set-up shared by every test directory."""

import os

import torch

# Without a GPU the Triton kernels run under Triton's CPU interpreter. Triton reads this
# variable when a kernel is defined, so it must be set before anything imports the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # Triton 3.6's interpreter with numpy >= 2.4 (see tests/_triton_compat.py).
    from _triton_compat import patch_interpreter_index

    patch_interpreter_index()


def pytest_collection_modifyitems(config, items):
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
