"""``python -m bench.chaos`` (``make chaos``): see :mod:`bench.chaos.cli`."""

import os

# The strangers scenario fails hundreds of TLS handshakes on purpose; gRPC core would log each
# on the console at INFO. Set before grpc loads; the suite's services inherit it (their own
# event logs are structlog's, untouched). An explicit GRPC_VERBOSITY wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from bench.chaos.cli import main  # after the environment is set

if __name__ == "__main__":
    raise SystemExit(main())
