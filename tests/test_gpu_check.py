"""benchmarks/gpu_check.py on a CPU, with fake steps that hang (issue 23: the first GPU run must
not be lost): the command ends before its deadline, every finished artefact is in --out, the
summary is rewritten after every step, and a hanging pytest test fails alone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

DRIVER = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, sys.argv[1])
    import gpu_check as g
    out, total = sys.argv[2], float(sys.argv[3])
    py = sys.executable
    def code(src):
        return lambda limit: [py, "-c", src]
    hang = "import time, pathlib; pathlib.Path({p!r}).write_text('x'); time.sleep(1000)"
    stubborn = ("import signal, subprocess, sys, time, pathlib; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1000)']); "
                "pathlib.Path({p!r}).write_text(str(c.pid)); time.sleep(1000)")
    steps = [
        g.Step("hangs, stops on SIGINT", code(hang.format(p=out + "/a.txt")), cap_s=3, min_s=1),
        g.Step("ignores SIGINT, has a child", code(stubborn.format(p=out + "/b.txt")), cap_s=3, min_s=1),
        g.Step("quick", code("import pathlib; pathlib.Path({p!r}).write_text('done')".format(p=out + "/c.txt")),
               cap_s=30, min_s=1, output_to=out + "/c.log"),
        g.Step("hangs past the deadline", code(hang.format(p=out + "/d.txt")), cap_s=10_000, min_s=1),
        g.Step("last, needs 5 s", code("print(1)"), cap_s=30, min_s=5),
    ]
    log = g.Tee(out + "/gpu_check.log")
    t0 = time.monotonic()
    results = g.execute(steps, out=out, total_s=total, log=log, grace_s=3.0, started=t0)
    print("RESULTS", results)
''')


def test_hanging_steps_end_before_the_deadline_with_their_artefacts(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    total = 40.0
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", DRIVER, str(BENCH), str(out), str(total)],
                          capture_output=True, text=True, timeout=120)
    wall = time.monotonic() - t0
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert wall < total + 5, wall  # the driver's own start-up is inside the margin
    for name in ("a.txt", "b.txt", "c.txt", "d.txt", "c.log", "gpu_check.log", "summary.md"):
        assert (out / name).exists(), (name, done.stdout[-3000:])
    summary = (out / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "step" not in line]
    statuses = [r.split("|")[2].strip() for r in rows]
    # the deadline-long hang is stopped in time for the last step's reserve (min_s plus two
    # kill graces: a loaded machine's slow exit after SIGINT must not eat the last step's time)
    assert statuses == ["TIMEOUT", "TIMEOUT", "pass", "TIMEOUT", "pass"], summary
    # the SIGINT-deaf step's child died with it (the step's descendants are killed)
    child = int((out / "b.txt").read_text())
    assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text()


def test_summary_is_written_before_the_first_step_ends(tmp_path):
    """summary.md exists (all steps pending) while the first step still runs."""
    sys.path.insert(0, str(BENCH))
    import gpu_check as g

    out = tmp_path
    seen = {}

    def first(limit):
        seen["summary"] = (out / "summary.md").read_text()
        return [sys.executable, "-c", "print('ok')"]

    log = g.Tee(None)
    results = g.execute([g.Step("one", first, cap_s=30), g.Step("two", lambda limit: [sys.executable, "-c", "1"],
                                                                 cap_s=30)], out=str(out), total_s=60, log=log)
    assert "| one | pending |" in seen["summary"] and "| two | pending |" in seen["summary"]
    assert [r[1] for r in results] == ["pass", "pass"]
    assert "| two | pass |" in (out / "summary.md").read_text()


def test_per_test_timeout_fails_the_hanging_test_and_goes_on(tmp_path):
    (tmp_path / "test_x.py").write_text(textwrap.dedent('''
        import time
        def test_hangs():
            time.sleep(1000)
        def test_after():
            assert True
    '''))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")]))}
    junit = tmp_path / "junit.xml"
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path / "test_x.py"), "-v", "-p", "no:cacheprovider",
                           "-p", "_pytest_deadline", "--per-test-timeout=2", f"--junitxml={junit}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - t0 < 60
    assert done.returncode == 1, done.stdout[-2000:]
    assert "test_hangs FAILED" in done.stdout and "test_after PASSED" in done.stdout
    assert "timed out after 2 s" in done.stdout
    assert junit.exists() and 'failures="1"' in junit.read_text()
