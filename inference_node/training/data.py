"""Training examples as token ids with the positions the loss learns, their batches, and the
deterministic order a fine-tune reads them in.

A prompt/completion line learns its completion (and the end-of-sequence token, so the adapter
learns to stop). A chat learns every assistant turn, as rendered by the model's chat template:
its content and the first token of its end of turn. The :class:`Tokenizer` protocol only
renders conversations followed by the assistant's generation prompt, so :class:`ChatEncoder`
measures once what the template puts after a reply (two probe replies share it) and finds each
turn's content by rendering the conversation up to it; a template whose rendering of a
conversation is not a prefix of its rendering with one more message (one that drops earlier
reasoning, say) is refused (:class:`ExampleError`), since no cut would then be right.

The order (:class:`DataOrder`) is a pure function of the seed: epoch ``e`` reads a permutation
drawn from a generator seeded with ``(seed, e)``, so a cursor ``(epoch, position)`` is all a
checkpoint needs to resume it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from inference_node.lora.train import IGNORE_INDEX, Batch
from inference_node.tokenizer import Tokenizer

_PROBE_USER = "Hello"
_PROBE_REPLIES = ("OK", "No")  # replies whose last tokens differ


class ExampleError(ValueError):
    """A training example that cannot be learned (nothing to learn, too long, bad roles)."""


@dataclass(frozen=True)
class TrainExample:
    """One training sequence: ``tokens`` and, per position, whether the loss learns it."""

    tokens: tuple[int, ...]
    learned: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.learned):
            raise ExampleError("tokens and learned differ in length")

    @classmethod
    def prompt_completion(cls, prompt: Sequence[int], completion: Sequence[int]) -> TrainExample:
        """``prompt`` then ``completion``, the completion learned."""
        tokens = (*prompt, *completion)
        return cls(
            tuple(int(t) for t in tokens), (False,) * len(prompt) + (True,) * len(completion)
        )

    @property
    def target_tokens(self) -> int:
        """Positions the loss is taken on (a learned token at position 0 has no predictor)."""
        return sum(self.learned[1:])


def encode_prompt_completion(
    tokenizer: Tokenizer, prompt: str, completion: str, *, eos_id: int | None
) -> TrainExample:
    """A prompt/completion line: the encoded texts, ``eos_id`` appended to the completion."""
    completion_ids = tokenizer.encode(completion) + ([eos_id] if eos_id is not None else [])
    return TrainExample.prompt_completion(tokenizer.encode(prompt), completion_ids)


class ChatEncoder:
    """Encodes conversations with ``tokenizer``'s chat template, learning assistant turns."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        before = tokenizer.apply_chat_template([("user", _PROBE_USER)])
        tails = []
        for reply in _PROBE_REPLIES:
            after = tokenizer.apply_chat_template([("user", _PROBE_USER), ("assistant", reply)])
            if after[: len(before)] != before:
                raise ExampleError("the chat template does not render conversations prefix-stably")
            tails.append(after[len(before) :])
        self.tail_tokens = _common_suffix(*tails)
        """Tokens the template renders after an assistant reply's content: its end of turn,
        then the generation prompt of the next turn."""
        if not 0 < self.tail_tokens < min(len(t) for t in tails):
            raise ExampleError("cannot find where the chat template's assistant turns end")

    def encode(self, messages: Sequence[tuple[str, str]]) -> TrainExample:
        """``(role, content)`` messages ending with an assistant turn. Every assistant turn's
        content and the first token of its end of turn (``<|im_end|>``, ``<|eot_id|>``: what
        makes generation stop) are learned; the rest is context. The sequence ends there."""
        if not messages or messages[-1][0] != "assistant":
            raise ExampleError("a chat example must end with an assistant message")
        if messages[0][0] == "assistant":
            raise ExampleError("a chat example cannot start with an assistant message")
        render = self.tokenizer.apply_chat_template
        full = render(messages)
        learned = [False] * len(full)
        end = 0
        for i, (role, _) in enumerate(messages):
            if role != "assistant":
                continue
            start = len(render(messages[:i]))
            turn = render(messages[: i + 1])
            end = len(turn) - self.tail_tokens + 1
            if not start < end <= len(full) or turn[:end] != full[:end]:
                raise ExampleError("the chat template does not render turns prefix-stably")
            learned[start:end] = [True] * (end - start)
        return TrainExample(tuple(full[:end]), tuple(learned[:end]))


def _common_suffix(first: Sequence[int], second: Sequence[int]) -> int:
    """How many final tokens ``first`` and ``second`` share."""
    size = 0
    while size < min(len(first), len(second)) and first[-1 - size] == second[-1 - size]:
        size += 1
    return size


def make_train_batch(
    examples: Sequence[TrainExample], *, device: torch.device | str = "cpu"
) -> Batch:
    """Right-padded ids and labels (:data:`IGNORE_INDEX` on unlearned and padding positions).
    Padding is token 0: right of every real token, it changes no learned position's logits."""
    if not examples:
        raise ValueError("a batch needs at least one example")
    length = max(len(e.tokens) for e in examples)
    ids = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        tokens = torch.tensor(example.tokens, dtype=torch.long)
        ids[row, : len(tokens)] = tokens
        mask = torch.tensor(example.learned, dtype=torch.bool)
        labels[row, : len(tokens)] = torch.where(mask, tokens, IGNORE_INDEX)
    return Batch(input_ids=ids.to(device), labels=labels.to(device))


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for the named random stream of a job seeded ``seed``."""
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class Cursor:
    """Where the data order stands: the next example is position ``position`` of epoch
    ``epoch``'s permutation."""

    epoch: int = 0
    position: int = 0


class DataOrder:
    """The order a fine-tune reads ``count`` examples in, ``micro_batch_size`` at a time.

    Epoch ``e`` is ``torch.randperm(count)`` drawn from a CPU generator seeded from
    ``(seed, e)``; the last micro-batch of an epoch holds what is left (it can be smaller), and
    the next one starts the next epoch.
    """

    def __init__(self, count: int, micro_batch_size: int, seed: int) -> None:
        if count < 1 or micro_batch_size < 1:
            raise ValueError("need at least one example and a micro-batch of at least one")
        self.count, self.micro_batch_size, self.seed = count, micro_batch_size, seed
        self._cached: tuple[int, list[int]] | None = None

    @property
    def micro_batches_per_epoch(self) -> int:
        """Micro-batches that make one pass over the examples."""
        return -(-self.count // self.micro_batch_size)

    def permutation(self, epoch: int) -> list[int]:
        """Example indices in epoch ``epoch``'s order."""
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(stream_seed(self.seed, f"epoch-{epoch}"))
            self._cached = (epoch, torch.randperm(self.count, generator=generator).tolist())
        return self._cached[1]

    def micro_batch(self, cursor: Cursor) -> tuple[list[int], Cursor]:
        """The example indices of the micro-batch at ``cursor``, and the cursor after it."""
        order = self.permutation(cursor.epoch)
        end = min(cursor.position + self.micro_batch_size, self.count)
        taken = order[cursor.position : end]
        after = Cursor(cursor.epoch + 1, 0) if end >= self.count else Cursor(cursor.epoch, end)
        return taken, after
