"""`python -m sds`: the same command line as `python -m sds.cli`."""
import sys

from .cli import main

sys.exit(main())
