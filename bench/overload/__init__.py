"""The overload benchmark: Sluice against the naive one-at-a-time server on the same machine and
model, under ``bench/scenarios/overload.yaml`` (``python -m bench.overload``, :mod:`.cli`).

*Capacity at SLO* is the highest offered rate at which at least 95 % of requests finish with
TTFT <= 2 s and mean TPOT <= 0.25 s, found by a stepped search (:mod:`.search`); load levels
are multiples of it (:mod:`.benchmark`), each target a child process (:mod:`.servers`,
:mod:`.naive_server`). Every figure in the results comes from one run: ``overload.json``
(:mod:`.report`), ``overload.md`` and two plots (:mod:`.render`).
"""
