"""The tokenizer interface the engine and servicers use, and two of its implementations.

:class:`ByteTokenizer` serves the built-in test model; :class:`HFTokenizer` wraps a
transformers tokenizer. Native checkpoints use :class:`inference_node.native.FastTokenizer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class Tokenizer(Protocol):
    """What the engine and servicers need from a tokenizer."""

    eos_token_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, adding no special tokens the model does not need."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, skipping special tokens."""
        ...

    def apply_chat_template(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of ``(role, content)`` messages plus the assistant generation prompt.

        Raises ``ValueError`` when the model has no chat template.
        """
        ...


class ByteTokenizer:
    """Byte-level tokenizer: ids 0-255 are UTF-8 bytes, then BOS, EOS and PAD.

    Decoding skips the special ids and replaces invalid UTF-8 with U+FFFD. The chat template
    renders each message as ``<|role|>\\ncontent\\n`` and ends with ``<|assistant|>\\n``.
    """

    bos_token_id = 256
    eos_token_id: int | None = 257
    pad_token_id = 258
    vocab_size = 259
    has_chat_template = True

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text``; no special tokens are added."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Decode byte ids, dropping special ids and replacing invalid UTF-8."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Render messages as ``<|role|>`` blocks followed by the assistant prompt."""
        text = "".join(f"<|{role}|>\n{content}\n" for role, content in messages)
        return self.encode(text + "<|assistant|>\n")


class HFTokenizer:
    """Adapter giving a Hugging Face tokenizer the :class:`Tokenizer` protocol."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        eos = tokenizer.eos_token_id
        self.eos_token_id: int | None = int(eos) if eos is not None else None

    @property
    def has_chat_template(self) -> bool:
        """Whether the wrapped tokenizer carries a chat template."""
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without added special tokens."""
        return [int(i) for i in self._tok.encode(text, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens skipped."""
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def apply_chat_template(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Render with the model's template and the generation prompt; ``ValueError`` if none."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template")
        rendered = self._tok.apply_chat_template(
            [{"role": role, "content": content} for role, content in messages],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        if isinstance(rendered, dict) or hasattr(rendered, "input_ids"):
            rendered = rendered["input_ids"]
        return [int(i) for i in rendered]
