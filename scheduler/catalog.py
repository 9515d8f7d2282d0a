"""The model catalog: configured limits, else default limits for models nodes advertise."""

from __future__ import annotations

from scheduler.config import ModelSpec
from scheduler.nodes import NodeDirectory
from sluice import limits
from sluice.v1 import common_pb2

DEFAULT_MAX_NEW_TOKENS = 1024
"""Limit of a model a node advertises without a context length."""


class ModelCatalog:
    """Configured model limits, plus default limits for models that nodes advertise."""

    def __init__(self, specs: list[ModelSpec], nodes: NodeDirectory) -> None:
        self._specs = {s.name: s for s in specs}
        self._nodes = nodes

    def __call__(self, name: str) -> ModelSpec | None:
        spec = self._specs.get(name)
        if spec is not None:
            return spec
        advertised = self._nodes.models().get(name)
        if advertised is None:
            return None
        kind = "embed" if advertised.kind == common_pb2.MODEL_KIND_EMBED else "generate"
        limit = (
            min(max(1, advertised.max_context_tokens // 2), limits.MAX_NEW_TOKENS)
            if advertised.max_context_tokens
            else DEFAULT_MAX_NEW_TOKENS
        )
        return ModelSpec(name=name, kind=kind, max_new_tokens=limit)
