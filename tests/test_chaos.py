"""The chaos harness (``bench.chaos``) itself: the TCP fault proxy against a local echo server,
the classification of requests and the figures from synthetic records, the report, the
fuzzer's generation, a short smoke of the load, probes and fuzzer against the in-process
suite, and one round of the strangers' attempts against the in-process secure suite.
``make chaos`` (the real scenarios) is not part of the tests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import queue
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from bench.chaos import strangers
from bench.chaos.figures import (
    FaultWindow,
    StrangerOutcome,
    load_figures,
    node_figures,
    recovery,
    stranger_figures,
)
from bench.chaos.fuzz import DOCUMENTED, FuzzCall, FuzzResult, call_strategy, fuzz, produce
from bench.chaos.load import (
    COMPLETED,
    LOST,
    REFUSED,
    Clock,
    LoadSettings,
    Prober,
    ProbeRound,
    Record,
    SteadyLoad,
)
from bench.chaos.logs import scheduler_events
from bench.chaos.proxy import FaultProxy, Mode
from bench.chaos.report import markdown, own_figure, verdict
from sluice import AsyncClient
from sluice.local.pki import create_pki
from sluice.local.stores import StoreProcess
from sluice.runtime.tls import Identity, Role
from sluice.sdk.errors import SluiceRpcError
from sluice.v1 import inference_pb2
from tests.harness import API_KEY, OTHER_KEY, Suite, eventually

# -- the proxy ----------------------------------------------------------------------------


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    """A TCP echo server on a free loopback port."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()


@pytest.fixture
async def proxy(echo: int) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the echo server, passing."""
    p = FaultProxy("127.0.0.1", echo)
    await p.start()
    yield p
    await p.stop()


async def _round_trip(port: int, data: bytes, timeout_s: float = 2.0) -> tuple[bytes, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.monotonic()
        writer.write(data)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(len(data)), timeout_s)
        return got, time.monotonic() - started
    finally:
        writer.close()


async def test_proxy_passes_bytes_both_ways(proxy: FaultProxy) -> None:
    """In PASS mode the echo comes back unchanged and fast."""
    got, took = await _round_trip(proxy.port, b"hello chaos")
    assert got == b"hello chaos"
    assert took < 0.5
    assert proxy.stats.connections == 1


async def test_proxy_latency_delays_each_direction(proxy: FaultProxy) -> None:
    """LATENCY 100 ms delays the request and the echo: the round trip takes ≥ 200 ms."""
    proxy.set_mode(Mode.LATENCY, latency_ms=100)
    got, took = await _round_trip(proxy.port, b"slow")
    assert got == b"slow"
    assert 0.2 <= took < 1.5


async def test_proxy_latency_does_not_serialise_chunks(proxy: FaultProxy) -> None:
    """Five chunks sent 30 ms apart through 200 ms of latency each way all come back about
    400 ms after they were sent, not 5 × 400 ms later."""
    proxy.set_mode(Mode.LATENCY, latency_ms=200)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    started = time.monotonic()
    for i in range(5):
        writer.write(bytes([i]) * 10)
        await writer.drain()
        await asyncio.sleep(0.03)
    got = await asyncio.wait_for(reader.readexactly(50), 3)
    took = time.monotonic() - started
    writer.close()
    assert got == b"".join(bytes([i]) * 10 for i in range(5))
    assert took < 1.2


async def test_proxy_black_hole_holds_then_delivers_on_heal(proxy: FaultProxy) -> None:
    """BLACKHOLE forwards nothing on an open connection; back to PASS, the held bytes arrive."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"before")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(6), 2) == b"before"
    proxy.set_mode(Mode.BLACKHOLE)
    writer.write(b"held")
    await writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readexactly(4), 0.3)
    proxy.set_mode(Mode.PASS)
    assert await asyncio.wait_for(reader.readexactly(4), 2) == b"held"
    writer.close()


