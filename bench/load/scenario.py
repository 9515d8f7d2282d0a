"""Load scenarios: the YAML a load run is described in, its validation, and the request plan.

```yaml
name: overload
model: smollm2-135m-instruct
duration_s: 60            # arrival window
seed: 7
request_timeout_s: 20     # each request's gRPC deadline (a tenant may override it)
max_requests: 5000        # hard bound on launched requests
ignore_eos: true          # generate exactly the drawn output length
slo: {ttft_s: 2.0, tpot_s: 0.25}
tenants:
  - name: A
    api_key: {env: SLUICE_BENCH_KEY_A}   # or {file: path} or {value: "sk-..."}; none: the CLI's
    class: realtime
    weight: 2
    rate_rps: 0.15                        # Poisson arrivals
    prompt_tokens: {kind: uniform, min: 16, max: 128}
    output_tokens: {kind: choice, values: [32, 64, 96]}
  - name: E
    kind: embed                           # Embed calls instead of Generate
    model: all-minilm-l6-v2               # default: the scenario's model
    rate_rps: 1.0
    prompt_tokens: {kind: fixed, value: 12}   # words per text
    texts: {kind: uniform, min: 8, max: 32}   # texts per call (default: 1)
```

Prompts are made of common English words that are one token each in SmolLM2's tokenizer, so a
drawn prompt length is its length in that model's tokens (other tokenizers count differently;
the server reports the real count). The plan is a pure function of the scenario and its seed:
each tenant has its own random stream, so changing one tenant leaves the others' arrivals alone.
An embed tenant draws from its stream only what it uses (texts per call, then each text's
length), so adding one changes no generate tenant's plan.
"""

from __future__ import annotations

import functools
import math
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sluice.contract import WorkloadClass

MAX_DURATION_S = 3600.0
MAX_REQUESTS = 100_000

# Each is a single token in SmolLM2's tokenizer when preceded by a space.
_WORD_TEXT = """time year people way day man thing woman life child world school state family
    student group country problem hand part place case week company system program question work
    government number night point home water room mother area money story fact month lot right
    study book eye job word business issue side kind head house service friend father power hour
    game line end member law car city community name president team minute idea kid body
    information back parent face others level office door health person art war history party
    result change morning reason research girl guy moment air teacher force education river
    garden window music table paper light green blue red small large early young important
    public bad same able"""
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())


@functools.lru_cache(maxsize=64)
def vocabulary(salt: str = "") -> tuple[str, ...]:
    """:data:`WORDS`, or with a ``salt`` the same words in an order that salt alone fixes.

    A plan drawn with a salted vocabulary has the same lengths and arrivals as the unsalted one
    (the draws are the same; only the word each index names moves) but prompts no other salt
    produces, so a server's prefix cache cannot serve one load run from the run before it."""
    if not salt:
        return WORDS
    words = list(WORDS)
    random.Random(f"words:{salt}").shuffle(words)
    return tuple(words)


class ScenarioError(ValueError):
    """A scenario file that cannot be read or does not validate; the message names the field."""


ClassLabel = Literal["realtime", "batch", "finetune"]
"""How a scenario names a workload class: the labels of :class:`WorkloadClass` (checked below),
spelled out so the YAML schema and its error messages list them."""
assert set(get_args(ClassLabel)) == {c.label for c in WorkloadClass}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Fixed(_Strict):
    """Always the same length."""

    kind: Literal["fixed"]
    value: int = Field(ge=1)

    def draw(self, rng: random.Random) -> int:
        """The length."""
        return self.value


class Uniform(_Strict):
    """A length drawn uniformly from ``[min, max]``."""

    kind: Literal["uniform"]
    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be at least min ({self.min})")
        return self

    def draw(self, rng: random.Random) -> int:
        """A uniform length."""
        return rng.randint(self.min, self.max)


class Choice(_Strict):
    """A length drawn uniformly from a list."""

    kind: Literal["choice"]
    values: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)

    def draw(self, rng: random.Random) -> int:
        """One of the values."""
        return rng.choice(self.values)


