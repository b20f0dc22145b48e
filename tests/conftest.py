"""Test-session set-up shared by every test directory."""

import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's CPU interpreter. Triton reads this
# variable when a kernel is defined, so it must be set before anything imports the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # Triton 3.6's interpreter with numpy >= 2.4 (see tests/_triton_compat.py).
    from _triton_compat import patch_interpreter_index

    patch_interpreter_index()


@pytest.fixture(scope="session")
def ext():
    """The loaded C++ extension (built once per machine, cached). A failed build fails the tests
    that need it (CI has a compiler); only an explicit ADAPTIVE_CL_CPU_EXTENSION=0 skips them."""
    from adaptive_cl.cpu import build

    if build.disabled():
        pytest.skip(f"{build.DISABLE_ENV}=0")
    reason = build.load_error()
    if reason is not None:
        pytest.fail(reason)
    return build.extension()


@pytest.fixture(params=["reference", "cpu"])
def cpu_backend(request):
    """A CPU backend that must follow the contract's rules: the reference, or the C++
    extension (which needs ``ext``)."""
    if request.param == "cpu":
        request.getfixturevalue("ext")
    return request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
