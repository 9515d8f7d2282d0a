"""``Node.Train``'s request checked and translated: the ``FinetuneSpec`` into a
:class:`~inference_node.training.TrainingConfig` with the proto's defaults (rank 0 → 8, alpha
0 → 2 × rank, no target modules → the four attention projections, learning rate 0 → 2e-4,
schedule unset → cosine, max_grad_norm 0 → no clipping, epochs, micro-batch and accumulation
0 → 1, max_sequence_tokens 0 → 512, checkpoint_every_steps 0 → 20), and the examples into
token sequences with the positions the loss learns.

The scheduler has checked all of it already; the node checks again (a caller that bypasses
the scheduler is refused the same way) and refuses with INVALID_ARGUMENT naming every field
at fault (``spec.lora.rank``, ``examples[3].messages``). An example longer than
``max_sequence_tokens`` (or the model's context) is cut to it, as the proto says; one left
with no token to learn is refused. Messages after a conversation's last assistant turn teach
nothing and are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from inference_node.adapters import AdapterRef, valid_name
from inference_node.lora import AdapterConfigError, LoraConfig
from inference_node.model_types import LanguageModel
from inference_node.training import (
    ChatEncoder,
    ExampleError,
    OptimizerConfig,
    Schedule,
    TrainExample,
    TrainingConfig,
    encode_prompt_completion,
)
from inference_node.training.checkpoint import valid_job_id
from sluice import limits
from sluice.runtime.errors import MAX_VIOLATIONS, InvalidArgument
from sluice.v1 import jobs_pb2, node_pb2

MAX_STEPS = limits.FINETUNE_MAX_STEPS
"""Optimizer steps of one fine-tune at most (however they are asked for)."""
SCHEDULES = {
    jobs_pb2.LR_SCHEDULE_UNSPECIFIED: Schedule.COSINE,
    jobs_pb2.LR_SCHEDULE_CONSTANT: Schedule.CONSTANT,
    jobs_pb2.LR_SCHEDULE_LINEAR: Schedule.LINEAR,
    jobs_pb2.LR_SCHEDULE_COSINE: Schedule.COSINE,
}


@dataclass(frozen=True)
class TrainPlan:
    """What a valid ``NodeTrainRequest`` asks for."""

    job_id: str
    adapter: AdapterRef
    """Where the adapter goes: the tenant, the base model and the adapter's name."""
    config: TrainingConfig
    checkpoint_every: int
    """Optimizer steps between two checkpoints (and one after the last step)."""


def plan_training(request: node_pb2.NodeTrainRequest, lm: LanguageModel) -> TrainPlan:
    """The plan of ``request`` for ``lm``, or :class:`InvalidArgument` naming every field
    out of range (before the examples are read)."""
    spec = request.spec
    bad: list[tuple[str, str]] = []
    if not valid_job_id(request.job_id):
        bad.append(("job_id", "1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit"))
    bad += limits.tenant_name_violations("tenant", request.tenant)
    if not valid_name(request.tenant):
        bad.append(("tenant", "1-64 of A-Z a-z 0-9 . _ -"))
    if not valid_name(spec.adapter_name):
        bad.append(("spec.adapter_name", "1-128 of A-Z a-z 0-9 . _ -"))
    bad += limits.finetune_spec_violations(spec, "spec.")
    ints = limits.finetune_ints(spec)
    targets = tuple(spec.lora.target_modules) or limits.DEFAULT_LORA_TARGET_MODULES
    if not request.examples:
        bad.append(("examples", "a fine-tune needs at least one example"))
    if bad:
        raise InvalidArgument(bad)
    try:
        config = _config(spec, ints, targets, lm, len(request.examples))
    except (AdapterConfigError, ValueError) as exc:
        raise InvalidArgument([("spec", str(exc))]) from exc
    return TrainPlan(
        job_id=request.job_id,
        adapter=AdapterRef(request.tenant, lm.name, spec.adapter_name),
        config=config,
        checkpoint_every=ints["checkpoint_every_steps"],
    )


