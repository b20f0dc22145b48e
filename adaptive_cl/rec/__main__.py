"""``python -m adaptive_cl.rec ...``: the training CLI (see :mod:`adaptive_cl.rec.cli`)."""

import sys

from .cli import main

sys.exit(main(prog="python -m adaptive_cl.rec"))
