"""Strangers at the internal doors: calls to every internal surface of a secure suite by callers
without a valid client certificate, or with a valid certificate of the wrong identity (issue 17:
without a valid client certificate, 0 internal calls succeed).

Surfaces, and who tries them (:func:`catalogue`):

- each node's ``Node/Generate``, ``Embed``, ``StreamLoad`` and ``Drain``, and the cache's
  ``Cache/Lookup``, ``Store``, ``Invalidate`` and ``Stats`` (only schedulers may call them):
  plaintext; TLS without a client certificate; a *scheduler* certificate signed by a foreign
  CA; the suite's own client, cache, root and etcd certificates and another node's (valid,
  wrong role). The caller trusts the suite's CA and checks the service's name, as a real
  client would: only the service's check is under test.
- etcd (one user per certificate, each kept to its keys): plaintext and TLS without a
  certificate reading ``/sluice/`` and registering a node; a foreign CA's *root* certificate;
  the client certificate registering a node or a scheduler and reading or rewriting the tenants
  document; node-1's rewriting or deleting node-2's entry, registering a scheduler (it would
  receive API keys from SDK discovery) or rewriting the tenants; the scheduler's registering a
  node or rewriting the tenants; the cache's and etcd's certificates (no etcd user).
- Redis (ACL users, no default user): no password, wrong passwords, the cache user on quota
  keys (directly and from a script), jobs keys and administrative commands, the scheduler user
  on cached answers and administrative commands.

Every attempt opens its own connection (a local subchannel pool per channel), so each goes
through its own handshake. An attempt *succeeded* when the service did what was asked: a gRPC
``OK`` or a stream's first message, an etcd answer, a Redis reply that is not an error.
Anything else is a refusal, counted by its code: the gRPC status, or Redis's error word
(``NOAUTH``, ``WRONGPASS``, ``NOPERM``). Requests are valid for a caller that may make them (the
controls show it), so a refusal is the door's, not the request's; ``Node/Embed`` aside (the
chaos nodes serve no embedding model): one that got through would end with the servicer's own
error, which the figures count as unexplained, never as refused. Writes would be harmless if
one got through: an unparsable tenants document (the scheduler keeps the last good one), a
node entry at a closed port. A script's call refused by the ACL is Redis's ``ERR`` naming the
keys the user "can't access": counted as ``NOPERM``. A ``SHUTDOWN`` that worked closes the
connection without a reply: counted as succeeded.

Controls: the same kinds of calls by the right identity (the scheduler's certificate streaming
a node's load and looking the cache up, root reading etcd, the cache user reading a cache key),
before and after the attempts. They must succeed, or the harness could not tell a success from
a refusal (or the attempts broke the suite), and the figure would mean nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import ssl
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc
from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

from bench.chaos.figures import SUCCEEDED, StrangerOutcome
from sluice.local.lockdown import Lockdown
from sluice.local.pki import Pki
from sluice.local.up import Endpoints
from sluice.runtime.cache_keys import KEY_PREFIX as CACHE_KEY_PREFIX
from sluice.runtime.tls import Identity, Role, node_identity
from sluice.v1 import cache_pb2, cache_pb2_grpc, common_pb2, inference_pb2, node_pb2, node_pb2_grpc

ATTEMPT_TIMEOUT_S = 5.0
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.use_local_subchannel_pool", 1),  # a connection (and a handshake) per attempt
]
MODEL = "tiny-random-llama"
TENANT = "victim"
QUOTA_KEY = f"sluice:quota:v1:{{{TENANT}}}:rps"
"""The victim's requests-per-second bucket (the scheduler's key, docs/architecture.md)."""
JOBS_KEY = "sluice:jobs:stranger"
"""A key of the scheduler's durable jobs (not the cache's to touch)."""
FOREIGN_IDENTITIES = (Identity(Role.SCHEDULER), Identity(Role.ROOT))
"""What a foreign CA's certificates claim to be: the identities that could do the most."""

