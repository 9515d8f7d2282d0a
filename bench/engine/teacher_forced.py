"""Whether the built-in engine's greedy tokens part from HF generate's on a near tie.

``python -m bench.engine.teacher_forced`` runs HF ``generate`` greedily on request 0 of
``make bench-engine``'s workload in ``--dtype``, then feeds the same tokens through the
engine's :class:`LlamaRunner` (prefill, then one decode step per token). At each position it
prints both top-2 margins and whether the argmaxes agree. Free-running greedy output diverges
for good at the first flip, so a flip on a margin of a rounding step (bf16: 0.125 at these
logits) says the two forwards round differently, not that one is wrong. Nothing is written;
the table is the result (docs/decisions/node-dtype-auto.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.engine.cli import DEFAULT_MODEL
from bench.engine.common import build_workload
from inference_node.engine.llama import LlamaRunner, Prefill
from inference_node.models import load_language_model


def main() -> None:
    """Print the table (see the module doc)."""
    p = argparse.ArgumentParser(prog="python -m bench.engine.teacher_forced", description=__doc__)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "sluice" / "models")
    args = p.parse_args()
    torch.set_num_threads(2)
    lm = load_language_model(DEFAULT_MODEL, dtype=args.dtype, cache_dir=args.cache_dir)
    prompt = list(build_workload(0, 1, lm.vocab_size, lm.eos_token_ids)[0].prompt)
    with torch.inference_mode():
        out = lm.hf_model().generate(
            torch.tensor([prompt]),
            max_new_tokens=args.tokens,
            min_new_tokens=args.tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        tokens = out.sequences[0, len(prompt) :].tolist()
        runner = LlamaRunner(lm, slots=1, max_len=len(prompt) + args.tokens + 1)
        logits = runner.step([], [], [Prefill(0, prompt, 0, wants_logits=True)])
        print(
            f"request 0 ({len(prompt)} prompt tokens), {args.dtype}, teacher-forced on HF's tokens"
        )
        print("| position | HF token | engine token | HF margin | engine margin |")
        print("| --- | --- | --- | --- | --- |")
        agree = 0
        for i, token in enumerate(tokens):
            ours = torch.topk(logits[0].float(), 2)
            theirs = torch.topk(out.scores[i][0].float(), 2)
            same = int(ours.indices[0]) == token
            agree += same
            print(
                f"| {i} | {token} | {int(ours.indices[0])}{'' if same else ' ✗'} | "
                f"{float(theirs.values[0] - theirs.values[1]):.3f} | "
                f"{float(ours.values[0] - ours.values[1]):.3f} |"
            )
            logits = runner.step([token], [len(prompt) + i], [])
    print(f"argmax agrees at {agree} of {len(tokens)} positions")


if __name__ == "__main__":
    main()