async def test_proxy_black_hole_accepts_new_connections_and_holds_them(proxy: FaultProxy) -> None:
    """A connection made while black-holed is accepted but answered only after the heal."""
    proxy.set_mode(Mode.BLACKHOLE)
    trip = asyncio.create_task(_round_trip(proxy.port, b"late", timeout_s=3))
    await asyncio.sleep(0.3)
    assert not trip.done()
    proxy.set_mode(Mode.PASS)
    got, took = await trip
    assert got == b"late" and took >= 0.29  # the loop's clock rounds a 0.3 s sleep


async def test_proxy_reset_aborts_open_and_new_connections(proxy: FaultProxy) -> None:
    """RESET aborts an open connection and every new one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    proxy.set_mode(Mode.RESET)
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(10), 2) == b""
    writer.close()
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await _round_trip(proxy.port, b"x")
    assert proxy.stats.resets >= 2


# -- records and figures ------------------------------------------------------------------


def _record(
    tenant: str,
    start: float,
    chunks: list[tuple[float, str]],
    end: float | None,
    outcome: str = COMPLETED,
    code: str = "",
) -> Record:
    r = Record(tenant, start)
    for t, node in chunks:
        r.chunk(t, node, 4)
    if end is not None:
        r.finish(end, outcome, code)
    return r


def test_record_gaps_make_a_request_hung() -> None:
    """A stream silent for more than 5 s between chunks is hung even though it completed; an
    open one is hung once its tail passes 5 s; one broken UNAVAILABLE after a chunk counts as
    such."""
    frozen = _record("a", 0.0, [(0.1, "n1"), (6.0, "n1")], 6.2)
    assert frozen.hung(now=10) and frozen.outcome == COMPLETED
    smooth = _record("a", 0.0, [(0.1, "n1"), (0.2, "n2"), (0.3, "n2")], 0.4)
    assert not smooth.hung(now=10) and smooth.nodes == ["n1", "n2"] and smooth.tokens == 12
    still_open = _record("a", 0.0, [(1.0, "n1")], None)
    assert not still_open.hung(now=5.5) and still_open.hung(now=6.5)
    broken = _record("a", 0.0, [(0.1, "n1")], 0.5, "UNAVAILABLE", "UNAVAILABLE")
    assert broken.unavailable_after_first_token
    refused = _record("a", 0.0, [], 0.01, "UNAVAILABLE", "UNAVAILABLE")
    assert not refused.unavailable_after_first_token


def test_load_figures_count_each_outcome() -> None:
    """Counts of a synthetic scenario, victim disturbances included."""
    records = [
        _record("victim", 0, [(0.1, "n1")], 1.0),
        _record("victim", 0, [(0.1, "n1")], 7.0, "UNAVAILABLE", "UNAVAILABLE"),  # and hung
        _record("victim", 1, [], 1.1, REFUSED, "RESOURCE_EXHAUSTED"),
        _record("other", 0, [(0.1, "n2")], 1.0),
        _record("other", 0, [], 0.2, "INTERNAL", "INTERNAL"),
        _record("other", 0, [(0.1, "n2")], 20.0, LOST),
    ]
    f = load_figures(records, victim="victim", now=20.0)
    assert f["sent"] == 6 and f["completed"] == 2
    assert f["refused_with_retry_info"] == 1 and f["unavailable_after_first_token"] == 1
    assert f["hung"] == 2 and f["lost"] == 1 and f["internal"] == 1
    assert f["victim_sent"] == 3 and f["victim_disturbed"] == 2


def test_node_figures_count_moved_and_disturbed_streams() -> None:
    """During a fault of n1 in [5, 10]: a request waiting at 5 that completed on n2 moved; a
    stream on n2 that broke in the window is disturbed; one on n1 is neither."""
    fault = FaultWindow(injected_s=5.0, over_s=10.0, reference_s=10.0, node="n1")
    records = [
        _record("a", 4.9, [(6.0, "n2")], 6.5),  # waiting at 5, moved
        _record("a", 4.0, [(4.5, "n1")], 5.1, "UNAVAILABLE", "UNAVAILABLE"),
        _record("b", 4.0, [(4.5, "n2")], 5.5, "UNAVAILABLE", "UNAVAILABLE"),  # disturbed
        _record("b", 11.0, [(11.1, "n2")], 11.5),  # after the window
    ]
    f = node_figures(records, fault, now=12.0)
    assert f == {"disturbed_on_other_nodes": 1, "no_token_at_fault": 1, "completed_elsewhere": 1}
    assert node_figures(records, FaultWindow(5.0, 10.0, 10.0), now=12.0) == {}


def _round(start: float, ok: bool, fleet: set[str] | None) -> ProbeRound:
    r = ProbeRound(start, fleet=frozenset(fleet) if fleet is not None else None)
    r.records.append(_record("t", start, [(start + 0.1, "n1")], start + 0.2))
    if not ok:
        r.records.append(_record("u", start, [], start + 0.1, "UNAVAILABLE", "UNAVAILABLE"))
    return r


def test_recovery_is_the_round_after_the_last_failure() -> None:
    """Tenants recover for good at the round after the last failed one (a relapse moves it
    later); the fleet when every expected node stays listed healthy; full when both hold;
    None when fewer than three good rounds follow the last failure."""
    both = {"n1", "n2"}
    rounds = [
        _round(0.0, False, both),  # before the reference: ignored
        _round(5.0, False, {"n2"}),
        _round(5.5, True, {"n2"}),
        _round(6.0, False, {"n2"}),  # a relapse
        _round(6.5, True, None),
        _round(7.0, True, both),
        _round(7.5, True, both),
        _round(8.0, True, both),
    ]
    assert recovery(rounds, 5.0, ["n1", "n2"]) == {"tenants_s": 1.5, "nodes_s": 2.0, "full_s": 2.0}
    assert recovery(rounds[:6], 5.0, ["n1", "n2"]) == {
        "tenants_s": None,
        "nodes_s": None,
        "full_s": None,
    }
    assert recovery(rounds[5:], 7.0, ["n1"])["full_s"] == 0.0


def test_report_has_one_row_per_scenario_and_a_verdict() -> None:
    """The markdown table has a row per scenario, errors included; the verdict names what
    misses issue 17's figures."""
    good = {
        "name": "node-sigkill",
        "title": "node SIGKILL",
        **load_figures([_record("victim", 0, [(0.1, "n1")], 1.0)], victim="victim", now=2),
        "retried_elsewhere": 3,
        "recovery": {"tenants_s": 0.5, "nodes_s": 1.0, "full_s": 1.0},
        "probe_rounds": 4,
        "probes_failed": 0,
        "timeline": [{"t_s": 1.0, "event": "SIGKILL node-1"}],
    }
    bad = {**good, "name": "fuzzer", "title": "fuzzer", "hung": 2, "fuzz": _fuzz_figures()}
    broken = {"name": "etcd-kill", "title": "etcd SIGKILL", "error": "TimeoutError: x"}
    doc = {
        "generated_at": "now",
        "machine": "test",
        "settings": {
            "workers_per_tenant": 2,
            "max_new_tokens": 48,
            "fault_at_s": 6.0,
            "after_s": 10.0,
            "load_s": 25.0,
            "grace_s": 10.0,
        },
        "scenarios": [good, bad, broken],
    }
    text = markdown(doc)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 4  # the head and three scenarios
    assert "| node SIGKILL | 1 | 1 | 0 | 0 | 3 | 0 | 0 | 0 | 0 | 0.5 | 1 | – | yes |" in rows
    assert verdict(bad) == "no: hung, undocumented answers"
    assert rows[-1].endswith("| error |")
    assert "SIGKILL node-1" in text
    json.dumps(doc)  # the document is JSON as it is


