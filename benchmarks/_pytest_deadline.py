"""A pytest plugin: ``--per-test-timeout S`` fails a test (setup, call and teardown together) that
runs longer than S seconds, and the session goes on to the next test. Used by gpu_check.py
(``-p _pytest_deadline``) so one hanging CUDA test cannot take the whole step's time; it needs
no install (pytest-timeout may be absent on the GPU machine). SIGALRM, so main thread, POSIX;
a hang inside a C call ends when the call returns to Python (the step's SIGINT / SIGKILL
covers the rest)."""

from __future__ import annotations

import signal

import pytest


def pytest_addoption(parser):
    parser.addoption("--per-test-timeout", type=float, default=0.0,
                     help="fail a test that runs longer than this many seconds (0: no limit)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    limit = item.config.getoption("per_test_timeout")
    if not limit or limit <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        pytest.fail(f"timed out after {limit:g} s (--per-test-timeout)", pytrace=False)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
