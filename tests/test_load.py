"""The load generator (``bench.load``), its statistics, scenarios, the naive baseline server and
the overload report.

Statistics are pinned on synthetic traces with answers worked out by hand; the smoke runs drive
the real services (the test suite's scheduler and node, and the naive server) with the tiny
model for a few seconds and check that every planned request is accounted for.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench.load.cli import cli_main
from bench.load.records import (
    OUTCOME_REFUSED,
    OUTCOMES,
    SLO,
    RequestRecord,
    meets_slo,
    summarize,
    tenant_fairness,
)
from bench.load.run import LoadResult, make_target, run_client, run_load
from bench.load.scenario import (
    WORDS,
    PlannedRequest,
    ScenarioError,
    load_scenario,
    parse_scenario,
    plan_requests,
    vocabulary,
)
from bench.load.targets import TargetError
from bench.overload.naive_server import SerialGenerator, load_model, start_server
from bench.overload.options import Options
from bench.overload.report import LEVEL_KEYS, build_report
from bench.overload.search import SearchResult, SearchStep, find_capacity
from bench.stats import jain_index, percentile, weighted_fair_shares
from sluice.v1 import common_pb2, inference_pb2
from tests.harness import API_KEY, Suite

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOKE = REPO_ROOT / "bench" / "scenarios" / "smoke.yaml"
OVERLOAD = REPO_ROOT / "bench" / "scenarios" / "overload.yaml"
CHAT_LONGTAIL = REPO_ROOT / "bench" / "scenarios" / "chat-longtail.yaml"
EMBED_HEAVY = REPO_ROOT / "bench" / "scenarios" / "embed-heavy.yaml"
EMBEDDER = "all-minilm-l6-v2"
RECORD_KEYS = {
    "index",
    "tenant",
    "workload_class",
    "scheduled_s",
    "sent_s",
    "ttft_s",
    "tpot_s",
    "e2e_s",
    "output_tokens",
    "requested_tokens",
    "prompt_tokens",
    "status",
    "outcome",
    "reason",
    "retry_after_s",
    "details",
    "finish_reason",
    "kind",
    "finished",
}


def rec(index: int, tenant: str = "A", cls: str = "realtime", **kw: Any) -> RequestRecord:
    """A synthetic record: an OK request with TTFT 1 s, TPOT 0.1 s, 10 tokens unless told."""
    fields: dict[str, Any] = {
        "scheduled_s": float(index),
        "sent_s": float(index),
        "ttft_s": 1.0,
        "tpot_s": 0.1,
        "e2e_s": 1.9,
        "output_tokens": 10,
        "requested_tokens": 10,
        "prompt_tokens": 5,
        "status": "OK",
        "outcome": "ok",
    }
    fields.update(kw)
    return RequestRecord(index=index, tenant=tenant, workload_class=cls, **fields)


def scenario_data(**overrides: Any) -> dict[str, Any]:
    """A valid scenario as loaded YAML, with top-level overrides."""
    data: dict[str, Any] = {
        "name": "t",
        "model": "tiny-random-llama",
        "duration_s": 10,
        "seed": 3,
        "tenants": [
            {
                "name": "A",
                "class": "realtime",
                "weight": 2,
                "rate_rps": 2.0,
                "prompt_tokens": {"kind": "uniform", "min": 4, "max": 8},
                "output_tokens": {"kind": "choice", "values": [4, 8]},
            },
            {
                "name": "B",
                "class": "batch",
                "rate_rps": 6.0,
                "prompt_tokens": {"kind": "fixed", "value": 4},
                "output_tokens": {"kind": "fixed", "value": 4},
            },
        ],
    }
    data.update(overrides)
    return data


def embed_tenant(**overrides: Any) -> dict[str, Any]:
    """A batch embed tenant ``E`` of 2-4 texts of 3-6 words per call, with overrides."""
    tenant: dict[str, Any] = {
        "name": "E",
        "class": "batch",
        "kind": "embed",
        "model": EMBEDDER,
        "rate_rps": 4.0,
        "prompt_tokens": {"kind": "uniform", "min": 3, "max": 6},
        "texts": {"kind": "uniform", "min": 2, "max": 4},
    }
    tenant.update(overrides)
    return tenant


# -- statistics ------------------------------------------------------------------------------


def test_percentile_interpolates_linearly_between_ranks() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 99) == pytest.approx(4.96)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 5.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 99) == 0.0


def test_slo_requires_ok_status_and_both_bounds() -> None:
    slo = SLO(ttft_s=2.0, tpot_s=0.25)
    assert meets_slo(rec(0, ttft_s=2.0, tpot_s=0.25), slo)
    assert not meets_slo(rec(0, ttft_s=2.01), slo)
    assert not meets_slo(rec(0, tpot_s=0.26), slo)
    assert meets_slo(rec(0, tpot_s=None, output_tokens=1), slo), "one token: no TPOT to judge"
    assert not meets_slo(rec(0, outcome="error", status="INTERNAL"), slo)


def test_embed_slo_is_an_ok_answer_within_embed_s() -> None:
    """An Embed (TTFT = latency, no TPOT) meets the SLO when it answers OK within ``embed_s``,
    whatever the TTFT bound; a miss is counted as a TTFT miss against that bound."""
    slo = SLO(ttft_s=2.0, tpot_s=0.25, embed_s=0.5)

    def embed(index: int, latency: float | None, **kw: Any) -> RequestRecord:
        return rec(index, kind="embed", ttft_s=latency, e2e_s=latency, tpot_s=None,
                   output_tokens=0, requested_tokens=12, **kw)  # fmt: skip

    assert meets_slo(embed(0, 0.5), slo)
    assert not meets_slo(embed(0, 0.51), slo)
    assert meets_slo(rec(0, ttft_s=1.0), slo) and not meets_slo(embed(0, 1.0), slo)
    refused = embed(0, None, outcome="refused", status="RESOURCE_EXHAUSTED", retry_after_s=0.2)
    assert not meets_slo(refused, slo)
    records = [embed(0, 0.1), embed(1, 0.9), rec(2, ttft_s=0.9), refused]
    s = summarize(records, duration_s=1.0, elapsed_s=1.0, slo=slo)
    assert (s["meeting_slo"], s["ttft_slo_misses"], s["tpot_slo_misses"]) == (2, 1, 0)
    assert (s["refused"], s["refused_without_retryinfo"], s["output_tokens"]) == (1, 0, 10)


def test_fairness_counts_an_embed_as_the_tokens_it_read() -> None:
    """Equal weights: G generates 30 tokens, all served; E asks to embed 90, gets 60 (the rest
    of what was served): fair, as an Embed serves its ``requested_tokens`` (it outputs none)."""
    records = [rec(i, "G", output_tokens=10, requested_tokens=10) for i in range(3)]
    records += [
        rec(10 + i, "E", kind="embed", output_tokens=0, requested_tokens=30, tpot_s=None)
        for i in range(2)
    ]
    records.append(
        rec(20, "E", kind="embed", output_tokens=0, requested_tokens=30, outcome="refused",
            status="RESOURCE_EXHAUSTED")
    )  # fmt: skip
    # 90 tokens served, G asked for 30: its fair share is 30, E's the other 60, which E got.
    assert tenant_fairness(records, {"G": 1.0, "E": 1.0})["realtime"] == pytest.approx(1.0)


def test_summary_of_a_synthetic_trace_matches_hand_computed_answers() -> None:
    """11 requests over a 5 s window: 6 good, 1 too slow, 2 refused (one without RetryInfo),
    1 timed out after 20 s without a token, 1 failed at once (UNAVAILABLE)."""
    records = [rec(i, ttft_s=0.1 * (i + 1)) for i in range(6)]  # TTFT 0.1 .. 0.6, good
    records.append(rec(6, ttft_s=3.0, e2e_s=4.0))  # OK but misses the TTFT bound
    records.append(
        rec(7, ttft_s=None, tpot_s=None, e2e_s=0.01, output_tokens=0, outcome="refused",
            status="RESOURCE_EXHAUSTED", retry_after_s=0.5)
    )  # fmt: skip
    records.append(
        rec(8, ttft_s=None, tpot_s=None, e2e_s=0.03, output_tokens=0, outcome="refused",
            status="RESOURCE_EXHAUSTED")
    )  # fmt: skip
    records.append(
        rec(9, ttft_s=None, tpot_s=None, e2e_s=20.0, output_tokens=0, outcome="timed_out",
            status="DEADLINE_EXCEEDED")
    )  # fmt: skip
    records.append(
        rec(10, ttft_s=None, tpot_s=None, e2e_s=0.001, output_tokens=0, outcome="error",
            status="UNAVAILABLE")
    )  # fmt: skip
    s = summarize(records, duration_s=5.0, elapsed_s=10.0, slo=SLO())
    assert s["requests"] == 11
    assert s["meeting_slo"] == 6
    assert (s["ttft_slo_misses"], s["tpot_slo_misses"]) == (1, 0), "among finished requests"
    assert s["slo_attainment"] == pytest.approx(6 / 11)
    assert s["goodput_rps"] == pytest.approx(6 / 5.0)
    # TTFT over the 8 that were served or waited: 0.1..0.6, 3.0 and the timed-out one's 20 s;
    # the refusals and the error are counted apart, not as fast first tokens.
    ttfts = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 3.0, 20.0]
    assert s["ttft_p50_s"] == pytest.approx((0.4 + 0.5) / 2)
    assert s["ttft_p99_s"] == pytest.approx(3.0 + (20.0 - 3.0) * 0.93)
    assert s["ttft_p99_s"] == pytest.approx(percentile(ttfts, 99))
    assert s["e2e_p99_s"] == pytest.approx(percentile([1.9] * 6 + [4.0, 20.0], 99))
    assert s["output_tokens"] == 70
    assert s["output_tokens_per_s"] == pytest.approx(7.0)
    assert s["refused"] == 2
    assert s["refusal_p99_s"] == pytest.approx(0.01 + 0.02 * 0.99)
    assert s["refused_without_retryinfo"] == 1
    assert (s["errors"], s["timed_out"], s["cut_off"], s["unfinished"]) == (1, 1, 0, 1)
    assert s["finished"] == 7


def test_jain_index_known_values() -> None:
    assert jain_index([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert jain_index([1.0, 3.0]) == pytest.approx(16 / 20)
    assert jain_index([]) == 1.0


def test_weighted_fair_shares_water_fill_by_weight_up_to_demand() -> None:
    weights = {"A": 2.0, "B": 1.0, "C": 1.0}
    backlogged = weighted_fair_shares({"A": 100, "B": 100, "C": 100}, weights, 40)
    assert backlogged == pytest.approx({"A": 20.0, "B": 10.0, "C": 10.0})
    # B asks for 4 only; its unused 6 is split 2:1 between A and C.
    capped = weighted_fair_shares({"A": 100, "B": 4, "C": 100}, weights, 40)
    assert capped == pytest.approx({"A": 24.0, "B": 4.0, "C": 12.0})
    assert weighted_fair_shares({"A": 1, "B": 2}, {"A": 1, "B": 1}, 10) == {"A": 1, "B": 2}


def test_fairness_is_one_for_a_weighted_split_and_lower_for_an_even_split() -> None:
    """A (weight 2) and B (weight 1) both backlogged: 2:1 is fair; 1:1 gives ratios 0.75/1.5."""
    weights = {"A": 2.0, "B": 1.0}

    def trace(served_a: int, served_b: int) -> list[RequestRecord]:
        out = [rec(i, "A", output_tokens=1, requested_tokens=1) for i in range(served_a)]
        out += [rec(100 + i, "B", output_tokens=1, requested_tokens=1) for i in range(served_b)]
        unserved = [
            rec(200 + i, t, outcome="refused", status="RESOURCE_EXHAUSTED", output_tokens=0)
            for i, t in enumerate(["A", "B"] * 50)
        ]  # both asked for far more than they got
        return out + unserved

    assert tenant_fairness(trace(20, 10), weights)["realtime"] == pytest.approx(1.0)
    even = tenant_fairness(trace(15, 15), weights)["realtime"]
    assert even == pytest.approx(jain_index([0.75, 1.5]))
    assert even == pytest.approx(0.9)


# -- scenarios -------------------------------------------------------------------------------


def test_bundled_scenarios_validate() -> None:
    smoke = load_scenario(SMOKE)
    overload = load_scenario(OVERLOAD)
    assert smoke.model == "tiny-random-llama"
    assert [(t.name, t.workload_class, t.weight) for t in overload.tenants] == [
        ("A", "realtime", 2.0),
        ("B", "realtime", 1.0),
        ("C", "batch", 1.0),
    ]
    assert overload.slo.ttft_s == 2.0 and overload.slo.tpot_s == 0.25
    assert load_scenario(CHAT_LONGTAIL).slo == overload.slo


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["tenants"][1].update(rate_rps=-1), "tenants[1] (B).rate_rps: Input should be"),
        (lambda d: d["tenants"][0].pop("rate_rps"), "tenants[0] (A).rate_rps: Field required"),
        (
            lambda d: d["tenants"][0].update(prompt_tokens={"kind": "uniform", "min": 9, "max": 3}),
            "tenants[0] (A).prompt_tokens.uniform: max (3) must be at least min (9)",
        ),
        (
            lambda d: d["tenants"][0].update(output_tokens={"kind": "normal", "mean": 3}),
            "tenants[0] (A).output_tokens: Input tag 'normal' found using 'kind' does not match",
        ),
        (lambda d: d["tenants"][0].update({"class": "urgent"}), "tenants[0] (A).class: Input"),
        (lambda d: d["tenants"][1].update(name="A"), "tenants: tenant names must be unique"),
        (lambda d: d.update(duraton_s=5), "duraton_s: Extra inputs are not permitted"),
        (lambda d: d.pop("model"), "model: Field required"),
        (
            lambda d: d["tenants"][0].update(api_key={"env": "X", "value": "k"}),
            "tenants[0] (A).api_key: set exactly one of env, file, value",
        ),
        (lambda d: d.update(tenants=[]), "tenants: List should have at least 1 item"),
        (
            lambda d: d["tenants"][0].pop("output_tokens"),
            "tenants[0] (A): output_tokens is required for a generate tenant",
        ),
        (
            lambda d: d["tenants"].append(
                embed_tenant(output_tokens={"kind": "fixed", "value": 4})
            ),
            "tenants[2] (E): an embed tenant generates no tokens: remove output_tokens",
        ),
        (
            lambda d: d["tenants"][0].update(texts={"kind": "fixed", "value": 2}),
            "tenants[0] (A): texts is for embed tenants (kind: embed) only",
        ),
        (lambda d: d["tenants"][0].update(kind="rerank"), "tenants[0] (A).kind: Input should be"),
    ],
)
def test_scenario_validation_errors_name_the_field(mutate: Any, expected: str) -> None:
    data = scenario_data()
    mutate(data)
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, "s.yaml")
    message = str(info.value)
    assert message.startswith("invalid scenario s.yaml:")
    assert expected in message, message


def test_scenario_file_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read scenario"):
        load_scenario(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(ScenarioError, match="must be a mapping"):
        load_scenario(bad)


def test_api_key_sources_resolve_or_say_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = scenario_data()
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file\n")
    data["tenants"][0]["api_key"] = {"file": str(key_file)}
    data["tenants"][1]["api_key"] = {"env": "LOAD_TEST_KEY_B"}
    scenario = parse_scenario(data)
    monkeypatch.delenv("LOAD_TEST_KEY_B", raising=False)
    with pytest.raises(ScenarioError, match="environment variable LOAD_TEST_KEY_B is not set"):
        assert scenario.tenants[1].api_key is not None
        scenario.tenants[1].api_key.resolve()
    monkeypatch.setenv("LOAD_TEST_KEY_B", "sk-from-env")
    assert [t.api_key.resolve() for t in scenario.tenants if t.api_key] == [
        "sk-from-file",
        "sk-from-env",
    ]


def test_plan_is_seeded_poisson_scaled_and_bounded() -> None:
    scenario = parse_scenario(scenario_data(duration_s=200))
    plan = plan_requests(scenario)
    assert plan == plan_requests(scenario), "same seed, same plan"
    assert [r.index for r in plan] == list(range(len(plan)))
    times = [r.scheduled_s for r in plan]
    assert times == sorted(times)
    counts = {t: sum(r.tenant == t for r in plan) for t in ("A", "B")}
    # Poisson counts: mean rate x window, within 4 standard deviations.
    for tenant, mean in (("A", 400), ("B", 1200)):
        assert abs(counts[tenant] - mean) < 4 * math.sqrt(mean), counts
    a = next(r for r in plan if r.tenant == "A")
    assert 4 <= a.prompt_tokens <= 8 and a.max_new_tokens in (4, 8)
    assert len(a.prompt.split()) == a.prompt_tokens and set(a.prompt.split()) <= set(WORDS)
    doubled = plan_requests(scenario, total_rps=16.0)
    assert abs(len(doubled) - 2 * len(plan)) < 4 * math.sqrt(2 * len(plan))
    capped = plan_requests(parse_scenario(scenario_data(duration_s=200, max_requests=50)))
    assert len(capped) == 50 and capped == plan[:50]


def test_a_salted_plan_keeps_lengths_and_arrivals_with_prompts_of_its_own() -> None:
    """A load run's salt moves only which word each draw names: the same arrivals, lengths
    and vocabulary, but prompts no other salt (or none) sends, so a prefix cache cannot serve
    one run from another's."""
    scenario = parse_scenario(scenario_data(duration_s=60))
    plain = plan_requests(scenario)
    salted = plan_requests(scenario, salt="2x30")
    assert salted == plan_requests(scenario, salt="2x30"), "same salt, same plan"
    keep = ("tenant", "scheduled_s", "prompt_tokens", "max_new_tokens")
    assert [[getattr(r, k) for k in keep] for r in salted] == [
        [getattr(r, k) for k in keep] for r in plain
    ]
    assert all(len(r.prompt.split()) == r.prompt_tokens for r in salted)
    assert set(vocabulary("2x30")) == set(WORDS) and vocabulary("") == WORDS
    other = plan_requests(scenario, salt="4x30")
    long = [i for i, r in enumerate(plain) if r.prompt_tokens >= 6]
    assert long and all(
        len({plain[i].prompt, salted[i].prompt, other[i].prompt}) == 3 for i in long
    )


