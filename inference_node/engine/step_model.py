"""What a step of the engine costs, learned from its own steps: ``seconds ≈ base +
per_sequence × decode rows + per_prefill_token × prompt tokens prefilled in it``, a least-squares
fit over the last ``window`` steps, refitted every ``refit_every``. Published in load reports, so
a scheduler can predict the inter-token time of a node's sequences if it adds one more.

Coefficients are kept non-negative (a term that fits negative is dropped and the rest refitted):
a step never gets cheaper with more work. A term whose work never varied in the window is left
out of the fit (least squares would split the cost between it and the base at random), and
nothing is published while the decode rows never varied (an engine that never batched says
nothing of what one more sequence costs). The first ``skip`` steps (warm-up: compilation,
allocation) are not fitted, and no step counts for more than ``clip`` times the window's
median: one slow step would otherwise move the base for 512 steps. Written and fitted on the
engine thread; read from any thread as one immutable :class:`StepCost`.

The median bound also clips the few steps that prefill a full chunk (0.5-0.7 s beside decode
steps of 50 ms on vLLM's CPU engine) and halves the cost per prompt token; the holds on lower
classes are tuned on that price (``docs/decisions/node-step-fit-clip.md``). So each fit also
carries :attr:`StepCost.timed`: the same terms refitted twice with every step bounded by
``clip`` times what its own work is fitted to cost (or the median, if more), the seconds steps
take, by which a scheduler times first tokens.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class StepCost:
    """The fitted cost of one step (seconds) and how many steps it was fitted on."""

    base_s: float
    per_sequence_s: float
    per_prefill_token_s: float
    samples: int
    timed: StepCost | None = None
    """The terms with each step bounded by its own work's cost, not the median (module doc)."""

    def predict(self, sequences: int, prefill_tokens: int = 0) -> float:
        """Seconds of a step decoding ``sequences`` rows and prefilling ``prefill_tokens``."""
        return (
            self.base_s
            + self.per_sequence_s * sequences
            + self.per_prefill_token_s * prefill_tokens
        )


class StepModel:
    """The fit (see the module doc)."""

    def __init__(
        self,
        window: int = 512,
        refit_every: int = 32,
        min_samples: int = 16,
        skip: int = 8,
        clip: float = 5.0,
    ) -> None:
        self._steps: deque[tuple[float, float, float]] = deque(maxlen=window)
        self._skip = skip
        self._clip = clip
        self._refit_every = refit_every
        self._min_samples = min_samples
        self._since_fit = 0
        self.cost: StepCost | None = None
        """The latest fit (None until ``min_samples`` steps were seen)."""

    def observe(self, seconds: float, sequences: int, prefill_tokens: int) -> None:
        """One step: its time, its decode rows and the prompt tokens it prefilled."""
        if self._skip > 0:
            self._skip -= 1
            return
        self._steps.append((float(sequences), float(prefill_tokens), seconds))
        self._since_fit += 1
        due = self.cost is None or self._since_fit >= self._refit_every
        if due and len(self._steps) >= self._min_samples:
            self.cost = self._fit()
            self._since_fit = 0

    def _fit(self) -> StepCost | None:
        data = torch.tensor(list(self._steps), dtype=torch.float64)
        if float(data[:, 0].std()) < 1e-9:  # the rows never varied
            return None
        x = torch.cat([torch.ones(len(data), 1, dtype=torch.float64), data[:, :2]], dim=1)
        seconds, floor = data[:, 2:], float(data[:, 2].median())
        terms = [0, 1] + ([2] if float(data[:, 1].std()) >= 1e-9 else [])
        coef = timed = _solve(x, seconds.clamp(max=self._clip * floor), terms)
        for _ in range(2 if math.isfinite(self._clip) else 0):  # bounded by its own work's cost
            bound = self._clip * (x @ timed).clamp(min=floor).unsqueeze(1)
            timed = _solve(x, torch.minimum(seconds, bound), terms)
        own = _cost(timed, len(data))
        return replace(_cost(coef, len(data)), timed=own)


def _cost(coef: torch.Tensor, samples: int) -> StepCost:
    return StepCost(coef[0].item(), coef[1].item(), coef[2].item(), samples)


def _solve(x: torch.Tensor, y: torch.Tensor, terms: list[int]) -> torch.Tensor:
    """Least squares of ``y`` on the columns ``terms`` of ``x``, the others zero; a term that
    fits negative is dropped and the rest refitted."""
    coef = torch.zeros(x.shape[1], dtype=torch.float64)
    while terms:
        solved = torch.linalg.lstsq(x[:, terms], y).solution.flatten()
        if bool((solved >= 0).all()):
            coef[terms] = solved
            break
        terms = [t for t, c in zip(terms, solved.tolist(), strict=True) if c >= 0]
    return coef
