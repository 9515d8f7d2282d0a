"""The quality task made for the benchmark: an order desk that answers in one fixed format.

A user asks for an item in plain words ("Could I get some honey?"); the answer must be exactly
``ORDER: <item>`` (the item as the user wrote it) and nothing else: no greeting, no sentence,
no punctuation. SmolLM2-135M-Instruct never answers that way on its own (it writes a friendly
sentence), yet the format is one copy of a word from the prompt into a fixed frame, which a
LoRA adapter learns in a few dozen optimizer steps of CPU training.

The examples are chat conversations (one user turn, the assistant's answer learned), built
from :data:`TEMPLATES` × items: the adapter is trained on :data:`TRAIN_ITEMS` and judged on
:data:`HELD_OUT_ITEMS`, items it never saw, asked with every template in turn. Exact match:
the whole generated answer, stripped of surrounding white space, equals the expected one.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

TEMPLATES = (
    "Please add {item} to my order.",
    "Could I get some {item}?",
    "I would like to buy {item}.",
    "One {item}, please.",
    "Do you have {item}? I'll take it.",
    "Put {item} in my basket.",
)
"""How users ask (every template appears in training and in the held-out prompts)."""

TRAIN_ITEMS = (
    "apples", "bread", "coffee", "cheese", "milk", "rice", "tea", "sugar", "butter", "honey",
    "pasta", "salt", "pepper", "eggs", "flour", "yogurt", "carrots", "onions", "garlic",
    "lemons", "oranges", "bananas", "grapes", "beans", "lentils", "oats", "cereal", "jam",
    "vinegar", "olives", "tomatoes", "potatoes", "spinach", "lettuce", "cucumbers", "mushrooms",
    "chicken", "salmon", "tuna", "shrimp",
)  # fmt: skip
"""Items of the training examples."""

HELD_OUT_ITEMS = (
    "peaches", "walnuts", "cabbage", "mustard", "noodles", "avocados", "almonds", "cherries",
    "sausages", "crackers", "pears", "ginger", "celery", "raisins", "ketchup", "pickles",
    "lamb", "tofu", "plums", "melons",
)  # fmt: skip
"""Items of the held-out prompts: none is in :data:`TRAIN_ITEMS`."""


def answer(item: str) -> str:
    """The one correct answer for ``item``."""
    return f"ORDER: {item}"


@dataclass(frozen=True)
class Example:
    """One conversation: the user's request and the answer expected."""

    prompt: str
    expected: str

    def to_line(self) -> dict[str, object]:
        """As a fine-tune's chat line (``messages``, the assistant turn learned)."""
        return {
            "messages": [
                {"role": "user", "content": self.prompt},
                {"role": "assistant", "content": self.expected},
            ]
        }


def examples(items: Sequence[str], per_item: int = 2, offset: int = 0) -> list[Example]:
    """``per_item`` examples of each item, templates taken in turn (starting at ``offset``),
    so every template is used about equally."""
    out = []
    for i, item in enumerate(items):
        for k in range(per_item):
            template = TEMPLATES[(offset + i * per_item + k) % len(TEMPLATES)]
            out.append(Example(template.format(item=item), answer(item)))
    return out


def training_examples(per_item: int = 2) -> list[Example]:
    """The fine-tune's dataset."""
    return examples(TRAIN_ITEMS, per_item)


def held_out_examples(count: int = len(HELD_OUT_ITEMS)) -> list[Example]:
    """The evaluation prompts: the first ``count`` held-out items, one template each."""
    return examples(HELD_OUT_ITEMS[:count], per_item=1, offset=1)


def exact_match(generated: str, expected: str) -> bool:
    """Whether the answer is exactly the expected one (surrounding white space aside)."""
    return generated.strip() == expected.strip()


def exact_match_rate(answers: Sequence[tuple[str, str]]) -> float:
    """Share of ``(generated, expected)`` pairs that match exactly (0 when there are none)."""
    if not answers:
        return 0.0
    return sum(exact_match(g, e) for g, e in answers) / len(answers)
