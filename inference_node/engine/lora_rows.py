"""Multi-LoRA for the batching engine: which adapter each sequence uses, loading them without
holding up the batch, and the per-row LoRA deltas :meth:`LlamaRunner.step` adds.

A step's rows are the decode tokens (one per running sequence) then every prefill chunk's
tokens. The factors of the adapters the step uses are stacked per layer and projection
(:class:`~inference_node.lora.StackedLora`); every adapted projection adds its deltas to its
base output: the decode rows, each with its own adapter (-1: base), through
:func:`~inference_node.lora.lora_delta` (Punica's BGMV: one gather and two batched matmuls,
whatever the mix), each prefill chunk through two matmuls on its rows (S-LoRA's and Punica's
SGMV segments: a chunk is one sequence, so one adapter). A step with no adapted row builds
nothing: :meth:`EngineAdapters.rows` returns ``None`` and the runner takes the base model's
path unchanged.

The stacks are rebuilt only when the set of adapters in the batch changes, and dropped when
no running sequence uses one; they are a float32 working copy of those adapters, counted in
:meth:`EngineAdapters.nbytes` next to the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch

from inference_node.adapters import AdapterCache, AdapterError, AdapterRef, parse_reference
from inference_node.lora import TARGET_MODULES, LoraAdapter, StackedLora, lora_delta, module_path
from inference_node.model_types import LanguageModel

QKV = ("q_proj", "k_proj", "v_proj")
"""The projections of the runner's fused Q/K/V matmul, in its column order."""
GATE_UP = ("gate_proj", "up_proj")
"""The projections of the runner's fused gate/up matmul, in its column order."""


@dataclass(frozen=True)
class LoraStacks:
    """The factors of the adapters one batch uses: ``layers[i][module]`` stacks them for
    :func:`lora_delta` (index ``j`` is ``refs[j]``); a module no adapter targets is absent."""

    refs: tuple[AdapterRef, ...]
    layers: list[dict[str, StackedLora]]
    widths: dict[str, int]
    """Output features of every targetable projection (its columns in a fused matmul)."""

    @classmethod
    def build(
        cls, refs: Sequence[AdapterRef], adapters: Sequence[LoraAdapter], lm: LanguageModel
    ) -> LoraStacks:
        layers = int(lm.config["num_hidden_layers"])
        shapes = {
            m: tuple(int(d) for d in lm.weights[f"{module_path(0, m)}.weight"].shape)
            for m in TARGET_MODULES
        }
        targeted = [
            m for m in TARGET_MODULES if any(m in a.config.target_modules for a in adapters)
        ]
        stacks = [
            {
                m: StackedLora.from_adapters(
                    adapters, module_path(i, m), (shapes[m][0], shapes[m][1]), device=lm.device
                )
                for m in targeted
            }
            for i in range(layers)
        ]
        return cls(tuple(refs), stacks, {m: shape[0] for m, shape in shapes.items()})

    def nbytes(self) -> int:
        """Bytes of the stacked factors."""
        return sum(s.nbytes() for layer in self.layers for s in layer.values())


@dataclass(frozen=True)
class LoraRows:
    """What :meth:`LlamaRunner.step` needs to apply LoRA to a step's rows, by kind:

    - the decode rows (the first ``len(decode)``), one per sequence, each with its own
      adapter: :func:`lora_delta`'s gather and batched matmuls (BGMV);
    - each prefill chunk, a run of rows of one sequence and so one adapter: two plain matmuls
      on that slice (SGMV's segments), where gathering the factors once per row would copy
      them ``rows`` times.

    A row's delta is computed the same way whatever else is in the batch."""

    decode: torch.Tensor | None
    """``[decode rows]`` long, each row's adapter in ``stacks.refs`` (-1: base model); None
    when no decode row uses an adapter."""
    chunks: tuple[tuple[int, int, int], ...]
    """``(first row, end row, adapter)`` of every prefill chunk that uses an adapter."""
    stacks: LoraStacks

    def add(self, layer: int, modules: Sequence[str], x: torch.Tensor, out: torch.Tensor) -> None:
        """Add to ``out`` (the fused output of ``modules``, side by side in that order, for
        input ``x``) each row's LoRA delta of decoder layer ``layer``."""
        stacked = self.stacks.layers[layer]
        start = 0
        for module in modules:
            cols = slice(start, start + self.stacks.widths[module])
            start = cols.stop
            factors = stacked.get(module)
            if factors is None:
                continue
            if self.decode is not None:
                n = self.decode.shape[0]
                out[:n, cols] += lora_delta(x[:n], self.decode, factors)
            for first, end, j in self.chunks:
                inner = x[first:end].to(factors.a.dtype) @ factors.a[j].t()
                delta = (inner @ factors.b[j].t()) * factors.scaling[j]
                out[first:end, cols] += delta.to(out.dtype)


class Adapted(Protocol):
    """A sequence as :class:`EngineAdapters` sees it."""

    adapter_ref: AdapterRef | None
    """The adapter it asked for, None for the base model."""
    adapter: LoraAdapter | None
    """That adapter once loaded and pinned; None before, and for the base model."""


