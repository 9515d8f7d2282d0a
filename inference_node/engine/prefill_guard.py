"""How many prompt tokens one step gives the classes below its tightest decoding stream.

Lower classes may run at looser inter-token targets only where they do not slow a REALTIME
stream past its own (issue 20). The batch limit (:func:`sluice.itl.fitted_limit`) keeps a
lower-class *sequence* from joining a batch that would then decode too slowly; its *prompt*
lands in steps as well, and a 512-token chunk of it takes several times a decode step. So
while streams of a class decode, prompt tokens of lower classes get what the tightest step
budget among those streams leaves once the decode rows and the step's other prompt tokens are
counted (:func:`sluice.itl.prefill_allowance`), and at least :data:`FLOOR_TOKENS` a step,
so they still move. The decoding class's own prompts (a REALTIME request's time to first
token) are never held back; they count against the allowance all the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from inference_node.engine.llama import Prefill
from inference_node.engine.sequences import BatchSequence
from sluice.itl import PrefillFit, prefill_allowance, tightest

FLOOR_TOKENS = 32
"""Prompt tokens the lower classes get per step however tight the budget: a 135M model on two
CPU cores prefills them in about 45 ms in bfloat16."""


@dataclass
class LowerPrefill:
    """One step's allowance (:meth:`plan`), spent by :meth:`take`."""

    rank: int
    """The tightest decoding stream's class rank: sequences ranked after it are capped."""
    left: int | None
    """Prompt tokens left for them this step; None: no cap."""

    @classmethod
    def plan(cls, fit: PrefillFit | None, decoding: Sequence[BatchSequence]) -> LowerPrefill:
        """The allowance of a step that decodes ``decoding`` by the node's fitted step time."""
        if not decoding:
            return cls(rank=0, left=None)
        rank = min(s.job.workload_class.rank for s in decoding)
        budget = tightest(
            s.job.request.step_budget_s for s in decoding if s.job.workload_class.rank == rank
        )
        allowance = prefill_allowance(fit, len(decoding), budget)
        return cls(rank, None if allowance is None else max(allowance, FLOOR_TOKENS))

    def capped(self, seq: BatchSequence) -> bool:
        """Whether ``seq``'s prompt tokens count against a spent allowance (it gets none)."""
        return self.left is not None and self.left <= 0 and seq.job.workload_class.rank > self.rank

    def take(self, seq: BatchSequence, budget: int) -> int:
        """Prompt tokens ``seq`` may prefill this step, of the step's ``budget`` left."""
        if self.left is None:
            return budget
        capped = seq.job.workload_class.rank > self.rank
        n = min(budget, max(self.left, 0)) if capped else budget
        self.left -= n
        return n


def next_chunk(seq: BatchSequence, tokens: int) -> Prefill:
    """The next ``tokens`` of ``seq``'s prompt not yet in its cache (fewer at its end)."""
    start = seq.computed
    n = min(len(seq.tokens) - start, tokens)
    end = start + n
    return Prefill(seq.slot, seq.tokens[start:end], start, wants_logits=end == len(seq.tokens))