def _fuzz_figures() -> dict[str, object]:
    return {
        "answers": 2,
        "by_code": {"INTERNAL": 1, "OK": 1},
        "undocumented": 1,
        "internal": 1,
        "elapsed_s": 1.0,
        "failures": [{"method": "Generate", "code": "INTERNAL", "details": "boom"}],
        "healthy_after": {"health": "SERVING", "request": "completed"},
    }


def test_scheduler_events_are_put_on_the_scenario_clock() -> None:
    """Fleet events are listed with their time since the origin; frequent ones summed up;
    repeats within 0.5 s collapsed; lines before the origin and non-JSON lines skipped."""
    origin = 1_800_000_000.0

    def line(t: float, event: str, **kw: object) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(origin + t))
        frac = f"{(origin + t) % 1:.6f}"[1:]
        return json.dumps({"event": event, "timestamp": f"{stamp}{frac}Z", **kw})

    lines = [
        line(-1.0, "node_added", node_id="n1"),
        "not json",
        line(2.0, "node_stalled", node_id="n1"),
        line(2.1, "node_stalled", node_id="n1"),
        line(3.0, "request_retried"),
        line(3.5, "request_retried"),
        line(4.0, "rpc_finished"),
    ]
    events = scheduler_events(lines, origin, "scheduler")
    assert events == [
        (2.0, "scheduler: node_stalled (node_id=n1) ×2"),
        (3.0, "scheduler: request_retried ×2 (last at 3.50 s)"),
    ]


