"""``python -m bench.embed`` (``make bench-embed``): see :mod:`bench.embed.cli`."""

from bench.embed.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
