"""Open-loop load generation shared by the benchmarks: scenarios (:mod:`.scenario`), targets
(:mod:`.targets`), the run itself (:mod:`.run`) and what it records (:mod:`.records`).

``python -m bench.load SCENARIO --target sluice|naive`` runs one scenario (:mod:`.cli`).
"""
