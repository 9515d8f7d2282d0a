"""Open-loop load generation: :func:`run_load` drives a scenario against a target.

Each tenant of the scenario (:mod:`bench.load.scenario`) sends Poisson arrivals for the
scenario's window, whether or not earlier requests have been answered (open loop: a slow server
faces a growing backlog, as in production). Every request is streamed and recorded
(:class:`bench.load.records.RequestRecord`): scheduled and actual send time, time to first token,
mean time per output token, end-to-end latency, tokens, final status code and details. An embed
tenant's requests are unary Embed calls: the answer's latency is both their TTFT and their
end-to-end latency, with no output tokens.

The run is bounded: at most ``max_requests`` launches, arrivals stop at the end of the window,
and requests still running ``drain_s`` later are cancelled and recorded as ``cut_off``. Every
planned request ends up in exactly one record (``ok``, ``refused``, ``timed_out``, ``error`` or
``cut_off``); :func:`run_load` checks this before returning.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bench.load.records import (
    OUTCOME_CUT_OFF,
    OUTCOME_ERROR,
    OUTCOME_OK,
    OUTCOME_REFUSED,
    OUTCOME_TIMED_OUT,
    OUTCOMES,
    SLO,
    RequestRecord,
    headline_fairness,
    summarize,
    tenant_fairness,
)
from bench.load.scenario import PlannedRequest, Scenario, ScenarioError, plan_requests
from bench.load.targets import (
    TARGETS,
    GenerationSettings,
    NaiveTarget,
    SluiceTarget,
    Target,
    TargetError,
)
from sluice.runtime.runner import run_loop
from sluice.v1 import common_pb2

T = TypeVar("T")

NOT_SENT = "NOT_SENT"
CLIENT_ERROR = "CLIENT_ERROR"  # the load generator itself failed on this request
INCOMPLETE_STREAM = "INCOMPLETE_STREAM"  # status OK, but no (or a CANCELLED) final chunk
INCOMPLETE_ANSWER = "INCOMPLETE_ANSWER"  # an Embed answered OK, but not one vector per text
ProgressFn = Callable[[int, int, int], None]  # (launched, done, planned)


@dataclass
class _Progress:
    """What one request has seen so far; turned into a record however it ends."""

    sent_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    tokens: int = 0
    usage_tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str = ""
    ended_s: float | None = None


@dataclass
class LoadResult:
    """A finished run: the records (one per planned request, in plan order) and its facts."""

    scenario: Scenario
    target: str
    records: list[RequestRecord]
    duration_s: float
    elapsed_s: float
    offered_rps: float
    started_at_unix_s: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def slo(self) -> SLO:
        """The scenario's SLO."""
        spec = self.scenario.slo
        return SLO(spec.ttft_s, spec.tpot_s, spec.embed_s)

    def weights(self) -> dict[str, float]:
        """Tenant → weight."""
        return {t.name: t.weight for t in self.scenario.tenants}

    def summary(self, records: Sequence[RequestRecord] | None = None) -> dict[str, Any]:
        """:func:`bench.load.records.summarize` of ``records`` (default: all of them)."""
        chosen = self.records if records is None else records
        return summarize(chosen, duration_s=self.duration_s, elapsed_s=self.elapsed_s, slo=self.slo)

    def report(self, *, with_requests: bool = True) -> dict[str, Any]:
        """The run as JSON: facts, summaries (all, per tenant, per class), fairness, records."""
        by_class = tenant_fairness(self.records, self.weights())
        tenants = {}
        for tenant in self.scenario.tenants:
            group = [r for r in self.records if r.tenant == tenant.name]
            tenants[tenant.name] = {
                "class": tenant.workload_class,
                "kind": tenant.kind,
                "model": self.scenario.model_for(tenant),
                "weight": tenant.weight,
                "offered_rps": self.offered_rps * tenant.rate_rps / self.scenario.total_rps,
                **self.summary(group),
            }
        classes = {
            c: self.summary([r for r in self.records if r.workload_class == c])
            for c in sorted({r.workload_class for r in self.records})
        }
        report: dict[str, Any] = {
            "scenario": self.scenario.name,
            "target": self.target,
            "model": self.scenario.model,
            "models": list(self.scenario.models()),
            "offered_rps": self.offered_rps,
            "duration_s": self.duration_s,
            "elapsed_s": self.elapsed_s,
            "started_at_unix_s": self.started_at_unix_s,
            "seed": self.scenario.seed,
            "slo": {
                "ttft_s": self.slo.ttft_s,
                "tpot_s": self.slo.tpot_s,
                "embed_s": self.slo.embed_s,
            },
            "all": self.summary(),
            "tenants": tenants,
            "classes": classes,
            "fairness_jain": headline_fairness(by_class),
            "fairness_jain_by_class": by_class,
            "accounting": accounting(self.records),
            **self.meta,
        }
        if with_requests:
            report["requests"] = [r.to_json() for r in self.records]
        return report


