"""pytest set-up for the benchmark suite (``pytest benchmarks/ --benchmark-only``).

Makes ``impls`` and the package importable from a plain checkout (no install needed) and
skips every benchmark cleanly where there is no CUDA device.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (HERE, os.path.dirname(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)
