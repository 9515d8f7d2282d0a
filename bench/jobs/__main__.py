"""``python -m bench.jobs`` (``make bench-jobs``): see :mod:`bench.jobs.cli`."""

from bench.jobs.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