S = TypeVar("S", bound=Adapted)


class EngineAdapters(Generic[S]):
    """The engine thread's side of adapters: pins each sequence's adapter in the node's
    :class:`AdapterCache` for as long as the sequence lives, parks sequences whose adapter is
    loading (the batch goes on without them) and builds each step's :class:`LoraRows`.
    Not thread-safe except :meth:`violations` and :meth:`nbytes`."""

    def __init__(self, lm: LanguageModel, cache: AdapterCache | None) -> None:
        self._lm = lm
        self.cache = cache
        self._loading: list[tuple[S, Future[LoraAdapter]]] = []
        self._stacks: LoraStacks | None = None
        self._holders = 0
        """Sequences holding a pinned adapter; the stacks are dropped when none is left."""

    def violations(self, reference: str) -> list[tuple[str, str]]:
        """Why a request naming ``reference`` cannot be served here (empty: it may be, if the
        store has it); checked at submit."""
        if not reference:
            return []
        if self.cache is None:
            return [("adapter", f"node serves no adapters of {self._lm.name!r}")]
        try:
            parse_reference(reference, self._lm.name)
        except AdapterError as exc:
            return [("adapter", str(exc))]
        return []

    def begin(self, seq: S, reference: str) -> bool:
        """Start ``seq``'s adapter; True when ``seq`` can be scheduled now (base model, or
        adapter already loaded), False when it waits for :meth:`poll`."""
        if not reference or self.cache is None:
            return True
        seq.adapter_ref = parse_reference(reference, self._lm.name)
        future = self.cache.acquire(seq.adapter_ref)
        if future.done() and future.exception() is None:
            seq.adapter = future.result()
            self._holders += 1
            return True
        self._loading.append((seq, future))
        return False

    @property
    def loading(self) -> bool:
        """Whether some sequence waits for its adapter."""
        return bool(self._loading)

    def poll(self) -> list[tuple[S, AdapterError | None]]:
        """The sequences whose adapter finished loading: each with None (ready; pinned) or
        the :class:`AdapterError` that ends it (nothing pinned)."""
        if not self._loading:
            return []
        done: list[tuple[S, Future[LoraAdapter]]] = []
        waiting: list[tuple[S, Future[LoraAdapter]]] = []
        for item in self._loading:  # one look at each future: it may complete meanwhile
            (done if item[1].done() else waiting).append(item)
        self._loading = waiting
        out: list[tuple[S, AdapterError | None]] = []
        for seq, future in done:
            exc = future.exception()
            if exc is None:
                seq.adapter = future.result()
                self._holders += 1
                out.append((seq, None))
            else:
                seq.adapter_ref = None  # a failed acquire holds no pin
                error = exc if isinstance(exc, AdapterError) else AdapterError("", repr(exc))
                out.append((seq, error))
        return out

    def release(self, seq: S) -> None:
        """Unpin ``seq``'s adapter (idempotent); call it whenever ``seq`` leaves the engine.
        A sequence cancelled while its adapter loads leaves after :meth:`poll` hands it back
        (the engine drops it like any cancelled waiting sequence, releasing it then)."""
        if seq.adapter is not None and seq.adapter_ref is not None and self.cache is not None:
            self.cache.release(seq.adapter_ref)
            self._holders -= 1
            if self._holders == 0:
                self._stacks = None
        seq.adapter = None
        seq.adapter_ref = None

    def rows(self, decode: Sequence[S], prefills: Sequence[tuple[S, int]]) -> LoraRows | None:
        """This step's :class:`LoraRows` (decode rows, then ``n`` rows per prefill chunk
        ``(seq, n)``), or None when no row uses an adapter."""
        if self._holders == 0:
            return None
        used = {
            s.adapter_ref: s.adapter
            for s in [*decode, *(s for s, _ in prefills)]
            if s.adapter is not None and s.adapter_ref is not None
        }
        if not used:
            self._stacks = None
            return None
        refs = tuple(sorted(used, key=lambda r: (r.tenant, r.name)))
        if self._stacks is None or self._stacks.refs != refs:
            self._stacks = None  # free the old stacks before building the new ones
            self._stacks = LoraStacks.build(refs, [used[r] for r in refs], self._lm)
        position = {ref: j for j, ref in enumerate(refs)}

        def of(seq: S) -> int:
            ref = seq.adapter_ref
            return position[ref] if seq.adapter is not None and ref is not None else -1

        index = [of(s) for s in decode]
        decode_index = None
        if any(j >= 0 for j in index):
            decode_index = torch.tensor(index, dtype=torch.long, device=self._lm.device)
        chunks, first = [], len(decode)
        for seq, n in prefills:
            if of(seq) >= 0:
                chunks.append((first, first + n, of(seq)))
            first += n
        return LoraRows(decode_index, tuple(chunks), self._stacks)

    def nbytes(self) -> int:
        """Bytes of adapters on the node for this model: the cache's and the batch's stacks."""
        cached = self.cache.used_bytes if self.cache is not None else 0
        stacks = self._stacks
        return cached + (stacks.nbytes() if stacks is not None else 0)