def test_long_tailed_lengths_and_bursty_arrivals_have_the_shape_asked() -> None:
    """Log-normal lengths stay in their bounds with about half under the median; gamma gaps
    keep the mean rate with the coefficient of variation asked (Poisson's is 1); a tenant
    that names Poisson arrivals gets the plan it got before they could be named."""
    data = scenario_data(duration_s=2000)
    data["tenants"][0]["prompt_tokens"] = {
        "kind": "lognormal",
        "median": 100,
        "sigma": 1.0,
        "min": 8,
        "max": 1000,
    }
    data["tenants"][0]["arrivals"] = {"kind": "gamma", "cv": 3}
    plan = [r for r in plan_requests(parse_scenario(data)) if r.tenant == "A"]
    lengths = [r.prompt_tokens for r in plan]
    assert min(lengths) >= 8 and max(lengths) <= 1000 and max(lengths) > 500
    assert 0.4 < sum(n < 100 for n in lengths) / len(lengths) < 0.6
    gaps = [b.scheduled_s - a.scheduled_s for a, b in itertools.pairwise(plan)]
    mean = statistics.fmean(gaps)
    assert abs(mean - 1 / 2.0) < 0.1, mean  # A's rate: 2 per second
    assert 2.4 < statistics.pstdev(gaps) / mean < 3.6
    poisson = scenario_data()
    poisson["tenants"][0]["arrivals"] = {"kind": "poisson"}
    assert plan_requests(parse_scenario(poisson)) == plan_requests(parse_scenario(scenario_data()))
    chat = load_scenario(CHAT_LONGTAIL)
    assert {t.arrivals.kind for t in chat.tenants} == {"gamma"}


