"""Time one staged training unit against a whole micro-step (the figure of
``docs/decisions/node-training-units.md``).

``python -m bench.training_units [--model smollm2-135m-instruct] [--shapes 1x256,2x256]``
prints one line per micro-batch shape: each unit kind's min and median, the staged micro-step,
and the one-piece ``FrozenLlama.forward`` + ``backward`` with and without checkpointing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from inference_node.lora import FrozenLlama, LoraAdapter, LoraConfig
from inference_node.models import load_language_model
from inference_node.training import StagedStep, TrainExample, balanced_loss_rows, make_train_batch


def _ms(values: list[float]) -> str:
    return f"min {min(values) * 1000:.0f} / median {statistics.median(values) * 1000:.0f} ms"


def _one_piece(
    model: FrozenLlama, adapter: LoraAdapter, ids: torch.Tensor, labels: torch.Tensor, seed: int
) -> tuple[float, float]:
    """Seconds of forward + backward, with and without per-layer checkpointing."""
    results = []
    for checkpoint in (True, False):
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)
        out = model.forward(adapter, ids, labels, generator=generator, checkpoint=checkpoint)
        torch.autograd.backward(out.loss)
        results.append(time.perf_counter() - started)
        for factor in adapter.parameters():
            factor.grad = None
    return results[0], results[1]


def measure(model: FrozenLlama, adapter: LoraAdapter, rows: int, length: int, repeats: int) -> str:
    """One line of timings for micro-batches of ``rows`` × ``length`` tokens."""
    generator = torch.Generator().manual_seed(0)
    examples = [
        TrainExample.prompt_completion(
            torch.randint(0, 256, (length // 2,), generator=generator).tolist(),
            torch.randint(0, 256, (length - length // 2,), generator=generator).tolist(),
        )
        for _ in range(rows)
    ]
    batch = make_train_batch(examples)
    chunk = balanced_loss_rows(model, rows * length)
    units: dict[str, list[float]] = {}
    staged, checkpointed, plain = [], [], []
    for seed in range(repeats):
        step = StagedStep(
            model,
            adapter,
            batch,
            generator=torch.Generator().manual_seed(seed),
            loss_chunk_rows=chunk,
        )
        started = time.perf_counter()
        step.run_all()
        staged.append(time.perf_counter() - started)
        for timing in step.timings:
            units.setdefault(timing.kind.value, []).append(timing.seconds)
        for factor in adapter.parameters():
            factor.grad = None
        with_checkpoint, without = _one_piece(model, adapter, batch.input_ids, batch.labels, seed)
        checkpointed.append(with_checkpoint)
        plain.append(without)
    kinds = ", ".join(f"{kind} {_ms(values)} (n={len(values)})" for kind, values in units.items())
    return (
        f"{rows}x{length} tokens, {chunk} loss rows per unit, load {os.getloadavg()[0]:.1f}: "
        f"{kinds}; staged micro-step {_ms(staged)}; forward(checkpoint)+backward "
        f"{_ms(checkpointed)}; forward+backward {_ms(plain)}"
    )


def main() -> None:
    """Parse the arguments, load the model, print one line per shape."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--shapes", default="1x256,2x256", help="rows x tokens, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache/sluice/models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_language_model(args.model, cache_dir=args.cache_dir)
    model = FrozenLlama(lm)
    lora = LoraConfig(rank=args.rank, dropout=0.05)
    adapter = LoraAdapter.for_model(lm, lora, seed=0).requires_grad_()
    targets = ",".join(lora.target_modules)
    print(f"{args.model}, LoRA rank {args.rank} on {targets}, {args.threads} thread(s)")
    for shape in args.shapes.split(","):
        rows, length = (int(part) for part in shape.split("x"))
        print(measure(model, adapter, rows, length, args.repeats), flush=True)


if __name__ == "__main__":
    main()
