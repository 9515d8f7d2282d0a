"""``python -m bench.finetune`` (``make bench-finetune``): see :mod:`bench.finetune.cli`."""

from bench.finetune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
