"""Closed-loop Embed callers straight to a node: each caller sends one single-text request,
waits for the answer, sends the next; the texts are sentences of varied lengths, the tenants
several (a node merges requests of any tenants)."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench.embed.node import MODEL
from bench.stats import percentile
from sluice.v1 import inference_pb2, node_pb2, node_pb2_grpc

GRPC_OPTIONS = [("grpc.enable_http_proxy", 0)]
TENANTS = ("tenant-a", "tenant-b", "tenant-c", "tenant-d")
CORPUS = (
    "the model serves requests from many tenants while the scheduler keeps each queue fair "
    "and every answer arrives within its deadline or the caller is told when to come back "
    "embeddings of short questions long product descriptions support tickets and search "
    "queries are computed on the node next to the language model"
)
WORDS = CORPUS.split()
CALL_TIMEOUT_S = 30.0


def sentences(count: int, seed: int, words: tuple[int, int] = (4, 40)) -> list[str]:
    """``count`` sentences of ``words`` words (uniform between the bounds), seeded."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))).capitalize() + "."
        for _ in range(count)
    ]


@dataclass
class Phase:
    """What one phase measured: the latency of each call that finished inside the window,
    and how the calls ended."""

    callers: int
    window_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        """Requests per second, latency percentiles (nearest rank) and outcomes."""
        lat = self.latencies_s
        return {
            "callers": self.callers,
            "window_s": self.window_s,
            "completed": len(lat),
            "requests_per_s": round(len(lat) / self.window_s, 2),
            "p50_s": percentile(lat, 50, method="nearest_rank", empty=float("nan")),
            "p99_s": percentile(lat, 99, method="nearest_rank", empty=float("nan")),
            "mean_s": sum(lat) / len(lat) if lat else float("nan"),
            "outcomes": dict(sorted(self.outcomes.items())),
        }


async def closed_loop(
    address: str, texts: list[str], warmup_s: float, window_s: float, phase: Phase
) -> None:
    """``phase.callers`` callers for ``warmup_s`` (not counted), then a window of ``window_s``
    (added to ``phase``'s): each call that finishes in the window counts, with its latency."""
    callers = phase.callers
    phase.window_s += window_s
    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        began = time.perf_counter()
        window = (began + warmup_s, began + warmup_s + window_s)
        await asyncio.gather(
            *(_caller(stub, i, callers, texts, window, phase) for i in range(callers))
        )


async def _caller(
    stub: node_pb2_grpc.NodeStub,
    index: int,
    callers: int,
    texts: list[str],
    window: tuple[float, float],
    phase: Phase,
) -> None:
    k = index
    while (sent := time.perf_counter()) < window[1]:
        request = node_pb2.NodeEmbedRequest(
            request=inference_pb2.EmbedRequest(model=MODEL, inputs=[texts[k % len(texts)]]),
            tenant=TENANTS[k % len(TENANTS)],
        )
        k += callers
        try:
            await stub.Embed(request, timeout=CALL_TIMEOUT_S)
            outcome = "ok"
        except grpc.aio.AioRpcError as exc:
            outcome = exc.code().name.lower()
        done = time.perf_counter()
        if window[0] <= done <= window[1]:
            phase.outcomes[outcome] += 1
            if outcome == "ok":
                phase.latencies_s.append(done - sent)
