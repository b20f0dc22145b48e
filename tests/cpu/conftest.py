"""The CPU extension, built once per machine (cached) and shared by every test here."""

import pytest

from adaptive_cl.cpu import build


@pytest.fixture(scope="session")
def ext():
    """The loaded extension. A failed build fails the tests that need it (CI has a compiler);
    only an explicit ADAPTIVE_CL_CPU_EXTENSION=0 skips them."""
    if build.disabled():
        pytest.skip(f"{build.DISABLE_ENV}=0")
    reason = build.load_error()
    if reason is not None:
        pytest.fail(reason)
    return build.extension()
