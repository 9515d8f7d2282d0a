"""`sluice jobs`: submit a JSONL file as a batch job (or, with ``--finetune``, a fine-tune:
:mod:`sluice.cli_finetune`), follow it, list, show, cancel it, and write its results as JSONL.

A file's lines are in Sluice's own format or OpenAI's batch format, told apart per line
(:mod:`sluice.sdk.job_lines`). Every malformed line is reported with its number and field, and
then nothing is submitted (exit 1) unless ``--skip-invalid``. Job ids go to stdout, results
as JSONL to stdout; everything else to stderr. The connection options are those of every
client command (:mod:`sluice.cli_connect`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from google.protobuf import json_format
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from sluice import FINAL_JOB_STATES, Client, WorkloadClass, parse_job_lines, result_record
from sluice.cli_connect import (
    DEFAULT_RUN_DIR,
    ApiKey,
    Ca,
    Cert,
    Endpoint,
    Insecure,
    Key,
    RunDir,
    TlsFlags,
    connect,
    console,
    err,
    rpc_errors,
)
from sluice.cli_files import read_lines_file
from sluice.cli_finetune import (
    Accumulation,
    AdapterName,
    Alpha,
    BaseModel,
    Dropout,
    Epochs,
    FinetuneFile,
    FinetuneFlags,
    Lr,
    MaxSteps,
    MicroBatch,
    Plot,
    Rank,
    Schedule,
    Seed,
    Shared,
    TargetModules,
    WarmupSteps,
    read_examples,
    submit_finetune,
    training_rows,
)
from sluice.sdk.finetune_lines import loss_curve
from sluice.v1 import jobs_pb2

jobs_app = typer.Typer(
    help="Batch and fine-tune jobs: submit a JSONL file, follow it, list, show, cancel, fetch "
    "results.",
    no_args_is_help=True,
)

STATES = {
    name.removeprefix("JOB_STATE_").lower(): value
    for name, value in jobs_pb2.JobState.items()
    if value != jobs_pb2.JOB_STATE_UNSPECIFIED
}
"""Job states by their CLI name (``running``)."""
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

Window = Annotated[
    str | None,
    typer.Option("--window", help="Completion window, e.g. 24h, 90m, 3600s, 2d (default: 24h)."),
]
Labels = Annotated[list[str] | None, typer.Option("--label", help="A label k=v (repeatable).")]
CustomIds = Annotated[
    list[str] | None,
    typer.Option("--custom-id", help="Only this line's result (repeatable; default: all)."),
]


def state_name(state: int) -> str:
    """A job state as the CLI writes it (``running``)."""
    return jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()


def window_seconds(text: str) -> int:
    """``24h``, ``90m``, ``3600s``, ``2d`` or plain seconds, as seconds (positive)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"] if match else 0
    if seconds <= 0:
        raise typer.BadParameter(f"{text!r}: give a positive duration such as 24h, 90m or 3600s")
    return int(seconds + 0.999)


def labels_of(items: Iterable[str]) -> dict[str, str]:
    """``k=v`` pairs as a dict."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"{item!r}: a label is key=value")
        out[name] = value
    return out


def _read_lines(path: Path, skip_invalid: bool) -> list[jobs_pb2.JobLine]:
    """The file's lines (:func:`sluice.cli_files.read_lines_file`)."""
    return read_lines_file(path, parse_job_lines, skip_invalid=skip_invalid, noun="line")


JobsFile = Annotated[
    Path | None,
    typer.Argument(
        help="JSONL file, one line per request (Sluice's or OpenAI's format); -: stdin.",
        show_default=False,
    ),
]
Wait = Annotated[
    bool, typer.Option("--wait", help="Show its progress until it ends; exit 1 unless completed.")
]
IdempotencyKey = Annotated[
    str | None,
    typer.Option("--idempotency-key", help="Resubmitting with the same key returns the first job."),
]
SkipInvalid = Annotated[
    bool, typer.Option("--skip-invalid", help="Submit the well-formed lines, skip the rest.")
]
ClassName = Annotated[
    str, typer.Option("--class", help="Class a batch job's lines run in: batch or finetune.")
]


@dataclass(frozen=True)
class SubmitOptions:
    """What both kinds of job take at submission."""

    idempotency_key: str | None
    completion_window_s: int | None
    labels: dict[str, str]

    def as_kwargs(self) -> dict[str, Any]:
        """As keyword arguments of ``submit_job`` / ``submit_finetune``."""
        return dict(self.__dict__)


