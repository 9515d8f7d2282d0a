"""Dynamic batching of Embed calls (``inference_node/embed_batcher.py``): the batch sizer on
synthetic latency curves; the batcher and a real node on all-MiniLM-L6-v2.

Nothing here depends on timing: a :class:`GatedEmbedder` holds the embedding thread in a
forward until the test lets it go, so the requests sent meanwhile are known to wait together,
and a :class:`FixedSizer` pins the batch limit.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from prometheus_client import CollectorRegistry

from inference_node.app import NodeService, embed_batcher
from inference_node.config import NodeSettings
from inference_node.embed_batcher import (
    EmbedBatcher,
    EmbedderClosedError,
    EmbedQueueFullError,
    EmbedResult,
)
from inference_node.embed_sizer import BatchSizer
from inference_node.metrics import NodeMetrics
from inference_node.model_types import Embedder
from inference_node.torch_threads import default_workers, pinned_pool
from sluice.v1 import inference_pb2, node_pb2, node_pb2_grpc
from tests.harness import eventually
from tests.test_end_to_end import details_of, unpack

MINILM = "all-minilm-l6-v2"
TOLERANCE = 1e-5
Node = tuple[NodeService, CollectorRegistry]
TEXTS = [
    "a cat",
    "The quick brown fox jumps over the lazy dog near the bank of the river.",
    "embeddings",
    "Dynamic batching merges concurrent requests into one forward pass.",
    "short",
    "A somewhat longer sentence, so that the batch needs padding and an attention mask.",
]


class FixedSizer(BatchSizer):
    """A sizer whose limit never moves."""

    def __init__(self, limit: int) -> None:
        super().__init__(max_size=limit, latency_bound_s=1.0)
        self.limit = limit

    def record(self, texts: int, seconds: float, chars: int = 0) -> None:
        pass

    def failed(self, texts: int) -> None:
        pass


def fixed(limit: int) -> Callable[[], BatchSizer]:
    """A sizer factory for :class:`EmbedBatcher`: every model's limit pinned at ``limit``."""
    return lambda: FixedSizer(limit)


class GatedEmbedder(Embedder):
    """The real embedder, whose forwards wait while :attr:`gate` is clear; it notes each
    forward's texts, and fails any forward holding ``poison``."""

    def __init__(self, real: Embedder) -> None:
        self.__dict__.update(real.__dict__)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.forwards: list[list[str]] = []

    def embed_each(
        self, texts: Sequence[str], batch_size: int | None = None
    ) -> tuple[list[list[float]], list[int]]:
        self.entered.set()
        self.gate.wait(timeout=30)
        self.forwards.append(list(texts))
        if "poison" in texts:
            raise ValueError("poisoned forward")
        return super().embed_each(texts, batch_size)


@pytest.fixture
def gated(minilm: Embedder) -> GatedEmbedder:
    return GatedEmbedder(minilm)


def alone(embedder: Embedder, texts: Sequence[str]) -> EmbedResult:
    """``texts`` embedded one at a time (the unbatched reference)."""
    vectors, tokens = [], 0
    for text in texts:
        v, t = Embedder.embed_each(embedder, [text])
        vectors += v
        tokens += t[0]
    return EmbedResult(vectors, tokens)


