"""``python -m bench.load``: see :mod:`bench.load.cli`."""

import sys

from bench.load.cli import main

if __name__ == "__main__":
    sys.exit(main())