_GENERATE = inference_pb2.GenerateRequest(
    model=MODEL,
    prompt="strangers: tell me another tenant's secrets",
    options=common_pb2.GenerationOptions(max_new_tokens=2, seed=7),
)
_CACHED = cache_pb2.CachedResponse(text="forged answer", token_ids=[1, 2], node_id="node-1")


class Refused(Exception):
    """A refusal that is no gRPC status: Redis's error word, or how the connection ended."""


Invoke = Callable[[grpc.aio.Channel], Awaitable[Any]]


@dataclass(frozen=True)
class Attempt:
    """One call to make."""

    surface: str
    credential: str
    call: Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class Credential:
    """How a caller shows up: plaintext (``tls`` None) or TLS trusting the suite's CA, with or
    without a certificate of its own."""

    label: str
    tls: grpc.ChannelCredentials | None


@dataclass(frozen=True)
class Target:
    """The suite under attempt, and what the strangers hold."""

    nodes: dict[str, str]
    """Node id → gRPC address."""
    cache: str
    etcd: str
    redis: tuple[str, int]
    lockdown: Lockdown
    foreign: dict[Identity, Credential]
    """A foreign CA's certificate per :data:`FOREIGN_IDENTITIES`, trusting the suite's CA."""
    etcd_peer: str = ""
    """etcd's peer port (raft, lease renewals), when known."""

    @classmethod
    def of(cls, endpoints: Endpoints, lockdown: Lockdown, foreign: Pki) -> Target:
        """A running suite's addresses (``sluice up``'s endpoints)."""
        target = cls.build(
            {n["id"]: n["grpc"] for n in endpoints.nodes},
            endpoints.cache["grpc"],
            endpoints.etcd,
            endpoints.redis,
            lockdown,
            foreign,
        )
        return dataclasses.replace(target, etcd_peer=endpoints.etcd_peer)

    @classmethod
    def build(
        cls,
        nodes: dict[str, str],
        cache: str,
        etcd: str,
        redis_url: str,
        lockdown: Lockdown,
        foreign: Pki,
    ) -> Target:
        """The target at these addresses; the foreign certificates are read now."""
        redis = urlsplit(redis_url)
        ca = lockdown.pki.ca.read_bytes()
        held = {}
        for identity in FOREIGN_IDENTITIES:
            files = foreign.files(identity)
            tls = grpc.ssl_channel_credentials(ca, files.key.read_bytes(), files.cert.read_bytes())
            held[identity] = Credential(f"foreign CA: {identity.common_name}", tls)
        return cls(
            nodes=dict(nodes),
            cache=cache,
            etcd=etcd,
            redis=(redis.hostname or "127.0.0.1", redis.port or 6379),
            lockdown=lockdown,
            foreign=held,
        )

    def suite(self, identity: Identity) -> Credential:
        """A valid certificate of the suite's ``identity``."""
        tls = self.lockdown.files(identity).channel_credentials()
        return Credential(f"suite: {identity.common_name}", tls)

    def strangers(self, claims: Identity, wrong: Sequence[Identity]) -> list[Credential]:
        """Plaintext, TLS without a certificate, a foreign certificate claiming ``claims``,
        and the suite's certificates of ``wrong`` identities."""
        ca = self.lockdown.pki.ca.read_bytes()
        return [
            Credential("plaintext", None),
            Credential("TLS, no certificate", grpc.ssl_channel_credentials(ca)),
            self.foreign[claims],
            *(self.suite(identity) for identity in wrong),
        ]


def _channel(address: str, credential: Credential, peer: Identity) -> grpc.aio.Channel:
    if credential.tls is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", peer.server_name)]
    return grpc.aio.secure_channel(address, credential.tls, options=options)


def _grpc(
    surface: str, address: str, credential: Credential, peer: Identity, invoke: Invoke
) -> Attempt:
    """``invoke`` on a channel of its own to ``peer`` at ``address``, as ``credential``."""

    async def call() -> None:
        async with _channel(address, credential, peer) as channel:
            await invoke(channel)

    return Attempt(surface, credential.label, call)


