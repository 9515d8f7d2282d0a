"""Fine-tuned LoRA adapters on a node: the fleet's adapter store and a byte-bounded LRU cache
of the adapters loaded from it.

The store is a directory every node and trainer mounts (``--adapters-dir``)::

    <root>/<tenant>/<base_model>/<adapter_name>/adapter_config.json
                                               /adapter_model.safetensors

in peft's format (:mod:`inference_node.lora.weights`); only safetensors is read, never a
pickle. :meth:`AdapterStore.publish` writes an adapter there atomically (a node never sees
half of one). Published adapters are immutable: a new version is a new name, since the cache
never rereads an adapter it holds.

A request names an adapter as ``"<tenant>/<adapter_name>"`` (:func:`parse_reference`); the
base model is the request's model. The scheduler resolves the client's
``"<base_model>:<adapter_name>"`` and decides whether the caller may use it: the node checks
neither ownership nor sharing, only that the files exist and fit the base model.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import tempfile
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch

from inference_node.lora import (
    AdapterConfigError,
    AdapterFormatError,
    LoraAdapter,
    LoraConfig,
    target_shapes,
)
from inference_node.lora.weights import CONFIG_FILE, MAX_CONFIG_BYTES, WEIGHTS_FILE
from inference_node.model_types import LanguageModel

log = structlog.get_logger(__name__)

MAX_NAME_CHARS = 128
"""Longest tenant, base model or adapter name in the store (one path component each)."""
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
HEADER_BYTES = 64 * 1024
HEADER_BYTES_PER_TENSOR = 512
"""A safetensors file's JSON header (its tensor index and metadata) may add
:data:`HEADER_BYTES` plus this much per tensor to the factors' own bytes."""


class AdapterError(Exception):
    """An adapter a request named cannot be served; ``reference`` is what it named."""

    def __init__(self, reference: str, message: str) -> None:
        super().__init__(message)
        self.reference = reference


class AdapterNotFoundError(AdapterError):
    """The store has no such adapter for this base model."""


class AdapterInvalidError(AdapterError):
    """The adapter's files exist but are not a LoRA adapter this node can serve on this base
    model (a malformed reference, unsupported peft settings, a pickle only, wrong shapes, a
    weights file larger than its shapes allow)."""


class AdapterTooLargeError(AdapterError):
    """The adapter alone is larger than the node's whole adapter cache."""


class AdapterUnavailableError(AdapterError):
    """The store could not be read (an I/O error): the node's problem, not the adapter's."""


def valid_name(name: str) -> bool:
    """Whether ``name`` can be a tenant, base model or adapter name in the store: 1 to
    :data:`MAX_NAME_CHARS` of ``A-Z a-z 0-9 . _ -``, not dots only."""
    return (
        0 < len(name) <= MAX_NAME_CHARS
        and set(name) <= _NAME_CHARS
        and name.strip(".") != ""  # never "." or "..": one component, inside the store
    )


@dataclass(frozen=True)
class AdapterRef:
    """One adapter in the store: its owner, the base model it adapts and its name."""

    tenant: str
    base_model: str
    name: str

    def __str__(self) -> str:
        return f"{self.tenant}/{self.name}"


def parse_reference(text: str, base_model: str) -> AdapterRef:
    """The adapter ``"<tenant>/<adapter_name>"`` of ``base_model``; :class:`AdapterInvalidError`
    unless each part is 1 to :data:`MAX_NAME_CHARS` of ``A-Z a-z 0-9 . _ -`` (not dots only)."""
    tenant, slash, name = text.partition("/")
    if not slash or not valid_name(tenant) or not valid_name(name):
        raise AdapterInvalidError(
            text[:300],
            "must be '<tenant>/<adapter_name>', each 1 to "
            f"{MAX_NAME_CHARS} characters of A-Z a-z 0-9 . _ -",
        )
    if not valid_name(base_model):
        raise AdapterInvalidError(text, f"model {base_model!r} cannot carry adapters")
    return AdapterRef(tenant, base_model, name)


def factor_bytes(config: LoraConfig, shapes: dict[str, tuple[int, int]]) -> int:
    """Bytes of an adapter's float32 factors on a base model whose targetable modules have
    ``shapes`` (:func:`~inference_node.lora.target_shapes`)."""
    return 4 * config.rank * sum(out_f + in_f for out_f, in_f in shapes.values())


def weights_file_limit(config: LoraConfig, shapes: dict[str, tuple[int, int]]) -> int:
    """Largest ``adapter_model.safetensors`` accepted for an adapter of ``config`` on
    ``shapes``: float32 factors (narrower dtypes are smaller) and their header."""
    return factor_bytes(config, shapes) + HEADER_BYTES + 2 * len(shapes) * HEADER_BYTES_PER_TENSOR


