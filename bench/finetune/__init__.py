"""The fine-tune benchmark (``make bench-finetune``, ``python -m bench.finetune``): issue 19's
figures for fine-tuning in the gaps inference leaves — real time untouched beside training,
training's progress under load, the waits it caused, a killed node's job resumed with the same
losses, and the trained adapter served. See :mod:`bench.finetune.cli`."""
