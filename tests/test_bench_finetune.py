"""The fine-tune benchmark (``python -m bench.finetune``): its pure pieces — the quality task,
the figures from synthetic values worked out by hand (histogram quantiles of the yield waits,
latency and progress ratios, per-step loss comparison), the report's rows, table and picture,
the nodes' flags and the run's plan. ``make bench-finetune`` (the real experiments) is not part
of the tests."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from bench.finetune.calls import TrainSpec, training_lines
from bench.finetune.cli import parse_args, plan_of, settings_of
from bench.finetune.figures import (
    buckets,
    compare_losses,
    histogram_quantile,
    increase,
    progress_curve,
    quality_verdict,
    quantile_edge,
    realtime_rps,
    sharing_verdict,
    wait_figures,
    yield_waits,
)
from bench.finetune.plot import write_plot
from bench.finetune.report import disturbed, markdown, rows, table
from bench.finetune.sharing import counter_rates, pooled
from bench.finetune.suite import NodeFlags
from bench.finetune.task import (
    HELD_OUT_ITEMS,
    TEMPLATES,
    TRAIN_ITEMS,
    answer,
    exact_match,
    exact_match_rate,
    held_out_examples,
    training_examples,
)
from bench.jobs.metrics import parse

WAITS_BEFORE = """\
sluice_node_training_yield_wait_seconds_bucket{le="0.01",model="m",wait="admission"} 1.0
sluice_node_training_yield_wait_seconds_bucket{le="0.05",model="m",wait="admission"} 1.0
sluice_node_training_yield_wait_seconds_bucket{le="0.1",model="m",wait="admission"} 1.0
sluice_node_training_yield_wait_seconds_bucket{le="+Inf",model="m",wait="admission"} 1.0
"""

WAITS_AFTER = """\
sluice_node_training_yield_wait_seconds_bucket{le="0.01",model="m",wait="admission"} 1.0
sluice_node_training_yield_wait_seconds_bucket{le="0.05",model="m",wait="admission"} 51.0
sluice_node_training_yield_wait_seconds_bucket{le="0.1",model="m",wait="admission"} 101.0
sluice_node_training_yield_wait_seconds_bucket{le="+Inf",model="m",wait="admission"} 101.0
sluice_node_training_yield_wait_seconds_bucket{le="0.01",model="m",wait="decode"} 100.0
sluice_node_training_yield_wait_seconds_bucket{le="0.05",model="m",wait="decode"} 100.0
sluice_node_training_yield_wait_seconds_bucket{le="0.1",model="m",wait="decode"} 100.0
sluice_node_training_yield_wait_seconds_bucket{le="+Inf",model="m",wait="decode"} 100.0
sluice_node_training_yield_wait_seconds_count{model="m",wait="decode"} 100.0
"""


# -- the quality task ------------------------------------------------------------------------


def test_the_held_out_items_are_never_trained_on_and_every_template_is_used() -> None:
    """No held-out item is a training item; both sets use every template; each example's
    answer is the fixed format around its own item."""
    assert not set(HELD_OUT_ITEMS) & set(TRAIN_ITEMS)
    train, held = training_examples(), held_out_examples()
    assert len(train) == 2 * len(TRAIN_ITEMS) and len(held) == len(HELD_OUT_ITEMS)
    for examples in (train, held):
        used = {t for t in TEMPLATES for e in examples if e.prompt.startswith(t.split("{")[0])}
        assert used == set(TEMPLATES)
    for example, item in zip(held, HELD_OUT_ITEMS, strict=True):
        assert item in example.prompt and example.expected == answer(item) == f"ORDER: {item}"


def test_exact_match_ignores_surrounding_space_only() -> None:
    """The whole answer must be the expected one: a trailing newline passes, a polite
    sentence around it does not."""
    assert exact_match(" ORDER: tofu\n", "ORDER: tofu")
    assert not exact_match("Sure! ORDER: tofu", "ORDER: tofu")
    assert not exact_match("ORDER: tofu.", "ORDER: tofu")
    assert exact_match_rate([("ORDER: a", "ORDER: a"), ("no", "ORDER: b")]) == 0.5
    assert exact_match_rate([]) == 0.0


def test_training_lines_are_chats_whose_assistant_turn_is_the_answer() -> None:
    """Each example goes as a ``train`` line: the user's request, then the answer."""
    (line,) = training_lines(held_out_examples(1))
    assert line.custom_id == "ex-0"
    roles = [(m.role, m.content) for m in line.train.messages]
    assert roles == [("user", held_out_examples(1)[0].prompt), ("assistant", "ORDER: peaches")]


