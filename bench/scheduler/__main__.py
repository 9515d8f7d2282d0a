"""``python -m bench.scheduler`` (``make bench-scheduler``): see :mod:`bench.scheduler.cli`."""

from bench.scheduler.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