def _read_config(path: Path) -> dict[str, object]:
    """An ``adapter_config.json`` object, at most ``MAX_CONFIG_BYTES``."""
    if not path.is_file():
        raise AdapterFormatError(f"no {CONFIG_FILE}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterFormatError(f"{CONFIG_FILE} is over {MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{CONFIG_FILE} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{CONFIG_FILE} is not a JSON object")
    return data


class AdapterStore:
    """The fleet's adapter directory (layout in the module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def directory(self, ref: AdapterRef) -> Path:
        """Where ``ref``'s files are."""
        return self.root / ref.tenant / ref.base_model / ref.name

    def read_config(self, ref: AdapterRef) -> LoraConfig:
        """``ref``'s LoRA settings; :class:`AdapterNotFoundError` when it is not in the store."""
        directory = self.directory(ref)
        try:
            if not directory.is_dir():
                raise AdapterNotFoundError(str(ref), f"no adapter {ref} of {ref.base_model!r}")
            if not directory.resolve().is_relative_to(self.root.resolve()):
                raise AdapterInvalidError(str(ref), f"adapter {ref} links outside the store")
            return LoraConfig.from_peft(_read_config(directory / CONFIG_FILE))
        except (AdapterFormatError, AdapterConfigError) as exc:
            raise AdapterInvalidError(str(ref), f"adapter {ref}: {exc}") from exc
        except OSError as exc:
            raise AdapterUnavailableError(str(ref), f"adapter store unreadable: {exc}") from exc

    def load(self, ref: AdapterRef, lm: LanguageModel, config: LoraConfig) -> LoraAdapter:
        """``ref``'s weights (with settings ``config``) on ``lm``'s device, checked against
        ``lm``'s shapes. The weights file is refused unread when it is over
        :func:`weights_file_limit`."""
        directory = self.directory(ref)
        shapes = target_shapes(lm, config)
        limit = weights_file_limit(config, shapes)
        try:
            weights = directory / WEIGHTS_FILE
            size = weights.stat().st_size if weights.is_file() else 0
            if size > limit:
                raise AdapterInvalidError(
                    str(ref), f"adapter {ref}: {WEIGHTS_FILE} is {size} bytes, over {limit}"
                )
            adapter = LoraAdapter.load(directory, device=lm.device)
            if lm.device.type == "cuda":  # copied on this thread's stream; the engine's differs
                torch.cuda.current_stream(lm.device).synchronize()
        except (AdapterFormatError, AdapterConfigError) as exc:
            raise AdapterInvalidError(str(ref), f"adapter {ref}: {exc}") from exc
        except OSError as exc:
            raise AdapterUnavailableError(str(ref), f"adapter store unreadable: {exc}") from exc
        if adapter.config != config:
            raise AdapterInvalidError(str(ref), f"adapter {ref} changed while it was read")
        problem = adapter.compatibility_error(shapes)
        if problem is not None:
            raise AdapterInvalidError(str(ref), f"adapter {ref} does not fit {lm.name}: {problem}")
        return adapter

    def publish(self, adapter: LoraAdapter, ref: AdapterRef) -> Path:
        """Write ``adapter`` as ``ref`` atomically: saved into a temporary sibling directory,
        then renamed into place (``FileExistsError`` if ``ref`` exists: adapters are
        immutable). Returns its directory."""
        target = self.directory(ref)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{ref.name}.", dir=target.parent))
        try:
            adapter.save(staging, base_model=ref.base_model)
            os.rename(staging, target)  # atomic; fails if target exists and is not empty
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if target.exists():
                raise FileExistsError(f"adapter {ref} already exists") from exc
            raise
        return target


@dataclass
class _Entry:
    future: Future[LoraAdapter] = field(default_factory=Future)
    pins: int = 1
    nbytes: int = 0
    """Bytes reserved (while loading) or held (loaded); 0 before its size is known."""
    loaded: bool = False


class AdapterCache:
    """The adapters of one base model loaded on this node: an LRU bounded by bytes.

    :meth:`acquire` pins an adapter and returns a future that completes when it is loaded (at
    once when it is cached); :meth:`release` unpins it. Loading runs on the cache's own thread,
    never on the caller's: read the config, reserve the adapter's float32 size, evicting
    least recently acquired unpinned adapters until it fits, then read the weights. When
    pinned adapters fill the cache the load waits, without blocking other loads' completion,
    until a release makes room; the cache never holds more than ``capacity_bytes``. An adapter
    larger than the whole cache fails (:class:`AdapterTooLargeError`), as do missing or
    invalid ones; failures are not cached. Thread-safe.
    """

    def __init__(self, store: AdapterStore, lm: LanguageModel, capacity_bytes: int) -> None:
        if capacity_bytes < 1:
            raise ValueError("capacity_bytes must be at least 1")
        self.store = store
        self.capacity_bytes = capacity_bytes
        self._lm = lm
        self._lock = threading.Lock()
        self._entries: OrderedDict[AdapterRef, _Entry] = OrderedDict()
        self._deferred: list[tuple[AdapterRef, LoraConfig, int]] = []
        self._tasks: queue.SimpleQueue[tuple[AdapterRef, LoraConfig | None, int] | None]
        self._tasks = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._work, name=f"adapter-loader-{lm.name}", daemon=True
        )
        self._thread.start()

    @property
    def used_bytes(self) -> int:
        """Bytes held by loaded adapters and reserved by loading ones."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def cached(self) -> list[AdapterRef]:
        """The adapters loaded now, least recently acquired first."""
        with self._lock:
            return [ref for ref, e in self._entries.items() if e.loaded]

    def acquire(self, ref: AdapterRef) -> Future[LoraAdapter]:
        """Pin ``ref`` and return its loaded adapter's future; its exception is an
        :class:`AdapterError`. Every acquire whose future succeeds needs one :meth:`release`
        (one that failed needs none)."""
        with self._lock:
            entry = self._entries.get(ref)
            if entry is not None:
                entry.pins += 1
                self._entries.move_to_end(ref)
                return entry.future
            entry = self._entries[ref] = _Entry()
        self._tasks.put((ref, None, 0))
        return entry.future

    def release(self, ref: AdapterRef) -> None:
        """Unpin ``ref``; once no one uses it, it may be evicted, and deferred loads retry."""
        with self._lock:
            entry = self._entries.get(ref)
            if entry is None or entry.pins == 0:
                return
            entry.pins -= 1
            if entry.pins > 0:
                return
        self._retry_deferred()

    def _retry_deferred(self) -> None:
        """Queue the loads that waited for room again (room may have been made)."""
        with self._lock:
            retry, self._deferred = self._deferred, []
        for task in retry:
            self._tasks.put(task)

    def close(self) -> None:
        """Stop the loader thread (loads not started fail as unavailable)."""
        self._tasks.put(None)

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            ref, config, needed = task
            try:
                self._load(ref, config, needed)
            except AdapterError as exc:
                self._fail(ref, exc)
            except Exception as exc:  # a bug: the request fails, the loader goes on
                log.exception("adapter_load_failed", adapter=str(ref), model=ref.base_model)
                self._fail(ref, AdapterUnavailableError(str(ref), f"loading failed: {exc!r}"))
        with self._lock:
            pending = [ref for ref, e in self._entries.items() if not e.loaded]
        for ref in pending:
            self._fail(ref, AdapterUnavailableError(str(ref), "the adapter cache is closed"))

    def _load(self, ref: AdapterRef, config: LoraConfig | None, needed: int) -> None:
        first_try = config is None
        if config is None:
            config = self.store.read_config(ref)
            needed = factor_bytes(config, target_shapes(self._lm, config))
            if needed > self.capacity_bytes:
                raise AdapterTooLargeError(
                    str(ref),
                    f"adapter {ref} needs {needed} bytes; the node's adapter cache holds "
                    f"{self.capacity_bytes}",
                )
        if not self._reserve(ref, config, needed):
            if first_try:
                log.info("adapter_load_deferred", adapter=str(ref), needed_bytes=needed)
            return
        adapter = self.store.load(ref, self._lm, config)
        with self._lock:
            entry = self._entries[ref]
            entry.loaded = True
            entry.nbytes = adapter.nbytes()
        log.info("adapter_loaded", adapter=str(ref), model=ref.base_model, bytes=entry.nbytes)
        entry.future.set_result(adapter)

    def _reserve(self, ref: AdapterRef, config: LoraConfig, needed: int) -> bool:
        """Evict unpinned loaded adapters, least recently acquired first, until ``needed``
        more bytes fit, and reserve them for ``ref``; if they cannot fit, evict nothing, defer
        the load until a release (under the same lock, so no release is missed) and return
        False."""
        with self._lock:
            used = sum(e.nbytes for e in self._entries.values())
            idle = [(r, e) for r, e in self._entries.items() if e.loaded and e.pins == 0]
            if used + needed - sum(e.nbytes for _, e in idle) > self.capacity_bytes:
                self._deferred.append((ref, config, needed))
                return False
            for victim, entry in idle:
                if used + needed <= self.capacity_bytes:
                    break
                del self._entries[victim]
                used -= entry.nbytes
                log.info("adapter_evicted", adapter=str(victim), bytes=entry.nbytes)
            self._entries[ref].nbytes = needed
            return True

    def _fail(self, ref: AdapterRef, exc: AdapterError) -> None:
        """End ``ref``'s load with ``exc`` for every holder, freeing what it reserved."""
        with self._lock:
            entry = self._entries.pop(ref, None)
        if entry is not None and not entry.future.done():
            entry.future.set_exception(exc)
        if entry is not None and entry.nbytes:
            self._retry_deferred()
