"""Token-level helpers shared by the engines: sampling, stop conditions, streaming text."""

from __future__ import annotations

import torch

from inference_node.engine.types import (
    EngineRequest,
    FinishReason,
    InvalidRequestError,
    SamplingParams,
    TokenDelta,
)
from inference_node.model_types import LanguageModel
from sluice import limits
from sluice.contract import WorkloadClass


def sampling_violations(params: SamplingParams) -> list[tuple[str, str]]:
    """Every sampling rule ``params`` breaks, as ``(field, why)``: numerically safe
    temperature and top_p (finite, no denormals), bounded stop strings; the contract's
    limits (:func:`sluice.limits.sampling_violations`), which the scheduler and the node's
    servicer check first."""
    return limits.sampling_violations(params.temperature, params.top_p, params.stop)


def checked_request(
    request: EngineRequest,
    vocab_size: int,
    max_context_tokens: int,
    adapter_violations: list[tuple[str, str]],
) -> tuple[WorkloadClass, int]:
    """``request``'s class (unspecified, 0, read as REALTIME) and its prompt plus
    ``max_new_tokens``, or :class:`InvalidRequestError` with every rule it breaks at once:
    numerically safe sampling, prompt ids within ``vocab_size``, at least one new token, the
    engine's ``adapter_violations``, a class the contract defines, the model's context. The
    node's second line of defence after the scheduler's validation, for every engine."""
    params = request.params
    prompt = request.prompt_token_ids
    violations = sampling_violations(params)
    if not prompt:
        violations.append(("prompt", "the prompt is empty"))
    elif min(prompt) < 0 or max(prompt) >= vocab_size:
        violations.append(("prompt", f"token ids must be in [0, {vocab_size})"))
    if params.max_new_tokens < 1:
        violations.append(("options.max_new_tokens", "must be at least 1"))
    violations.extend(adapter_violations)
    workload_class = WorkloadClass.REALTIME
    try:
        workload_class = WorkloadClass.from_wire(request.workload_class)
    except ValueError:
        violations.append(("workload_class", f"unknown value {int(request.workload_class)}"))
    total = len(prompt) + params.max_new_tokens
    if total > max_context_tokens:
        violations.append(
            (
                "options.max_new_tokens",
                f"prompt ({len(prompt)} tokens) plus max_new_tokens ({params.max_new_tokens})"
                f" exceeds the context of {max_context_tokens} tokens",
            )
        )
    if violations:
        raise InvalidRequestError(violations)
    return workload_class, total


class SamplingError(ArithmeticError):
    """The numbers of one request's sampling step are unusable (NaN or infinite)."""


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request generator seeded from ``params.seed`` (random if unset); none if greedy."""
    if params.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy when temperature is 0, else temperature plus nucleus (top-p) sampling.

    The largest logit is subtracted before dividing by the temperature, so the scaled logits
    are at most 0 and the best token's is exactly 0: no temperature > 0, however small,
    overflows them (a tiny one makes sampling greedy). Raises :class:`SamplingError` when the
    logits or probabilities are not finite, before ``torch.multinomial`` would."""
    peak = logits.max()  # NaN if any logit is NaN
    if not bool(torch.isfinite(peak)):
        raise SamplingError("the model's logits for this request are not finite")
    if generator is None:
        return int(torch.argmax(logits).item())
    probs = torch.softmax((logits - peak) / params.temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise SamplingError("the sampling probabilities of this request are not finite")
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that could be the start of a stop string."""
    longest = min(max((len(s) for s in stops), default=0) - 1, len(text))
    for size in range(longest, 0, -1):
        tail = text[-size:]
        if any(s.startswith(tail) for s in stops):
            return size
    return 0


def kv_bytes_per_token(lm: LanguageModel) -> int:
    """2 (K and V) x layers x KV heads x head size x bytes per element."""
    config = lm.config
    heads = int(config.get("num_attention_heads", 1) or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size", 0)) // heads)
    layers = int(config.get("num_hidden_layers", 0))
    element = torch.empty((), dtype=lm.dtype).element_size()
    return 2 * layers * kv_heads * head_dim * element


class TextStream:
    """One request's generated tokens and the text already streamed for them.

    Each :meth:`push` decodes the whole completion (so multi-token characters come out whole)
    and emits only the new stable suffix: a trailing partial UTF-8 character ("\\ufffd") and
    any suffix that could still become a stop string are held back until disambiguated.
    Concatenating every delta's text gives the final completion, stop string excluded.
    """

    def __init__(
        self, lm: LanguageModel, params: SamplingParams, prompt_tokens: int, eos: frozenset[int]
    ) -> None:
        self._tokenizer = lm.tokenizer
        self.params = params
        self.prompt_tokens = prompt_tokens
        self._eos = eos
        self.generated: list[int] = []
        self._emitted = ""

    def push(self, token: int) -> TokenDelta:
        """Add a token; the delta's ``finish_reason`` is set when the request must end."""
        params = self.params
        self.generated.append(token)
        count = len(self.generated)
        text = self._tokenizer.decode(self.generated)
        reason: FinishReason | None = None
        found = [i for i in (text.find(s) for s in params.stop) if i >= 0]
        if found:
            reason, text = FinishReason.STOP, text[: min(found)]
        elif token in self._eos and not params.ignore_eos:
            reason = FinishReason.EOS
        elif count >= params.max_new_tokens:
            reason = FinishReason.LENGTH
        if reason is not None:
            piece = text[len(self._emitted) :] if text.startswith(self._emitted) else ""
            return TokenDelta(piece, (token,), reason, self.prompt_tokens, count)
        stable = text.rstrip("\ufffd")
        stable = stable[: len(stable) - held_back(stable, params.stop)]
        piece = ""
        if len(stable) > len(self._emitted) and stable.startswith(self._emitted):
            piece, self._emitted = stable[len(self._emitted) :], stable
        return TokenDelta(piece, (token,), None, self.prompt_tokens, count)

    def final(self, reason: FinishReason) -> TokenDelta:
        """An empty last delta ending the request with ``reason`` (e.g. CANCELLED)."""
        return TokenDelta("", (), reason, self.prompt_tokens, len(self.generated))