def test_embed_tenants_need_no_output_tokens_and_models_lists_each_model_once() -> None:
    """An embed tenant validates without ``output_tokens`` and names its own model; ``models()``
    is every model the requests name, the scenario's first, each once."""
    data = scenario_data()
    data["tenants"] += [embed_tenant(), embed_tenant(name="F", texts={"kind": "fixed", "value": 1})]
    scenario = parse_scenario(data)
    assert scenario.tenants[2].output_tokens is None and scenario.tenants[3].kind == "embed"
    assert scenario.models() == ("tiny-random-llama", EMBEDDER)
    assert parse_scenario(scenario_data()).models() == ("tiny-random-llama",)
    heavy = load_scenario(EMBED_HEAVY)
    assert heavy.models() == ("smollm2-135m-instruct", EMBEDDER)
    assert heavy.slo.embed_s == 0.5 and 1.0 <= heavy.total_rps <= 5.0
    embed_rps = sum(t.rate_rps for t in heavy.tenants if t.kind == "embed")
    assert embed_rps > 0.75 * heavy.total_rps, "most of the traffic embeds"


# The first five requests of ``scenario_data()``'s plan (seed 3), computed with the planner as
# it was before embed tenants existed: they must not change a generate-only plan by one draw.
GENERATE_PLAN_HEAD = [
    ("B", 0.003135523, 4, 4, "country right early stud"),
    ("B", 0.048791526, 4, 4, "night school green car"),
    ("B", 0.352528928, 4, 4, "service month problem ti"),
    ("B", 0.88094051, 4, 4, "light work war thing"),
    ("A", 0.972410757, 8, 4, "president hour guy count"),
]


