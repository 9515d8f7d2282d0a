"""The naive baseline: what a team runs before Sluice.

One process, the same model, Hugging Face ``generate`` one request at a time in arrival order,
tokens streamed as they are decoded. No batching, no priorities, no admission control: a
request waits in the queue until its turn or until its deadline passes (the client gives up,
gRPC cancels the call, and the request is skipped or, mid-generation, stopped - which is more
generous than many real servers, which keep generating for nobody).

It serves the public ``sluice.v1.Inference/Generate`` contract on loopback, so the load
generator drives it exactly as it drives Sluice. Generation runs on the main thread and
asyncio (gRPC) on a helper thread, as in a Sluice node: torch kernels are markedly slower when
driven from a non-main thread on this kind of machine, and the baseline must not be handicapped.

``python -m bench.overload.naive_server --model smollm2-135m-instruct --port 50061``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import queue
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import structlog
import torch
from prometheus_client import CollectorRegistry
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from sluice.runtime.errors import InvalidArgument
from sluice.runtime.runner import lower_cpu_priority
from sluice.runtime.server import GrpcServer, ServerOptions
from sluice.runtime.telemetry import configure_logging
from sluice.v1 import common_pb2, inference_pb2, inference_pb2_grpc

log = structlog.get_logger("naive_server")

DEFAULT_MAX_NEW_TOKENS = 128
POLL_S = 0.2  # how often an idle generation thread looks at its stop flag


@dataclass
class NaiveModel:
    """What the naive server needs: the Hugging Face causal-LM module and a tokenizer."""

    name: str
    hf_model: Any
    tokenizer: Any
    """``inference_node.models.Tokenizer``: encode, decode, apply_chat_template, eos_token_id."""
    device: torch.device
    max_context_tokens: int
    chat: bool
    eos_ids: frozenset[int]
    """Token ids that end a generation (unless the request ignores EOS)."""


def load_model(
    name: str, *, device: str = "cpu", dtype: str = "auto", cache_dir: Path | None = None
) -> NaiveModel:
    """The model Sluice nodes serve, loaded the same way (the one place that touches loading)."""
    from inference_node.models import load_language_model  # noqa: PLC0415 - torch-heavy import

    cache = cache_dir or Path.home() / ".cache" / "sluice" / "models"
    lm = load_language_model(name, device=device, dtype=dtype, cache_dir=cache)
    return NaiveModel(
        name=lm.name,
        hf_model=lm.hf_model(),
        tokenizer=lm.tokenizer,
        device=lm.device,
        max_context_tokens=lm.max_context_tokens,
        chat=lm.chat,
        eos_ids=lm.eos_token_ids,
    )


@dataclass
class Delta:
    """Tokens decoded since the last delta; the last one carries the finish reason."""

    token_ids: list[int]
    text: str = ""
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


@dataclass
class Job:
    """One queued generation and the way back to its RPC's event loop."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    ignore_eos: bool
    loop: asyncio.AbstractEventLoop
    deltas: asyncio.Queue[Delta] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, delta: Delta) -> None:
        """Hand ``delta`` to the RPC (thread-safe)."""
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            self.loop.call_soon_threadsafe(self.deltas.put_nowait, delta)


class _Cancelled(StoppingCriteria):  # type: ignore[misc]
    """Stops ``generate`` once the job's RPC is gone."""

    def __init__(self, job: Job) -> None:
        self._job = job

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        stop = self._job.cancelled.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _Streamer(BaseStreamer):  # type: ignore[misc]
    """Sends each decoded token (and its new text) to the job as ``generate`` produces it."""

    def __init__(self, job: Job, tokenizer: Any, eos_ids: frozenset[int]) -> None:
        self._job = job
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._prompt_seen = False
        self.tokens: list[int] = []
        self.saw_eos = False
        self._text = ""

    def put(self, value: torch.Tensor) -> None:
        """The first call carries the prompt; every later one the next token."""
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        new = [int(t) for t in value.reshape(-1).tolist()]
        if not self._job.ignore_eos:
            ends = [i for i, token in enumerate(new) if token in self._eos_ids]
            if ends:
                new = new[: ends[0]]
                self.saw_eos = True
        if not new:
            return
        self.tokens.extend(new)
        text = self._tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
            self._job.send(Delta(new))
            return
        self._job.send(Delta(new, text[len(self._text) :]))
        self._text = text

    def end(self) -> None:
        """Nothing to flush: the final delta is sent by the worker."""