class LogNormal(_Strict):
    """A long-tailed length, as in public chat traces: ``median`` times ``exp(sigma * z)`` for
    a standard normal ``z``, rounded and clipped to ``[min, max]``."""

    kind: Literal["lognormal"]
    median: float = Field(gt=0)
    sigma: float = Field(gt=0, le=4)
    min: int = Field(default=1, ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> LogNormal:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be at least min ({self.min})")
        return self

    def draw(self, rng: random.Random) -> int:
        """A long-tailed length."""
        value = round(self.median * math.exp(self.sigma * rng.gauss(0.0, 1.0)))
        return min(self.max, max(self.min, value))


Length = Annotated[Fixed | Uniform | Choice | LogNormal, Field(discriminator="kind")]


class Poisson(_Strict):
    """Arrivals of a Poisson process: exponential gaps (coefficient of variation 1)."""

    kind: Literal["poisson"] = "poisson"

    def gap(self, rng: random.Random, rate: float) -> float:
        """Seconds to the next arrival at ``rate`` per second on average."""
        return rng.expovariate(rate)


class Gamma(_Strict):
    """Bursty arrivals: gamma-distributed gaps with mean ``1 / rate`` and coefficient of
    variation ``cv`` (above 1: bursts and lulls; 2-4 is what public chat traces show)."""

    kind: Literal["gamma"]
    cv: float = Field(gt=0, le=10)

    def gap(self, rng: random.Random, rate: float) -> float:
        """Seconds to the next arrival at ``rate`` per second on average."""
        shape = 1.0 / (self.cv * self.cv)
        return rng.gammavariate(shape, 1.0 / (rate * shape))


Arrivals = Annotated[Poisson | Gamma, Field(discriminator="kind")]


class ApiKeySource(_Strict):
    """Where a tenant's API key comes from: exactly one of ``env``, ``file``, ``value``."""

    env: str | None = None
    file: Path | None = None
    value: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ApiKeySource:
        given = [n for n in ("env", "file", "value") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of env, file, value (got {given or 'none'})")
        return self

    def resolve(self) -> str:
        """The key; ``ScenarioError`` when the variable or file is missing or empty."""
        if self.value is not None:
            return self.value
        if self.env is not None:
            key = os.environ.get(self.env, "").strip()
            where = f"environment variable {self.env}"
        else:
            assert self.file is not None
            try:
                key = self.file.expanduser().read_text().strip()
            except OSError as exc:
                raise ScenarioError(f"api_key file {self.file}: {exc.strerror}") from exc
            where = f"file {self.file}"
        if not key:
            raise ScenarioError(f"api_key: {where} is not set or empty")
        return key


class TenantLoad(_Strict):
    """One tenant's traffic: Generate calls, or Embed calls (``kind: embed``)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    api_key: ApiKeySource | None = None
    workload_class: ClassLabel = Field(default="realtime", alias="class")
    """A :attr:`sluice.contract.WorkloadClass.label`."""
    weight: float = Field(default=1.0, gt=0)
    rate_rps: float = Field(gt=0)
    arrivals: Arrivals = Field(default_factory=Poisson)
    kind: Literal["generate", "embed"] = "generate"
    model: str | None = Field(default=None, min_length=1)
    """The model its calls name; default: the scenario's (an embed tenant names an embedder)."""
    prompt_tokens: Length
    """A generate tenant's prompt length; an embed tenant's length of each text."""
    output_tokens: Length | None = None
    """Answer length: required for a generate tenant, absent for an embed tenant."""
    texts: Length = Field(default_factory=lambda: Fixed(kind="fixed", value=1))
    """Texts per Embed call (embed tenants only)."""
    timeout_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> TenantLoad:
        if self.kind == "generate" and self.output_tokens is None:
            raise ValueError("output_tokens is required for a generate tenant")
        if self.kind == "embed" and self.output_tokens is not None:
            raise ValueError("an embed tenant generates no tokens: remove output_tokens")
        if self.kind == "generate" and "texts" in self.model_fields_set:
            raise ValueError("texts is for embed tenants (kind: embed) only")
        return self


class SLOSpec(_Strict):
    """The SLO goodput counts against."""

    ttft_s: float = Field(default=2.0, gt=0)
    tpot_s: float = Field(default=0.25, gt=0)
    embed_s: float = Field(default=0.5, gt=0)
    """An Embed meets the SLO when it answers OK within this many seconds."""


class Scenario(_Strict):
    """A whole scenario file."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    model: str = Field(min_length=1)
    duration_s: float = Field(gt=0, le=MAX_DURATION_S)
    seed: int = 0
    request_timeout_s: float = Field(default=30.0, gt=0)
    max_requests: int = Field(default=10_000, ge=1, le=MAX_REQUESTS)
    drain_s: float | None = Field(default=None, ge=0)
    """Wait after the arrival window for requests in flight; default: the longest timeout + 5."""
    ignore_eos: bool = True
    temperature: float = Field(default=0.0, ge=0)
    cache_bypass: bool = True
    slo: SLOSpec = Field(default_factory=SLOSpec)
    tenants: list[TenantLoad] = Field(min_length=1)

    @field_validator("tenants")
    @classmethod
    def _unique(cls, tenants: list[TenantLoad]) -> list[TenantLoad]:
        names = [t.name for t in tenants]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"tenant names must be unique; repeated: {', '.join(repeated)}")
        return tenants

    def model_for(self, tenant: TenantLoad) -> str:
        """The model the tenant's requests name."""
        return tenant.model or self.model

    def models(self) -> tuple[str, ...]:
        """Every distinct model the scenario's requests name, the scenario's model first (what
        a suite must serve to run it)."""
        return tuple(dict.fromkeys([self.model, *(self.model_for(t) for t in self.tenants)]))

    def timeout_for(self, tenant: TenantLoad) -> float:
        """The tenant's per-request deadline."""
        return tenant.timeout_s or self.request_timeout_s

    def drain_seconds(self) -> float:
        """How long a run waits after its arrival window before cutting requests off."""
        if self.drain_s is not None:
            return self.drain_s
        return max(self.timeout_for(t) for t in self.tenants) + 5.0

    @property
    def total_rps(self) -> float:
        """Sum of the tenants' rates."""
        return sum(t.rate_rps for t in self.tenants)


def _location(loc: tuple[int | str, ...], data: Any) -> str:
    """``('tenants', 1, 'rate_rps')`` → ``tenants[1] (B).rate_rps``."""
    out = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, dict) and isinstance(node.get("name"), str):
                out += f" ({node['name']})"
        else:
            out += f".{part}" if out else part
            node = node.get(part) if isinstance(node, dict) else None
    return out or "(top level)"


def format_errors(exc: ValidationError, data: Any, source: str) -> str:
    """One line per problem, each naming the field and what was wrong with it."""
    lines = [f"invalid scenario {source}:"]
    for error in exc.errors():
        where = _location(tuple(error["loc"]), data)
        message = str(error["msg"]).removeprefix("Value error, ")
        got = f" (got {error['input']!r})" if error["type"] not in ("missing",) else ""
        if isinstance(error.get("input"), dict | list):
            got = ""
        lines.append(f"  {where}: {message}{got}")
    return "\n".join(lines)


def parse_scenario(data: Any, source: str = "<scenario>") -> Scenario:
    """Validate already-loaded YAML data."""
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(format_errors(exc, data, source)) from None


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file; ``ScenarioError`` says what is wrong and where."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(f"scenario {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ScenarioError(f"scenario {path} must be a mapping with name, model, tenants, ...")
    return parse_scenario(data, str(path))


@dataclass(frozen=True)
class PlannedRequest:
    """One request of the plan: who sends what, and when (seconds after the run starts)."""

    index: int
    tenant: str
    workload_class: str
    """The tenant's class label; :meth:`sluice.contract.WorkloadClass.from_label` reads it."""
    scheduled_s: float
    prompt: str
    """A Generate's prompt; empty for an Embed."""
    prompt_tokens: int
    """A Generate's prompt length; an Embed's length of all its texts together."""
    max_new_tokens: int
    """0 for an Embed."""
    timeout_s: float
    kind: Literal["generate", "embed"] = "generate"
    model: str = ""
    """The model to call; empty: the target's default (the scenario's model)."""
    texts: tuple[str, ...] = ()
    """An Embed's inputs; empty for a Generate."""

    @property
    def requested_tokens(self) -> int:
        """The work it asks for, as fairness counts it: a Generate's output tokens, an Embed's
        tokens read (the scheduler charges an Embed its prompt tokens)."""
        return self.prompt_tokens if self.kind == "embed" else self.max_new_tokens


def make_prompt(rng: random.Random, tokens: int, words: tuple[str, ...] = WORDS) -> str:
    """``tokens`` random ``words`` (one SmolLM2 token each)."""
    return " ".join(rng.choice(words) for _ in range(tokens))


def plan_requests(
    scenario: Scenario,
    *,
    duration_s: float | None = None,
    total_rps: float | None = None,
    salt: str = "",
) -> list[PlannedRequest]:
    """Every tenant's arrivals (Poisson unless it says ``arrivals: {kind: gamma, cv: ...}``)
    over the window, merged in time order.

    ``total_rps`` scales every tenant's rate by the same factor so they sum to it; the plan is
    cut at ``max_requests``. A ``salt`` draws the prompts' words from :func:`vocabulary`.
    """
    words = vocabulary(salt)
    window = duration_s if duration_s is not None else scenario.duration_s
    scale = total_rps / scenario.total_rps if total_rps is not None else 1.0
    drafts: list[PlannedRequest] = []
    for tenant in scenario.tenants:
        rng = random.Random(f"{scenario.seed}:{tenant.name}")
        rate = tenant.rate_rps * scale
        t = tenant.arrivals.gap(rng, rate)
        while t < window:
            drafts.append(_draft(scenario, tenant, rng, t, words))
            t += tenant.arrivals.gap(rng, rate)
    drafts.sort(key=lambda r: (r.scheduled_s, r.tenant))
    return [replace(r, index=i) for i, r in enumerate(drafts[: scenario.max_requests])]


def _draft(
    scenario: Scenario,
    tenant: TenantLoad,
    rng: random.Random,
    scheduled_s: float,
    words: tuple[str, ...],
) -> PlannedRequest:
    """The tenant's request at ``scheduled_s`` (index -1), drawn from its stream ``rng``.

    A Generate draws its prompt length, prompt and answer length, in that order, exactly as
    before Embeds existed (so generate plans are unchanged); an Embed draws its text count,
    then every text's length, then their words.
    """
    texts: tuple[str, ...] = ()
    if tenant.kind == "embed":
        lengths = [tenant.prompt_tokens.draw(rng) for _ in range(tenant.texts.draw(rng))]
        texts = tuple(make_prompt(rng, n, words) for n in lengths)
        prompt, prompt_tokens, max_new_tokens = "", sum(lengths), 0
    else:
        assert tenant.output_tokens is not None  # the validator requires it for generate
        prompt_tokens = tenant.prompt_tokens.draw(rng)
        prompt = make_prompt(rng, prompt_tokens, words)
        max_new_tokens = tenant.output_tokens.draw(rng)
    return PlannedRequest(
        index=-1,
        tenant=tenant.name,
        workload_class=tenant.workload_class,
        scheduled_s=scheduled_s,
        prompt=prompt,
        prompt_tokens=prompt_tokens,
        max_new_tokens=max_new_tokens,
        timeout_s=scenario.timeout_for(tenant),
        kind=tenant.kind,
        model=scenario.model_for(tenant),
        texts=texts,
    )