def test_generate_plans_are_unchanged_by_embed_support() -> None:
    """A generate-only plan is what it was before Embeds (same draws, same prompts); adding an
    embed tenant leaves the generate tenants' requests alone."""
    plan = plan_requests(parse_scenario(scenario_data()))
    head = [
        (r.tenant, round(r.scheduled_s, 9), r.prompt_tokens, r.max_new_tokens, r.prompt[:24])
        for r in plan[:5]
    ]
    assert head == GENERATE_PLAN_HEAD
    assert {(r.kind, r.model, r.texts) for r in plan} == {("generate", "tiny-random-llama", ())}
    mixed = scenario_data()
    mixed["tenants"].append(embed_tenant())
    with_embeds = plan_requests(parse_scenario(mixed))
    generated = [replace(r, index=-1) for r in with_embeds if r.kind == "generate"]
    assert generated == [replace(r, index=-1) for r in plan]


def test_embed_plan_draws_texts_per_call_and_words_per_text() -> None:
    """An Embed carries 2-4 texts of 3-6 words each, asks for no tokens, counts its work as all
    its words, and is the same for the same seed."""
    data = scenario_data(duration_s=20)
    data["tenants"].append(embed_tenant())
    scenario = parse_scenario(data)
    embeds = [r for r in plan_requests(scenario) if r.kind == "embed"]
    assert len(embeds) > 40 and embeds == [r for r in plan_requests(scenario) if r.kind == "embed"]
    for r in embeds:
        assert (r.tenant, r.model, r.prompt, r.max_new_tokens) == ("E", EMBEDDER, "", 0)
        assert 2 <= len(r.texts) <= 4 and all(3 <= len(t.split()) <= 6 for t in r.texts)
        assert r.prompt_tokens == r.requested_tokens == sum(len(t.split()) for t in r.texts)
    assert {len(r.texts) for r in embeds} == {2, 3, 4}


