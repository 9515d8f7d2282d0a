"""``python -m bench.engine``: see :mod:`bench.engine.cli`."""

import sys

from bench.engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
