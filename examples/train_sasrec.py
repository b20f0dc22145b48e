"""Train SASRec with a contrastive objective and compare it with the popularity baseline.

A thin wrapper: the CLI lives in the package (:mod:`adaptive_cl.rec.cli`), so after
``pip install adaptive-cl`` the same flags work as ``adaptive-cl-train ...`` or
``python -m adaptive_cl.rec ...``. ``python examples/train_sasrec.py --help`` lists them.
"""

import sys

from adaptive_cl.rec.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="train_sasrec.py"))
