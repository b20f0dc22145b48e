"""Reproduce the results table: train every (method, seed) of the plan that has no committed
result yet, within a time budget, and tabulate every committed run.

A thin wrapper: the logic lives in the package (:mod:`adaptive_cl.rec.reproduce`, also
``python -m adaptive_cl.rec.reproduce``). ``python examples/reproduce.py --help`` lists the
flags; examples/results/<dataset>/README.md holds the table.

    python examples/reproduce.py --data Beauty.txt --budget-s 480 --archive "$OUT"
"""

import sys

from adaptive_cl.rec.reproduce import main

if __name__ == "__main__":
    sys.exit(main(prog="python examples/reproduce.py"))
