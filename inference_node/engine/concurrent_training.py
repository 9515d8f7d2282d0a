"""A fine-tune on a thread and CUDA stream of its own, beside the engine's decode.

On a GPU the built-in engine is launch-bound: the GPU idles while the engine thread issues a
decode step, and time-slicing training into the engine thread's gaps holds it to a sixth of
the node (docs/decisions/node-training-gpu-check.md). With ``GapConfig.concurrent`` the
:class:`~inference_node.engine.gap_training.GapTrainer` hands its run to a
:class:`ConcurrentTraining` instead: a thread that runs the run's units one after another on
a stream of the lowest priority, while the engine thread decodes on one of the highest
(:func:`use_decode_stream`). While the engine has sequences running or requests waiting,
the thread sleeps after each unit so that it is busy at most ``GapConfig.duty`` of its time
(it shares the GIL with the engine thread, whose decode step is mostly Python issuing
kernels); while the engine is idle it trains back to back. Measured on an H200
(docs/decisions/node-training-own-stream.md): decode stretched 1.04x (p50) / 1.15x (p99) at
duty 0.5 with training at 0.37x of its speed alone while decoding flat out.

The thread honours the run's other holds as the engine-thread path does: it waits (polling
every ``poll_s``) while the engine's sequences do not leave the run's reserved slots
free, and while its listener has not taken its events. The engine thread tells it what it
has (:meth:`ConcurrentTraining.engine_state`) after each of its steps.

On a CPU the two threads would only split the cores: nodes train there in the engine
thread's gaps (``training_concurrency: auto``), and this path runs only when asked for.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import structlog
import torch

if TYPE_CHECKING:  # that module hands its runs to this one
    from inference_node.engine.gap_training import TrainingRun

log = structlog.get_logger(__name__)


def _stream(device: torch.device, highest: bool) -> torch.cuda.Stream | None:
    """A new CUDA stream on ``device`` of its highest or lowest priority (``None`` off CUDA).
    CUDA's default streams have the lowest priority, so only decode raised above them is
    favoured."""
    if device.type != "cuda":
        return None
    # (least, greatest); the stub declares it an instance method, it is static
    lowest, high = torch.cuda.Stream.priority_range()  # type: ignore[call-arg]
    return torch.cuda.Stream(device, priority=high if highest else lowest)  # type: ignore[no-untyped-call]


def training_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A lowest-priority CUDA stream on ``device`` for training (``None`` off CUDA)."""
    return _stream(device, highest=False)


def use_decode_stream(device: torch.device) -> None:
    """Make the calling (engine) thread issue its kernels on a highest-priority stream of
    ``device`` from now on, after the work already queued (its model and caches) is done.
    A no-op off CUDA."""
    stream = _stream(device, highest=True)
    if stream is not None:
        torch.cuda.synchronize(device)
        torch.cuda.set_stream(stream)


@contextlib.contextmanager
def _on(stream: torch.cuda.Stream | None, device: torch.device) -> Iterator[None]:
    """Issue on ``stream`` after all work queued on ``device`` (the trainer was built on other
    threads' streams); drained at the end, so nothing of the run's is in flight after it."""
    if stream is None:
        yield
        return
    torch.cuda.synchronize(device)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        stream.synchronize()


class ConcurrentTraining:
    """Runs one :class:`TrainingRun` to its end on a thread of its own (module doc)."""

    def __init__(
        self,
        run: TrainingRun,
        *,
        stream: torch.cuda.Stream | None,
        device: torch.device,
        duty: float,
        on_unit: Callable[[str, float], None],
        end: Callable[[TrainingRun, BaseException | None], None],
        poll_s: float,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not 0 < duty <= 1:
            raise ValueError(f"duty must be in (0, 1], got {duty}")
        self.run = run
        self._stream = stream
        self._device = device
        self._duty = duty
        self._on_unit = on_unit
        self._end = end
        self._poll_s = poll_s
        self._clock = clock
        # waiting, running, memory_free, replaced whole; held until the engine first tells
        self._state = (0, 0, False)
        self._closing: BaseException | None = None
        self._wake = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"training-{run.model}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def engine_state(self, *, waiting: int, running: int, memory_free: bool) -> None:
        """What the engine has now (engine thread): requests ``waiting`` to be admitted,
        sequences ``running``, and whether they leave the run's reserved slots free."""
        self._state = (waiting, running, memory_free)

    def wake(self) -> None:
        """Look at the run now (a stop was requested)."""
        self._wake.set()

    def stop(self, error: BaseException) -> None:
        """The engine closes: end the run with ``error`` after the unit in flight."""
        self._closing = error
        self._wake.set()

    def join(self, timeout_s: float) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _pause(self, seconds: float) -> None:
        if seconds > 0 and self._wake.wait(seconds):
            self._wake.clear()

    def _loop(self) -> None:
        run = self.run
        run.started = self._clock()
        try:
            with _on(self._stream, self._device):
                error = self._train(run)
        except Exception as exc:  # building a stream, or a bug below
            log.exception("training_thread_failed", model=run.model, step=run.trainer.step)
            error = exc
        self._end(run, error)

    def _train(self, run: TrainingRun) -> BaseException | None:
        """Run units until the run ends; returns why it stopped (``None``: every step ran)."""
        while True:
            if self._closing is not None:
                return self._closing
            if run.stop_reason is not None:
                return run.stopped()
            try:
                work = run.next_work()
            except Exception as exc:  # building the next micro-batch failed
                log.exception("training_unit_failed", model=run.model, step=run.trainer.step)
                return exc
            if work is None:
                return None
            waiting, running, memory_free = self._state
            if not memory_free or run.backlogged:
                self._pause(self._poll_s)
                continue
            started = self._clock()
            try:
                finished = run.run_next()
            except Exception as exc:
                log.exception("training_unit_failed", model=run.model, step=run.trainer.step)
                return exc
            spent = self._clock() - started
            self._on_unit(work[0], spent)
            if finished:
                return None
            if waiting or running:  # inference is on: at most ``duty`` of the time
                self._pause(spent * (1 - self._duty) / self._duty)