# -- the fuzzer ---------------------------------------------------------------------------


def test_fuzzer_generates_serialisable_public_calls() -> None:
    """Hypothesis, seeded, makes calls of every public method whose requests serialise."""
    calls: queue.Queue[FuzzCall | None] = queue.Queue()
    keys = {"fuzzer": "sk-sluice-fuzz", "victim": "sk-sluice-victim"}
    produce(call_strategy(keys, "fuzzer"), 60, 1, calls, threading.Event())
    made = []
    while (call := calls.get()) is not None:
        made.append(call)
    assert len(made) == 60
    assert {c.method for c in made} >= {"Generate", "Embed"}
    for call in made:
        call.request.SerializeToString()
        assert all(k in {"authorization", "x-request-id"} for k, _ in call.metadata)
    assert "INTERNAL" not in DOCUMENTED and "UNKNOWN" not in DOCUMENTED


def test_fuzz_result_counts_answers_lost_to_oversized_trailers() -> None:
    """A client-side RESOURCE_EXHAUSTED for trailers over the limit is counted apart, listed
    among the failures and makes the verdict fail; an INTERNAL answer is undocumented."""
    result = FuzzResult()
    call = FuzzCall("Generate", inference_pb2.GenerateRequest(), ())
    result.record(call, "OK")
    result.record(call, "INVALID_ARGUMENT", "bad", "INVALID_ARGUMENT")
    result.record(call, "RESOURCE_EXHAUSTED", "Stream removed (received metadata size exceeds")
    result.record(call, "INTERNAL", "boom")
    f = result.figures()
    assert f["answers"] == 4 and f["undocumented"] == 1 and f["oversized_trailers"] == 1
    assert [x["code"] for x in f["failures"]] == ["RESOURCE_EXHAUSTED", "INTERNAL"]
    assert f["by_reason"]["INVALID_ARGUMENT INVALID_ARGUMENT"] == 1
    entry = {
        "hung": 0,
        "lost": 0,
        "internal": 1,
        "fuzz": {**f, "healthy_after": {"health": "SERVING", "request": "completed"}},
    }
    assert verdict(entry) == "no: internal, undocumented answers, oversized error trailers"


def test_fuzzer_producer_stops_when_asked() -> None:
    """A full queue and a stop request end the producer promptly."""
    calls: queue.Queue[FuzzCall | None] = queue.Queue(maxsize=2)
    stop = threading.Event()
    thread = threading.Thread(
        target=produce, args=(call_strategy({"f": "k"}, "f"), 1000, 1, calls, stop)
    )
    thread.start()
    first = calls.get(timeout=10)
    assert first is not None
    stop.set()
    thread.join(10)
    assert not thread.is_alive()


# -- the load with fake clients -----------------------------------------------------------