async def _first(stream: Any) -> None:
    """A stream answered: its first message, or its end with OK; then it is cancelled."""
    try:
        async for _ in stream:
            break
    finally:
        stream.cancel()


def _node_calls(node_id: str) -> dict[str, Invoke]:
    generate = node_pb2.NodeGenerateRequest(
        request=_GENERATE, tenant=TENANT, request_id=f"stranger-{node_id}"
    )
    embed = node_pb2.NodeEmbedRequest(
        request=inference_pb2.EmbedRequest(model=MODEL, inputs=["x"]), tenant=TENANT
    )
    t = ATTEMPT_TIMEOUT_S
    return {
        "Node/Generate": lambda ch: _first(
            node_pb2_grpc.NodeStub(ch).Generate(generate, timeout=t)
        ),
        "Node/Embed": lambda ch: node_pb2_grpc.NodeStub(ch).Embed(embed, timeout=t),
        "Node/StreamLoad": lambda ch: _first(
            node_pb2_grpc.NodeStub(ch).StreamLoad(node_pb2.StreamLoadRequest(), timeout=t)
        ),
        "Node/Drain": lambda ch: node_pb2_grpc.NodeStub(ch).Drain(
            node_pb2.DrainRequest(grace_seconds=1), timeout=t
        ),
    }


def _cache_calls() -> dict[str, Invoke]:
    lookup = cache_pb2.LookupRequest(tenant=TENANT, request=_GENERATE)
    store = cache_pb2.StoreRequest(
        tenant=TENANT, request=_GENERATE, response=_CACHED, ttl_seconds=60
    )
    invalidate = cache_pb2.InvalidateRequest(tenant=TENANT)
    t = ATTEMPT_TIMEOUT_S
    return {
        "Cache/Lookup": lambda ch: cache_pb2_grpc.CacheStub(ch).Lookup(lookup, timeout=t),
        "Cache/Store": lambda ch: cache_pb2_grpc.CacheStub(ch).Store(store, timeout=t),
        "Cache/Invalidate": lambda ch: cache_pb2_grpc.CacheStub(ch).Invalidate(
            invalidate, timeout=t
        ),
        "Cache/Stats": lambda ch: cache_pb2_grpc.CacheStub(ch).Stats(
            cache_pb2.StatsRequest(), timeout=t
        ),
    }


def _service_attempts(t: Target) -> list[Attempt]:
    """Every node method on every node, every cache method on the cache."""
    attempts = []
    claims = Identity(Role.SCHEDULER)
    common = [Identity(Role.CLIENT), Identity(Role.ROOT), Identity(Role.ETCD)]
    for node_id, address in t.nodes.items():
        others = [node_identity(n) for n in t.nodes if n != node_id][:1]
        credentials = t.strangers(claims, [*common, Identity(Role.CACHE), *others])
        for method, invoke in _node_calls(node_id).items():
            for credential in credentials:
                surface = f"{node_id} {method}"
                attempts.append(_grpc(surface, address, credential, node_identity(node_id), invoke))
    first_node = [node_identity(n) for n in t.nodes][:1]
    credentials = t.strangers(claims, [*common, *first_node])
    for method, invoke in _cache_calls().items():
        for credential in credentials:
            attempts.append(
                _grpc(f"cache {method}", t.cache, credential, Identity(Role.CACHE), invoke)
            )
    return attempts


def _prefix_end(key: bytes) -> bytes:
    return key[:-1] + bytes([key[-1] + 1])


def _range(key: bytes, prefix: bool = False) -> Invoke:
    request = rpc_pb2.RangeRequest(key=key, range_end=_prefix_end(key) if prefix else b"")
    return lambda ch: rpc_pb2_grpc.KVStub(ch).Range(request, timeout=ATTEMPT_TIMEOUT_S)