def test_the_spec_sets_what_the_benchmark_trains_with() -> None:
    """The proto carries the spec's knobs; the load job only changes the length."""
    spec = TrainSpec(steps=60, rank=8, micro_batch_size=2, checkpoint_every=10, seed=19)
    proto = spec.proto("base", "a")
    assert (proto.base_model, proto.adapter_name, proto.max_steps) == ("base", "a", 60)
    assert (proto.lora.rank, proto.lora.alpha, proto.micro_batch_size) == (8, 16.0, 2)
    assert (proto.checkpoint_every_steps, proto.seed) == (10, 19)
    assert spec.proto("base", "b", steps=1000).max_steps == 1000


# -- yield waits -----------------------------------------------------------------------------


def test_histogram_quantiles_read_as_prometheus_reads_them() -> None:
    """100 waits: 50 in (10, 50] ms and 50 in (50, 100] ms. The median is the edge between
    them, the p99 interpolated at 99 % of the way through the upper bucket, whose edge is
    the most the p99 can be."""
    counts = {0.01: 0.0, 0.05: 50.0, 0.1: 100.0, math.inf: 100.0}
    assert histogram_quantile(counts, 0.5) == pytest.approx(0.05)
    assert histogram_quantile(counts, 0.99) == pytest.approx(0.05 + 0.05 * 49 / 50)
    assert quantile_edge(counts, 0.99) == 0.1
    assert histogram_quantile({}, 0.99) is None
    assert quantile_edge({0.1: 0.0, math.inf: 0.0}, 0.99) is None


def test_a_quantile_beyond_the_last_edge_is_that_edge_and_fails_any_finite_bound() -> None:
    """Waits past the largest finite bucket read as that bucket's edge (as Prometheus does),
    but the verdict takes the +Inf edge: unbounded."""
    counts = {0.1: 1.0, 1.0: 1.0, math.inf: 10.0}
    assert histogram_quantile(counts, 0.99) == 1.0
    figures = wait_figures(counts, bound_s=5.0)
    assert figures["p99_edge_s"] == math.inf and figures["pass"] is False


def test_yield_waits_are_the_increase_between_two_scrapes_per_kind_and_together() -> None:
    """Only what happened between the scrapes counts; ``all`` sums both kinds; the p99's
    bucket edge decides the verdict (admission's is 100 ms: within a 100 ms bound, not a
    50 ms one); no wait at all passes."""
    before, after = parse(WAITS_BEFORE), parse(WAITS_AFTER)
    assert increase(buckets(before, "x"), buckets(after, "x")) == {}
    waits = yield_waits(before, after, bound_s=0.1)
    assert waits["admission"]["count"] == 100 and waits["decode"]["count"] == 100
    assert waits["admission"]["p99_edge_s"] == 0.1 and waits["admission"]["pass"]
    assert waits["decode"]["p99_edge_s"] == 0.01
    assert waits["all"]["count"] == 200 and waits["all"]["p99_edge_s"] == 0.1
    assert not yield_waits(before, after, bound_s=0.05)["admission"]["pass"]
    assert wait_figures({}, 0.05) | {"p50_s": None} == {
        "count": 0,
        "p50_s": None,
        "p99_s": None,
        "p99_edge_s": None,
        "pass": True,
    }
    assert yield_waits(None, None, 0.1)["all"]["count"] == 0


def test_counter_rates_read_generation_training_and_deferred_units() -> None:
    """Rates are increases over the time between the reads; deferred units per reason."""
    a = parse(
        'sluice_node_generated_tokens_total{model="m"} 100\n'
        'sluice_node_training_tokens_total{model="m"} 1000\n'
        'sluice_node_training_steps_total{model="m"} 3\n'
        'sluice_node_training_units_deferred_total{model="m",reason="no_slack"} 1\n'
    )
    b = parse(
        'sluice_node_generated_tokens_total{model="m"} 300\n'
        'sluice_node_training_tokens_total{model="m"} 1400\n'
        'sluice_node_training_steps_total{model="m"} 5\n'
        'sluice_node_training_units_deferred_total{model="m",reason="no_slack"} 4\n'
        'sluice_node_training_units_deferred_total{model="m",reason="over_bound"} 2\n'
    )
    figures = counter_rates((10.0, a), (12.0, b))
    assert figures["node_tokens_per_s"] == 100.0 and figures["training_tokens_per_s"] == 200.0
    assert figures["training_steps"] == 2
    assert figures["deferred"] == {"no_slack": 3, "over_bound": 2}
    assert counter_rates((0.0, None), (1.0, b))["training_tokens_per_s"] is None


