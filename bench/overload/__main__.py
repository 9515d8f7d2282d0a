"""``python -m bench.overload`` (``make bench``): see :mod:`bench.overload.cli`."""

import os
import sys

from bench.overload.cli import main

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
