"""Scheduler settings and the model catalog."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from scheduler.prefill import PrefillGuard
from sluice import limits
from sluice.contract import WorkloadClass
from sluice.runtime.settings import ServiceSettings


class ModelSpec(BaseModel):
    """Limits the scheduler enforces for one model before any node sees the request: within
    the contract's (:mod:`sluice.limits`), never looser."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1, max_length=limits.MAX_MODEL_NAME_CHARS)
    kind: str = Field(pattern="^(generate|embed)$")
    max_new_tokens: int = Field(default=1024, ge=1, le=limits.MAX_NEW_TOKENS)
    """Largest ``max_new_tokens`` a request may ask for."""
    default_max_new_tokens: int = Field(default=128, ge=1, le=limits.MAX_NEW_TOKENS)
    """``max_new_tokens`` of a request that sets none."""
    max_prompt_chars: int = Field(default=32_000, ge=1, le=limits.MAX_PROMPT_CHARS)
    """Longest prompt (or sum of chat message contents) accepted, in characters; for an
    embedding model, longest text (the contract's bound per text is lower still)."""
    max_inputs: int = Field(default=256, ge=1, le=limits.MAX_EMBED_INPUTS)
    """Embedding models: most texts per request."""


DEFAULT_MODELS = [
    ModelSpec(name="smollm2-135m-instruct", kind="generate", max_new_tokens=2048),
    ModelSpec(name="tiny-random-llama", kind="generate", max_new_tokens=1024),
    ModelSpec(name="all-minilm-l6-v2", kind="embed", max_prompt_chars=8_000),
]