def _put(key: bytes, value: bytes) -> Invoke:
    request = rpc_pb2.PutRequest(key=key, value=value)
    return lambda ch: rpc_pb2_grpc.KVStub(ch).Put(request, timeout=ATTEMPT_TIMEOUT_S)


def _delete(key: bytes) -> Invoke:
    request = rpc_pb2.DeleteRangeRequest(key=key)
    return lambda ch: rpc_pb2_grpc.KVStub(ch).DeleteRange(request, timeout=ATTEMPT_TIMEOUT_S)


def _etcd_attempts(t: Target) -> list[Attempt]:
    """Reads and writes of ``/sluice/`` by those who may not (see the module docstring)."""
    node = next(iter(t.nodes), "node-1")
    other = next((n for n in t.nodes if n != node), "node-2")
    forged_node = common_pb2.NodeInfo(node_id=other, address="127.0.0.1:9").SerializeToString()
    tenants = b"/sluice/config/tenants"
    forged_tenants = b"tenants: [forged"  # unparsable: refused and the last good one kept
    scheduler_entry = b"/sluice/schedulers/stranger"
    plain, no_cert, foreign, *_ = t.strangers(Identity(Role.ROOT), [])
    tries: list[tuple[Credential, str, Invoke]] = [
        (plain, "Range /sluice/", _range(b"/sluice/", prefix=True)),
        (plain, "Put /sluice/nodes/x", _put(b"/sluice/nodes/x", forged_node)),
        (no_cert, "Range /sluice/", _range(b"/sluice/", prefix=True)),
        (no_cert, "Put /sluice/nodes/x", _put(b"/sluice/nodes/x", forged_node)),
        (foreign, "Range /sluice/", _range(b"/sluice/", prefix=True)),
        (foreign, "Put /sluice/config/tenants", _put(tenants, forged_tenants)),
    ]
    client = t.suite(Identity(Role.CLIENT))
    tries += [
        (client, "Put /sluice/nodes/x", _put(b"/sluice/nodes/x", forged_node)),
        (client, "Put /sluice/config/tenants", _put(tenants, forged_tenants)),
        (client, "Range /sluice/config/tenants", _range(tenants)),
        (client, "Put /sluice/schedulers/x", _put(scheduler_entry, b"forged")),
    ]
    first = t.suite(node_identity(node))
    other_key = f"/sluice/nodes/{other}".encode()
    tries += [
        (first, f"Put /sluice/nodes/{other}", _put(other_key, forged_node)),
        (first, f"DeleteRange /sluice/nodes/{other}", _delete(other_key)),
        (first, "Put /sluice/schedulers/x", _put(scheduler_entry, b"forged")),
        (first, "Put /sluice/config/tenants", _put(tenants, forged_tenants)),
    ]
    scheduler = t.suite(Identity(Role.SCHEDULER))
    tries += [
        (scheduler, "Put /sluice/nodes/x", _put(b"/sluice/nodes/x", forged_node)),
        (scheduler, "Put /sluice/config/tenants", _put(tenants, forged_tenants)),
        (t.suite(Identity(Role.CACHE)), "Range /sluice/", _range(b"/sluice/", prefix=True)),
        (t.suite(Identity(Role.ETCD)), "Range /sluice/", _range(b"/sluice/", prefix=True)),
    ]
    etcd = Identity(Role.ETCD)
    return [_grpc(f"etcd {what}", t.etcd, c, etcd, invoke) for c, what, invoke in tries]


def _resp(args: Sequence[str]) -> bytes:
    """A command in Redis's protocol."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


async def redis_command(
    address: tuple[str, int], login: tuple[str, str] | None, command: Sequence[str]
) -> None:
    """``AUTH`` as ``login`` (user, password) when given, then ``command``, on a fresh
    connection; raises :class:`Refused` with Redis's error word when either is refused."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        for args in [*([("AUTH", *login)] if login else []), command]:
            writer.write(_resp(args))
            await writer.drain()
            line = await reader.readline()
            if not line and args[0] == "SHUTDOWN":
                return  # it did: Redis closes the connection without a reply
            if not line:
                raise Refused("CLOSED")
            if line.startswith(b"-"):
                raise Refused(_error_word(line))
    finally:
        writer.close()


