"""`python -m r1fast ...`: the `r1fast` command, where its script is not on PATH."""
import sys

from r1fast.cli import main

sys.exit(main())