class SchedulerSettings(ServiceSettings):
    """Settings of the scheduler (``SLUICE_*`` env, YAML file or flags)."""

    tenants_file: Path = Path("tenants.yaml")
    """YAML file of tenants and their hashed API keys."""
    cache_address: str = ""
    """``host:port`` of the cache service; empty disables caching."""
    cache_timeout_seconds: float = 0.1
    """Budget of a cache lookup on the request path; slower counts as a miss."""
    default_deadline_seconds: float = 120.0
    """Deadline applied to requests that arrive without one, unless the tenant sets one for
    the class."""
    max_attempts: int = 2
    """Nodes tried for one request while no token has reached the client."""
    models: list[ModelSpec] = Field(default_factory=lambda: list(DEFAULT_MODELS))
    """The model catalog; models that nodes advertise beyond it get default limits."""
    scheduler_id: str = ""
    """Id published under /sluice/schedulers/; empty picks a random one."""
    etcd_start_wait_seconds: float = 3.0
    """Longest start-up waits for etcd's first answer before opening the port anyway: while the
    node view has never been read, health says NOT_SERVING and etcd is retried in the
    background (a refused connection ends the wait at once)."""

    # Quotas (global, Redis).
    redis_url: str = ""
    """Redis holding the quota buckets shared by every replica; empty disables quotas."""
    quota_timeout_seconds: float = 0.25
    """Connect and command timeout of the quota check: a dead Redis costs this three times, then
    is skipped for a second."""
    quota_fail_closed: list[str] = Field(default_factory=list)
    """Quotas refused while Redis is unreachable (requests_per_second, tokens_per_minute,
    max_concurrent); the others fail open (max_concurrent then holds per replica)."""
    quota_overlap: bool = True
    """Run the Redis quota check alongside admission and the node's prefill instead of before
    them; the first token waits for the answer, and a refusal cancels the node call. Saves the
    round trip (~0.5 ms) from every metered request's time to first token. The Redis call
    starts a loop turn after the node call, so the node's request goes out first. Not used
    while the tenant's requests on this replica already fill its max_concurrent, nor after a
    refusal this replica remembers, so an over-quota tenant does not get node work started."""

    # Queues and admission.
    max_queued_per_class: int = 1000
    """Most requests queued per workload class on this replica."""
    max_queued_per_tenant: int = 200
    """Most requests one tenant may have queued per class on this replica."""
    aging_seconds: float = 10.0
    """Extra wait that lifts a lower class one rank (so nothing starves); 0 disables aging."""
    prompt_token_weight: float = 0.5
    """Cost of a prompt token relative to a generated token, for fairness and wait prediction."""
    chars_per_token: float = 4.0
    """Prompt characters per token, to estimate prompt tokens before the node counts them."""
    default_tokens_per_s: float = 200.0
    """Service rate assumed for a node not measured yet (weighted tokens per second)."""
    low_class_headroom: float = 0.125
    """Share of a node's sequences BATCH and FINETUNE leave free for REALTIME."""
    tenant_max_in_flight: int = 256
    """Requests one tenant may have in flight on this replica when its quotas set no
    ``max_concurrent`` (refused RESOURCE_EXHAUSTED ``TENANT_CONCURRENCY``); 0: no cap."""
    realtime_max_wait_seconds: float = 1.5
    """A REALTIME request predicted to wait longer than this in the queue is refused at once
    (OVERLOADED, retry after the predicted wait) even when its deadline is further: someone
    is waiting for its first token, and a quick refusal with a time to come back serves them
    better than seconds of silence (docs/decisions/scheduler-realtime-max-wait.md); the TTFT
    target below also counts the prompt's prefill. 0: only the deadline counts."""
    realtime_ttft_target_seconds: float = 2.0
    """REALTIME's time-to-first-token target: a REALTIME request that would queue is refused at
    once (OVERLOADED, retry after the predicted wait) when its predicted wait plus its
    prompt's prefill (prompt tokens x the fastest serving node's fitted cost per prompt token)
    exceeds it; one that can start at once, or whose prompt alone takes longer, is never
    refused for it. 2 s: a common chat TTFT objective. 0: none."""
    batch_ttft_target_seconds: float = 0.0
    """BATCH's TTFT target (0: none; BATCH is held to its deadline and admission's promise)."""
    finetune_ttft_target_seconds: float = 0.0
    """FINETUNE-class generations' TTFT target (0: none)."""
    realtime_embed_target_seconds: float = 0.5
    """REALTIME's target for a whole ``Embed`` call (its queue wait plus the node's call, the
    call priced at the scheduler's recent average per model and class): one that would queue
    past it is refused at once (OVERLOADED, with RetryInfo), as a generation past its TTFT
    target; one that can start at once, or whose call alone (the fastest lately) misses it,
    is not. 0.5 s: an interactive retrieval query's embedding. 0: none."""
    batch_embed_target_seconds: float = 0.0
    """BATCH's target for a whole ``Embed`` call (0: none; held to its deadline)."""
    finetune_embed_target_seconds: float = 0.0
    """FINETUNE-class ``Embed`` calls' target (0: none)."""
    first_token_budgets: bool = False
    """Send each REALTIME request's node what its TTFT target leaves its first token, for an
    engine that places prompts itself (the vLLM node: behind waiting BATCH prompts while it
    fits; the built-in engine ignores it). Off by default: on, it missed REALTIME's target in
    bursts at 2x or 4x in every run, calibrated too
    (docs/decisions/node-vllm-realtime-placement.md)."""
    realtime_itl_target_seconds: float = 0.2
    """REALTIME's inter-token target: a sequence joins a node's batch only if the node's fitted
    step time with it stays within the target of every REALTIME stream there (the time per
    output token of MLPerf's LLM server scenario, 200 ms); 0: no guard beyond the slots."""
    batch_itl_target_seconds: float = 1.0
    """BATCH's inter-token target: looser, it fills a node only where REALTIME does not run
    (the node preempts BATCH down to REALTIME's batch when a REALTIME request arrives)."""
    finetune_itl_target_seconds: float = 2.0
    """FINETUNE-class generations' inter-token target."""
    itl_step_share: float = Field(default=0.8, gt=0, le=1)
    """Share of an inter-token target a decode step may take: the rest is left for the
    prompt chunks new requests prefill in the same steps (docs/decisions/scheduler-itl-guard.md)."""
    prefill_burst_intervals: float = 8.0
    """Prompt prefill a node may take at once beside the streams it runs, in REALTIME
    inter-token targets (8 x 0.2 s = 1.6 s: one 1,000-token prompt on a 2-core CPU); what
    follows waits until the node has worked it off at the share of its time the streams'
    targets leave to prompts (docs/decisions/scheduler-prefill-bucket.md). 0: no guard."""
    lower_class_prefill_share: float = Field(default=0.5, ge=0, le=1)
    """Share of that burst classes below REALTIME may fill (the rest is REALTIME's)."""
    promote_lead_seconds: float = 1.0
    """A queued BATCH or FINETUNE request is served first (nothing else for its model starts
    before it) from this long before the latest start admission promised it, so it still
    finishes before its deadline."""
    promoted_hold_seconds: float = Field(default=1.0, ge=0)
    """Longest such a request, unable to start, keeps its model from other requests (0: until
    it starts); past it they may pass it, and it goes first whenever it can start
    (docs/decisions/scheduler-lower-class-promise.md)."""

    # Failure handling.
    breaker_failures: int = 5
    """Consecutive failures that open a node's circuit."""
    breaker_failure_rate: float = 0.5
    """Failure share over the window that opens it too (with at least 20 calls); 0 disables."""
    breaker_window_seconds: float = 10.0
    """Window of the failure rate."""
    breaker_open_seconds: float = 5.0
    """Time open before a half-open probe."""
    breaker_max_open_seconds: float = 30.0
    """Longest open period of one round."""
    retry_budget_ratio: float = 0.2
    """Retries may add at most this share of extra load (over 10 s windows)."""
    outlier_factor: float = 3.0
    """A node whose TTFT or inter-token latency average exceeds this multiple of the peers'
    median is ejected for ``outlier_eject_seconds``."""
    outlier_eject_seconds: float = 15.0
    """Ejection time of a latency outlier."""
    jobs_enabled: bool = True
    """Serve the Jobs API and run job lines (needs ``redis_url``: jobs live in Redis)."""
    job_line_timeout_seconds: float = 300.0
    """Longest one attempt of one line may take (within its job's window)."""
    job_reclaim_idle_seconds: float = 30.0
    """A line whose worker sent no heartbeat (every ``job_heartbeat_seconds``) this long is
    taken over by another replica (``XAUTOCLAIM``): its worker is presumed dead."""
    job_heartbeat_seconds: float = 5.0
    """How often a replica marks the lines it holds (running or deferred) as alive."""
    job_max_deliveries: int = 3
    """A line that failed (or whose worker died) this many times is dead-lettered with its
    last error."""
    job_default_window_seconds: float = 86400.0
    """Completion window of a job that sets none."""
    job_max_lines_in_flight: int = 64
    """Most lines one replica runs at once (the adaptive window's ceiling)."""
    job_capacity_share: float = 0.9
    """Share of the nodes' measured throughput predictions count on for jobs before any job
    ran (afterwards the rate jobs actually got is used)."""
    job_max_active_per_tenant: int = 64
    """Jobs of one tenant not final at most (RESOURCE_EXHAUSTED ``TOO_MANY_JOBS`` beyond)."""
    finetune_max_jobs_per_replica: int = 16
    """Fine-tune jobs one replica drives at once (each holds one Node.Train call)."""
    finetune_max_deliveries: int = 4
    """A fine-tune whose training failed this many times in a row without a new checkpoint
    (a node died, its stream broke, its driver's replica died) is FAILED with its last error.
    A refusal because the node is busy or draining does not count."""
    finetune_avoid_node_seconds: float = 15.0
    """A node that failed or refused a fine-tune is not chosen for it again for this long
    (or its RetryInfo, when longer); while every node serving its base model is avoided or
    training, the fine-tune waits."""
    finetune_stall_seconds: float = 60.0
    """A Train call with no event this long (a node sends progress about every second) is
    cancelled and the fine-tune moved, as if its node had died."""


