"""The engine benchmark (``python -m bench.engine``): a smoke test on the tiny seeded Llama,
then unit tests of how the ``vllm`` system is planned, run and reported (no vLLM needed).

The smoke test runs the real harness end to end (driver plus one worker subprocess per system
and concurrency) on a small workload and checks the JSON schema other tools rely on.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench.engine.cli import default_systems, parse_args, plan_jobs
from bench.engine.common import JOB_RUN, BenchRequest, JobSpec
from bench.engine.driver import build_report, worker_python, write_outputs
from bench.engine.proctree import TreeRssSampler, descendants, tree_pids
from bench.engine.report import VLLM_TARGET, render_markdown, render_text
from bench.engine.teacher_forced import bf16_step
from bench.engine.vllm_worker import VllmCalls, engine_args, vllm_loop

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_KEYS: dict[str, type] = {
    "system": str,
    "concurrency": int,
    "requests": int,
    "output_tokens_per_s": float,
    "ttft_p50_s": float,
    "ttft_p99_s": float,
    "peak_rss_bytes": int,
}
TOP_FLOATS = ("matmul_gflops", "midbatch_ttft_p99_s", "decode_step_s", "prefill_s")
EXPECTED_RUNS = {
    ("hf_sequential", 1): 4,
    ("sluice", 1): 4,
    ("sluice", 4): 8,
    ("hf_static", 4): 8,
    ("hf_generate_batch", 4): 8,
}


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.timeout(150)
def test_engine_benchmark_end_to_end(tmp_path: Path) -> None:
    out_dir = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "bench.engine",
        "--model",
        "tiny-random-llama",
        "--requests",
        "8",
        "--concurrency",
        "1,4",
        "--sequential-requests",
        "4",
        "--out-dir",
        str(out_dir),
        "--matmul-seconds",
        "0.2",
        "--midbatch-background-tokens",
        "24",
        "--midbatch-probes",
        "3",
        "--midbatch-start-timeout-s",
        "20",
        "--midbatch-probe-timeout-s",
        "10",
        "--worker-timeout-s",
        "100",
        # Two workers at a time: the timings are meaningless here, the plumbing is not.
        "--parallel-workers",
        "2",
        # No vLLM here (tiny-random-llama has no checkpoint directory for it): the default
        # systems skip it, with a note.
        "--vllm-python",
        str(tmp_path / "no-venv" / "python"),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=140, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    report = json.loads((out_dir / "engine.json").read_text(encoding="utf-8"))
    for key in TOP_FLOATS:
        assert isinstance(report[key], float) and math.isfinite(report[key]), key
    assert report["matmul_gflops"] > 0

    runs = report["runs"]
    seen = [(run["system"], run["concurrency"]) for run in runs]
    assert sorted(seen) == sorted(EXPECTED_RUNS), seen
    for run in runs:
        label = f"{run['system']}@{run['concurrency']}"
        for key, kind in RUN_KEYS.items():
            assert type(run[key]) is kind, (label, key, run[key])
            if kind is not str:
                assert _is_finite_number(run[key]), (label, key)
        assert run["requests"] == EXPECTED_RUNS[(run["system"], run["concurrency"])], label
        if run.get("error"):
            # transformers' own continuous batching may not run everywhere: then it is recorded.
            assert run["system"] == "hf_generate_batch", (label, run["error"])
            assert isinstance(run["error"], str)
            continue
        assert run["output_tokens_per_s"] > 0, label
        assert 0 < run["ttft_p50_s"] <= run["ttft_p99_s"], label
        assert run["peak_rss_bytes"] > 0, label
        assert _is_finite_number(run["roofline_fraction"]), label

    assert set(report["skipped_systems"]) == {"vllm"}, report["skipped_systems"]
    assert report["midbatch"]["ran"], report["midbatch"]
    assert report["prefill_s"] > 0
    assert {t["status"] for t in report["targets"]} <= {"PASS", "FAIL", "n/a"}
    assert (out_dir / "engine.md").read_text(encoding="utf-8").startswith("# Engine benchmark")
    assert (out_dir / "engine.png").read_bytes().startswith(b"\x89PNG")
    assert "targets:" in proc.stdout


# -- the vllm system ---------------------------------------------------------------------------


def _interpreter(tmp_path: Path) -> Path:
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n", encoding="utf-8")
    python.chmod(0o755)
    return python


def test_default_systems_include_vllm_only_when_its_interpreter_exists(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "python"
    assert "vllm" not in default_systems(missing)
    assert "sluice" in default_systems(missing)
    assert default_systems(_interpreter(tmp_path))[-2:] == ["sluice", "vllm"]


def test_parse_args_defaults_to_vllm_where_it_is_installed(tmp_path: Path) -> None:
    args = parse_args(["--vllm-python", str(_interpreter(tmp_path))])
    assert "vllm" in args.systems
    assert args.skipped_systems == {}


def test_vllm_is_skipped_with_a_note_when_its_interpreter_is_missing(tmp_path: Path) -> None:
    """By default and when asked for by name alike."""
    missing = tmp_path / "nowhere" / "python"
    for argv in ([], ["--systems", "sluice,vllm"]):
        args = parse_args([*argv, "--vllm-python", str(missing)])
        assert "vllm" not in args.systems, argv
        assert "sluice" in args.systems, argv
        assert str(missing) in args.skipped_systems["vllm"], argv
    assert parse_args(["--systems", "sluice", "--vllm-python", str(missing)]).skipped_systems == {}


def test_vllm_runs_at_every_concurrency_right_after_sluice(tmp_path: Path) -> None:
    python = str(_interpreter(tmp_path))
    argv = ["--systems", "hf_static,sluice,vllm", "--concurrency", "1,32", "--vllm-python", python]
    args = parse_args(argv)
    runs = [(j.system, j.concurrency, j.requests) for j in plan_jobs(args) if j.kind == JOB_RUN]
    assert runs == [
        ("sluice", 1, 12),
        ("sluice", 32, 64),
        ("vllm", 1, 12),
        ("vllm", 32, 64),
        ("hf_static", 32, 64),
    ]


def test_worker_interpreter_is_chosen_per_system(tmp_path: Path) -> None:
    python = tmp_path / "venv" / "bin" / "python"
    assert worker_python("vllm", python) == str(python)
    for system in ("sluice", "hf_sequential", "hf_static", "hf_generate_batch", ""):
        assert worker_python(system, python) == sys.executable, system


def _run(system: str, concurrency: int, tokens_per_s: float) -> dict[str, Any]:
    return {
        "system": system,
        "concurrency": concurrency,
        "requests": 64,
        "output_tokens": 100,
        "prompt_tokens": 100,
        "wall_s": 1.0,
        "output_tokens_per_s": tokens_per_s,
        "total_tokens_per_s": 2 * tokens_per_s,
        "ttft_p50_s": 0.1,
        "ttft_p99_s": 0.2,
        "peak_rss_bytes": 1 << 30,
        "request0_head": [1, 2, 3],
    }


def _report(argv: list[str], runs: list[dict[str, Any]]) -> dict[str, Any]:
    machine = {"cpu_model": "test", "cpu_count": 2, "loadavg_start": [0.0, 0.0, 0.0]}
    return build_report(parse_args(argv), argv, machine, {}, runs)


def _vllm_target(report: dict[str, Any]) -> dict[str, Any]:
    return next(t for t in report["targets"] if t["name"] == VLLM_TARGET)


@pytest.mark.parametrize(("sluice", "status"), [(61.0, "PASS"), (59.0, "FAIL")])
def test_vllm_target_is_sluice_over_vllm_at_c32(tmp_path: Path, sluice: float, status: str) -> None:
    runs = [
        _run("hf_sequential", 1, 10.0),
        _run("sluice", 32, sluice),
        _run("vllm", 32, 100.0),
        _run("vllm", 8, 50.0),
    ]
    runs[2]["request0_head"] = [1, 2, 9]
    argv = ["--vllm-python", str(_interpreter(tmp_path))]
    report = _report(argv, runs)
    assert report["ratios"]["sluice/vllm@32"] == pytest.approx(sluice / 100.0)
    assert report["ratios"]["sluice/vllm@8"] is None  # no sluice run at 8
    assert _vllm_target(report)["status"] == status
    assert report["greedy_agreement"]["vllm@32"] == "2/3"
    markdown = render_markdown(report)
    assert f"**{status}**  {VLLM_TARGET} ({sluice / 100:.2f}x vs 0.60x)" in markdown
    assert "| vllm | 32 | 64 |" in markdown
    assert "`vllm` = (e) vLLM's own engine" in markdown
    assert "sluice/vllm@32: " in render_text(report)


def test_report_notes_a_skipped_vllm(tmp_path: Path) -> None:
    argv = ["--vllm-python", str(tmp_path / "nowhere" / "python")]
    report = _report(argv, [_run("sluice", 32, 100.0)])
    target = _vllm_target(report)
    assert target["status"] == "n/a"
    assert target["note"].startswith("vllm skipped: ")
    assert "vllm" not in report["config"]["systems"]
    markdown = render_markdown(report)
    assert "- vllm: skipped, " in markdown
    assert "| vllm |" not in markdown


def test_vllm_engine_args_are_the_nodes(tmp_path: Path) -> None:
    spec = JobSpec(
        kind=JOB_RUN,
        system="vllm",
        concurrency=64,
        requests=64,
        model="smollm2-135m-instruct",
        device="cpu",
        dtype="bfloat16",
        cache_dir=str(tmp_path),
        seed=0,
        workload_requests=64,
        kv_budget_bytes=3 << 30,
        max_batched_tokens=1024,
    )
    kwargs = engine_args(spec, tmp_path / "model", 8192, 64)
    assert kwargs == {
        "model": str(tmp_path / "model"),
        "served_model_name": ["smollm2-135m-instruct"],
        "dtype": "bfloat16",
        "max_model_len": 8192,
        "max_num_seqs": 64,
        "max_num_batched_tokens": 1024,
        "kv_cache_memory_bytes": 3 << 30,
        "enable_prefix_caching": False,
        "enforce_eager": False,
        "disable_log_stats": True,
    }


class _FakeLlm:
    """``AsyncLLM.generate`` as deltas of one token each (its prompt's first id, then 1, 2,
    ...), counting requests in flight; ``short`` ends a request one token early."""

    def __init__(self, short: bool = False) -> None:
        self.in_flight = 0
        self.most_in_flight = 0
        self.short = short

    async def generate(
        self, prompt: Sequence[int], new_tokens: int, request_id: str
    ) -> AsyncIterator[Any]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            count = new_tokens - 1 if self.short else new_tokens
            yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=[], finish_reason=None)])
            for i in range(count):
                await asyncio.sleep(0.001)
                token = prompt[0] if i == 0 else i
                reason = "length" if i == count - 1 else None
                yield SimpleNamespace(
                    outputs=[SimpleNamespace(token_ids=[token], finish_reason=reason)]
                )
        finally:
            self.in_flight -= 1


def _calls(llm: _FakeLlm) -> VllmCalls:
    return VllmCalls(llm, prompt=list, sampling=lambda n: n)


async def test_vllm_closed_loop_keeps_c_requests_in_flight() -> None:
    """Every request served once, never more than C at once, TTFT at the first token,
    each request's leading tokens kept."""
    llm = _FakeLlm()
    requests = [BenchRequest(i, (100 + i, 5), 3 + i % 4) for i in range(10)]
    results, heads = await vllm_loop(_calls(llm), requests, 3, "bench")
    assert sorted(r.index for r in results) == list(range(10))
    assert llm.most_in_flight == 3
    for result in results:
        assert result.output_tokens == requests[result.index].max_new_tokens
        assert 0 < result.ttft_s < result.latency_s
    assert heads[0] == [100, 1, 2]


