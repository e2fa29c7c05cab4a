"""`python -m liverec.platform` is the `liverec` command."""

import sys

from liverec.platform.cli import main

sys.exit(main())
