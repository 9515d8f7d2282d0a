"""Whether the built-in engine's greedy tokens part from HF generate's only on near ties.

Free-running greedy output diverges for good at the first flip, so in bfloat16, where two
correct forwards round differently, counting leading tokens in common says little.
:func:`teacher_forced` runs HF ``generate`` greedily on some of ``make bench-engine``'s
requests, then feeds the same tokens through the engine's :class:`LlamaRunner` (prefill,
then one decode step per token) and compares the argmaxes position by position. A flip is a
*tie* when HF's own top-2 margin is at most :data:`TIE_STEPS` bfloat16 rounding steps at
that logit's magnitude; bench-engine's bf16 pass holds the engine to no flip beyond a tie
(its aux job, :mod:`bench.engine.workers`). ``python -m bench.engine.teacher_forced`` prints
the table for one request (docs/decisions/node-dtype-auto.md).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.engine.common import DEFAULT_MODEL, BenchRequest, build_workload
from inference_node.engine.llama import LlamaRunner, Prefill
from inference_node.models import LanguageModel, load_language_model

TIE_STEPS = 2
"""HF margins up to this many bfloat16 steps (at the top logit's magnitude) count as ties."""
BF16_MANTISSA_BITS = 7


def bf16_step(value: float) -> float:
    """The spacing of bfloat16 numbers around ``value``."""
    magnitude = abs(value)
    if magnitude == 0 or not math.isfinite(magnitude):
        return 0.0
    return 2.0 ** (math.floor(math.log2(magnitude)) - BF16_MANTISSA_BITS)


def positions(lm: LanguageModel, prompt: Sequence[int], tokens: int) -> list[dict[str, Any]]:
    """Per position of HF's greedy continuation of ``prompt``: HF's token, the engine's
    argmax fed HF's tokens so far, both top-2 margins and whether the flip is a tie."""
    with torch.inference_mode():
        out = lm.hf_model().generate(
            torch.tensor([list(prompt)]),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        hf_tokens = out.sequences[0, len(prompt) :].tolist()
        runner = LlamaRunner(lm, slots=1, max_len=len(prompt) + tokens + 1)
        logits = runner.step([], [], [Prefill(0, list(prompt), 0, wants_logits=True)])
        rows = []
        for i, token in enumerate(hf_tokens):
            ours = torch.topk(logits[0].float(), 2)
            theirs = torch.topk(out.scores[i][0].float(), 2)
            margin = float(theirs.values[0] - theirs.values[1])
            engine = int(ours.indices[0])
            rows.append(
                {
                    "hf": token,
                    "engine": engine,
                    "hf_margin": margin,
                    "engine_margin": float(ours.values[0] - ours.values[1]),
                    "tie": margin <= TIE_STEPS * bf16_step(float(theirs.values[0])),
                }
            )
            logits = runner.step([token], [len(prompt) + i], [])
    return rows


def teacher_forced(
    lm: LanguageModel, workload: Sequence[BenchRequest], requests: int = 4, tokens: int = 16
) -> dict[str, Any]:
    """:func:`positions` over the first ``requests`` of ``workload``, summed up."""
    flips: list[dict[str, Any]] = []
    total = 0
    for req in workload[:requests]:
        for i, row in enumerate(positions(lm, req.prompt, tokens)):
            total += 1
            if row["engine"] != row["hf"]:
                flips.append({"request": req.index, "position": i, **row})
    return {
        "requests": min(requests, len(workload)),
        "tokens": tokens,
        "positions": total,
        "agree": total - len(flips),
        "flips": flips,
        "flips_beyond_tie": sum(not f["tie"] for f in flips),
    }


def main() -> None:
    """Print one request's table (see the module doc)."""
    p = argparse.ArgumentParser(prog="python -m bench.engine.teacher_forced", description=__doc__)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--request", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "sluice" / "models")
    args = p.parse_args()
    torch.set_num_threads(2)
    lm = load_language_model(DEFAULT_MODEL, dtype=args.dtype, cache_dir=args.cache_dir)
    req = build_workload(0, args.request + 1, lm.vocab_size, lm.eos_token_ids)[args.request]
    rows = positions(lm, req.prompt, args.tokens)
    print(f"request {args.request} ({len(req.prompt)} prompt tokens), {args.dtype}, on HF's tokens")
    print("| position | HF token | engine token | HF margin | engine margin |")
    print("| --- | --- | --- | --- | --- |")
    for i, r in enumerate(rows):
        mark = "" if r["engine"] == r["hf"] else (" ✗ (tie)" if r["tie"] else " ✗")
        print(
            f"| {i} | {r['hf']} | {r['engine']}{mark} | {r['hf_margin']:.3f} | "
            f"{r['engine_margin']:.3f} |"
        )
    agree = sum(r["engine"] == r["hf"] for r in rows)
    print(f"argmax agrees at {agree} of {len(rows)} positions")


if __name__ == "__main__":
    main()
