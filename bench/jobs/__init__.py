"""The jobs benchmark (``make bench-jobs``, ``python -m bench.jobs``): issue 18's figures for
durable jobs on the real suite — nothing lost through kills, gaps filled without disturbing
real time, deadlines kept. See :mod:`bench.jobs.cli`."""
