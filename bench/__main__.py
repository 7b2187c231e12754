"""``python -m bench [--quick]``: the benchmark (see bench/run.py)."""

import sys

from bench.run import main

sys.exit(main(sys.argv[1:]))