def accounting(records: Sequence[RequestRecord]) -> dict[str, int]:
    """Requests per outcome, plus ``planned`` (their sum: nothing is left out)."""
    counts = {o: sum(r.outcome == o for r in records) for o in OUTCOMES}
    return {"planned": len(records), **counts}


def _outcome(code: str) -> str:
    if code == "RESOURCE_EXHAUSTED":
        return OUTCOME_REFUSED
    if code == "DEADLINE_EXCEEDED":
        return OUTCOME_TIMED_OUT
    return OUTCOME_ERROR


def _record(
    request: PlannedRequest,
    progress: _Progress,
    *,
    status: str,
    outcome: str,
    error: TargetError | None = None,
    details: str = "",
) -> RequestRecord:
    sent, first, last = progress.sent_s, progress.first_token_s, progress.last_token_s
    ended = progress.ended_s
    tokens = max(progress.tokens, progress.usage_tokens)
    tpot = None
    if first is not None and last is not None and progress.tokens >= 2:
        tpot = (last - first) / (progress.tokens - 1)
    return RequestRecord(
        index=request.index,
        tenant=request.tenant,
        workload_class=request.workload_class,
        scheduled_s=request.scheduled_s,
        sent_s=sent,
        ttft_s=first - sent if first is not None and sent is not None else None,
        tpot_s=tpot,
        e2e_s=ended - sent if ended is not None and sent is not None else None,
        output_tokens=tokens,
        requested_tokens=request.requested_tokens,
        prompt_tokens=progress.prompt_tokens,
        status=status,
        outcome=outcome,
        reason=error.reason if error else "",
        retry_after_s=error.retry_after_s if error else None,
        details=error.message if error else details,
        finish_reason=progress.finish_reason,
        kind=request.kind,
    )


def _failed(
    request: PlannedRequest, progress: _Progress, exc: Exception, clock: Callable[[], float]
) -> RequestRecord:
    """The record of a request that raised ``exc``: a target's error with its status code,
    anything else as the load generator's own (``CLIENT_ERROR``)."""
    progress.ended_s = clock()
    if isinstance(exc, TargetError):
        return _record(request, progress, status=exc.code, outcome=_outcome(exc.code), error=exc)
    details = f"{type(exc).__name__}: {exc}"
    return _record(request, progress, status=CLIENT_ERROR, outcome=OUTCOME_ERROR, details=details)


async def _one(
    target: Target, request: PlannedRequest, progress: _Progress, clock: Callable[[], float]
) -> RequestRecord:
    if request.kind == "embed":
        return await _one_embed(target, request, progress, clock)
    progress.sent_s = clock()
    try:
        async for chunk in target.generate(request):
            now = clock()
            if chunk.token_ids:
                if progress.first_token_s is None:
                    progress.first_token_s = now
                progress.last_token_s = now
                progress.tokens += len(chunk.token_ids)
            if chunk.finish_reason:
                progress.finish_reason = common_pb2.FinishReason.Name(chunk.finish_reason)
                progress.finish_reason = progress.finish_reason.removeprefix("FINISH_REASON_")
                progress.usage_tokens = chunk.usage.completion_tokens
                progress.prompt_tokens = chunk.usage.prompt_tokens
    except Exception as exc:  # a target's error, a bug or a transport surprise: accounted for
        return _failed(request, progress, exc, clock)
    progress.ended_s = clock()
    if progress.finish_reason in ("", "CANCELLED"):  # a stream must end with a finish reason
        return _record(
            request,
            progress,
            status=INCOMPLETE_STREAM,
            outcome=OUTCOME_ERROR,
            details=f"stream ended OK without a finish reason ({progress.finish_reason or 'none'})",
        )
    return _record(request, progress, status="OK", outcome=OUTCOME_OK)


async def _one_embed(
    target: Target, request: PlannedRequest, progress: _Progress, clock: Callable[[], float]
) -> RequestRecord:
    """An Embed: its answer is its first and last output (TTFT = end-to-end latency)."""
    progress.sent_s = clock()
    try:
        vectors = await target.embed(request)
    except Exception as exc:  # a target's error, a bug or a transport surprise: accounted for
        return _failed(request, progress, exc, clock)
    progress.ended_s = progress.first_token_s = clock()
    if vectors != len(request.texts):
        return _record(
            request,
            progress,
            status=INCOMPLETE_ANSWER,
            outcome=OUTCOME_ERROR,
            details=f"{vectors} vectors for {len(request.texts)} texts",
        )
    return _record(request, progress, status="OK", outcome=OUTCOME_OK)


