"""The optimizer of a fine-tune: AdamW on the adapter's factors, a learning-rate schedule with
warm-up, gradient-norm clipping, and the optimizer's state split into tensors (for
safetensors) and JSON scalars, so a checkpoint never needs pickle.

The schedules are transformers' (``get_constant_schedule_with_warmup``,
``get_linear_schedule_with_warmup``, ``get_cosine_schedule_with_warmup`` with half a cycle):
step ``s`` (0 for the first optimizer step) of ``total`` gets ``learning_rate`` times
``s / warmup`` during warm-up, then 1 (constant), the linear decay
``(total - s) / (total - warmup)`` or ``0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))``,
never below 0. The rate is a function of the step alone: restoring the step restores it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch


class Schedule(StrEnum):
    """How the learning rate moves after warm-up."""

    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW's settings, the schedule and clipping. Validated on construction."""

    learning_rate: float = 2e-4
    """Peak learning rate (after warm-up); > 0."""
    schedule: Schedule = Schedule.LINEAR
    """Shape of the rate after warm-up."""
    warmup_steps: int = 0
    """Optimizer steps over which the rate rises linearly from 0."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's moment coefficients."""
    eps: float = 1e-8
    """AdamW's denominator term."""
    max_grad_norm: float | None = 1.0
    """Clip the gradients' total L2 norm to this before each update; ``None`` never clips."""

    def __post_init__(self) -> None:
        problems = []
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            problems.append(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            problems.append(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            problems.append(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "schedule", Schedule(self.schedule))
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))


def lr_multiplier(schedule: Schedule, step: int, *, total: int, warmup: int) -> float:
    """The factor on the peak learning rate at optimizer step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule is Schedule.CONSTANT:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule is Schedule.LINEAR:
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def learning_rate(config: OptimizerConfig, step: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total``."""
    factor = lr_multiplier(config.schedule, step, total=total, warmup=config.warmup_steps)
    return config.learning_rate * factor


def make_optimizer(params: Iterable[torch.Tensor], config: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over ``params`` with ``config``'s settings (the rate is set before each step)."""
    return torch.optim.AdamW(
        list(params),
        lr=config.learning_rate,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        foreach=False,
    )


def clip_and_step(
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    config: OptimizerConfig,
    rate: float,
) -> float:
    """Clip the gradients (if configured), update at ``rate``, clear the gradients; returns the
    gradients' total L2 norm before clipping. Parameters without a gradient are skipped."""
    with_grad = [p for p in params if p.grad is not None]
    # An infinite bound scales by exactly 1: the norm is measured and nothing changes.
    bound = config.max_grad_norm if config.max_grad_norm is not None else math.inf
    norm = torch.nn.utils.clip_grad_norm_(with_grad, bound, foreach=False)
    for group in optimizer.param_groups:
        group["lr"] = rate
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def split_state(
    optimizer: torch.optim.Optimizer, prefix: str = "optimizer.", *, copy: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's ``state_dict`` as tensors (``{prefix}{param}.{name}``, CPU copies; with
    ``copy=False`` the live tensors, which the next update changes) and a JSON-ready object
    holding everything else."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                key = f"{prefix}{index}.{name}"
                tensors[key] = value.detach().to("cpu").contiguous().clone() if copy else value
            else:
                scalars.setdefault(str(index), {})[name] = value
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
        for group in state["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def join_state(
    optimizer: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    prefix: str = "optimizer.",
) -> None:
    """Load what :func:`split_state` produced into ``optimizer`` (built over the same
    parameters in the same order)."""
    entries: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, name = key[len(prefix) :].split(".", 1)
            entries.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        entries.setdefault(int(index), {}).update(values)
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()}
        for group in meta["param_groups"]
    ]
    optimizer.load_state_dict({"state": entries, "param_groups": groups})
