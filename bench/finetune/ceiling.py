"""What sharing decode steps could give fine-tuning on this machine, from measured costs.

``python -m bench.finetune.ceiling`` times, on SmolLM2 in one thread (medians of
``--repeats``):

- the built-in engine's decode step (:meth:`LlamaRunner.step`) of ``--running`` sequences,
  alone and with ``--riding`` prompt tokens in the same step: the marginal forward cost of a
  token that rides in a decode step (what FlexLLM-style co-serving would pay for a training
  token's forward);
- one staged training micro-step of the benchmark job's shape (micro-batch 2 x 128 tokens,
  LoRA rank 8), per unit kind: forward, loss, backward (recompute + backward), per token.

It then prints the most a fused design could give at an inter-token stretch of ``--stretch``
(1.2 = the issue's limit) on a node busy decoding all the time (as at 30 % load): the shared
node spends ``s / (1 + s)`` of its time on training, and a fused token costs its riding
forward plus the loss and backward units (or, keeping every layer's activations, the backward
without its recompute), against the whole staged step alone. Nothing is
written; the table is the result (docs/decisions/node-training-fused-ceiling.md).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from inference_node.config import NodeSettings
from inference_node.engine.llama import LlamaRunner, Prefill
from inference_node.lora import Example, FrozenLlama, LoraAdapter, LoraConfig, make_batch
from inference_node.models import load_language_model
from inference_node.training import StagedStep, UnitKind


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on CPU), so that a timing holds the kernels it
    launched, not only their launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    run()  # warm
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _decode_costs(lm: object, running: int, riding: int, repeats: int) -> tuple[float, float]:
    """Seconds of a decode step of ``running`` sequences, and of the same step with
    ``riding`` prompt tokens in it."""
    runner = LlamaRunner(lm, slots=running + 1, max_len=512)  # type: ignore[arg-type]
    for slot in range(running):  # each running sequence has a 100-token context
        runner.step([], [], [Prefill(slot, list(range(10, 110)), 0, True)])
    tokens, positions = [11] * running, [100] * running
    plain = _median_s(lambda: runner.step(tokens, positions, []), repeats, lm.device)  # type: ignore[attr-defined]
    ride = [Prefill(running, list(range(20, 20 + riding)), 0, False)]
    mixed = _median_s(lambda: runner.step(tokens, positions, ride), repeats, lm.device)  # type: ignore[attr-defined]
    return plain, mixed


def _training_costs(lm: object, repeats: int, rows: int, length: int) -> dict[str, float]:
    """Seconds per micro-batch token of each unit kind of one staged step."""
    model = FrozenLlama(lm)  # type: ignore[arg-type]
    adapter = LoraAdapter.for_model(lm, LoraConfig(rank=8), seed=1).requires_grad_()  # type: ignore[arg-type]
    half = length // 2
    examples = [Example(list(range(30, 30 + half)), list(range(40, 40 + half)))] * rows
    batch = make_batch(examples, pad_id=0, device=lm.device)  # type: ignore[attr-defined]
    totals: dict[str, list[float]] = {}
    for _ in range(repeats + 1):
        step = StagedStep(model, adapter, batch)
        _sync(batch.input_ids.device)
        step.run_all()
        _sync(batch.input_ids.device)
        for factor in adapter.parameters():
            factor.grad = None
        spent: dict[str, float] = {}
        for timing in step.timings:
            spent[timing.kind] = spent.get(timing.kind, 0.0) + timing.seconds
        for kind, seconds in spent.items():
            totals.setdefault(kind, []).append(seconds)
    tokens = rows * length
    return {kind: statistics.median(v[1:]) / tokens for kind, v in totals.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--running", type=int, default=8, help="sequences in the decode step")
    p.add_argument("--riding", type=int, default=32, help="prompt tokens riding in it")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--stretch", type=float, default=1.2, help="inter-token limit (x without)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs (float32)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cache = args.cache_dir or NodeSettings().model_cache_dir
    lm = load_language_model("smollm2-135m-instruct", device=args.device, cache_dir=cache)
    plain, mixed = _decode_costs(lm, args.running, args.riding, args.repeats)
    ride = (mixed - plain) / args.riding
    unit = _training_costs(lm, args.repeats, rows=2, length=128)
    alone = sum(unit.values())
    fused = ride + unit.get(UnitKind.LOSS, 0.0) + unit.get(UnitKind.BACKWARD, 0.0)
    kept = fused - unit.get(UnitKind.FORWARD, 0.0)  # backward without its recompute
    share = (args.stretch - 1.0) / args.stretch
    rows = [
        (f"decode step, {args.running} sequences", f"{plain * 1e3:.1f} ms"),
        (f"  with {args.riding} prompt tokens riding", f"{mixed * 1e3:.1f} ms"),
        ("forward of a riding token", f"{ride * 1e3:.2f} ms"),
        *((f"staged {k} unit, per token", f"{v * 1e3:.2f} ms") for k, v in unit.items()),
        ("training token alone (staged step)", f"{alone * 1e3:.2f} ms"),
        ("training token fused (riding forward + loss + backward)", f"{fused * 1e3:.2f} ms"),
        (f"node time training may take at {args.stretch}x inter-token", f"{share:.1%}"),
        ("ceiling: progress vs alone, time-sliced", f"{share:.1%}"),
        ("ceiling: progress vs alone, fused", f"{share * alone / fused:.1%}"),
        ("  fused, activations kept (no recompute)", f"{share * alone / kept:.1%}"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
