"""Dynamic batching of ``Embed`` calls: concurrent requests, of any tenants, merged into one
forward on one of the node's embedding threads, then split back per request.

:class:`~inference_node.embed_sizer.BatchSizer` (synchronous, no I/O) chooses how many texts
a forward may take from the latency curve the node measures as it runs. :class:`EmbedBatcher`
owns the queue and the threads: it takes the waiting requests of one model in arrival order up
to the sizer's limit, runs them as one forward (``Embedder.embed_each``) and hands each
request its own vectors and prompt tokens. A text's vector does not depend on its batch mates
(padding is masked), so a batched answer equals the one-at-a-time answer within float
rounding.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import structlog

from inference_node.embed_sizer import BatchSizer
from inference_node.model_types import Embedder
from inference_node.torch_threads import pinned_pool
from sluice.runtime.waits import wait_event

log = structlog.get_logger(__name__)


CHARS_PER_TOKEN_CAP = 8
"""A text counts at most this many characters per token the embedder keeps: the rest of a
longer one is truncated away and costs nothing."""
MAX_PASSED_OVER = 4
"""Forwards a lower-class text too long for the time allowed may be passed over for
REALTIME texts before it goes beside them all the same."""
MAX_EMBEDS_WAITING = 64
"""Embed calls queued for the embedding threads at most; more are refused OVERLOADED (the
scheduler admits no more than a node's slots, so only a caller around it reaches this)."""


class EmbedQueueFullError(Exception):
    """As many requests as the bound already wait for the embedding threads."""


class EmbedderClosedError(Exception):
    """The batcher was closed before the request ran."""


@dataclass
class EmbedResult:
    """One request's share of a forward."""

    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(eq=False, repr=False)
class _Waiting:
    embedder: Embedder
    texts: list[str]
    future: asyncio.Future[EmbedResult]
    rank: int = 0
    """Its workload class's rank (0: REALTIME): lower ranks are taken first."""
    seq: int = 0
    """Arrival order."""
    queued_at: float = field(default_factory=time.monotonic)
    passed_over: int = 0
    """Forwards that left its next text out for being too long beside others."""
    taken: int = 0
    """Texts handed to forwards so far: a request larger than a forward's room is taken in
    slices, one forward after another."""
    vectors: list[list[float]] = field(default_factory=list)
    tokens: int = 0

    @property
    def left(self) -> int:
        """Texts not yet handed to a forward."""
        return len(self.texts) - self.taken


@dataclass(frozen=True)
class _Slice:
    """Texts ``start:end`` of a request, in one forward."""

    item: _Waiting
    start: int
    end: int


class EmbedBatcher:
    """The embedding threads and the requests waiting for them.

    :meth:`embed` queues a request and waits for its result. One task takes batches for
    ``workers`` threads (each running torch on ``threads`` intra-op threads, ``None``: the
    process's count; :func:`~inference_node.torch_threads.pinned_pool`), so that up to that
    many forwards run at once: when a thread is free it waits at most ``max_wait_s`` for as
    many texts of the head request's model as that model's previous batch had (capped by its
    sizer's limit), then fills one forward of at most the limit's texts from the waiting
    requests of that model. The head
    is the waiting request of the highest class (lowest rank), the earliest among them, and
    the forward is filled in that order too: a request with more texts than the room left is
    taken in slices, its next slice in a later forward, so a REALTIME request waits for at most
    one forward of the limit's size whatever lower-class requests hold. With
    ``lower_forward_s``, lower-class texts fill a forward only as far as they take that long
    at the pace the model's sizer measured (at least one text, when they are all it holds or
    one was passed over :data:`MAX_PASSED_OVER` times; a text counts no more characters than
    the embedder keeps of it): a
    REALTIME request arriving behind them waits about that long, not the limit's latency
    bound, and its own forward is not stretched by them past it. The previous
    sizes are forgotten whenever the queue empties with no forward running, so a request
    that arrives at an idle node never waits. Each model has its own :class:`BatchSizer`
    (``new_sizer()``, made on its first request), so one model's latency never caps
    another's batches.

    A request whose caller goes away before its batch runs leaves the queue at once; one that
    goes away while its batch runs leaves its result unread, and the others are unaffected. A
    merged forward that fails marks its size class as over the bound in the model's sizer
    (an out-of-memory at N texts is not tried again soon) and is retried one request at a
    time, so only the request at fault fails. ``on_batch(model, texts)`` is told each
    forward's size (metrics); an error there, or in the sizer, is logged and the batch is
    answered all the same. Should the batching task die all the same, its requests fail with
    the error and the next request starts a new task; a forward that dies of a bug fails
    its own requests.
    """

    def __init__(
        self,
        new_sizer: Callable[[], BatchSizer],
        *,
        max_wait_s: float,
        max_waiting: int = MAX_EMBEDS_WAITING,
        on_batch: Callable[[str, int], None] = lambda model, texts: None,
        lower_forward_s: float | None = None,
        workers: int = 1,
        threads: int | None = None,
    ) -> None:
        self.new_sizer = new_sizer
        self.lower_forward_s = lower_forward_s
        self.sizers: dict[str, BatchSizer] = {}
        """Model name → its sizer."""
        self.max_wait_s = max_wait_s
        self.max_waiting = max_waiting
        self._on_batch = on_batch
        self.workers = workers
        self._pool = pinned_pool(workers, threads, "embed")
        self._warming: list[Future[None]] = []
        self._queue: deque[_Waiting] = deque()
        self._forwards: dict[asyncio.Task[None], list[_Waiting]] = {}
        """Forwards running, each with the requests it holds."""
        self._arrivals = itertools.count()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._previous_texts: dict[str, int] = {}
        self.waiting = 0
        """Requests queued or running (the bound counts these)."""
        self._closed = False

    def warm(self, embedders: Iterable[Embedder]) -> None:
        """Queue each embedder's kernel builds (:meth:`Embedder.warm`) on the embedding threads,
        ahead of any forward: a forward of a new row count would otherwise build its kernels
        while it runs, and the sizer would read that as the size's cost. Nothing once closed."""
        if self._closed:
            return
        self._warming += [self._pool.submit(_warm, embedder) for embedder in embedders]

    def sizer(self, model: str) -> BatchSizer:
        """``model``'s sizer, made on first use."""
        sizer = self.sizers.get(model)
        if sizer is None:
            sizer = self.sizers[model] = self.new_sizer()
        return sizer

    @property
    def queued(self) -> int:
        """Requests queued, not yet running."""
        return len(self._queue)

    async def embed(self, embedder: Embedder, texts: Sequence[str], rank: int = 0) -> EmbedResult:
        """``texts``' vectors and prompt tokens, computed in some batches; ``rank``: the
        request's class rank (0 = REALTIME, taken first). Raises :class:`EmbedQueueFullError`
        at once past ``max_waiting``, :class:`EmbedderClosedError` once closed."""
        if self._closed:
            raise EmbedderClosedError("the embedding thread is closed")
        if self.waiting >= self.max_waiting:
            raise EmbedQueueFullError(f"{self.waiting} embeddings already wait on this node")
        loop = asyncio.get_running_loop()
        item = _Waiting(embedder, list(texts), loop.create_future(), rank, next(self._arrivals))
        self._queue.append(item)
        self._changed.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="embed-batcher")
            self._task.add_done_callback(self._stopped)
        self.waiting += 1
        try:
            return await item.future
        finally:
            self.waiting -= 1
            if not item.future.done():  # the caller went away first
                item.future.cancel()
            if item in self._queue:  # (not taken yet; a failed deque.remove formats the item)
                self._queue.remove(item)

    async def _run(self) -> None:
        while self._warming:  # kernels first: a forward would build them while it runs
            await asyncio.wrap_future(self._warming.pop())
        while True:
            takeable = self._takeable()
            if not takeable:
                self._forget_if_idle()
                self._changed.clear()
                await self._changed.wait()  # an arrival, or a forward's end
                continue
            if len(self._forwards) >= self.workers:
                await asyncio.wait(self._forwards, return_when=asyncio.FIRST_COMPLETED)
                continue
            await self._fill(min(takeable, key=_order).embedder)
            batch = self._take()
            if batch:
                task = asyncio.create_task(self._forward(batch), name="embed-forward")
                self._forwards[task] = [piece.item for piece in batch]
                task.add_done_callback(self._forward_done)

    def _forward_done(self, task: asyncio.Task[None]) -> None:
        """A forward ended: its requests are answered, or (a bug, or closed) fail with its
        error; their next slices may now be taken."""
        items = self._forwards.pop(task, [])
        self._changed.set()
        self._forget_if_idle()
        if task.cancelled():
            exc: BaseException = EmbedderClosedError("the embedding thread was stopped")
        elif (error := task.exception()) is not None:
            log.error("embed_forward_died", error=repr(error), exc_info=error)
            exc = error
        else:
            return
        for item in items:
            _settle(item.future, exc)

    def _forget_if_idle(self) -> None:
        """With nothing queued and no forward running, forget the previous batch sizes: a
        request arriving now never waits."""
        if not self._queue and not self._forwards:
            self._previous_texts.clear()

    async def _fill(self, embedder: Embedder) -> None:
        """Wait, at most ``max_wait_s``, until as many texts of ``embedder`` wait as its
        previous batch had (no more than its limit)."""
        target = min(self.sizer(embedder.name).limit, self._previous_texts.get(embedder.name, 1))
        deadline = time.monotonic() + self.max_wait_s
        while sum(w.left for w in self._takeable() if w.embedder is embedder) < target:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._changed.clear()
            await wait_event(self._changed, left)

    def _takeable(self) -> list[_Waiting]:
        """Queued requests a forward may take texts of now: not settled, and none of their
        texts in a forward running (a request's slices run one after another, so its vectors
        come back in order and a failed slice is always its latest)."""
        busy = {item for items in self._forwards.values() for item in items}
        return [w for w in self._queue if not w.future.done() and w not in busy]

    def _take(self) -> list[_Slice]:
        """One forward's texts, at most the head's model's limit: the waiting requests of
        that model in class then arrival order, the last one sliced to the room left;
        requests whose callers left are dropped, requests fully taken leave the queue; a
        request with a slice in a running forward waits for it (:meth:`_takeable`)."""
        live = sorted(self._takeable(), key=_order)
        if not live:
            self._queue = deque(w for w in self._queue if not w.future.done())
            return []
        head = live[0]
        sizer = self.sizer(head.embedder.name)
        room, lower_chars = sizer.limit, sizer.chars_within(self.lower_forward_s)
        batch: list[_Slice] = []
        for item in live:
            if room <= 0:
                break
            if item.embedder is head.embedder:
                count = min(item.left, room)
                if item.rank > 0:  # lower class: as far as its characters fit
                    first = not batch or item.passed_over >= MAX_PASSED_OVER
                    count, chars = _fitting(item, count, lower_chars, first)
                    if count == 0:
                        item.passed_over += 1
                        break
                    item.passed_over = 0
                    lower_chars -= chars
                batch.append(_Slice(item, item.taken, item.taken + count))
                item.taken += count
                room -= count
        self._queue = deque(w for w in self._queue if not w.future.done() and w.left > 0)
        return batch

    async def _forward(self, batch: list[_Slice]) -> None:
        """Run ``batch`` as one forward and hand each request its share; a request is
        answered once its last slice ran (its slices run one after another)."""
        embedder = batch[0].item.embedder
        sizer = self.sizer(embedder.name)
        texts = [t for piece in batch for t in piece.item.texts[piece.start : piece.end]]
        chunk = max(sizer.max_size, embedder.batch_size)
        loop = asyncio.get_running_loop()
        try:
            vectors, tokens, seconds = await loop.run_in_executor(
                self._pool, _timed_forward, embedder, texts, chunk
            )
        except Exception as exc:
            if 1 < len(texts) <= chunk:  # one forward of several texts: its size is over the bound
                try:
                    sizer.failed(len(texts))
                except Exception:
                    log.exception("embed_batch_sizer_failed", model=embedder.name)
            if len(batch) == 1:
                _settle(batch[0].item.future, exc)
                return
            log.warning(
                "embed_batch_failed",
                model=embedder.name,
                requests=len(batch),
                texts=len(texts),
                error=repr(exc),
            )
            await self._retry_alone(batch, sizer.limit)
            return
        try:
            chars = sum(_chars(embedder, t) for t in texts)
            self._measured(embedder.name, sizer, (len(texts), chars), seconds, chunk)
        except Exception:  # bookkeeping only: the vectors are good
            log.exception("embed_batch_bookkeeping_failed", model=embedder.name)
        start = 0
        for piece in batch:
            item, end = piece.item, start + piece.end - piece.start
            item.vectors.extend(vectors[start:end])
            item.tokens += sum(tokens[start:end])
            if len(item.vectors) == len(item.texts) and not item.future.done():
                item.future.set_result(EmbedResult(item.vectors, item.tokens))
            start = end

    async def _retry_alone(self, batch: list[_Slice], limit: int) -> None:
        """After a merged forward failed: each slice again on its own, so only the request at
        fault fails; a slice larger than the (lowered) ``limit`` goes back to the queue, to be
        taken again in slices that fit it (it is always its request's latest slice: a request
        has one slice in a forward at a time), once this forward's task ends."""
        for piece in batch:
            item = piece.item
            if item.future.done():
                continue
            if piece.end - piece.start > limit:
                item.taken = piece.start
                if item not in self._queue:
                    self._queue.appendleft(item)
            else:
                await self._forward([piece])

    def _measured(
        self, model: str, sizer: BatchSizer, size: tuple[int, int], seconds: float, chunk: int
    ) -> None:
        """A forward of ``size`` (texts, characters) of ``model`` took ``seconds``: the sizer,
        the previous size and ``on_batch`` are told."""
        texts, chars = size
        self._previous_texts[model] = texts
        if texts <= chunk:  # one forward: a point of the curve
            limit = sizer.limit
            sizer.record(texts, seconds, chars)
            if sizer.limit != limit:
                log.info(
                    "embed_batch_limit_changed",
                    model=model,
                    limit=sizer.limit,
                    texts=texts,
                    seconds=round(seconds, 4),
                )
        self._on_batch(model, texts)

    def _stopped(self, task: asyncio.Task[None]) -> None:
        """The batching task ended: closed, or died of a bug. The requests it held fail (with
        the bug's error), and the next request starts a new task."""
        if self._task is not task:  # a new task took over its queue
            return
        self._task = None
        if task.cancelled():
            self._fail_all(EmbedderClosedError("the embedding thread was stopped"))
            return
        exc = task.exception()
        if exc is not None:
            log.error("embed_batcher_died", error=repr(exc), exc_info=exc)
            self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for item in [*itertools.chain(*self._forwards.values()), *self._queue]:
            _settle(item.future, exc)
        self._queue.clear()

    def close(self) -> None:
        """Fail every request queued or running and stop the thread (a forward already on
        the thread finishes there, its result unread)."""
        self._closed = True
        self._fail_all(EmbedderClosedError("the embedding thread is closed"))
        if self._task is not None:
            self._task.cancel()
        for task in list(self._forwards):
            task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _warm(embedder: Embedder) -> None:
    started = time.perf_counter()
    try:
        products = embedder.warm()
    except Exception:  # a cold kernel is slow, not wrong: forwards build their own
        log.exception("embedder_warm_failed", model=embedder.name)
        return
    if products:
        seconds = round(time.perf_counter() - started, 2)
        log.info("embedder_warmed", model=embedder.name, products=products, seconds=seconds)


