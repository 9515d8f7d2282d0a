"""``python -m bench.slo``."""

import sys

from bench.slo.cli import main

sys.exit(main())