def _error_word(line: bytes) -> str:
    """Redis's error code (``-NOPERM this user...``); a script's call the ACL refused is an
    ``ERR`` that says the user can't access the keys: ``NOPERM`` too."""
    word = line[1:].split(b" ", 1)[0].strip().decode(errors="replace")
    return "NOPERM" if word == "ERR" and b"can't access" in line else word


def _redis_attempts(t: Target) -> list[Attempt]:
    """Redis without a user, with wrong passwords, and each user outside its keys and rights."""
    cache_key = f"{CACHE_KEY_PREFIX}:{TENANT}:{MODEL}:stranger"
    script = f"return redis.call('SET', '{QUOTA_KEY}', '0')"  # the key not declared
    read = "return redis.call('GET', KEYS[1])"
    cache = ("cache", t.lockdown.redis_passwords["cache"])
    scheduler = ("scheduler", t.lockdown.redis_passwords["scheduler"])
    admin = {
        "FLUSHALL": ["FLUSHALL"],
        "CONFIG SET": ["CONFIG", "SET", "maxmemory", "1"],
        "ACL SETUSER": ["ACL", "SETUSER", "stranger", "on", ">pw", "~*", "+@all"],
        "SHUTDOWN": ["SHUTDOWN", "NOSAVE"],
    }
    tries: list[tuple[str, tuple[str, str] | None, str, list[str]]] = [
        ("no password", None, "GET sluice:cache:*", ["GET", cache_key]),
        ("no password", None, "SET sluice:quota:*", ["SET", QUOTA_KEY, "0"]),
        ("no password", None, "FLUSHALL", ["FLUSHALL"]),
        ("no password", None, "CONFIG GET", ["CONFIG", "GET", "*"]),
        ("wrong password: cache", ("cache", "guess"), "GET sluice:cache:*", ["GET", cache_key]),
        ("wrong password: scheduler", ("scheduler", "guess"), "FLUSHALL", ["FLUSHALL"]),
        ("wrong password: default", ("default", "guess"), "CONFIG GET", ["CONFIG", "GET", "*"]),
        ("cache user", cache, "GET sluice:quota:*", ["GET", QUOTA_KEY]),
        ("cache user", cache, "SET sluice:jobs:*", ["SET", JOBS_KEY, "forged"]),
        ("cache user", cache, "SET sluice:quota:*", ["SET", QUOTA_KEY, "0"]),
        ("cache user", cache, "EVAL SET sluice:quota:*", ["EVAL", script, "0"]),
        ("cache user", cache, "EVAL GET sluice:quota:*", ["EVAL", read, "1", QUOTA_KEY]),
        ("cache user", cache, "FLUSHDB", ["FLUSHDB"]),
        ("cache user", cache, "CONFIG GET", ["CONFIG", "GET", "*"]),
        ("cache user", cache, "KEYS *", ["KEYS", "*"]),
        ("cache user", cache, "DEBUG SLEEP", ["DEBUG", "SLEEP", "0"]),
        ("cache user", cache, "MONITOR", ["MONITOR"]),
        *(("cache user", cache, what, args) for what, args in admin.items()),
        ("scheduler user", scheduler, "GET sluice:cache:*", ["GET", cache_key]),
        *(("scheduler user", scheduler, what, args) for what, args in admin.items()),
    ]

    def attempt(label: str, login: tuple[str, str] | None, what: str, args: list[str]) -> Attempt:
        return Attempt(f"redis {what}", label, lambda: redis_command(t.redis, login, args))

    return [attempt(*one) for one in tries]


