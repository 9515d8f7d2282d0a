"""``python -m bench.vllm``: see :mod:`bench.vllm.cli`."""

import sys

from bench.vllm.cli import main

sys.exit(main())