def test_changing_one_tenant_leaves_the_others_arrivals_alone() -> None:
    base = parse_scenario(scenario_data())
    changed_data = scenario_data()
    changed_data["tenants"][1]["rate_rps"] = 1.0
    changed = parse_scenario(changed_data)
    times = [r.scheduled_s for r in plan_requests(base) if r.tenant == "A"]
    assert times == [r.scheduled_s for r in plan_requests(changed) if r.tenant == "A"]


# -- capacity search and report --------------------------------------------------------------


def test_capacity_search_brackets_then_refines() -> None:
    """Attainment is 1.0 up to 0.3 req/s and 0.5 above: 0.1, 0.2 pass, 0.4 fails, then the
    midpoint sqrt(0.2 x 0.4) = 0.2828 passes."""
    search = find_capacity(
        lambda rate: 1.0 if rate <= 0.3 else 0.5, start_rps=0.1, factor=2.0, refine_steps=1
    )
    assert [s.offered_rps for s in search.steps] == [0.1, 0.2, 0.4, 0.2828]
    assert [s.passed for s in search.steps] == [True, True, False, True]
    assert search.capacity_rps == 0.2828 and search.bracketed


def test_capacity_search_walks_down_when_the_start_fails_and_is_bounded() -> None:
    down = find_capacity(lambda r: 1.0 if r <= 0.05 else 0.0, start_rps=0.4, refine_steps=0)
    assert [s.offered_rps for s in down.steps] == [0.4, 0.2, 0.1, 0.05]
    assert down.capacity_rps == 0.05
    never = find_capacity(lambda r: 0.0, start_rps=1.0, max_steps=3)
    assert len(never.steps) == 3 and never.capacity_rps == 0.0
    floored = find_capacity(lambda r: 0.0, start_rps=1.0, min_rps=0.3)
    assert [s.offered_rps for s in floored.steps] == [1.0, 0.5]
    raised = find_capacity(lambda r: 1.0, start_rps=0.1, min_rps=0.2, max_steps=1)
    assert [s.offered_rps for s in raised.steps] == [0.2], "never starts below the floor"
    always = find_capacity(lambda r: 1.0, start_rps=1.0, max_steps=3)
    assert always.capacity_rps == 4.0 and not always.bracketed, "only a lower bound"