async def test_vllm_closed_loop_fails_a_request_that_ends_short() -> None:
    with pytest.raises(RuntimeError, match="bench-0: 2 tokens of 3"):
        await vllm_loop(_calls(_FakeLlm(short=True)), [BenchRequest(0, (7,), 3)], 1, "bench")


def test_descendants_follow_the_parent_chain() -> None:
    parents = {1: 0, 10: 1, 11: 10, 12: 11, 20: 2, 13: 10}
    assert descendants(10, parents) == {11, 12, 13}
    assert descendants(1, parents) == {10, 11, 12, 13}
    assert descendants(12, parents) == set()


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
def test_tree_rss_counts_child_processes() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert child.pid in tree_pids(os.getpid())
        sampler = TreeRssSampler(os.getpid(), 60.0)
        sampler.sample()
        assert sampler.peak_processes >= 2
        assert sampler.peak_bytes > 0
    finally:
        child.kill()
        child.wait()


def _greedy_target(report: dict[str, Any]) -> dict[str, Any]:
    return next(t for t in report["targets"] if t["name"].startswith("greedy "))


@pytest.mark.parametrize(("head", "status"), [([1, 2, 3, 4], "PASS"), ([1, 2, 3, 9], "FAIL")])
def test_greedy_target_holds_sluice_to_hf_generate_in_float32(head: list[int], status: str) -> None:
    runs = [_run("hf_sequential", 1, 10.0), _run("sluice", 1, 12.0), _run("sluice", 32, 90.0)]
    runs[0]["request0_head"] = [1, 2, 3, 4]
    runs[1]["request0_head"] = [1, 2, 3, 4]
    runs[2]["request0_head"] = head  # the least agreeing run decides
    report = _report(["--dtype", "float32"], runs)
    assert _greedy_target(report)["status"] == status
    assert "float32" in _greedy_target(report)["name"]


