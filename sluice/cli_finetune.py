"""`sluice jobs submit --finetune data.jsonl --base-model M --adapter-name N`: a LoRA fine-tune
from an OpenAI fine-tuning JSONL file (``{"prompt", "completion"}`` or ``{"messages": [...]}``
lines), followed live (step/total, loss, learning rate, tokens/s, time waiting for gaps, ETA
and the loss so far as a sparkline), its loss curve at the end as a sparkline and, with
``--plot loss.png``, as a PNG (matplotlib, installed with the ``dev`` extra). Also the
fine-tune rows of `sluice jobs show`.
"""

from __future__ import annotations

import importlib.util
import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn

from sluice import FINAL_JOB_STATES, Client
from sluice.cli_connect import err
from sluice.cli_files import read_lines_file
from sluice.sdk.finetune_lines import (
    SCHEDULES,
    FinetuneSettings,
    loss_curve,
    parse_training_lines,
)
from sluice.v1 import jobs_pb2

SPARK = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 48

FinetuneFile = Annotated[
    Path | None,
    typer.Option(
        "--finetune",
        help="Fine-tune on this JSONL (prompt/completion or messages lines, OpenAI's "
        "fine-tuning format) instead of running a batch file; -: stdin.",
    ),
]
BaseModel = Annotated[str | None, typer.Option("--base-model", help="Model to fine-tune.")]
AdapterName = Annotated[
    str | None, typer.Option("--adapter-name", help="Adapter name, served as BASE:NAME.")
]
Rank = Annotated[int, typer.Option("--rank", help="LoRA rank, 1-256 (0: 8).")]
Alpha = Annotated[float, typer.Option("--alpha", help="LoRA alpha (0: 2 x rank).")]
Dropout = Annotated[float, typer.Option("--dropout", help="LoRA dropout, 0-0.5.")]
TargetModules = Annotated[
    str, typer.Option("--target-modules", help="Comma-separated, e.g. q_proj,v_proj.")
]
Lr = Annotated[float, typer.Option("--lr", help="Peak learning rate (0: 2e-4).")]
Schedule = Annotated[str, typer.Option("--schedule", help="constant, linear or cosine.")]
WarmupSteps = Annotated[int, typer.Option("--warmup-steps", help="Linear warm-up steps.")]
Epochs = Annotated[int, typer.Option("--epochs", help="Passes over the data (0: 1).")]
MaxSteps = Annotated[int, typer.Option("--max-steps", help="Optimizer steps (0: the epochs').")]
MicroBatch = Annotated[int, typer.Option("--micro-batch", help="Examples per micro-batch.")]
Accumulation = Annotated[
    int, typer.Option("--accumulation", help="Micro-batches per optimizer step.")
]
Seed = Annotated[int, typer.Option("--seed", help="Seed of init, data order and dropout.")]
Shared = Annotated[
    bool, typer.Option("--shared", help="Serve the adapter to every tenant of the base model.")
]
Plot = Annotated[
    Path | None,
    typer.Option("--plot", help="Write the loss curve as a PNG here (implies --wait)."),
]


@dataclass(frozen=True)
class FinetuneFlags:
    """The fine-tune flags of `sluice jobs submit`."""

    path: Path
    base_model: str
    adapter_name: str
    settings: FinetuneSettings
    plot: Path | None

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> FinetuneFlags:
        """From the command's parameters (``typer.Context.params``)."""
        for flag, name in (("--base-model", "base_model"), ("--adapter-name", "adapter_name")):
            if not params.get(name):
                raise typer.BadParameter(f"{flag} is required with --finetune", param_hint=flag)
        schedule = params.get("schedule") or ""
        if schedule and schedule not in SCHEDULES:
            raise typer.BadParameter(f"one of {', '.join(SCHEDULES)}", param_hint="--schedule")
        plot = params.get("plot")
        if plot is not None and importlib.util.find_spec("matplotlib") is None:
            raise typer.BadParameter(
                "needs matplotlib (pip install matplotlib)", param_hint="--plot"
            )
        settings = FinetuneSettings(
            rank=params["rank"],
            alpha=params["alpha"],
            dropout=params["dropout"],
            target_modules=[m for m in params["target_modules"].split(",") if m.strip()],
            learning_rate=params["lr"],
            warmup_steps=params["warmup_steps"],
            epochs=params["epochs"],
            max_steps=params["max_steps"],
            micro_batch_size=params["micro_batch"],
            gradient_accumulation_steps=params["accumulation"],
            seed=params["seed"],
            shared=params["shared"],
        )
        if schedule:
            settings["schedule"] = schedule
        return cls(params["finetune"], params["base_model"], params["adapter_name"], settings, plot)


def read_examples(path: Path, skip_invalid: bool) -> list[jobs_pb2.JobLine]:
    """The file's examples (:func:`sluice.cli_files.read_lines_file`)."""
    return read_lines_file(path, parse_training_lines, skip_invalid=skip_invalid, noun="example")