async def run_load(
    scenario: Scenario,
    target: Target,
    *,
    duration_s: float | None = None,
    total_rps: float | None = None,
    on_progress: ProgressFn | None = None,
    salt: str = "",
) -> LoadResult:
    """Run the scenario against ``target`` and return every request's record.

    ``duration_s`` overrides the arrival window, ``total_rps`` scales every tenant's rate so
    they sum to it, ``salt`` gives the run prompts of its own (:func:`plan_requests`). Raises
    ``RuntimeError`` if a planned request is missing from the records (which would be a bug
    here, never a server's fault).
    """
    window = duration_s if duration_s is not None else scenario.duration_s
    plan = plan_requests(scenario, duration_s=window, total_rps=total_rps, salt=salt)
    started_at = time.time()
    t0 = time.perf_counter()

    def clock() -> float:  # not the loop's clock: uvloop's ticks in whole milliseconds
        return time.perf_counter() - t0

    hard_stop = window + scenario.drain_seconds()
    progress = {r.index: _Progress() for r in plan}
    tasks: dict[int, asyncio.Task[RequestRecord]] = {}
    done_count = 0

    def finished(_task: asyncio.Task[RequestRecord]) -> None:
        nonlocal done_count
        done_count += 1
        if on_progress is not None:
            on_progress(len(tasks), done_count, len(plan))

    for request in plan:
        delay = request.scheduled_s - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        if clock() >= hard_stop:
            break
        task = asyncio.create_task(_one(target, request, progress[request.index], clock))
        task.add_done_callback(finished)
        tasks[request.index] = task
    if tasks:
        await asyncio.wait(tasks.values(), timeout=max(0.0, hard_stop - clock()))
    for task in tasks.values():
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    end = clock()
    records = []
    for request in plan:
        task_or_none = tasks.get(request.index)
        if task_or_none is not None and not task_or_none.cancelled():
            records.append(task_or_none.result())
            continue
        state = progress[request.index]
        state.ended_s = end if state.sent_s is not None else None
        status = "CANCELLED" if task_or_none is not None else NOT_SENT
        details = "still running at the run's hard stop" if task_or_none else "never sent"
        records.append(
            _record(request, state, status=status, outcome=OUTCOME_CUT_OFF, details=details)
        )
    if sorted(r.index for r in records) != [r.index for r in plan]:
        raise RuntimeError("load run lost track of a request")
    ends = [r.sent_s + r.e2e_s for r in records if r.sent_s is not None and r.e2e_s is not None]
    elapsed = max(ends, default=end)
    offered = total_rps if total_rps is not None else scenario.total_rps
    meta = {
        "planned_requests": len(plan),
        # At the cap the plan was cut short: the real offered load was lower than ``offered``.
        "max_requests_reached": len(plan) >= scenario.max_requests,
        "launched_requests": len(tasks),
    }
    return LoadResult(scenario, target.name, records, window, elapsed, offered, started_at, meta)


def run_client(main: Coroutine[Any, Any, T]) -> T:
    """Run a load client's coroutine to completion on the event loop the services run on
    (uvloop when installed, :func:`sluice.runtime.runner.run_loop`): on a machine the client
    shares with the suite, each chunk it reads costs less there, so less of its own time ends
    up in what it measures (docs/decisions/bench-load-client-loop.md)."""
    return run_loop(main)


def resolve_api_keys(scenario: Scenario, fallback: str | None) -> dict[str, str]:
    """Tenant → API key from each tenant's source, else ``fallback`` (``ScenarioError`` if
    neither gives one)."""
    keys = {}
    for tenant in scenario.tenants:
        if tenant.api_key is not None:
            keys[tenant.name] = tenant.api_key.resolve()
        elif fallback:
            keys[tenant.name] = fallback
        else:
            raise ScenarioError(
                f"tenant {tenant.name} has no api_key in the scenario and no --api-key "
                "(or SLUICE_API_KEY) was given"
            )
    return keys


def make_target(
    kind: str, scenario: Scenario, endpoint: str, api_keys: Mapping[str, str]
) -> Target:
    """The target called ``kind`` (``sluice`` or ``naive``) at ``endpoint``."""
    settings = GenerationSettings(
        model=scenario.model,
        ignore_eos=scenario.ignore_eos,
        temperature=scenario.temperature,
        cache_bypass=scenario.cache_bypass,
    )
    if kind == "sluice":
        return SluiceTarget(endpoint, api_keys, settings)
    if kind == "naive":
        return NaiveTarget(endpoint, settings)
    raise ValueError(f"unknown target {kind!r}; use one of {', '.join(TARGETS)}")