def _result(target: str, records: list[RequestRecord], rate: float) -> LoadResult:
    scenario = load_scenario(OVERLOAD)
    return LoadResult(scenario, target, records, 10.0, 12.0, rate, 0.0)


def test_overload_report_has_exactly_the_published_schema() -> None:
    def trace(ttft: float) -> list[RequestRecord]:
        tenants = [("A", "realtime"), ("B", "realtime"), ("C", "batch")]
        return [rec(i, t, c, ttft_s=ttft) for i, (t, c) in enumerate(tenants)]

    runs = {
        ("naive", 0.2): _result("naive", trace(1.5), 0.2),
        ("sluice", 0.2): _result("sluice", trace(0.3), 0.2),
        ("sluice", 1.6): _result("sluice", trace(0.5), 1.6),
    }
    report = build_report(
        scenario=load_scenario(OVERLOAD),
        runs=runs,
        searches={
            "naive": SearchResult(0.2, [SearchStep(0.2, 1.0, True)]),
            "sluice": SearchResult(1.6, [SearchStep(1.6, 1.0, True)]),
        },
        levels={
            "naive": [(0.2, "1x naive capacity")],
            "sluice": [(0.2, "1x naive capacity"), (1.6, "1x sluice capacity")],
        },
        options=Options(),
        argv=[],
        started_at=0.0,
        duration_s=1.0,
    )
    report = json.loads(json.dumps(report))  # nothing that JSON cannot carry
    assert report["capacity_at_slo_rps"] == {"naive": 0.2, "sluice": 1.6}
    assert isinstance(report["fairness_jain"], float)
    assert len(report["levels"]) == 9
    counts = {"requests", "refused", "refused_without_retryinfo", "errors", "unfinished"}
    for row in report["levels"]:
        assert tuple(row) == LEVEL_KEYS
        assert row["target"] in ("naive", "sluice") and row["class"] in ("realtime", "batch")
        for key in LEVEL_KEYS[4:]:
            assert isinstance(row[key], int if key in counts else float), key
    assert report["checks"]["capacity_ratio"] == pytest.approx(8.0)
    assert report["checks"]["realtime_ttft_ratio"] == pytest.approx(0.2)


class ScriptedTarget:
    """A fake target whose answer depends on ``index % 5``: a full stream (or every vector), a
    refusal with RetryInfo, a timeout, a stream that ends without a finish reason (or a vector
    short), a client-side bug."""

    name = "scripted"

    async def generate(self, request: PlannedRequest) -> AsyncIterator[inference_pb2.GenerateChunk]:
        kind = request.index % 5
        if kind == 1:
            raise TargetError("RESOURCE_EXHAUSTED", "busy", reason="OVERLOADED", retry_after_s=0.5)
        if kind == 2:
            raise TargetError("DEADLINE_EXCEEDED", "too slow")
        if kind == 4:
            raise ValueError("bug")
        for token in range(3):
            await asyncio.sleep(0.001)
            yield inference_pb2.GenerateChunk(token_ids=[token])
        if kind == 0:
            final = inference_pb2.GenerateChunk(finish_reason=common_pb2.FINISH_REASON_LENGTH)
            final.usage.completion_tokens = 3
            final.usage.prompt_tokens = 7
            yield final

    async def embed(self, request: PlannedRequest) -> int:
        kind = request.index % 5
        if kind == 1:
            raise TargetError("RESOURCE_EXHAUSTED", "busy", reason="OVERLOADED", retry_after_s=0.5)
        if kind == 2:
            raise TargetError("DEADLINE_EXCEEDED", "too slow")
        if kind == 4:
            raise ValueError("bug")
        await asyncio.sleep(0.001)
        return len(request.texts) - (kind == 3)

    async def close(self) -> None:
        """Nothing to close."""


async def test_every_embed_outcome_is_classified_like_a_generate() -> None:
    """Embeds end in the same outcomes as streams (a short answer is an error); an answered
    one has TTFT = end-to-end latency, no tokens and no TPOT, and a refusal keeps RetryInfo."""
    data = scenario_data(duration_s=0.5, drain_s=1)
    data["tenants"] = [embed_tenant()]
    result = await run_load(parse_scenario(data), ScriptedTarget(), total_rps=40.0)
    report = result.report()
    _assert_accounted(report)
    expected = {
        0: ("ok", "OK"),
        1: ("refused", "RESOURCE_EXHAUSTED"),
        2: ("timed_out", "DEADLINE_EXCEEDED"),
        3: ("error", "INCOMPLETE_ANSWER"),
        4: ("error", "CLIENT_ERROR"),
    }
    for r in report["requests"]:
        assert (r["outcome"], r["status"], r["kind"]) == (*expected[r["index"] % 5], "embed")
    ok = next(r for r in report["requests"] if r["index"] % 5 == 0)
    assert ok["ttft_s"] == ok["e2e_s"] > 0 and ok["tpot_s"] is None
    assert (ok["output_tokens"], ok["finished"]) == (0, True)
    assert 6 <= ok["requested_tokens"] <= 24, "2-4 texts of 3-6 words"
    refused = next(r for r in report["requests"] if r["index"] % 5 == 1)
    assert (refused["reason"], refused["retry_after_s"]) == ("OVERLOADED", 0.5)
    assert report["tenants"]["E"]["kind"] == "embed" and report["models"] == [
        "tiny-random-llama",
        EMBEDDER,
    ]


