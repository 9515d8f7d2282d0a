"""What batching can give ``Embed`` on this machine at the forward alone.

``python -m bench.embed.forward`` times the node's embedder (``Embedder.embed_each``, the call
the batcher makes) on ``make bench-embed``'s texts, in process and with nothing around it, at
batch sizes 1 to 64, ``--seconds`` each, and prints texts per second. Texts per second at the
best batch size over ``make bench-embed``'s one-at-a-time requests per second is the most the
batched node could reach if gRPC, the callers and the batcher cost nothing. Nothing is
written; the table is the result (docs/decisions/node-embed-batching.md).
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.embed.cli import TEXTS, WORDS
from bench.embed.load import sentences
from bench.embed.node import MODEL
from inference_node.models import load_embedder

SIZES = (1, 2, 4, 8, 16, 32, 64)


def texts_per_second(dtype: str, seconds: float, threads: int) -> list[tuple[int, float, float]]:
    """(batch size, milliseconds per forward, texts per second) at each of :data:`SIZES`."""
    torch.set_num_threads(threads)
    embedder = load_embedder(MODEL, dtype=dtype)
    embedder.warm()  # as the node does before its first forward
    texts = sentences(TEXTS, 0, WORDS)
    rows = []
    for size in SIZES:
        embedder.embed_each(texts[:size], batch_size=size)  # warm
        forwards, start, at = 0, time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            chunk = [texts[(at + i) % len(texts)] for i in range(size)]
            at += size
            embedder.embed_each(chunk, batch_size=size)
            forwards += 1
        per_forward = (time.perf_counter() - start) / forwards
        rows.append((size, per_forward * 1000, size / per_forward))
    return rows


def main() -> None:
    """Print the table (see the module doc)."""
    p = argparse.ArgumentParser(prog="python -m bench.embed.forward", description=__doc__)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per batch size")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the node's: 2 here)")
    args = p.parse_args()
    if args.seconds <= 0 or args.threads < 1:
        p.error("--seconds must be positive and --threads at least 1")
    rows = texts_per_second(args.dtype, args.seconds, args.threads)
    print(f"{MODEL} ({args.dtype}, {args.threads} threads), texts of {WORDS[0]}-{WORDS[1]} words")
    print("| batch | ms per forward | texts/s |")
    print("| --- | --- | --- |")
    for size, ms, rate in rows:
        print(f"| {size} | {ms:.1f} | {rate:.1f} |")


if __name__ == "__main__":
    main()