def _timed_forward(
    embedder: Embedder, texts: list[str], chunk: int
) -> tuple[list[list[float]], list[int], float]:
    """On the embedding thread: the batch's vectors, tokens per text and seconds taken (in
    forwards of ``chunk`` texts at most: one, unless a single request has more)."""
    began = time.perf_counter()
    vectors, tokens = embedder.embed_each(texts, batch_size=chunk)
    return vectors, tokens, time.perf_counter() - began


def _fitting(item: _Waiting, count: int, chars: float, first: bool) -> tuple[int, int]:
    """How many of ``item``'s next ``count`` texts fit in ``chars`` characters (at least one
    with ``first``: the forward would hold nothing else, or it was passed over enough), and
    their characters."""
    taken = used = 0
    for text in item.texts[item.taken : item.taken + count]:
        size = _chars(item.embedder, text)
        if used + size > chars and not (first and taken == 0):
            break
        taken, used = taken + 1, used + size
    return taken, used


def _chars(embedder: Embedder, text: str) -> int:
    """The characters of ``text`` a forward pays for (:data:`CHARS_PER_TOKEN_CAP`)."""
    return min(len(text), CHARS_PER_TOKEN_CAP * embedder.max_tokens)


def _order(item: _Waiting) -> tuple[int, int]:
    """Service order: class rank, then arrival."""
    return item.rank, item.seq


def _settle(future: asyncio.Future[EmbedResult], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
