"""The engine benchmark: Hugging Face baselines against the Sluice engine on a real model
(``python -m bench.engine``, :mod:`.cli`), and the warm node start
(``python -m bench.engine.node_start``).

The driver side (:mod:`.cli`, :mod:`.driver`, :mod:`.report`, :mod:`.common`) stays free of
torch; each measurement runs in its own worker process (:mod:`.workers`, :mod:`.model`,
:mod:`.hf`, :mod:`.sluice_engine`).
"""
