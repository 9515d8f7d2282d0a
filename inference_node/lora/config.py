"""A LoRA adapter's settings, and their translation to and from peft's ``adapter_config.json``.

Only plain LoRA as peft defines it is supported: ``scaling = alpha / rank`` (not rsLoRA), no
DoRA, no bias training, the same rank and alpha in every layer, every layer adapted. A peft
config asking for anything else is refused rather than silently served differently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""The linear layers of a Llama-family decoder layer that can carry LoRA, in module order."""
ATTENTION_MODULES: frozenset[str] = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
"""Those of :data:`TARGET_MODULES` that live under ``self_attn`` (the rest under ``mlp``)."""
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
MAX_RANK = 256
MAX_DROPOUT = 0.5


def module_path(layer: int, module: str) -> str:
    """The base model's name of ``module`` in decoder layer ``layer``, as in the state dict
    without ``.weight`` (``model.layers.3.self_attn.q_proj``)."""
    group = "self_attn" if module in ATTENTION_MODULES else "mlp"
    return f"model.layers.{layer}.{group}.{module}"


class AdapterConfigError(ValueError):
    """Settings or an ``adapter_config.json`` this implementation cannot honour."""


@dataclass(frozen=True)
class LoraConfig:
    """LoRA settings of one adapter. Validated on construction: every violation is reported
    in one :class:`AdapterConfigError`. ``target_modules`` is kept in :data:`TARGET_MODULES`
    order, so two configs naming the same modules compare equal."""

    rank: int = 8
    """Inner dimension ``r`` of ``B @ A``; 1 to :data:`MAX_RANK`."""
    alpha: float = 16.0
    """Numerator of the scaling (peft's ``lora_alpha``); finite and > 0."""
    dropout: float = 0.0
    """Dropout probability on the LoRA branch's input during training; 0 to
    :data:`MAX_DROPOUT`. Serving never applies it."""
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGET_MODULES)
    """Which linear layers of every decoder layer get an adapter; a non-empty subset of
    :data:`TARGET_MODULES`."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            problems.append(f"rank must be an integer, got {self.rank!r}")
        elif not 1 <= self.rank <= MAX_RANK:
            problems.append(f"rank must be between 1 and {MAX_RANK}, got {self.rank}")
        if not _is_number(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            problems.append(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout <= MAX_DROPOUT:
            problems.append(f"dropout must be between 0 and {MAX_DROPOUT}, got {self.dropout!r}")
        targets = tuple(self.target_modules) if _is_name_list(self.target_modules) else None
        if targets is None:
            problems.append(f"target_modules must be a list of names, got {self.target_modules!r}")
        else:
            unknown = sorted(set(targets) - set(TARGET_MODULES))
            if unknown:
                problems.append(
                    f"unknown target modules {unknown}; choose from {list(TARGET_MODULES)}"
                )
            if not targets:
                problems.append("target_modules must name at least one module")
            if len(set(targets)) != len(targets):
                problems.append(f"target_modules repeats a module: {list(targets)}")
        if problems:
            raise AdapterConfigError("; ".join(problems))
        ordered = tuple(m for m in TARGET_MODULES if m in set(self.target_modules))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "target_modules", ordered)

    @property
    def scaling(self) -> float:
        """Factor on ``B @ A @ x``: ``alpha / rank`` (peft's default, not rsLoRA's)."""
        return self.alpha / self.rank

    def to_peft(self, base_model: str | None = None) -> dict[str, Any]:
        """The ``adapter_config.json`` object peft reads back as this configuration."""
        alpha: float | int = int(self.alpha) if self.alpha.is_integer() else self.alpha
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "revision": None,
            "inference_mode": True,
            "r": self.rank,
            "lora_alpha": alpha,
            "lora_dropout": self.dropout,
            "target_modules": list(self.target_modules),
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    @classmethod
    def from_peft(cls, data: Mapping[str, Any]) -> LoraConfig:
        """The configuration of a peft ``adapter_config.json``; :class:`AdapterConfigError`
        if it uses a feature this implementation does not serve identically."""
        problems = [
            f"{key}={data.get(key)!r} is not supported"
            for key, allowed in _PEFT_MUST_BE.items()
            if data.get(key, allowed[0]) not in allowed
        ]
        targets = data.get("target_modules")
        if isinstance(targets, str):
            problems.append(f"target_modules as a pattern ({targets!r}) is not supported")
        if problems:
            raise AdapterConfigError("; ".join(problems))
        return cls(
            rank=data.get("r", 8),
            alpha=data.get("lora_alpha", 8),
            dropout=data.get("lora_dropout", 0.0),
            target_modules=tuple(targets) if isinstance(targets, list) else (),
        )


_PEFT_MUST_BE: dict[str, tuple[Any, ...]] = {
    # key: accepted values, the first being peft's default when the key is absent.
    "peft_type": ("LORA",),
    "bias": ("none",),
    "fan_in_fan_out": (False,),
    "use_rslora": (False,),
    "use_dora": (False,),
    "lora_bias": (False,),
    "modules_to_save": (None, []),
    "layers_to_transform": (None,),
    "rank_pattern": ({},),
    "alpha_pattern": ({},),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "layer_replication": (None,),
    "exclude_modules": (None, []),
    # LoRA variants whose forward differs from plain LoRA's (peft 0.21).
    "use_qalora": (False,),
    "use_bdlora": (None, False),
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "monteclora_config": (None,),
}


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_name_list(value: object) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and all(isinstance(v, str) for v in value)
    )