class _FakeClient:
    """Streams, refuses with RetryInfo, or hangs, by the prompt's worker number."""

    def generate(
        self,
        model: str,
        prompt: str,
        *,
        max_new_tokens: int | None = None,
        timeout_s: float | None = None,
        ignore_eos: bool = False,
    ) -> AsyncGenerator[inference_pb2.GenerateChunk, None]:
        return self._stream(prompt)

    async def _stream(self, prompt: str) -> AsyncGenerator[inference_pb2.GenerateChunk, None]:
        if " w0 " in prompt:
            for _ in range(3):
                await asyncio.sleep(0.01)
                yield inference_pb2.GenerateChunk(token_ids=[1], node_id="n1")
        elif " w1 " in prompt:
            retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=50_000_000))
            raise SluiceRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", [retry])
        else:
            yield inference_pb2.GenerateChunk(token_ids=[1], node_id="n2")
            await asyncio.sleep(3600)


async def test_steady_load_records_completed_refused_and_lost_requests() -> None:
    """Workers loop until stopped; a refused worker waits its RetryInfo; a stream that never
    ends is cancelled after the grace and recorded LOST (and hung when past the bound)."""
    load = SteadyLoad({"t": _FakeClient()}, LoadSettings(workers_per_tenant=3), Clock())
    load.start()
    await asyncio.sleep(0.5)
    await load.stop(grace_s=0.1)
    outcomes = {r.outcome for r in load.records}
    assert outcomes == {COMPLETED, REFUSED, LOST}
    refused = [r for r in load.records if r.outcome == REFUSED]
    assert 3 <= len(refused) <= 12  # about one per 50 ms RetryInfo, not a spin
    assert refused[0].retry_after_s == pytest.approx(0.05)
    lost = [r for r in load.records if r.outcome == LOST]
    assert len(lost) == 1 and lost[0].nodes == ["n2"] and not lost[0].hung(100)
    assert all(r.end is not None for r in load.records)


# -- smoke against the in-process suite ---------------------------------------------------


@pytest.mark.timeout(60)
async def test_load_probes_and_fuzzer_against_the_in_process_suite(running: Suite) -> None:
    """The real SDK load completes requests and the prober sees the one node; a short fuzz run
    gets a status for every call it made."""
    assert running.scheduler is not None
    address = running.scheduler.address
    clock = Clock()
    async with AsyncClient(address, api_key=API_KEY, retry=None) as client:
        load = SteadyLoad({"alpha": client}, LoadSettings(max_new_tokens=8), clock)
        prober = Prober({"alpha": client}, clock, fleet=client, interval_s=0.2)
        load.start()
        prober.start()
        await asyncio.sleep(1.5)
        await prober.stop()
        await load.stop(grace_s=5)
    figures = load_figures(load.records, victim="alpha", now=clock.now())
    assert figures["completed"] >= 2 and figures["lost"] == 0 and figures["hung"] == 0
    assert prober.rounds and prober.rounds[0].fleet == frozenset({"node-a"})
    assert recovery(prober.rounds, 0.0, ["node-a"], streak=1)["full_s"] is not None
    result = await fuzz(
        address, {"alpha": API_KEY, "beta": OTHER_KEY}, "alpha", count=40, max_s=20, seed=3
    )
    assert result.sent + sum(result.client_errors.values()) == 40
    assert all(code == code.upper() for code in result.by_code)


# -- strangers at the internal surfaces ---------------------------------------------------