def _forced(*ties: bool) -> dict[str, Any]:
    flips = [{"request": 0, "position": i, "tie": t} for i, t in enumerate(ties)]
    return {
        "requests": 4,
        "tokens": 16,
        "positions": 64,
        "agree": 64 - len(flips),
        "flips": flips,
        "flips_beyond_tie": sum(not t for t in ties),
    }


@pytest.mark.parametrize(
    ("forced", "status"),
    [(_forced(), "PASS"), (_forced(True, True), "PASS"), (_forced(True, False), "FAIL")],
)
def test_bf16_greedy_target_allows_teacher_forced_flips_on_ties_only(
    forced: dict[str, Any], status: str
) -> None:
    """In bf16 the leading tokens are reported, not judged: a flip on a near tie parts the
    free-running outputs for good. The engine fed HF's tokens may differ only on ties."""
    runs = [_run("hf_sequential", 1, 10.0), _run("sluice", 32, 90.0)]
    runs[0]["request0_head"] = [1, 2, 3, 4]
    runs[1]["request0_head"] = [1, 9, 9, 9]
    argv = ["--dtype", "bfloat16"]
    report = build_report(parse_args(argv), argv, {}, {"teacher_forced": forced}, runs)
    target = _greedy_target(report)
    assert target["status"] == status and "bfloat16" in target["name"]
    missing = build_report(parse_args(argv), argv, {}, {}, runs)
    assert _greedy_target(missing)["status"] == "n/a"


def test_a_bf16_step_is_the_spacing_at_the_logits_magnitude() -> None:
    assert bf16_step(20.0) == 0.125  # 2^(4 - 7)
    assert bf16_step(-3.0) == 2.0**-6
    assert bf16_step(0.0) == 0.0


def test_out_name_names_the_result_files(tmp_path: Path) -> None:
    argv = ["--out-name", "engine-bf16", "--dtype", "bfloat16"]
    report = _report(argv, [_run("hf_sequential", 1, 10.0), _run("sluice", 1, 12.0)])
    paths = write_outputs(report, tmp_path, parse_args(argv).out_name)
    assert {p.name for p in paths} >= {"engine-bf16.json", "engine-bf16.md"}
    assert not (tmp_path / "engine.json").exists()
