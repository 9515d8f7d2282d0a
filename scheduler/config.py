"""Scheduler settings and the model catalog."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from sluice.settings import ServiceSettings


class ModelSpec(BaseModel):
    """Limits the scheduler enforces for one model before any node sees the request."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: str = Field(pattern="^(generate|embed)$")
    max_new_tokens: int = 1024
    """Largest ``max_new_tokens`` a request may ask for."""
    default_max_new_tokens: int = 128
    """``max_new_tokens`` of a request that sets none."""
    max_prompt_chars: int = 32_000
    """Longest prompt (or sum of chat message contents) accepted, in characters."""
    max_inputs: int = 256
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
    """Deadline applied to requests that arrive without one."""
    max_attempts: int = 2
    """Nodes tried for one request while no token has reached the client."""
    models: list[ModelSpec] = Field(default_factory=lambda: list(DEFAULT_MODELS))
    """The model catalog; models that nodes advertise beyond it get default limits."""
    scheduler_id: str = ""
    """Id published under /sluice/schedulers/; empty picks a random one."""