def _per_class(settings: SchedulerSettings, name: str) -> dict[WorkloadClass, float]:
    """Each class's setting ``<class>_<name>`` (``realtime_ttft_target_seconds``, ...), at
    least 0."""
    return {c: max(0.0, getattr(settings, f"{c.label}_{name}")) for c in WorkloadClass}


def ttft_targets(settings: SchedulerSettings) -> dict[WorkloadClass, float]:
    """Each class's TTFT target in seconds (0: none)."""
    return _per_class(settings, "ttft_target_seconds")


def embed_targets(settings: SchedulerSettings) -> dict[WorkloadClass, float]:
    """Each class's target for a whole ``Embed`` call in seconds (0: none)."""
    return _per_class(settings, "embed_target_seconds")


def itl_targets(settings: SchedulerSettings) -> dict[WorkloadClass, float]:
    """Each class's inter-token target in seconds (0: none)."""
    return _per_class(settings, "itl_target_seconds")


def step_budgets(settings: SchedulerSettings) -> dict[WorkloadClass, float]:
    """Each class's step budget: its inter-token target times ``itl_step_share``."""
    return {c: t * settings.itl_step_share for c, t in itl_targets(settings).items()}


def prefill_guard(settings: SchedulerSettings) -> PrefillGuard:
    """The nodes' prefill bucket settings (:mod:`scheduler.prefill`)."""
    return PrefillGuard(
        itl_targets(settings),
        burst_intervals=settings.prefill_burst_intervals,
        lower_class_share=settings.lower_class_prefill_share,
        measured_share=settings.itl_step_share,
    )
