"""`python -m tensor_parallel.plan ...`, the same as `kiln plan ...`."""

import sys

from kiln.cli import entry
from tensor_parallel.plan.cli import main

sys.exit(entry(main))