class SerialGenerator:
    """Runs queued jobs one at a time, in arrival order, with Hugging Face ``generate``."""

    def __init__(self, model: NaiveModel) -> None:
        self.model = model
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._closed = threading.Event()
        self._eos = sorted(model.eos_ids)
        self._pad = self._eos[0] if self._eos else 0

    def submit(self, job: Job) -> None:
        """Queue ``job`` behind every job already waiting (no limit, no priority)."""
        self._jobs.put(job)

    def waiting(self) -> int:
        """Jobs queued and not started."""
        return self._jobs.qsize()

    def serve(self) -> None:
        """Run jobs on this thread until :meth:`close`."""
        while not self._closed.is_set():
            try:
                job = self._jobs.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if job is None:
                break
            if job.cancelled.is_set():
                continue  # its deadline passed while it waited
            try:
                self._run(job)
            except Exception as exc:  # the RPC reports it; the server keeps serving
                log.exception("naive_generate_failed")
                job.send(Delta([], error=f"{type(exc).__name__}: {exc}"))

    def start(self) -> threading.Thread:
        """Serve on a thread of its own (tests); production serves on the main thread."""
        thread = threading.Thread(target=self.serve, name="naive-generate", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop after the current job; queued jobs are dropped."""
        self._closed.set()
        self._jobs.put(None)

    def warm_up(self) -> None:
        """One tiny generation before serving, so the first request does not pay for it."""
        ids = [int(i) for i in self.model.tokenizer.encode("Hello")] or [0]
        tensor = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        with torch.inference_mode():
            self.model.hf_model.generate(
                input_ids=tensor,
                attention_mask=torch.ones_like(tensor),
                max_new_tokens=2,
                do_sample=False,
                pad_token_id=self._pad,
            )

    def _run(self, job: Job) -> None:
        model = self.model
        streamer = _Streamer(job, model.tokenizer, model.eos_ids)
        ids = torch.tensor([job.prompt_ids], dtype=torch.long, device=model.device)
        sampling: dict[str, Any] = {"do_sample": False}
        if job.temperature > 0:
            sampling = {"do_sample": True, "temperature": job.temperature, "top_p": job.top_p}
            if job.seed is not None:
                torch.manual_seed(job.seed)
        if job.ignore_eos:
            sampling["min_new_tokens"] = job.max_new_tokens
        with torch.inference_mode():
            model.hf_model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=job.max_new_tokens,
                eos_token_id=self._eos or None,
                pad_token_id=self._pad,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_Cancelled(job)]),
                **sampling,
            )
        if job.cancelled.is_set():
            finish = common_pb2.FINISH_REASON_CANCELLED
        elif streamer.saw_eos:
            finish = common_pb2.FINISH_REASON_EOS
        else:
            finish = common_pb2.FINISH_REASON_LENGTH
        job.send(
            Delta(
                [],
                finish_reason=finish,
                prompt_tokens=len(job.prompt_ids),
                completion_tokens=len(streamer.tokens),
            )
        )


class NaiveInferenceServicer(inference_pb2_grpc.InferenceServicer):
    """``Inference/Generate`` over a :class:`SerialGenerator`; ``Embed`` stays unimplemented."""

    def __init__(self, generator: SerialGenerator, node_id: str = "naive") -> None:
        self._generator = generator
        self._node_id = node_id

    def _prompt_ids(self, req: inference_pb2.GenerateRequest) -> list[int]:
        model = self._generator.model
        if req.model != model.name:
            raise InvalidArgument([("model", f"this server serves only {model.name!r}")])
        if bool(req.prompt) == bool(req.messages):
            raise InvalidArgument([("prompt", "set exactly one of prompt or messages")])
        if req.options.stop:
            raise InvalidArgument([("options.stop", "stop strings are not supported here")])
        if req.messages:
            if not model.chat:
                raise InvalidArgument([("messages", "this model has no chat template")])
            ids = model.tokenizer.apply_chat_template([(m.role, m.content) for m in req.messages])
        else:
            ids = model.tokenizer.encode(req.prompt)
        return [int(i) for i in ids]

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        prompt_ids = self._prompt_ids(request)
        opts = request.options
        max_new = opts.max_new_tokens if opts.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
        limit = self._generator.model.max_context_tokens
        if max_new < 1 or len(prompt_ids) + max_new > limit:
            raise InvalidArgument(
                [("options.max_new_tokens", f"prompt plus max_new_tokens must fit in {limit}")]
            )
        job = Job(
            prompt_ids=prompt_ids,
            max_new_tokens=max_new,
            temperature=opts.temperature if opts.HasField("temperature") else 0.0,
            top_p=opts.top_p if opts.HasField("top_p") else 1.0,
            seed=opts.seed if opts.HasField("seed") else None,
            ignore_eos=opts.ignore_eos,
            loop=asyncio.get_running_loop(),
        )
        self._generator.submit(job)
        first = True
        try:
            while True:
                delta = await job.deltas.get()
                if delta.error:
                    await context.abort(grpc.StatusCode.INTERNAL, "generation failed")
                chunk = inference_pb2.GenerateChunk(text=delta.text, token_ids=delta.token_ids)
                if first or delta.finish_reason:
                    chunk.node_id = self._node_id
                    first = False
                if delta.finish_reason:
                    chunk.finish_reason = delta.finish_reason  # type: ignore[assignment]
                    chunk.usage.prompt_tokens = delta.prompt_tokens
                    chunk.usage.completion_tokens = delta.completion_tokens
                    yield chunk
                    return
                yield chunk
        finally:
            job.cancelled.set()  # deadline passed or client gone: skip or stop the job


async def start_server(
    generator: SerialGenerator, host: str = "127.0.0.1", port: int = 0
) -> GrpcServer:
    """The gRPC server (health, reflection, the shared interceptors) serving ``generator``."""
    server = GrpcServer("naive_server", ServerOptions(host=host, port=port), CollectorRegistry())
    server.add(
        inference_pb2_grpc.add_InferenceServicer_to_server,
        NaiveInferenceServicer(generator),
        "sluice.v1.Inference",
    )
    await server.start()
    return server


def _serve_until_stopped(
    generator: SerialGenerator,
    host: str,
    port: int,
    stop_requested: threading.Event,
    failed: threading.Event,
) -> Callable[[], None]:
    """The helper thread's body: serve gRPC until ``stop_requested``, then close ``generator``.

    A server that fails (to bind, say) sets ``failed`` and closes ``generator`` all the same.
    """

    async def serve() -> None:
        server = await start_server(generator, host, port)
        log.info("service_ready", service="naive_server", address=server.address)
        await asyncio.to_thread(stop_requested.wait)  # set by the main thread's signal handler
        await server.stop(1.0)

    def run() -> None:
        try:
            asyncio.run(serve())
        except Exception:
            log.exception("naive_server_failed")
            failed.set()
        finally:
            generator.close()

    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Load the model, serve until SIGTERM/SIGINT, then exit."""
    p = argparse.ArgumentParser(prog="python -m bench.overload.naive_server", description=__doc__)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50061)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="as the node's --dtype (auto: what a node picks on this machine)",
    )
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    p.add_argument(
        "--cpu-nice",
        type=int,
        choices=range(20),
        default=0,
        metavar="0-19",
        help="nice increment applied at start",
    )
    args = p.parse_args(argv)
    configure_logging(args.log_format)
    if args.cpu_nice:  # as a Sluice node does: before torch starts its threads
        log.info("cpu_priority_lowered", nice=lower_cpu_priority(args.cpu_nice))
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop_requested.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    started = time.monotonic()
    generator = SerialGenerator(
        load_model(args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    )
    generator.warm_up()
    log.info("model_ready", model=args.model, seconds=round(time.monotonic() - started, 2))
    failed = threading.Event()
    helper = threading.Thread(
        target=_serve_until_stopped(generator, args.host, args.port, stop_requested, failed),
        name="asyncio",
        daemon=True,
    )
    helper.start()
    generator.serve()  # main thread, until the helper closes it
    helper.join()
    return 1 if failed.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())
