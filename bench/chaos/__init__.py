"""The chaos suite (``make chaos``, ``python -m bench.chaos``): faults injected into the real
suite under steady streaming load, with what they did to the requests (issue 17, deliverable 7).
See :mod:`bench.chaos.cli`."""