def _config(
    spec: jobs_pb2.FinetuneSpec,
    ints: dict[str, int],
    targets: tuple[str, ...],
    lm: LanguageModel,
    examples: int,
) -> TrainingConfig:
    rank = ints["lora.rank"]
    lora = LoraConfig(
        rank=rank,
        alpha=float(spec.lora.alpha) or 2.0 * rank,
        dropout=float(spec.lora.dropout),
        target_modules=targets,
    )
    optimizer = OptimizerConfig(
        learning_rate=float(spec.optimizer.learning_rate) or limits.DEFAULT_LEARNING_RATE,
        schedule=SCHEDULES[spec.optimizer.schedule],
        warmup_steps=ints["optimizer.warmup_steps"],
        weight_decay=float(spec.optimizer.weight_decay),
        max_grad_norm=float(spec.optimizer.max_grad_norm) or None,
    )
    micro, accumulation = ints["micro_batch_size"], ints["gradient_accumulation_steps"]
    steps = ints["max_steps"] or -(-ints["epochs"] * -(-examples // micro) // accumulation)
    if steps > MAX_STEPS:
        raise ValueError(f"{steps} optimizer steps in all, at most {MAX_STEPS}")
    return TrainingConfig(
        lora=lora,
        optimizer=optimizer,
        micro_batch_size=micro,
        accumulation_steps=accumulation,
        epochs=ints["epochs"],
        max_steps=ints["max_steps"] or None,
        # Longer examples are cut to this; never longer than the model's context.
        max_seq_len=min(ints["max_sequence_tokens"], lm.max_context_tokens),
        seed=int(spec.seed),
    )


def encode_examples(
    examples: Sequence[jobs_pb2.TrainingExample], lm: LanguageModel, max_tokens: int
) -> list[TrainExample]:
    """Token sequences of ``examples`` for ``lm``, each cut to ``max_tokens``; or
    :class:`InvalidArgument` naming every example that cannot be learned."""
    tokenizer = lm.tokenizer
    chat: ChatEncoder | None = None
    out: list[TrainExample] = []
    bad: list[tuple[str, str]] = []
    for i, example in enumerate(examples):
        where = f"examples[{i}]"
        problem = _shape_problem(example, lm)
        if problem is not None:
            bad.append((f"{where}.{problem[0]}" if problem[0] else where, problem[1]))
            continue
        try:
            if example.messages:
                chat = chat or ChatEncoder(tokenizer)
                encoded = chat.encode(_learnable_turns(example))
            else:
                encoded = encode_prompt_completion(
                    tokenizer, example.prompt, example.completion, eos_id=tokenizer.eos_token_id
                )
        except ExampleError as exc:
            bad.append((where, str(exc)))
            continue
        except Exception as exc:  # the tokenizer failed on this text
            bad.append((where, f"could not be tokenized ({type(exc).__name__})"))
            continue
        cut = TrainExample(encoded.tokens[:max_tokens], encoded.learned[:max_tokens])
        if cut.target_tokens < 1:
            bad.append((where, f"no token to learn within its first {max_tokens} tokens"))
            continue
        out.append(cut)
    if len(bad) > MAX_VIOLATIONS:
        bad.insert(0, ("examples", f"{len(bad)} examples cannot be learned; the first follow"))
    if bad:
        raise InvalidArgument(bad)
    return out


def _shape_problem(example: jobs_pb2.TrainingExample, lm: LanguageModel) -> tuple[str, str] | None:
    """What makes ``example`` unlearnable before it is tokenized: ``(field, why)``."""
    if not example.messages:
        if not example.completion:
            return "completion", "required: the text to learn (or send messages)"
        return None
    if example.prompt or example.completion:
        return "", "set prompt and completion, or messages, not both"
    if not lm.chat:
        return "messages", f"model {lm.name!r} has no chat template"
    if len(example.messages) > limits.MAX_MESSAGES:
        return "messages", f"at most {limits.MAX_MESSAGES} messages"
    for j, message in enumerate(example.messages):
        if message.role not in limits.CHAT_ROLES:
            return f"messages[{j}].role", f"one of {sorted(limits.CHAT_ROLES)}"
    if example.messages[0].role == "assistant":
        return "messages[0].role", "a conversation cannot start with the assistant"
    if all(m.role != "assistant" for m in example.messages):
        return "messages", "at least one assistant turn (the turns learned)"
    return None


def _learnable_turns(example: jobs_pb2.TrainingExample) -> list[tuple[str, str]]:
    """The conversation up to its last assistant turn."""
    turns = [(m.role, m.content) for m in example.messages]
    last = max(i for i, (role, _) in enumerate(turns) if role == "assistant")
    return turns[: last + 1]
