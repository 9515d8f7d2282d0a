"""``python -m bench.chaos`` (``make chaos``): see :mod:`bench.chaos.cli`."""

from bench.chaos.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
