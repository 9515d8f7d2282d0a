"""Local tooling: run the whole suite on one machine (:mod:`.up`, :mod:`.stores`), the demo
(:mod:`.demo`) and the live view (:mod:`.top`). Behind the CLI's ``up``, ``demo`` and ``top``;
needs the ``server`` extra."""
