"""The life of one Embed request, without gRPC (a Generate's, and the parts both share:
:mod:`scheduler.lifecycle`).

authorize → validate → quota (Redis; not overlapped, the node call is the whole request) →
admit, queue and book a node slot (:class:`~scheduler.gate.DispatchGate`, as for a Generate)
→ embed (retried on another node by the :class:`~scheduler.dispatch.Dispatcher`) → settle.

An embedding holds a node slot for its call: it counts against the node's capacity, its
tenant's slot share and fair-queuing counter (its estimated tokens at the prompt weight; it
generates none), the tenant's in-flight cap, and it is refused as a Generate is (OVERLOADED,
QUEUE_FULL with RetryInfo; NO_NODE). However it ends (served, refused, failed, or the client
gone while it waited or ran) :meth:`EmbedFlow._settle` gives back the slot and the quota.
"""

from __future__ import annotations

import time
import uuid

from scheduler.lifecycle import (
    ENDED_IN,
    Outcome,
    RequestPath,
    Step,
    admit,
    authorize,
    estimated_tokens,
    request_deadline,
    within_default_cap,
)
from scheduler.queues import QueuedRequest
from scheduler.quotas import Lease
from scheduler.validation import Metadata, validate_embed
from sluice.contract import WorkloadClass
from sluice.runtime.errors import SluiceError
from sluice.v1 import inference_pb2


class EmbedFlow:
    """One Embed request: authorize and validate (construction), then :meth:`run`:
    ``_acquire_quota``, ``admit``, the node call; and, however it ends, ``_settle``."""

    def __init__(
        self,
        path: RequestPath,
        request: inference_pb2.EmbedRequest,
        *,
        tenant: str,
        deadline: float | None,
        metadata: Metadata = (),
    ) -> None:
        self._path = path
        self.outcome: Outcome | None = None
        """Set once, by the step that ends the request."""
        self.tenant = authorize(path.tenants, tenant)
        self._counters = path.usage.of(self.tenant.name)
        try:  # an invalid Embed is counted for its tenant, not in the requests metric
            self.request = validate_embed(request, self.tenant, path.catalog, metadata)
        except SluiceError as exc:
            self.outcome = Outcome.INVALID
            self._counters.refuse(exc.reason)
            raise
        self.workload_class = WorkloadClass(self.request.workload_class)
        self.deadline = request_deadline(
            deadline, self.tenant, self.workload_class, path.settings.default_deadline_seconds
        )
        self._step = Step.QUOTA
        self._item = self._queued()
        self._lease: Lease | None = None
        self._booked = False
        self._used = 0
        """Tokens the node counted (0 until it answered)."""

    def _queued(self) -> QueuedRequest:
        chars = sum(len(text) for text in self.request.inputs)
        return QueuedRequest(
            request_id=uuid.uuid4().hex,
            tenant=self.tenant.name,
            workload_class=self.workload_class,
            model=self.request.model,
            prompt_tokens=estimated_tokens(chars, self._path.settings.chars_per_token),
            max_new_tokens=0,
            deadline=self.deadline,
            embed=True,
        )

    def _end(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome

    async def run(self) -> inference_pb2.EmbedResponse:
        """Quota, a node slot, the node's answer; the slot and the quota are settled with
        the tokens the node counted."""
        path, counters = self._path, self._counters
        counters.in_flight += 1
        try:
            self._step = Step.QUOTA
            self._lease = await self._acquire_quota()
            self._step = Step.ADMIT
            node = await admit(path.gate, self._item, counters)
            self._booked = True
            counters.requests += 1
            self._step = Step.STREAM
            cost = path.gate.cost(self._item)
            reply = await path.dispatcher.embed(
                self.request, self.tenant.name, self.deadline, node, cost=cost
            )
            self._used = reply.usage.prompt_tokens
            counters.prompt_tokens += self._used
            self._end(Outcome.SERVED)
            return reply
        except BaseException as exc:
            error, gone = ENDED_IN[self._step]
            self._end(error if isinstance(exc, Exception) else gone)
            raise
        finally:
            self._settle()

    async def _acquire_quota(self) -> Lease:
        """The tenant's in-flight cap and quotas (never overlapped: the node call is the
        whole request); a refusal is counted."""
        item = self._item
        try:
            within_default_cap(self._path.settings, self.tenant, self._counters.in_flight)
            return await self._path.quotas.acquire(
                self.tenant, item.prompt_tokens, item.request_id, self.deadline - time.monotonic()
            )
        except SluiceError as exc:
            self._counters.refuse(exc.reason)
            raise

    def _settle(self) -> None:
        """Give back what the request held: its node slot (the tenant's fair-share charge
        corrected with the node's count) and its quota lease."""
        assert self.outcome is not None  # every way out of run() sets it
        path, item = self._path, self._item
        self._counters.in_flight -= 1
        path.metrics.requests.labels("embed", self.workload_class.label, self.outcome.label).inc()
        if self._booked:
            path.gate.release(item)
            if self._used:  # VTC: settle the prompt estimate with the true count
                weight = path.settings.prompt_token_weight
                path.gate.charge(item, (self._used - item.prompt_tokens) * weight)
        if self._lease is not None:
            path.background.spawn(path.quotas.release(self._lease, self._used))