# -- sharing, resume and quality verdicts ----------------------------------------------------


def test_sharing_verdict_compares_the_same_arrivals_and_the_job_alone() -> None:
    """TTFT 110 vs 100 ms passes (1.1×), inter-token 130 vs 100 ms fails (1.3×); progress
    60 of 100 tokens/s passes (60 %), and nothing measured fails."""
    without = {"ttft_p99_s": 0.1, "inter_token_p99_s": 0.1}
    busy = {"ttft_p99_s": 0.11, "inter_token_p99_s": 0.13, "training_tokens_per_s": 60.0}
    verdict = sharing_verdict(without, busy, 100.0)
    assert verdict["ttft_ratio"] == pytest.approx(1.1) and verdict["ttft_pass"]
    assert verdict["inter_token_ratio"] == pytest.approx(1.3) and not verdict["inter_token_pass"]
    assert verdict["progress_share"] == pytest.approx(0.6) and verdict["progress_pass"]
    empty = sharing_verdict({}, {}, None)
    assert not (empty["ttft_pass"] or empty["inter_token_pass"] or empty["progress_pass"])


def test_the_progress_curve_is_sorted_by_load_with_shares_of_alone() -> None:
    """One point per phase with training, its share of the job alone."""
    phases = [
        {"load": 0.6, "training_tokens_per_s": 20.0},
        {"load": 0.1, "training_tokens_per_s": 80.0},
    ]
    curve = progress_curve(phases, 100.0)
    assert [(p["load"], p["share_of_alone"]) for p in curve] == [(0.1, 0.8), (0.6, 0.2)]


def test_losses_pass_only_when_every_step_is_there_and_within_tolerance() -> None:
    """Equal within 1e-4 at every step passes; a step missing, or one 2e-4 off, fails; the
    worst step is named."""
    ref = {1: 2.0, 2: 1.5, 3: 1.0}
    same = compare_losses(ref, {1: 2.0, 2: 1.50005, 3: 1.0})
    assert same["pass"] and same["worst_step"] == 2 and same["steps_compared"] == 3
    assert same["max_abs_diff"] == pytest.approx(5e-5)
    missing = compare_losses(ref, {1: 2.0, 2: 1.5})
    assert not missing["pass"] and missing["missing_in_resumed"] == [3]
    off = compare_losses(ref, {1: 2.0, 2: 1.5, 3: 1.0002})
    assert not off["pass"] and off["within_tolerance"] == 2
    assert not compare_losses({}, {})["pass"]


def test_quality_needs_the_adapter_at_90_percent_and_the_base_near_zero() -> None:
    """≥ 90 % for the adapter, ≤ 10 % for the base model."""
    assert quality_verdict(0.9, 0.1) == {"adapter_pass": True, "base_pass": True}
    assert quality_verdict(0.85, 0.15) == {"adapter_pass": False, "base_pass": False}
    assert quality_verdict(None, None) == {"adapter_pass": False, "base_pass": False}


def test_realtime_rate_is_the_share_of_capacity_in_requests() -> None:
    """30 % of 320 tokens/s in requests of 32 tokens: 3 requests per second."""
    assert realtime_rps(320.0, 0.3, 32) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="positive"):
        realtime_rps(0.0, 0.3, 32)


# -- flags and plan --------------------------------------------------------------------------


def test_node_flags_name_the_pools_stores_and_bounds_and_leave_an_unset_budget_out() -> None:
    """The stores are under the run directory; without a budget the node keeps its own."""
    flags = NodeFlags(yield_bound_ms=100.0).flags(Path("/r"))
    assert flags == [
        "--pools", "realtime,finetune", "--checkpoint-dir", "/r/checkpoints",
        "--adapters-dir", "/r/adapters", "--training-yield-bound-ms", "100",
        "--training-concurrency", "auto",
    ]  # fmt: skip
    budget = NodeFlags(itl_budget_ms=84.5).flags(Path("/r"))
    assert budget[-2:] == ["--training-itl-budget-ms", "84.5"]


