"""`python -m liverec.platform` is the `liverec` command."""

import sys

from liverec.platform.cli import main

if __name__ == "__main__":  # not when a spawned worker process (serving.workers) re-imports this module
    sys.exit(main())