def assert_close(got: EmbedResult, want: EmbedResult) -> None:
    assert got.prompt_tokens == want.prompt_tokens
    assert len(got.vectors) == len(want.vectors)
    for a, b in zip(got.vectors, want.vectors, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= TOLERANCE


async def held_thread(batcher: EmbedBatcher, gated: GatedEmbedder) -> asyncio.Task[EmbedResult]:
    """A request running on the embedding thread, held there until ``gated.gate`` is set."""
    gated.gate.clear()
    gated.entered.clear()
    first = asyncio.create_task(batcher.embed(gated, ["holding the thread"]))
    await eventually(gated.entered.is_set)
    return first


# The sizer, on synthetic curves


def test_the_sizer_grows_while_throughput_rises_within_the_bound() -> None:
    """Forwards whose throughput keeps rising take the limit up a class at a time, each new
    class being tried before the next, up to ``max_size``."""
    sizer = BatchSizer(max_size=12, latency_bound_s=1.0)
    for size in (1, 2, 4):
        assert sizer.limit == size
        sizer.record(size, 0.01 + 0.001 * size)
    assert sizer.limit == 8
    sizer.record(8, 0.018)
    assert sizer.limit == 12  # every class within bounds: max_size
    assert sorted(sizer.curve()) == [1, 2, 4, 8]


def test_the_sizer_steps_back_past_the_latency_bound_and_retries_later() -> None:
    """A class over the latency bound sets the limit to the class below; it is tried again
    once ``retry_after`` forwards have passed without it, its old average forgotten."""
    sizer = BatchSizer(max_size=64, latency_bound_s=0.05, retry_after=4)
    for size, seconds in ((1, 0.01), (2, 0.015), (4, 0.02)):
        sizer.record(size, seconds)
    assert sizer.limit == 8
    sizer.record(8, 0.08)  # over the bound
    assert sizer.limit == 4
    for _ in range(4):
        sizer.record(4, 0.02)
        assert sizer.limit == 4
    sizer.record(4, 0.02)
    assert sizer.limit == 8  # stale: tried again
    sizer.record(8, 0.03)  # within the bound now
    assert sizer.limit == 16


def test_the_sizer_stops_where_throughput_falls() -> None:
    """A class clearly slower per text than the best below it (by more than
    ``tolerance``) stops the growth; a flat one does not."""
    sizer = BatchSizer(max_size=64, latency_bound_s=1.0, tolerance=0.1)
    sizer.record(1, 0.010)  # 100 texts/s
    sizer.record(2, 0.021)  # 95: within the tolerance
    assert sizer.limit == 4
    sizer.record(4, 0.050)  # 80: worse
    assert sizer.limit == 2


def test_a_failed_forward_puts_its_size_class_over_the_bound() -> None:
    """A failed forward of eight texts sets the limit to four until eight is retried."""
    sizer = BatchSizer(max_size=64, latency_bound_s=1.0, retry_after=2)
    for size in (1, 2, 4):
        sizer.record(size, 0.01 * size)
    assert sizer.limit == 8
    sizer.failed(8)
    assert sizer.limit == 4
    for _ in range(3):
        sizer.record(4, 0.04)
    assert sizer.limit == 8  # stale: tried again


def test_the_sizer_learns_seconds_per_character_from_forwards_long_enough() -> None:
    """The pace is a moving average of seconds per character over forwards of 200 characters
    or more (shorter ones are mostly fixed cost); a forward's characters within a time follow
    from it (no bound before a pace, or without a time)."""
    sizer = BatchSizer(max_size=16, latency_bound_s=1.0)
    assert sizer.chars_within(0.1) == math.inf
    sizer.record(8, 0.5, chars=1000)
    sizer.record(1, 0.01, chars=10)
    assert sizer.seconds_per_char == pytest.approx(0.0005)
    sizer.record(8, 1.0, chars=1000)
    assert sizer.seconds_per_char == pytest.approx(0.0005 + 0.3 * 0.0005)
    assert sizer.chars_within(0.13) == pytest.approx(200)
    assert sizer.chars_within(None) == math.inf


def test_a_max_size_of_one_runs_every_request_alone() -> None:
    """``max_size`` 1 (one at a time) never grows."""
    sizer = BatchSizer(max_size=1, latency_bound_s=1.0)
    for _ in range(3):
        sizer.record(1, 0.001)
    assert sizer.limit == 1


# The batcher, on the real model


async def test_concurrent_requests_share_one_forward_with_unbatched_results(
    gated: GatedEmbedder,
) -> None:
    """Six single-text requests sent while the thread is busy run as one forward of six
    texts; each gets the vector and token count it gets alone (within 1e-5)."""
    sizes: list[int] = []
    batcher = EmbedBatcher(fixed(16), max_wait_s=0, on_batch=lambda m, n: sizes.append(n))
    first = await held_thread(batcher, gated)
    calls = [asyncio.create_task(batcher.embed(gated, [t])) for t in TEXTS]
    await eventually(lambda: batcher.waiting == len(TEXTS) + 1)
    gated.gate.set()
    results = await asyncio.gather(*calls)
    await first
    assert sizes == [1, len(TEXTS)]
    assert gated.forwards[1] == TEXTS
    for text, result in zip(TEXTS, results, strict=True):
        assert_close(result, alone(gated, [text]))
    batcher.close()


async def test_requests_of_several_texts_are_split_back_in_order(gated: GatedEmbedder) -> None:
    """Requests of 1, 3 and 2 texts of different lengths merged into one forward each get
    their own vectors, in order, and their own prompt tokens."""
    batcher = EmbedBatcher(fixed(16), max_wait_s=0)
    first = await held_thread(batcher, gated)
    groups = [TEXTS[:1], TEXTS[1:4], TEXTS[4:]]
    calls = [asyncio.create_task(batcher.embed(gated, g)) for g in groups]
    await eventually(lambda: batcher.waiting == 4)
    gated.gate.set()
    results = await asyncio.gather(*calls)
    await first
    assert gated.forwards[1] == TEXTS
    for group, result in zip(groups, results, strict=True):
        assert_close(result, alone(gated, group))
    batcher.close()


async def test_a_batch_takes_no_more_texts_than_the_limit(gated: GatedEmbedder) -> None:
    """With a limit of four texts, six waiting single-text requests run as four, then two."""
    batcher = EmbedBatcher(fixed(4), max_wait_s=0)
    first = await held_thread(batcher, gated)
    calls = [asyncio.create_task(batcher.embed(gated, [t])) for t in TEXTS]
    await eventually(lambda: batcher.waiting == len(TEXTS) + 1)
    gated.gate.set()
    await asyncio.gather(first, *calls)
    assert [len(f) for f in gated.forwards] == [1, 4, 2]
    batcher.close()


class SteppedEmbedder(GatedEmbedder):
    """The real embedder whose every forward waits for one :attr:`permits` release."""

    def __init__(self, real: Embedder) -> None:
        super().__init__(real)
        self.permits = threading.Semaphore(0)

    def embed_each(
        self, texts: Sequence[str], batch_size: int | None = None
    ) -> tuple[list[list[float]], list[int]]:
        self.forwards.append(list(texts))
        self.permits.acquire(timeout=30)
        return Embedder.embed_each(self, texts, batch_size)


async def test_realtime_goes_first_and_a_large_lower_class_request_is_sliced(
    minilm: Embedder,
) -> None:
    """With a limit of four texts, a BATCH request of six texts queued before two REALTIME
    ones: the REALTIME texts fill the next forward first and the BATCH request runs in slices
    of the room left; a REALTIME request arriving between two slices runs before the next
    one. Every request gets the vectors it gets alone, in order."""
    stepped = SteppedEmbedder(minilm)
    batcher = EmbedBatcher(fixed(4), max_wait_s=0)
    first = asyncio.create_task(batcher.embed(stepped, ["holding the thread"]))
    await eventually(lambda: len(stepped.forwards) == 1)
    bulk = asyncio.create_task(batcher.embed(stepped, TEXTS, rank=1))
    urgent = [asyncio.create_task(batcher.embed(stepped, [t])) for t in ("rt one", "rt two")]
    await eventually(lambda: batcher.waiting == 4)
    stepped.permits.release()
    await eventually(lambda: len(stepped.forwards) == 2)
    held = await first
    late = asyncio.create_task(batcher.embed(stepped, ["rt late"]))
    await eventually(lambda: batcher.waiting == 4)
    stepped.permits.release(3)
    results = await asyncio.gather(bulk, *urgent, late)
    assert stepped.forwards == [
        ["holding the thread"],
        ["rt one", "rt two", *TEXTS[:2]],
        ["rt late", *TEXTS[2:5]],
        TEXTS[5:],
    ]
    assert_close(results[0], alone(minilm, TEXTS))
    assert_close(results[1], alone(minilm, ["rt one"]))
    assert_close(results[3], alone(minilm, ["rt late"]))
    assert_close(held, alone(minilm, ["holding the thread"]))
    batcher.close()


async def test_lower_class_texts_fill_a_forward_only_as_far_as_they_take_the_time_allowed(
    minilm: Embedder,
) -> None:
    """At 0.01 s per character and 1 s allowed, a BATCH request's texts go 100 characters to
    a forward, beside a REALTIME text that does not count against them (and never past the
    limit): 5 + 71 + 10, then 66 + 5, then 82. A lower-class text longer than that runs
    alone. Every request still gets the vectors it gets alone."""
    stepped = SteppedEmbedder(minilm)
    batcher = EmbedBatcher(fixed(16), max_wait_s=0, lower_forward_s=1.0)
    batcher.sizer(stepped.name).seconds_per_char = 0.01
    first = asyncio.create_task(batcher.embed(stepped, ["holding the thread"]))
    await eventually(lambda: len(stepped.forwards) == 1)
    bulk = asyncio.create_task(batcher.embed(stepped, TEXTS, rank=1))
    long = "word " * 40
    too_long = asyncio.create_task(batcher.embed(stepped, [long], rank=2))
    urgent = asyncio.create_task(batcher.embed(stepped, ["rt one"]))
    await eventually(lambda: batcher.waiting == 4)
    stepped.permits.release(5)
    results = await asyncio.gather(bulk, too_long, urgent, first)
    assert stepped.forwards == [
        ["holding the thread"],
        ["rt one", *TEXTS[:3]],
        TEXTS[3:5],
        TEXTS[5:],
        [long],
    ]
    assert_close(results[0], alone(minilm, TEXTS))
    assert_close(results[1], alone(minilm, [long]))
    assert_close(results[2], alone(minilm, ["rt one"]))
    batcher.close()


async def test_a_long_lower_class_text_passed_over_four_times_goes_beside_realtime(
    minilm: Embedder,
) -> None:
    """A BATCH text longer than the characters allowed waits while REALTIME texts fill each
    forward, but only four times: the fifth forward takes it beside the REALTIME text."""
    stepped = SteppedEmbedder(minilm)
    batcher = EmbedBatcher(fixed(16), max_wait_s=0, lower_forward_s=1.0)
    batcher.sizer(stepped.name).seconds_per_char = 0.01  # 100 characters
    long = "word " * 40
    calls = [asyncio.create_task(batcher.embed(stepped, ["holding the thread"]))]
    await eventually(lambda: len(stepped.forwards) == 1)
    calls.append(asyncio.create_task(batcher.embed(stepped, [long], rank=1)))
    for i in range(5):
        calls.append(asyncio.create_task(batcher.embed(stepped, [f"rt {i}"])))
        await eventually(lambda: batcher.queued == 2)  # the long text and this one
        stepped.permits.release()
        await eventually(lambda n=i: len(stepped.forwards) == n + 2)
    stepped.permits.release()
    await asyncio.gather(*calls)
    assert stepped.forwards[1:] == [["rt 0"], ["rt 1"], ["rt 2"], ["rt 3"], ["rt 4", long]]
    batcher.close()


class HalvingSizer(FixedSizer):
    """A fixed limit that a failed forward halves."""

    def failed(self, texts: int) -> None:
        self.limit = max(1, texts // 2)


class SmallForwardsOnly(SteppedEmbedder):
    """Fails every forward of more than two texts (an out-of-memory, say); no permits."""

    def embed_each(
        self, texts: Sequence[str], batch_size: int | None = None
    ) -> tuple[list[list[float]], list[int]]:
        self.gate.wait(timeout=30)
        self.forwards.append(list(texts))
        if len(texts) > 2:
            raise MemoryError("too many texts at once")
        return Embedder.embed_each(self, texts, batch_size)


async def test_a_slice_of_a_failed_forward_is_taken_again_at_the_lowered_limit(
    minilm: Embedder,
) -> None:
    """A merged forward of four texts fails: the limit falls to two, the REALTIME request's
    text runs alone, and the BATCH request's slice of three goes back to be taken in slices
    of two; both get the vectors they get alone."""
    small = SmallForwardsOnly(minilm)
    batcher = EmbedBatcher(lambda: HalvingSizer(4), max_wait_s=0)
    small.gate.clear()
    first = asyncio.create_task(batcher.embed(small, ["holding"]))
    await eventually(lambda: batcher.waiting == 1 and not batcher.queued)
    bulk = asyncio.create_task(batcher.embed(small, TEXTS, rank=1))
    urgent = asyncio.create_task(batcher.embed(small, ["rt one"]))
    await eventually(lambda: batcher.waiting == 3)
    small.gate.set()
    await first
    assert_close(await urgent, alone(minilm, ["rt one"]))
    assert_close(await bulk, alone(minilm, TEXTS))
    assert small.forwards[1] == ["rt one", *TEXTS[:3]]
    assert [len(f) for f in small.forwards[2:]] == [1, 2, 2, 2]
    batcher.close()


async def test_a_caller_that_leaves_drops_out_and_the_others_are_served(
    gated: GatedEmbedder,
) -> None:
    """A queued request cancelled before its batch runs is left out of the forward; one
    cancelled while its forward runs leaves its result unread; the others get theirs."""
    batcher = EmbedBatcher(fixed(16), max_wait_s=0)
    first = await held_thread(batcher, gated)
    calls = [asyncio.create_task(batcher.embed(gated, [t])) for t in TEXTS[:3]]
    await eventually(lambda: batcher.waiting == 4)
    calls[1].cancel()
    await eventually(lambda: batcher.waiting == 3)
    assert batcher.queued == 2  # the cancelled request left the queue at once
    first.cancel()  # its forward is running
    await eventually(lambda: batcher.waiting == 2)
    gated.gate.set()
    kept = await asyncio.gather(calls[0], calls[2])
    assert gated.forwards[1] == [TEXTS[0], TEXTS[2]]
    assert_close(kept[0], alone(gated, [TEXTS[0]]))
    assert_close(kept[1], alone(gated, [TEXTS[2]]))
    assert first.cancelled() and calls[1].cancelled()
    batcher.close()


async def test_past_the_waiting_bound_a_request_is_refused_at_once(gated: GatedEmbedder) -> None:
    """With three requests waiting (the bound), a fourth raises EmbedQueueFullError and the
    three are served once the thread is free."""
    batcher = EmbedBatcher(fixed(16), max_wait_s=0, max_waiting=3)
    first = await held_thread(batcher, gated)
    calls = [asyncio.create_task(batcher.embed(gated, [t])) for t in TEXTS[:2]]
    await eventually(lambda: batcher.waiting == 3)
    with pytest.raises(EmbedQueueFullError):
        await batcher.embed(gated, ["one too many"])
    gated.gate.set()
    assert all(len(r.vectors) == 1 for r in await asyncio.gather(first, *calls))
    batcher.close()


async def test_a_failing_forward_fails_only_the_request_at_fault(gated: GatedEmbedder) -> None:
    """A merged forward that raises is retried one request at a time: the request whose
    text fails gets the error, its batch mates their vectors."""
    batcher = EmbedBatcher(fixed(16), max_wait_s=0)
    first = await held_thread(batcher, gated)
    good = asyncio.create_task(batcher.embed(gated, [TEXTS[0]]))
    bad = asyncio.create_task(batcher.embed(gated, ["poison"]))
    await eventually(lambda: batcher.waiting == 3)
    gated.gate.set()
    await first
    assert_close(await good, alone(gated, [TEXTS[0]]))
    with pytest.raises(ValueError, match="poisoned"):
        await bad
    batcher.close()


async def test_a_failed_merged_forward_lowers_the_limit_below_its_size_class(
    gated: GatedEmbedder,
) -> None:
    """A merged forward that fails (an out-of-memory, say) marks its size class over the
    bound: the limit falls below it, so the next requests are not merged into the same
    failing size again; each is retried alone."""
    batcher = EmbedBatcher(lambda: BatchSizer(max_size=16, latency_bound_s=1000.0), max_wait_s=0)
    first = await held_thread(batcher, gated)
    good = asyncio.create_task(batcher.embed(gated, [TEXTS[0]]))
    bad = asyncio.create_task(batcher.embed(gated, ["poison"]))
    await eventually(lambda: batcher.waiting == 3)
    gated.gate.set()
    await first
    await good
    with pytest.raises(ValueError, match="poisoned"):
        await bad
    assert gated.forwards[1:] == [[TEXTS[0], "poison"], [TEXTS[0]], ["poison"]]
    sizer = batcher.sizer(MINILM)
    assert sizer.limit == 1
    assert sizer.curve()[2][0] == math.inf
    first = await held_thread(batcher, gated)
    calls = [asyncio.create_task(batcher.embed(gated, [t])) for t in TEXTS[:2]]
    await eventually(lambda: batcher.waiting == 3)
    gated.gate.set()
    await asyncio.gather(first, *calls)
    assert [len(f) for f in gated.forwards[4:]] == [1, 1, 1]  # not merged again
    batcher.close()


async def test_each_model_has_its_own_sizer(gated: GatedEmbedder, minilm: Embedder) -> None:
    """A failure that lowers one model's limit leaves another model's sizer untouched."""
    other = GatedEmbedder(minilm)
    other.name = "other-embedder"
    batcher = EmbedBatcher(lambda: BatchSizer(max_size=16, latency_bound_s=1000.0), max_wait_s=0)
    first = await held_thread(batcher, gated)
    calls = [asyncio.create_task(batcher.embed(gated, [t])) for t in (TEXTS[0], "poison")]
    await eventually(lambda: batcher.waiting == 3)
    gated.gate.set()
    await asyncio.gather(first, *calls, return_exceptions=True)
    await batcher.embed(other, [TEXTS[1]])
    assert batcher.sizer(MINILM) is not batcher.sizer(other.name)
    assert batcher.sizer(MINILM).limit == 1
    assert batcher.sizer(other.name).limit == 2  # class 1 measured, class 2 next to try
    assert sorted(batcher.sizer(other.name).curve()) == [1]
    batcher.close()


async def test_close_fails_the_running_batch_and_the_queued_requests(
    gated: GatedEmbedder,
) -> None:
    """Closing while a forward runs fails its request as well as the queued ones."""
    batcher = EmbedBatcher(fixed(16), max_wait_s=0)
    first = await held_thread(batcher, gated)
    queued = asyncio.create_task(batcher.embed(gated, [TEXTS[0]]))
    await eventually(lambda: batcher.waiting == 2)
    batcher.close()
    gated.gate.set()  # the thread's forward finishes, unread
    for call in (first, queued):
        with pytest.raises(EmbedderClosedError):
            await call
    assert batcher.waiting == 0 and batcher.queued == 0
    with pytest.raises(EmbedderClosedError):
        await batcher.embed(gated, [TEXTS[1]])


async def test_a_cancelled_request_leaves_the_queue_at_once(gated: GatedEmbedder) -> None:
    """A queued request whose caller goes away is removed from the queue (texts and all)
    as soon as it is cancelled, not when the next batch is taken."""
    batcher = EmbedBatcher(fixed(16), max_wait_s=0)
    first = await held_thread(batcher, gated)
    calls = [asyncio.create_task(batcher.embed(gated, [t])) for t in TEXTS[:2]]
    await eventually(lambda: batcher.queued == 2)
    calls[0].cancel()
    await eventually(lambda: batcher.waiting == 2)
    assert batcher.queued == 1
    gated.gate.set()
    await asyncio.gather(first, calls[1])
    assert gated.forwards[1] == [TEXTS[1]]
    batcher.close()


async def test_errors_outside_the_forward_do_not_stop_the_batcher(
    gated: GatedEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ``on_batch`` that raises is logged and the request answered; should the batching
    task die, its requests fail with the error and the next request starts a new task."""

    def broken(model: str, texts: int) -> None:
        raise RuntimeError("metrics broke")

    batcher = EmbedBatcher(fixed(16), max_wait_s=0, on_batch=broken)
    assert len((await batcher.embed(gated, [TEXTS[0]])).vectors) == 1

    def dies() -> list[object]:
        raise RuntimeError("batcher bug")

    monkeypatch.setattr(batcher, "_take", dies)
    with pytest.raises(RuntimeError, match="batcher bug"):
        await asyncio.wait_for(batcher.embed(gated, [TEXTS[1]]), 10)
    monkeypatch.undo()
    assert len((await asyncio.wait_for(batcher.embed(gated, [TEXTS[2]]), 10)).vectors) == 1
    batcher.close()


async def test_a_lone_request_after_a_burst_does_not_wait(gated: GatedEmbedder) -> None:
    """The previous batch's size is forgotten once the queue empties: with a wait of 60 s,
    a lone request after a burst of six is answered at once (well within the 10 s guard)."""
    batcher = EmbedBatcher(fixed(16), max_wait_s=60)
    first = await held_thread(batcher, gated)
    calls = [asyncio.create_task(batcher.embed(gated, [t])) for t in TEXTS]
    await eventually(lambda: batcher.waiting == len(TEXTS) + 1)
    gated.gate.set()
    await asyncio.gather(first, *calls)
    assert len(gated.forwards[1]) == len(TEXTS)
    await asyncio.wait_for(batcher.embed(gated, [TEXTS[0]]), 10)
    batcher.close()


def test_packed_matches_the_padded_forward_at_the_real_tokens(minilm: Embedder) -> None:
    """``BertEncoder.packed`` on texts of unequal lengths gives, at every real token, the
    hidden state the padded forward gives there, and the one each text gets alone (1e-5)."""
    ids, mask = minilm.tokenize(TEXTS)
    lengths = mask.sum(dim=1).tolist()
    assert len(set(lengths)) > 1  # padding is exercised
    packed = minilm.encoder.packed(ids, mask)
    padded = minilm.encoder(ids, mask)
    assert packed.shape == (sum(lengths), minilm.dimensions)
    assert (packed - padded[mask.bool()]).abs().max().item() <= TOLERANCE
    start = 0
    for row, n in enumerate(lengths):
        alone_ids = ids[row : row + 1, :n]
        own = minilm.encoder(alone_ids, mask[row : row + 1, :n])[0]
        assert (packed[start : start + n] - own).abs().max().item() <= TOLERANCE
        start += n


async def test_kernels_are_built_on_the_embedding_thread_before_the_first_forward(
    gated: GatedEmbedder,
) -> None:
    """``EmbedBatcher.warm`` queues each embedder's ``warm`` on the embedding thread, so the
    first forward runs after it, on the same thread."""
    calls: list[tuple[str, str]] = []

    class Noting(GatedEmbedder):
        def warm(self) -> int:
            calls.append(("warm", threading.current_thread().name))
            return 0

        def embed_each(
            self, texts: Sequence[str], batch_size: int | None = None
        ) -> tuple[list[list[float]], list[int]]:
            calls.append(("forward", threading.current_thread().name))
            return super().embed_each(texts, batch_size)

    noting = Noting(gated)
    batcher = EmbedBatcher(fixed(16), max_wait_s=0)
    batcher.warm([noting])
    await batcher.embed(noting, [TEXTS[0]])
    batcher.close()
    assert [c[0] for c in calls] == ["warm", "forward"]
    assert calls[0][1] == calls[1][1] != threading.current_thread().name


class CountingGate(GatedEmbedder):
    """A gated embedder that counts the forwards inside it and the intra-op threads each
    ran on."""

    def __init__(self, real: Embedder) -> None:
        super().__init__(real)
        self.inside = 0
        self.threads: list[int] = []
        self.started: list[list[str]] = []
        """Each forward's texts as it entered (before the gate)."""
        self._lock = threading.Lock()

    def embed_each(
        self, texts: Sequence[str], batch_size: int | None = None
    ) -> tuple[list[list[float]], list[int]]:
        with self._lock:
            self.inside += 1
            self.threads.append(torch.get_num_threads())
            self.started.append(list(texts))
        try:
            return super().embed_each(texts, batch_size)
        finally:
            with self._lock:
                self.inside -= 1


async def test_two_workers_run_two_forwards_at_once_and_merge_what_waits_for_them(
    gated: GatedEmbedder,
) -> None:
    """With two workers of one intra-op thread each: a second request starts on the free
    worker while the first is held; requests sent while both are held wait together and run
    as one forward once a worker frees; each answer equals the text's unbatched one, and every
    forward ran on one intra-op thread while the caller's thread kept its count."""
    counting = CountingGate(gated)
    default = torch.get_num_threads()
    batcher = EmbedBatcher(fixed(16), max_wait_s=0, workers=2, threads=1)
    counting.gate.clear()
    first = asyncio.create_task(batcher.embed(counting, ["holding one thread"]))
    await eventually(lambda: counting.inside == 1)
    second = asyncio.create_task(batcher.embed(counting, ["holding the other"]))
    await eventually(lambda: counting.inside == 2)
    calls = [asyncio.create_task(batcher.embed(counting, [t])) for t in TEXTS]
    await eventually(lambda: batcher.queued == len(TEXTS))
    counting.gate.set()
    results = await asyncio.gather(*calls)
    await asyncio.gather(first, second)
    batcher.close()
    assert [len(f) for f in counting.forwards] == [1, 1, len(TEXTS)]
    assert counting.forwards[2] == TEXTS
    for text, result in zip(TEXTS, results, strict=True):
        assert_close(result, alone(gated, [text]))
    assert counting.threads == [1, 1, 1]
    assert torch.get_num_threads() == default


async def test_a_request_has_one_slice_in_a_forward_at_a_time_and_its_vectors_in_order(
    gated: GatedEmbedder,
) -> None:
    """Two workers, a limit of two texts: a request of six runs in three slices one after
    another, never two at once (the free worker takes another caller's request instead), so
    its vectors come back in text order."""
    counting = CountingGate(gated)
    batcher = EmbedBatcher(fixed(2), max_wait_s=0, workers=2, threads=1)
    counting.gate.clear()
    bulk = asyncio.create_task(batcher.embed(counting, TEXTS))
    await eventually(lambda: counting.inside == 1)
    other = asyncio.create_task(batcher.embed(counting, ["another caller"]))
    await eventually(lambda: counting.inside == 2)
    assert counting.started == [TEXTS[0:2], ["another caller"]]  # not the bulk's next slice
    assert batcher.queued == 1  # the bulk's rest waits its turn
    counting.gate.set()
    assert_close(await bulk, alone(gated, TEXTS))
    await other
    batcher.close()
    bulk_forwards = [f for f in counting.forwards if f != ["another caller"]]
    assert bulk_forwards == [TEXTS[0:2], TEXTS[2:4], TEXTS[4:6]]


async def test_a_slice_sent_back_after_a_failed_forward_runs_with_nothing_else_queued(
    minilm: Embedder,
) -> None:
    """A merged forward of four texts fails with nothing queued behind it: the limit falls
    to two and the slice of three that went back to the queue runs without waiting for
    another call to arrive."""
    small = SmallForwardsOnly(minilm)
    batcher = EmbedBatcher(lambda: HalvingSizer(4), max_wait_s=0)
    small.gate.clear()
    first = asyncio.create_task(batcher.embed(small, ["holding"]))
    await eventually(lambda: batcher.waiting == 1 and not batcher.queued)
    merged = [asyncio.create_task(batcher.embed(small, [t])) for t in TEXTS[:1]]
    bulk = asyncio.create_task(batcher.embed(small, TEXTS[1:4]))
    await eventually(lambda: batcher.waiting == 3)
    small.gate.set()
    await first
    results = await asyncio.wait_for(asyncio.gather(*merged, bulk), 10)
    assert_close(results[-1], alone(minilm, TEXTS[1:4]))
    assert [len(f) for f in small.forwards[1:]] == [4, 1, 2, 1]
    batcher.close()


def test_a_pinned_pool_runs_its_workers_on_their_share_and_no_other_thread() -> None:
    """``pinned_pool``'s workers run torch on the count given; the caller's thread and
    threads started afterwards keep the process's count."""
    default = torch.get_num_threads()
    pool = pinned_pool(2, 1, "pinned-test")
    try:
        barrier = threading.Barrier(2, timeout=10)  # one call on each worker
        counts = list(pool.map(lambda _: (barrier.wait(), torch.get_num_threads())[1], [0, 1]))
        later: list[int] = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
    finally:
        pool.shutdown()
    assert counts == [1, 1]
    assert torch.get_num_threads() == default and later == [default]


def test_two_embedding_threads_only_on_a_cpu_node_without_a_generator() -> None:
    """``default_workers``: one beside a generator (its steps share the cores) and on CUDA;
    two on CPU otherwise, where torch has two threads."""
    assert default_workers("cpu", beside_generator=True) == 1
    assert default_workers("cuda", beside_generator=False) == 1
    assert default_workers("cpu", beside_generator=False) == min(2, torch.get_num_threads())


def test_a_node_takes_two_embedding_threads_only_without_a_generator() -> None:
    """The node's batcher (``app.embed_batcher``, as ``NodeService`` builds it from the
    models it loaded): an embedding-only CPU node gets ``default_workers``' two, one serving
    a generator beside its embedder keeps one, and a node with no embedder one, unpinned."""

    def workers(*, embedders: bool, beside_generator: bool) -> int:
        settings = NodeSettings(node_id="node-threads")
        metrics = NodeMetrics(CollectorRegistry())
        batcher = embed_batcher(
            settings, metrics, embedders=embedders, beside_generator=beside_generator
        )
        batcher.close()
        return batcher.workers

    assert workers(embedders=True, beside_generator=False) == default_workers(
        "cpu", beside_generator=False
    )
    assert workers(embedders=True, beside_generator=True) == 1
    assert workers(embedders=False, beside_generator=True) == 1


# A real node, called directly


@pytest.fixture
async def node(
    etcd: str, gated: GatedEmbedder
) -> AsyncIterator[tuple[NodeService, CollectorRegistry]]:
    registry = CollectorRegistry()
    settings = NodeSettings(
        etcd_endpoint=etcd,
        node_id="node-embed",
        models=[MINILM],
        registry_ttl_seconds=2,
        drain_grace_seconds=5,
        embed_workers=1,  # one gated thread: the calls sent while it is held wait together
    )
    service = NodeService(settings, registry, {}, {MINILM: gated})
    await service.start()
    yield service, registry
    gated.gate.set()
    await service.stop(0.5)


def embed_call(text: str) -> node_pb2.NodeEmbedRequest:
    return node_pb2.NodeEmbedRequest(
        request=inference_pb2.EmbedRequest(model=MINILM, inputs=[text]), tenant="t"
    )


async def test_the_node_merges_concurrent_embed_calls_and_counts_batch_sizes(
    node: Node, gated: GatedEmbedder
) -> None:
    """Through the node's API: Embed calls of several tenants waiting together share one
    forward (``sluice_node_embed_batch_size`` observes it), each answer equal to the text's
    unbatched vector with its own prompt tokens; one caller cancelling does not disturb the
    others."""
    service, registry = node
    service.servicer.embeds.sizers[MINILM] = FixedSizer(16)
    async with grpc.aio.insecure_channel(service.address) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        gated.gate.clear()
        gated.entered.clear()
        first = stub.Embed(embed_call("holding the thread"))
        await eventually(gated.entered.is_set)
        calls = [stub.Embed(embed_call(t)) for t in TEXTS]
        leaving = stub.Embed(embed_call("going away"))
        await eventually(lambda: service.servicer.embeds.waiting == len(TEXTS) + 2)
        leaving.cancel()
        await eventually(lambda: service.servicer.embeds.waiting == len(TEXTS) + 1)
        gated.gate.set()
        replies = [await c for c in calls]
        await first
    for text, reply in zip(TEXTS, replies, strict=True):
        want = alone(gated, [text])
        got = EmbedResult([list(e.values) for e in reply.embeddings], reply.usage.prompt_tokens)
        assert_close(got, want)
    assert gated.forwards[1] == TEXTS
    labels = {"model": MINILM}
    assert registry.get_sample_value("sluice_node_embed_batch_size_count", labels) == 2
    assert registry.get_sample_value("sluice_node_embed_batch_size_sum", labels) == 1 + len(TEXTS)
    tokens = sum(r.usage.prompt_tokens for r in replies)
    counted = registry.get_sample_value("sluice_node_prompt_tokens_total", labels)
    assert counted is not None and counted >= tokens


async def test_the_node_refuses_past_the_waiting_bound_with_retry_info(
    node: Node, gated: GatedEmbedder
) -> None:
    """Past ``max_waiting`` Embed calls the node answers RESOURCE_EXHAUSTED with RetryInfo."""
    service, _ = node
    service.servicer.embeds.max_waiting = 2
    async with grpc.aio.insecure_channel(service.address) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        gated.gate.clear()
        calls = [stub.Embed(embed_call(t)) for t in TEXTS[:2]]
        await eventually(lambda: service.servicer.embeds.waiting == 2)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Embed(embed_call("one too many"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry = unpack(details_of(err.value), error_details_pb2.RetryInfo)
        assert isinstance(retry, error_details_pb2.RetryInfo)
        assert retry.retry_delay.ToTimedelta().total_seconds() > 0
        gated.gate.set()
        for call in calls:
            assert len((await call).embeddings) == 1
