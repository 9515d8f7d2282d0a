"""The scheduler benchmark on the real suite: overhead, refusal latency against a bare refusal
floor, 2:1 fairness and isolation under a 10x flood (``python -m bench.scheduler``,
:mod:`.cli`); and a discrete-event model of its isolation phase
(``python -m bench.scheduler.isolation_model``).
"""