async def test_every_outcome_is_classified_and_accounted_for() -> None:
    scenario = parse_scenario(scenario_data(duration_s=0.5, drain_s=1))
    result = await run_load(scenario, ScriptedTarget(), total_rps=40.0)
    report = result.report()
    _assert_accounted(report)
    expected = {
        0: ("ok", "OK"),
        1: ("refused", "RESOURCE_EXHAUSTED"),
        2: ("timed_out", "DEADLINE_EXCEEDED"),
        3: ("error", "INCOMPLETE_STREAM"),
        4: ("error", "CLIENT_ERROR"),
    }
    for r in report["requests"]:
        assert (r["outcome"], r["status"]) == expected[r["index"] % 5], r
    ok = next(r for r in report["requests"] if r["index"] % 5 == 0)
    assert (ok["output_tokens"], ok["prompt_tokens"], ok["finish_reason"]) == (3, 7, "LENGTH")
    assert ok["tpot_s"] is not None and ok["ttft_s"] <= ok["e2e_s"]
    refused = next(r for r in report["requests"] if r["index"] % 5 == 1)
    assert (refused["reason"], refused["retry_after_s"]) == ("OVERLOADED", 0.5)
    assert (
        "ValueError: bug" in next(r for r in report["requests"] if r["index"] % 5 == 4)["details"]
    )


class RefusingTarget:
    """Refuses each call after ``hold_s`` of work on the client's own thread (no await)."""

    name = "refusing"

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.loops: set[str] = set()

    async def generate(self, request: PlannedRequest) -> AsyncIterator[inference_pb2.GenerateChunk]:
        self.loops.add(type(asyncio.get_running_loop()).__module__.split(".")[0])
        end = time.perf_counter() + self.hold_s
        while time.perf_counter() < end:
            pass
        raise TargetError("RESOURCE_EXHAUSTED", "busy", reason="OVERLOADED", retry_after_s=0.5)
        yield inference_pb2.GenerateChunk()  # never reached: makes this a stream

    async def embed(self, request: PlannedRequest) -> int:
        raise AssertionError("no embed tenant here")

    async def close(self) -> None:
        """Nothing to close."""