@jobs_app.command()
def submit(
    ctx: typer.Context,
    path: JobsFile = None,
    wait: Wait = False,
    window: Window = None,
    idempotency_key: IdempotencyKey = None,
    label: Labels = None,
    skip_invalid: SkipInvalid = False,
    workload_class: ClassName = "batch",
    finetune: FinetuneFile = None,
    base_model: BaseModel = None,
    adapter_name: AdapterName = None,
    rank: Rank = 0,
    alpha: Alpha = 0.0,
    dropout: Dropout = 0.0,
    target_modules: TargetModules = "",
    lr: Lr = 0.0,
    schedule: Schedule = "",
    warmup_steps: WarmupSteps = 0,
    epochs: Epochs = 0,
    max_steps: MaxSteps = 0,
    micro_batch: MicroBatch = 0,
    accumulation: Accumulation = 0,
    seed: Seed = 0,
    shared: Shared = False,
    plot: Plot = None,
    endpoint: Endpoint = None,
    api_key: ApiKey = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    ca: Ca = None,
    cert: Cert = None,
    key: Key = None,
    insecure: Insecure = False,
) -> None:
    """Submit a JSONL file as a batch job, or with --finetune a LoRA fine-tune of
    --base-model making --adapter-name; prints the job id."""
    window_s = window_seconds(window) if window is not None else None
    options = SubmitOptions(idempotency_key, window_s, labels_of(label or []))
    tls = TlsFlags(ca, cert, key, insecure)
    if finetune is not None:
        if path is not None:
            raise typer.BadParameter("give a batch file or --finetune FILE, not both")
        flags = FinetuneFlags.of(ctx.params)
        examples = read_examples(finetune, skip_invalid)
        with rpc_errors(), connect(endpoint, api_key, run_dir, tls) as client:
            submit_finetune(client, flags, examples, wait=wait, **options.as_kwargs())
        return
    if path is None:
        raise typer.BadParameter("give the JSONL file to submit (or --finetune FILE)")
    try:
        cls = WorkloadClass.from_label(workload_class)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    lines = _read_lines(path, skip_invalid)
    with rpc_errors(), connect(endpoint, api_key, run_dir, tls) as client:
        job = client.submit_job(
            lines,
            idempotency_key=options.idempotency_key,
            completion_window_s=options.completion_window_s,
            workload_class=cls,
            labels=options.labels,
        )
        typer.echo(job.job_id)
        err.print(
            f"job {job.job_id}: {state_name(job.state)}, {job.request_counts.total} lines, "
            f"predicted to finish {_when(job.predicted_completion_unix_ms)}, "
            f"window closes {_when(job.deadline_unix_ms)}"
        )
        if wait:
            job = _follow(client, job)
            raise typer.Exit(0 if job.state == jobs_pb2.JOB_STATE_COMPLETED else 1)