def submit_finetune(
    client: Client,
    flags: FinetuneFlags,
    examples: Sequence[jobs_pb2.JobLine],
    *,
    wait: bool,
    **submit: Any,
) -> None:
    """Submit the fine-tune, print its id; with ``wait`` (or a plot) follow it to its end,
    show its loss curve and exit 0 only when it completed."""
    job = client.submit_finetune(
        examples,
        base_model=flags.base_model,
        adapter_name=flags.adapter_name,
        **submit,
        **flags.settings,
    )
    typer.echo(job.job_id)
    err.print(
        f"fine-tune {job.job_id}: {_state(job.state)}, {job.request_counts.total} examples, "
        f"{job.training.total_steps} steps, adapter {flags.base_model}:{flags.adapter_name}"
    )
    if not (wait or flags.plot):
        return
    job = follow(client, job)
    curve = loss_curve(client.job_results(job.job_id))
    if curve:
        losses = [s.loss for s in curve]
        err.print(
            f"loss {sparkline(losses)} {losses[0]:.4f} → {losses[-1]:.4f} over {len(curve)} steps",
            highlight=False,
        )
    if flags.plot is not None and curve:
        plot_loss(curve, flags.plot, f"{flags.base_model}:{flags.adapter_name}")
        err.print(f"loss curve written to {escape(str(flags.plot))}")
    if job.adapter:
        err.print(f"adapter {escape(job.adapter)} is served")
    raise typer.Exit(0 if job.state == jobs_pb2.JOB_STATE_COMPLETED else 1)


def follow(client: Client, job: jobs_pb2.Job) -> jobs_pb2.Job:
    """A live progress line of a fine-tune until it reaches a final state; returns it then."""
    progress = Progress(
        TextColumn("{task.description:>10}"),
        BarColumn(bar_width=24),
        TextColumn("step {task.fields[step]}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TextColumn("waited {task.fields[waited]}"),
        TextColumn("ETA {task.fields[eta]}"),
        TextColumn("{task.fields[spark]}"),
        console=err,
    )
    losses: list[float] = []
    last_step = 0
    try:
        with progress:
            task = progress.add_task(_state(job.state), total=None, **_fields(job, losses))
            for event in client.watch_job(job.job_id):
                job = event.job
                if job.training.step > last_step and job.training.loss > 0:
                    last_step = job.training.step
                    losses.append(job.training.loss)
                progress.update(
                    task,
                    description=_state(job.state),
                    completed=job.training.step,
                    total=job.training.total_steps or None,
                    **_fields(job, losses),
                )
    except KeyboardInterrupt:
        err.print(f"stopped watching; the fine-tune goes on (sluice jobs show {job.job_id})")
        raise typer.Exit(130) from None
    if job.state not in FINAL_JOB_STATES:
        job = client.get_job(job.job_id)
    err.print(f"fine-tune {job.job_id}: {_state(job.state)}")
    if job.error:
        err.print(f"  {escape(job.error)}")
    return job


def _fields(job: jobs_pb2.Job, losses: Sequence[float]) -> dict[str, Any]:
    t = job.training
    return {
        "step": f"{t.step}/{t.total_steps or '?'}",
        "loss": f"{t.loss:.4f}" if t.step else "-",
        "lr": f"{t.learning_rate:.2e}" if t.step else "-",
        "tps": f"{t.tokens_per_second:.0f}",
        "waited": _duration(t.waiting_seconds),
        "eta": eta(job),
        "spark": sparkline(losses),
    }


def eta(job: jobs_pb2.Job) -> str:
    """Time left as the node predicts it ("done" once final, "-" unknown)."""
    if job.state in FINAL_JOB_STATES:
        return "done"
    at = job.training.eta_unix_ms or job.predicted_completion_unix_ms
    return _duration(at / 1000 - time.time()) if at else "-"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _state(state: int) -> str:
    return jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()  # type: ignore[arg-type]


def sparkline(values: Sequence[float], width: int = SPARK_WIDTH) -> str:
    """``values`` as a terminal sparkline of at most ``width`` characters (▁ lowest, █
    highest; a longer series is averaged into ``width`` buckets)."""
    if not values:
        return ""
    if len(values) > width:
        edges = [round(i * len(values) / width) for i in range(width + 1)]
        values = [sum(values[a:b]) / (b - a) for a, b in itertools.pairwise(edges) if b > a]
    low, high = min(values), max(values)
    span = high - low
    top = len(SPARK) - 1
    return "".join(SPARK[round((v - low) / span * top) if span > 0 else 0] for v in values)


def plot_loss(curve: Sequence[jobs_pb2.TrainingStep], path: Path, title: str) -> None:
    """The loss curve as a PNG (matplotlib's Agg backend: no display needed)."""
    import matplotlib  # noqa: PLC0415 - only for --plot; not a dependency of the CLI

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s.step for s in curve], [s.loss for s in curve], marker=".", linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(f"fine-tune {title}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_rows(
    job: jobs_pb2.Job, curve: Sequence[jobs_pb2.TrainingStep]
) -> list[tuple[str, str]]:
    """The fine-tune rows of `sluice jobs show`."""
    t = job.training
    rows = [
        ("step", f"{t.step} of {t.total_steps}"),
        ("loss", f"{t.loss:.4f}" if t.step else "-"),
        ("learning rate", f"{t.learning_rate:.3e}" if t.step else "-"),
        ("tokens/s", f"{t.tokens_per_second:.1f}"),
        ("waited for gaps", _duration(t.waiting_seconds)),
        ("node", t.node_id or "-"),
        ("checkpoint", f"step {t.checkpoint_step}" if t.checkpoint_step else "-"),
        ("ETA", eta(job)),
        ("adapter", job.adapter or "-"),
    ]
    if curve:
        losses = [s.loss for s in curve]
        rows.append(("loss curve", f"{sparkline(losses)} {losses[0]:.4f} → {losses[-1]:.4f}"))
    return rows