def test_the_plan_is_smollm2_by_default_tiny_in_smoke_and_takes_overrides() -> None:
    """Smoke mode trains the tiny model on seconds-long phases; flags override the mode."""
    full = plan_of(parse_args([]))
    assert full.model == "smollm2-135m-instruct"
    assert full.sharing.compared_load in full.sharing.loads
    smoke = plan_of(parse_args(["--smoke", "--phase-s", "3", "--yield-bound-ms", "75"]))
    assert smoke.flags.concurrency == "auto"
    thread = plan_of(parse_args(["--smoke", "--training-concurrency", "thread"]))
    assert "--training-concurrency thread" in settings_of(thread, Path("/r"))["node_flags"]
    assert smoke.model == "tiny-random-llama" and smoke.sharing.phase_s == 3.0
    assert smoke.flags.yield_bound_ms == 75.0 and smoke.flags.itl_budget_ms is None
    settings = settings_of(smoke, Path("/r"))
    assert settings["mode"] == "smoke" and "--training-yield-bound-ms 75" in settings["node_flags"]
    assert sum(full.budget_s.values()) <= 26 * 60


# -- report ----------------------------------------------------------------------------------


def _phase(load: float, ttft: float, itl: float, training: float | None) -> dict[str, Any]:
    waits = {
        "count": 10,
        "p50_s": 0.01,
        "p99_s": 0.04,
        "p99_edge_s": 0.05,
        "pass": True,
    }
    return {
        "load": load,
        "rps": 3.0,
        "requests": 90,
        "outcomes": {"planned": 90, "ok": 90, "refused": 0},
        "ttft_p50_s": ttft / 2,
        "ttft_p99_s": ttft,
        "inter_token_p50_s": itl / 2,
        "inter_token_p99_s": itl,
        "node_tokens_per_s": 100.0,
        "training_tokens_per_s": training,
        "training_steps": 5,
        "deferred": {"no_slack": 3},
        "yield_waits": {"admission": waits, "decode": waits, "all": waits},
    }


def _doc() -> dict[str, Any]:
    waits = {"count": 20, "p50_s": 0.01, "p99_s": 0.04, "p99_edge_s": 0.05, "pass": True}
    loaded = [_phase(0.1, 0.1, 0.05, 90.0), _phase(0.3, 0.15, 0.06, 60.0)]
    sharing = {
        "capacity": {"streams": 40, "max_new_tokens": 32, "window_s": 15, "node_tokens_per_s": 300},
        "compared_load": 0.3,
        "realtime_tokens": 32,
        "without": {
            **_phase(0.3, 0.1, 0.05, None),
            "before": _phase(0.3, 0.1, 0.05, None),
            "after": _phase(0.3, 0.1, 0.05, None),
        },
        "alone": {"window_s": 30, "training_tokens_per_s": 100.0, "training_steps": 9},
        "with_training": loaded,
        "curve": progress_curve(loaded, 100.0),
        "yield_waits": {"admission": waits, "decode": waits, "all": waits},
        "yield_bound_s": 0.1,
        "node_flags": {"yield_bound_ms": 100.0, "itl_budget_ms": 72.0},
        "itl_budget_from": "1.2 × p99 without",
        "load_job": {"job_id": "j", "steps_when_cancelled": 40, "waiting_s": 3.0, "node": "n"},
        **sharing_verdict(_phase(0.3, 0.1, 0.05, None), loaded[1], 100.0),
        "cpu": {
            "available_s": 600.0,
            "suite_and_bench_s": 400.0,
            "other_processes_s": 150.0,
            "other_processes_share": 0.25,
        },
    }
    sharing["capacity"]["failed_calls"] = 0
    sharing["alone"]["deferred"] = {}
    steps = [
        {"step": s, "loss": 2.0 / s, "deliveries": 1, "at_unix_ms": 1000 * s} for s in (1, 2, 5, 6)
    ]
    resume = {
        "reference": {"job_id": "r", "examples": 80, "nodes": ["node-1"], "duration_s": 90,
                      "steps": steps},
        "kill": {"job_id": "k", "killed_node": "node-1", "killed_at_step": 5,
                 "killed_at_unix_ms": 5500,
                 "checkpoint_at_kill": 4, "resumed_on": "node-2", "resumed_after_s": 1.5,
                 "nodes": ["node-1", "node-2"], "state": "JOB_STATE_COMPLETED", "steps": steps},
        "losses": compare_losses({s["step"]: s["loss"] for s in steps},
                                 {s["step"]: s["loss"] for s in steps}),
        "quality": {"prompts": 2, "adapter_exact_match": 1.0, "base_exact_match": 0.0,
                    "adapter_answers": [], "base_answers": [], "adapter_pass": True,
                    "base_pass": True},
        "resumed_elsewhere": True,
    }  # fmt: skip
    return {
        "generated_at": "2026-12-03T10:00:00+00:00",
        "machine": "x86_64, 2 CPUs",
        "wall_s": 800.0,
        "settings": {"mode": "full", "model": "m", "node_flags": "--pools realtime,finetune",
                     "itl_budget": "1.2 × p99"},
        "experiments": {"sharing": sharing, "resume": resume},
        "figures": rows({"sharing": sharing, "resume": resume}),
    }  # fmt: skip


