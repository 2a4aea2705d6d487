"""`python -m llamalab ...` (what `torchrun -m llamalab train ...` runs): the `llamalab` command line."""

import sys

from llamalab.cli import main

sys.exit(main())