def test_stranger_figures_count_per_surface_and_fail_the_verdict_on_a_success() -> None:
    """Attempts are counted per surface with their refusal codes; one success, one answer
    that is no refusal (a time-out) or a failed control each make the verdict fail."""
    outcomes = [
        StrangerOutcome("node-1 Node/Drain", "plaintext", "UNAVAILABLE"),
        StrangerOutcome("node-1 Node/Drain", "suite: client", "PERMISSION_DENIED"),
        StrangerOutcome("redis FLUSHALL", "cache user", "NOPERM"),
    ]
    controls = [StrangerOutcome("cache Cache/Lookup (before)", "suite: scheduler", "OK")]
    f = stranger_figures(outcomes, controls)
    assert f["attempts"] == 3 and f["succeeded"] == 0 and f["unexplained"] == 0
    assert f["by_surface"]["node-1 Node/Drain"] == {
        "attempts": 2,
        "succeeded": 0,
        "refused": {"UNAVAILABLE": 1, "PERMISSION_DENIED": 1},
        "credentials": 2,
    }
    assert f["controls_ok"]
    entry = {"hung": 0, "lost": 0, "internal": 0, "strangers": f}
    assert verdict(entry) == "yes"
    assert own_figure(entry) == "internal calls succeeded without a valid certificate: 0 of 3"
    breached = [
        *outcomes,
        StrangerOutcome("cache Cache/Store", "foreign CA: scheduler", "OK"),
        StrangerOutcome("etcd Put /sluice/nodes/x", "suite: client", "TIMEOUT"),
    ]
    failed = [StrangerOutcome("cache Cache/Lookup (after)", "suite: scheduler", "UNAVAILABLE")]
    bad = stranger_figures(breached, [*controls, *failed])
    assert bad["succeeded_calls"] == ["cache Cache/Store by foreign CA: scheduler"]
    assert verdict({**entry, "strangers": bad}) == (
        "no: internal calls succeeded without a valid certificate, "
        "unexplained answers to strangers, controls failed"
    )


@pytest.mark.timeout(120)
async def test_strangers_are_refused_at_every_internal_surface_of_the_secure_suite(
    secure_suite: Suite, tmp_path: Path, locked_stores: tuple[Any, StoreProcess, StoreProcess]
) -> None:
    """One round of every stranger's attempt at a node, the cache, etcd and Redis of the
    in-process secure suite: none succeeds, each is refused by its door (handshake,
    PERMISSION_DENIED, NOAUTH, WRONGPASS, NOPERM), and the right identities' controls succeed."""
    lockdown = secure_suite.lockdown
    assert lockdown is not None
    cache = await secure_suite.start_cache()
    node = await secure_suite.start_node("node-a")
    foreign = create_pki(tmp_path / "foreign", strangers.FOREIGN_IDENTITIES)
    target = strangers.Target.build(
        {"node-a": node.address},
        cache.address,
        secure_suite.etcd,
        secure_suite.redis_url,
        lockdown,
        foreign,
    )
    target = dataclasses.replace(target, etcd_peer=locked_stores[1].peer_address)
    attempts = strangers.catalogue(target)
    assert any(a.surface.startswith("etcd peer") for a in attempts)
    outcomes, not_made = await strangers.attempt_all(attempts, concurrency=4, max_s=60)
    controls = [await strangers.outcome_of(a) for a in strangers.controls(target)]
    f = stranger_figures(outcomes, controls, not_made)
    assert f["attempts"] == len(attempts) >= 80 and f["not_made"] == 0
    assert f["succeeded"] == 0, f["succeeded_calls"]
    assert f["unexplained"] == 0, f["unexplained_calls"]
    assert {"UNAVAILABLE", "PERMISSION_DENIED", "NOAUTH", "WRONGPASS", "NOPERM"} <= set(
        f["refused"]
    )
    assert f["controls_ok"], f["controls"]
    assert not node.drained.is_set()


@pytest.mark.timeout(60)
async def test_fuzzer_speaks_tls_to_a_secure_scheduler(secure_suite: Suite) -> None:
    """Given the suite's CA, the fuzzer's calls reach the TLS public port and are answered
    (not all UNAVAILABLE, as a plaintext fuzzer's would be)."""
    lockdown = secure_suite.lockdown
    assert lockdown is not None
    await secure_suite.start_cache()
    await secure_suite.start_node("node-a")
    scheduler = await secure_suite.start_scheduler()
    await eventually(lambda: scheduler.nodes.candidates("tiny-random-llama", 1))
    ca = lockdown.files(Identity(Role.CLIENT)).ca.read_bytes()
    result = await fuzz(
        scheduler.address,
        {"alpha": API_KEY, "beta": OTHER_KEY},
        "alpha",
        count=20,
        max_s=20,
        seed=3,
        credentials=grpc.ssl_channel_credentials(ca),
    )
    assert result.sent == 20
    assert set(result.by_code) - {"UNAVAILABLE"}, result.figures()["examples"]