def test_report_rows_carry_each_figure_with_its_verdict() -> None:
    """Figure 1's ratios at the compared load, figure 2's share and the other loads as a
    curve, figure 3 per kind (verdict on all), figures 4 and 5 from the resume entry."""
    doc = _doc()
    figures = {r["figure"]: r for r in doc["figures"]}
    ttft = figures[
        "REALTIME TTFT p99 at 30 % load, with training vs without (same arrivals, before and "
        "after pooled)"
    ]
    assert (ttft["ratio"], ttft["pass"]) == ("1.50×", False)
    progress = figures["fine-tune progress at 30 % load vs the same job alone"]
    assert (progress["ratio"], progress["pass"]) == ("60.0 %", True)
    assert figures["fine-tune progress at 10 % load (the curve)"]["ratio"] == "90.0 %"
    waits = [r for r in doc["figures"] if r["figure"].startswith("real time waiting")]
    assert [r["pass"] for r in waits] == [None, None, True]
    assert figures["per-step losses vs the uninterrupted run (same seed)"]["pass"] is True
    assert [r["pass"] for r in doc["figures"]][-4:] == [True, True, True, True]
    text = markdown(doc)
    assert "1 steps logged after the kill (steps 6-6)" in text
    assert "inter-token budget 72 ms (1.2 × p99 without)" in text


def test_a_failed_experiment_is_one_failing_row_and_said_so_in_the_report() -> None:
    """An entry with ``error`` gives a single FAIL row naming it; the markdown says it was
    not measured; a disturbed experiment is flagged."""
    doc = _doc()
    doc["experiments"]["resume"] = {"error": "TimeoutError: late", "wall_s": 1.0}
    doc["figures"] = rows(doc["experiments"])
    assert doc["figures"][-1]["measured"] == "error: TimeoutError: late"
    text = markdown(doc)
    assert "Not measured: TimeoutError: late" in text and "**FAIL**" in text
    assert disturbed(doc["experiments"])[0].startswith("**Disturbed:**")
    assert table(doc["figures"])[0].startswith("| experiment | figure | measured")


def test_the_plot_is_written_even_when_an_experiment_failed(tmp_path: Path) -> None:
    """Three panels; the failed experiment's panel says it was not measured."""
    doc = _doc()
    write_plot(doc, tmp_path / "ok.png")
    doc["experiments"]["resume"] = {"error": "x"}
    write_plot(doc, tmp_path / "partial.png")
    assert (tmp_path / "ok.png").stat().st_size > 10_000
    assert (tmp_path / "partial.png").read_bytes()[:4] == b"\x89PNG"


def test_the_baseline_pools_the_phases_before_and_after_the_compared_one() -> None:
    """Percentiles come from both phases' samples together, outcomes add up, and each phase's
    own figures stay beside them."""
    before = (_phase(0.3, 0.2, 0.1, None), ([0.1] * 98 + [0.9, 1.0], [0.05] * 100))
    after = (_phase(0.3, 0.4, 0.1, None), ([0.2] * 100, [0.07] * 100))
    base = pooled(0.3, before, after)
    assert base["requests"] == 180 and base["outcomes"] == {"planned": 180, "ok": 180, "refused": 0}
    assert base["ttft_p50_s"] == pytest.approx(0.2)
    assert 0.2 <= base["ttft_p99_s"] <= 0.9  # two slow requests in 200 are the tail, not its p99
    assert base["inter_token_p50_s"] == pytest.approx(0.06, abs=0.011)
    assert base["before"]["ttft_p99_s"] == 0.2 and base["after"]["ttft_p99_s"] == 0.4
    assert base["before"]["load"] == 0.3