def _peer_request(url: str, body: bytes, context: ssl.SSLContext | None) -> None:
    request = urllib.request.Request(url, data=body or None, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=ATTEMPT_TIMEOUT_S, context=context) as reply:
            if reply.status != 200:
                raise Refused(f"HTTP_{reply.status}")
    except (ssl.SSLError, ConnectionError, http.client.HTTPException) as exc:
        raise Refused("HANDSHAKE_FAILED") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLError | ConnectionError):
            raise Refused("HANDSHAKE_FAILED") from exc
        raise


def _peer_attempts(t: Target) -> list[Attempt]:
    """etcd's peer port: list the members and renew a lease (the calls that, unauthenticated,
    would keep a dead process registered), in plaintext and over TLS without a certificate."""
    if not t.etcd_peer:
        return []
    no_cert = ssl.create_default_context(cafile=str(t.lockdown.pki.ca))
    no_cert.check_hostname = False
    renew = b"\x08\x01"  # a LeaseKeepAliveRequest for lease id 1
    ways = (("http", "plaintext", None), ("https", "TLS, no certificate", no_cert))
    calls = (("GET /members", "/members", b""), ("POST /leases", "/leases", renew))
    out = []
    for scheme, label, context in ways:
        for what, path, body in calls:
            url = f"{scheme}://{t.etcd_peer}{path}"

            async def call(
                url: str = url, body: bytes = body, ctx: ssl.SSLContext | None = context
            ) -> None:
                await asyncio.to_thread(_peer_request, url, body, ctx)

            out.append(Attempt(f"etcd peer {what}", label, call))
    return out


def catalogue(t: Target) -> list[Attempt]:
    """Every attempt of one round (see the module docstring)."""
    return [*_service_attempts(t), *_etcd_attempts(t), *_peer_attempts(t), *_redis_attempts(t)]


def controls(t: Target) -> list[Attempt]:
    """The right identities making the same kinds of calls: each must succeed."""
    scheduler, root = t.suite(Identity(Role.SCHEDULER)), t.suite(Identity(Role.ROOT))
    attempts = [
        _grpc(
            f"{node_id} Node/StreamLoad",
            address,
            scheduler,
            node_identity(node_id),
            _node_calls(node_id)["Node/StreamLoad"],
        )
        for node_id, address in t.nodes.items()
    ]
    lookup = _cache_calls()["Cache/Lookup"]
    attempts.append(_grpc("cache Cache/Lookup", t.cache, scheduler, Identity(Role.CACHE), lookup))
    read = _range(b"/sluice/nodes/", prefix=True)
    attempts.append(_grpc("etcd Range /sluice/nodes/", t.etcd, root, Identity(Role.ETCD), read))
    login = ("cache", t.lockdown.redis_passwords["cache"])
    get = ["GET", f"{CACHE_KEY_PREFIX}:{TENANT}:{MODEL}:control"]
    attempts.append(
        Attempt(
            "redis GET sluice:cache:*", "cache user", lambda: redis_command(t.redis, login, get)
        )
    )
    return attempts


async def outcome_of(attempt: Attempt) -> StrangerOutcome:
    """Make ``attempt`` (bounded by the attempt timeout) and say how it ended."""
    try:
        await asyncio.wait_for(attempt.call(), ATTEMPT_TIMEOUT_S + 1.0)
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    except Refused as exc:
        code = str(exc)
    except TimeoutError:
        code = "TIMEOUT"
    except OSError:
        code = "CONNECTION_ERROR"
    else:
        code = SUCCEEDED
    return StrangerOutcome(attempt.surface, attempt.credential, code)


async def attempt_all(
    attempts: Sequence[Attempt], *, concurrency: int, max_s: float
) -> tuple[list[StrangerOutcome], int]:
    """Make ``attempts`` in order, ``concurrency`` at a time, until done or ``max_s`` has
    passed; returns the outcomes and how many attempts were not made."""
    waiting = deque(attempts)
    outcomes: list[StrangerOutcome] = []
    deadline = time.monotonic() + max_s

    async def worker() -> None:
        while waiting and time.monotonic() < deadline:
            outcomes.append(await outcome_of(waiting.popleft()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes, len(waiting)
