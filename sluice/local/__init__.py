"""Local tooling behind the CLI: run the whole suite on one machine (:mod:`.up`, :mod:`.stores`;
needs the ``server`` extra), the demo (:mod:`.demo`, likewise), the live view (:mod:`.top`) and
what a running suite leaves for clients (:mod:`.rundir`), which need no extra."""