def test_a_load_runs_on_the_services_loop_and_times_below_its_millisecond_ticks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``run_client`` runs the load on uvloop (a dependency of the project), whose own clock
    ticks in whole milliseconds; a refusal 0.3 ms after its send is still timed as such."""
    pytest.importorskip("uvloop")
    monkeypatch.delenv("SLUICE_EVENT_LOOP", raising=False)
    target = RefusingTarget(hold_s=0.0003)
    scenario = parse_scenario(scenario_data(duration_s=0.3, drain_s=1))
    result = run_client(run_load(scenario, target, total_rps=40.0))
    assert target.loops == {"uvloop"}
    times = [r.e2e_s for r in result.records if r.outcome == OUTCOME_REFUSED]
    assert times and all(t is not None and 0.0003 <= t < 1.0 for t in times), times


# -- smoke runs against real servers ---------------------------------------------------------


def _assert_accounted(report: dict[str, Any], planned: int | None = None) -> None:
    acc = report["accounting"]
    assert sum(acc[o] for o in OUTCOMES) == acc["planned"] == len(report["requests"])
    if planned is not None:
        assert acc["planned"] == planned
    assert sorted(r["index"] for r in report["requests"]) == list(range(acc["planned"]))
    for r in report["requests"]:
        assert set(r) == RECORD_KEYS
        assert r["outcome"] in OUTCOMES


async def test_smoke_run_against_the_suite_writes_well_formed_json(
    running: Suite, tmp_path: Path
) -> None:
    assert running.scheduler is not None
    out = tmp_path / "load.json"
    code = await _in_thread(cli_main, SMOKE, "sluice", running.scheduler.address, API_KEY, out, 1.5)
    assert code == 0
    report = json.loads(out.read_text())
    _assert_accounted(report)
    assert report["target"] == "sluice" and report["duration_s"] == 1.5
    assert set(report["tenants"]) == {"A", "B", "C"}
    ok = [r for r in report["requests"] if r["outcome"] == "ok"]
    assert ok, report["accounting"]
    for r in ok:
        assert r["finished"] and r["status"] == "OK" and r["finish_reason"] == "LENGTH"
        assert r["output_tokens"] == r["requested_tokens"], "ignore_eos fixes the length"
        assert 0 < r["ttft_s"] <= r["e2e_s"]
    assert report["all"]["requests"] == len(report["requests"])


async def test_embed_and_generate_mix_against_the_suite(running: Suite) -> None:
    """A generate tenant and an embed tenant through the SDK against the real suite: every
    Embed answers OK with one vector per text, each generation with its asked length."""
    assert running.scheduler is not None
    data = scenario_data(duration_s=1.0, drain_s=10)
    data["tenants"] = [data["tenants"][0], embed_tenant()]
    scenario = parse_scenario(data)
    keys = {"A": API_KEY, "E": API_KEY}
    target = make_target("sluice", scenario, running.scheduler.address, keys)
    try:
        result = await run_load(scenario, target, total_rps=6.0)
    finally:
        await target.close()
    report = result.report()
    _assert_accounted(report)
    embeds = [r for r in report["requests"] if r["kind"] == "embed"]
    assert embeds and all(r["outcome"] == "ok" for r in report["requests"]), report["accounting"]
    for r in embeds:
        assert r["ttft_s"] == r["e2e_s"] > 0 and r["output_tokens"] == 0
    for r in report["requests"]:
        if r["kind"] == "generate":
            assert r["output_tokens"] == r["requested_tokens"]


async def _in_thread(fn: Any, *args: Any) -> Any:
    """``cli_main`` runs its own event loop; keep this test's loop (the suite's) free."""
    return await asyncio.to_thread(fn, *args)


@pytest.fixture(scope="module")
def naive_generator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SerialGenerator]:
    generator = SerialGenerator(
        load_model("tiny-random-llama", cache_dir=tmp_path_factory.mktemp("naive-models"))
    )
    generator.warm_up()
    generator.start()
    yield generator
    generator.close()


async def test_naive_server_serves_requests_one_at_a_time(
    naive_generator: SerialGenerator,
) -> None:
    server = await start_server(naive_generator)
    scenario = parse_scenario(scenario_data(duration_s=1.0, drain_s=10))
    target = make_target("naive", scenario, server.address, {})
    try:
        result = await run_load(scenario, target, total_rps=4.0)
    finally:
        await target.close()
        await server.stop(0.5)
    report = result.report()
    _assert_accounted(report)
    ok = [r for r in report["requests"] if r["outcome"] == "ok"]
    assert len(ok) == len(report["requests"]) > 0
    for r in ok:
        assert r["output_tokens"] == r["requested_tokens"] and r["finish_reason"] == "LENGTH"
        assert r["prompt_tokens"] > 0 and 0 < r["ttft_s"] <= r["e2e_s"]


async def test_cli_runs_the_smoke_scenario_against_the_naive_server(
    naive_generator: SerialGenerator, tmp_path: Path
) -> None:
    server = await start_server(naive_generator)
    out = tmp_path / "naive.json"
    try:
        code = await _in_thread(cli_main, SMOKE, "naive", server.address, None, out, 1.0)
    finally:
        await server.stop(0.5)
    assert code == 0
    report = json.loads(out.read_text())
    _assert_accounted(report)
    assert report["target"] == "naive"
    assert report["accounting"]["ok"] == report["accounting"]["planned"] > 0


def test_cli_rejects_a_bad_scenario_or_target_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps(scenario_data(duration_s=-1)))
    assert cli_main(bad, "naive", "127.0.0.1:1", None, None, None) == 2
    assert "duration_s: Input should be greater than 0" in capsys.readouterr().err
    assert cli_main(SMOKE, "vllm", "127.0.0.1:1", None, None, None) == 2
    assert "unknown target 'vllm'" in capsys.readouterr().err
    assert cli_main(SMOKE, "naive", None, None, None, None) == 2
    assert "no endpoint for target naive" in capsys.readouterr().err


async def test_requests_cut_off_or_timed_out_are_accounted_for(
    naive_generator: SerialGenerator,
) -> None:
    """Long generations queue on the naive server: A's requests (0.8 s deadline) time out, B's
    (30 s) are cut off at the run's hard stop 1.5 s in; none disappears."""
    server = await start_server(naive_generator)
    data = scenario_data(duration_s=0.5, drain_s=1.0, request_timeout_s=0.8)
    for tenant in data["tenants"]:
        tenant.update(rate_rps=1.0, output_tokens={"kind": "fixed", "value": 1500})
    data["tenants"][1]["timeout_s"] = 30
    scenario = parse_scenario(data)
    target = make_target("naive", scenario, server.address, {})
    try:
        result = await run_load(scenario, target, total_rps=20.0)
    finally:
        await target.close()
        await server.stop(0.5)
    report = result.report()
    _assert_accounted(report, planned=len(plan_requests(scenario, total_rps=20.0)))
    by_tenant = {
        tenant: {(r["outcome"], r["status"]) for r in report["requests"] if r["tenant"] == tenant}
        for tenant in ("A", "B")
    }
    assert by_tenant == {
        "A": {("timed_out", "DEADLINE_EXCEEDED")},
        "B": {("cut_off", "CANCELLED")},
    }
    assert report["all"]["unfinished"] == len(report["requests"])
