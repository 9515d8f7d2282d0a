"""The SDK's and the CLI's fine-tune side: a dataset in OpenAI's fine-tuning format read with
line numbers, ``submit_finetune`` in both clients and `sluice jobs submit --finetune` with its
progress line, sparkline and PNG, all against a real scheduler whose finetune node is the
scripted ``TrainingNode`` of the fine-tune job tests (it reports steps, trains nothing)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sluice import AsyncClient, Client, JobLinesError, RetryPolicy
from sluice import cli as sluice_cli
from sluice.cli_finetune import sparkline
from sluice.sdk.errors import AlreadyExistsError
from sluice.sdk.finetune_lines import finetune_spec, loss_curve, parse_training_lines
from sluice.v1 import jobs_pb2
from tests.harness import API_KEY, Suite
from tests.test_finetune_jobs import MODEL, Fleet, TrainingNode, finetune_nodes, training_node

FAST = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05)
CHAT = {
    "messages": [
        {"role": "developer", "content": "You are a pirate."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": [{"type": "text", "text": "Arr!"}]},
    ]
}


def dataset(n: int) -> list[dict[str, Any]]:
    return [
        CHAT if i % 2 else {"prompt": f"Say {i}", "completion": f"{i}, matey"} for i in range(n)
    ]


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.fixture
async def fleet(suite: Suite) -> AsyncIterator[tuple[Suite, str]]:
    """A scheduler serving jobs and one finetune node reporting a step every 20 ms."""
    async with training_node(suite.etcd, TrainingNode("ft-a", Fleet(), step_s=0.02)):
        scheduler = await suite.start_scheduler(redis_url=suite.redis_url)
        await finetune_nodes(scheduler, 1)
        yield suite, scheduler.address


# -- the dataset and the spec ------------------------------------------------------------------


def test_openai_fine_tuning_lines_are_read_and_every_problem_named_by_line() -> None:
    """Prompt/completion and chat lines (text parts, developer as system) become train lines
    numbered as in the file; unknown keys, a chat not ending with the assistant, a missing
    completion and bad JSON are each reported with their line number and field."""
    good = parse_training_lines([json.dumps(d) for d in dataset(2)])
    assert not good.errors
    first, second = good.lines
    assert (first.custom_id, first.train.completion) == ("line-1", "0, matey")
    assert [m.role for m in second.train.messages] == ["system", "user", "assistant"]
    assert second.train.messages[2].content == "Arr!"
    bad = parse_training_lines(
        [
            json.dumps({"prompt": "x", "completion": "y", "weight": 0}),
            "",
            json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
            json.dumps({"prompt": "only"}),
            "{oops",
        ]
    )
    assert [(e.line_number, e.field) for e in bad.errors] == [
        (1, "weight"),
        (3, "messages[0]"),
        (4, "completion"),
        (5, ""),
    ]
    with pytest.raises(JobLinesError):
        bad.check()


def test_a_spec_takes_every_setting_and_refuses_unknown_ones() -> None:
    """finetune_spec maps each keyword to its field; an unknown schedule or setting raises."""
    spec = finetune_spec(
        MODEL, "p", rank=4, target_modules=["q_proj"], learning_rate=1e-3, schedule="linear"
    )
    assert (spec.lora.rank, list(spec.lora.target_modules)) == (4, ["q_proj"])
    assert spec.optimizer.schedule == jobs_pb2.LR_SCHEDULE_LINEAR
    with pytest.raises(ValueError):
        finetune_spec(MODEL, "p", schedule="step")
    with pytest.raises(TypeError):
        finetune_spec(MODEL, "p", ranks=4)  # type: ignore[call-arg]


def test_a_sparkline_spans_the_blocks_and_buckets_long_curves() -> None:
    """Highest value █, lowest ▁; a constant curve is flat; longer than the width: averaged."""
    assert sparkline([3.0, 2.0, 1.0]) == "█▅▁"
    assert sparkline([1.0, 1.0]) == "▁▁"
    long = sparkline([float(100 - i) for i in range(100)], width=10)
    assert len(long) == 10 and long[0] == "█" and long[-1] == "▁"
    assert sparkline([]) == ""


# -- both clients against a scheduler --------------------------------------------------------------


@pytest.fixture(params=["async", "sync"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_submit_finetune_runs_and_its_loss_curve_comes_back(
    fleet: tuple[Suite, str], kind: str
) -> None:
    """submit_finetune sends the examples and the spec; watch_job follows the training to
    COMPLETED; loss_curve of job_results gives every step once, in order; the same adapter
    name again is AlreadyExistsError."""
    _, address = fleet
    examples = dataset(6)

    async def run_async() -> tuple[jobs_pb2.Job, list[jobs_pb2.TrainingStep]]:
        async with AsyncClient(
            address, api_key=API_KEY, retry=FAST, health_check_interval_s=None
        ) as client:
            job = await client.submit_finetune(
                examples, base_model=MODEL, adapter_name="sdk-a", max_steps=5, rank=4
            )
            events = [e.job async for e in client.watch_job(job.job_id, timeout_s=30)]
            curve = loss_curve([r async for r in client.job_results(job.job_id)])
            with pytest.raises(AlreadyExistsError):
                await client.submit_finetune(examples, base_model=MODEL, adapter_name="sdk-a")
            return events[-1], curve

    def run_sync() -> tuple[jobs_pb2.Job, list[jobs_pb2.TrainingStep]]:
        with Client(address, api_key=API_KEY, retry=FAST, health_check_interval_s=None) as client:
            job = client.submit_finetune(
                iter(json.dumps(e) for e in examples),
                base_model=MODEL,
                adapter_name="sdk-s",
                max_steps=5,
            )
            events: Iterator[jobs_pb2.JobEvent] = client.watch_job(job.job_id, timeout_s=30)
            last = [e.job for e in events][-1]
            curve = loss_curve(client.job_results(job.job_id))
            with pytest.raises(AlreadyExistsError):
                client.submit_finetune(examples, base_model=MODEL, adapter_name="sdk-s")
            return last, curve

    done, curve = await (run_async() if kind == "async" else asyncio.to_thread(run_sync))
    assert done.state == jobs_pb2.JOB_STATE_COMPLETED, done
    assert done.kind == jobs_pb2.JOB_KIND_FINETUNE
    assert done.request_counts.total == 6
    assert [s.step for s in curve] == [1, 2, 3, 4, 5]
    assert curve[0].loss > curve[-1].loss


# -- the CLI --------------------------------------------------------------------------------------


async def sluice(*args: str) -> Any:
    """``sluice`` with ``args`` on a thread (the scheduler runs on this test's loop)."""
    return await asyncio.to_thread(CliRunner().invoke, sluice_cli.app, list(args))


async def test_cli_finetune_waits_with_progress_sparkline_and_plot(
    fleet: tuple[Suite, str], tmp_path: Path
) -> None:
    """`sluice jobs submit --finetune` prints the job id, follows it to COMPLETED (exit 0) with
    its step/total, shows the loss curve as a sparkline and writes it as a PNG; `jobs show`
    prints the fine-tune's step, loss, adapter and curve."""
    _, address = fleet
    data = write_jsonl(tmp_path / "data.jsonl", dataset(4))
    png = tmp_path / "loss.png"
    connect = ("--endpoint", address, "--insecure", "--api-key", API_KEY)
    result = await sluice(
        "jobs", "submit", "--finetune", str(data), "--base-model", MODEL,
        "--adapter-name", "cli-pirate", "--max-steps", "6", "--rank", "4", "--lr", "0.001",
        "--schedule", "linear", "--target-modules", "q_proj,v_proj", "--wait",
        "--plot", str(png), *connect,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # The scheduler logs to the same stdout (it runs in this process): pick the CLI's lines.
    (job_id,) = [line for line in result.stdout.splitlines() if line.startswith("job-")]
    assert "step 6/6" in result.output
    assert "completed" in result.output
    curve_line = next(line for line in result.output.splitlines() if "over 6 steps" in line)
    assert curve_line.startswith("loss ") and "█" in curve_line and "▁" in curve_line
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = await sluice("jobs", "show", job_id, *connect)
    assert shown.exit_code == 0, shown.output
    assert "6 of 6" in shown.stdout
    assert f"{MODEL}:cli-pirate" in shown.stdout
    assert "loss curve" in shown.stdout
    got = await sluice("jobs", "results", job_id, *connect)
    records = [json.loads(line) for line in got.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["response"]["step"] for r in records) == [1, 2, 3, 4, 5, 6]
    assert all(r["error"] is None and r["response"]["at_unix_ms"] > 0 for r in records)


async def test_cli_finetune_refuses_bad_files_and_flags_before_submitting(
    fleet: tuple[Suite, str], tmp_path: Path
) -> None:
    """A malformed example is reported with its line number and nothing is submitted (exit 1);
    --finetune without --base-model, or with a batch file too, is a usage error (exit 2)."""
    suite, address = fleet
    connect = ("--endpoint", address, "--insecure", "--api-key", API_KEY)
    bad = write_jsonl(tmp_path / "bad.jsonl", [*dataset(2), {"prompt": "no completion"}])
    result = await sluice(
        "jobs", "submit", "--finetune", str(bad), "--base-model", MODEL,
        "--adapter-name", "x", *connect,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "line 3: completion" in result.output and "nothing submitted" in result.output
    good = write_jsonl(tmp_path / "good.jsonl", dataset(2))
    missing = await sluice("jobs", "submit", "--finetune", str(good), "--adapter-name", "x")
    assert missing.exit_code == 2 and "--base-model" in missing.output
    both = await sluice(
        "jobs", "submit", str(good), "--finetune", str(good), "--base-model", MODEL,
        "--adapter-name", "x",
    )  # fmt: skip
    assert both.exit_code == 2
    listed = await suite.jobs().ListJobs(
        jobs_pb2.ListJobsRequest(), metadata=(("authorization", f"Bearer {API_KEY}"),)
    )
    assert not listed.jobs