def _follow(client: Client, job: jobs_pb2.Job) -> jobs_pb2.Job:
    """A live progress bar of ``job`` until it reaches a final state; returns it then."""
    progress = Progress(
        TextColumn("{task.description:>10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TextColumn("{task.fields[rate]} lines/s"),
        TextColumn("ETA {task.fields[eta]}"),
        console=err,
    )
    try:
        with progress:
            task = progress.add_task(state_name(job.state), total=None, failed=0, rate="-", eta="-")
            for event in client.watch_job(job.job_id):
                job = event.job
                counts = job.request_counts
                progress.update(
                    task,
                    description=state_name(job.state),
                    completed=_settled(counts),
                    total=counts.total or None,
                    failed=counts.failed,
                    rate=f"{event.lines_per_second:.1f}",
                    eta=_eta(job),
                )
    except KeyboardInterrupt:
        err.print(f"stopped watching; the job goes on (sluice jobs show {job.job_id})")
        raise typer.Exit(130) from None
    if job.state not in FINAL_JOB_STATES:  # the watch ended early: read where it stands
        job = client.get_job(job.job_id)
    err.print(f"job {job.job_id}: {state_name(job.state)}, {_counts(job.request_counts)}")
    if job.error:
        err.print(f"  {escape(job.error)}")
    return job


def _settled(counts: jobs_pb2.RequestCounts) -> int:
    return counts.completed + counts.failed + counts.cancelled + counts.expired


def _counts(counts: jobs_pb2.RequestCounts) -> str:
    parts = [f"{counts.completed} completed", f"{counts.failed} failed"]
    parts += [
        f"{n} {name}"
        for name, n in (("cancelled", counts.cancelled), ("expired", counts.expired))
        if n
    ]
    return f"{', '.join(parts)} of {counts.total}"


def _eta(job: jobs_pb2.Job) -> str:
    if job.state in FINAL_JOB_STATES:
        return "done"
    if not job.predicted_completion_unix_ms:
        return "-"
    return _duration(job.predicted_completion_unix_ms / 1000 - time.time())


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _when(unix_ms: int) -> str:
    """A timestamp as local time (``-`` when unset)."""
    if not unix_ms:
        return "-"
    return datetime.fromtimestamp(unix_ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


@jobs_app.command("list")
def list_jobs(
    state: Annotated[
        str | None, typer.Option("--state", help=f"Only jobs in this state: {', '.join(STATES)}.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Most jobs shown.")] = 20,
    endpoint: Endpoint = None,
    api_key: ApiKey = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    ca: Ca = None,
    cert: Cert = None,
    key: Key = None,
    insecure: Insecure = False,
) -> None:
    """The tenant's jobs, newest first."""
    if state is not None and state.lower() not in STATES:
        raise typer.BadParameter(f"{state!r}: one of {', '.join(STATES)}", param_hint="--state")
    wanted = STATES[state.lower()] if state is not None else None
    table = Table()
    for column in ("job", "state", "done", "failed", "total", "created", "finish", "labels"):
        table.add_column(column)
    tls = TlsFlags(ca, cert, key, insecure)
    with rpc_errors(), connect(endpoint, api_key, run_dir, tls) as client:
        for n, job in enumerate(client.list_jobs(state=wanted, page_size=min(limit, 500))):
            if n == limit:
                break
            counts = job.request_counts
            finish = job.finished_at_unix_ms or job.predicted_completion_unix_ms
            table.add_row(
                job.job_id,
                state_name(job.state),
                str(_settled(counts)),
                str(counts.failed),
                str(counts.total),
                _when(job.created_at_unix_ms),
                _when(finish),
                escape(",".join(f"{k}={v}" for k, v in sorted(job.labels.items()))),
            )
    console.print(table)


@jobs_app.command()
def show(
    job_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job as JSON.")] = False,
    endpoint: Endpoint = None,
    api_key: ApiKey = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    ca: Ca = None,
    cert: Cert = None,
    key: Key = None,
    insecure: Insecure = False,
) -> None:
    """One job: state, line counts, times, predicted completion."""
    tls = TlsFlags(ca, cert, key, insecure)
    with rpc_errors(), connect(endpoint, api_key, run_dir, tls) as client:
        job = client.get_job(job_id)
        finetune = job.kind == jobs_pb2.JOB_KIND_FINETUNE
        curve = loss_curve(client.job_results(job_id)) if finetune and not as_json else []
    if as_json:
        typer.echo(json_format.MessageToJson(job, preserving_proto_field_name=True))
        return
    table = Table(show_header=False)
    rows = [
        ("job", job.job_id),
        ("state", state_name(job.state)),
        ("lines", _counts(job.request_counts)),
        ("dead-lettered", str(job.request_counts.dead_lettered)),
        ("created", _when(job.created_at_unix_ms)),
        ("started", _when(job.started_at_unix_ms)),
        ("predicted", _when(job.predicted_completion_unix_ms)),
        ("finished", _when(job.finished_at_unix_ms)),
        ("window closes", _when(job.deadline_unix_ms)),
        ("results kept until", _when(job.expires_at_unix_ms)),
        ("idempotency key", job.idempotency_key),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(job.labels.items()))),
        ("error", job.error),
    ]
    if finetune:
        rows[2] = ("examples", _counts(job.request_counts))
        rows[3:3] = training_rows(job, curve)
    for name, value in rows:
        table.add_row(name, escape(value))
    console.print(table)


@jobs_app.command()
def cancel(
    job_id: str,
    endpoint: Endpoint = None,
    api_key: ApiKey = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    ca: Ca = None,
    cert: Cert = None,
    key: Key = None,
    insecure: Insecure = False,
) -> None:
    """Cancel a job: no new line starts, lines in flight finish, results so far are kept."""
    tls = TlsFlags(ca, cert, key, insecure)
    with rpc_errors(), connect(endpoint, api_key, run_dir, tls) as client:
        job = client.cancel_job(job_id)
    err.print(f"job {job.job_id}: {state_name(job.state)}, {_counts(job.request_counts)}")


@jobs_app.command()
def results(
    job_id: str,
    custom_id: CustomIds = None,
    endpoint: Endpoint = None,
    api_key: ApiKey = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    ca: Ca = None,
    cert: Cert = None,
    key: Key = None,
    insecure: Insecure = False,
) -> None:
    """Write a job's results to stdout as JSONL: custom_id, response, error per line."""
    written = failed = 0
    tls = TlsFlags(ca, cert, key, insecure)
    with rpc_errors(), connect(endpoint, api_key, run_dir, tls) as client:
        for result in client.job_results(job_id, custom_id):
            record = result_record(result)
            typer.echo(json.dumps(record, ensure_ascii=False))
            written += 1
            failed += record["error"] is not None
    err.print(f"{written} results, {failed} of them errors")
