"""``make bench-slo``'s pure pieces: the autoscaling signals' bins and scores, the per-class
figures and verdicts, the report; and its two suites measured in turns with a confirmation at
the contested rate, on stand-ins for the suites and for ``run_load``. The benchmark itself
(real suites under load) is not part of ``make test``."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.jobs.metrics import parse
from bench.load.records import OUTCOME_OK, OUTCOME_REFUSED, SLO, RequestRecord
from bench.load.run import LoadResult
from bench.load.scenario import Scenario, load_scenario
from bench.overload import benchmark as overload
from bench.overload.benchmark import Benchmark
from bench.overload.options import Options
from bench.overload.paired import Phase, run_paired
from bench.overload.search import BudgetExhausted, PooledProbe
from bench.slo import cli as slo
from bench.slo.figures import by_class, capacity_verdict, level_verdict, refusals
from bench.slo.report import markdown
from bench.slo.signals import (
    auc,
    best_threshold,
    bins,
    ranks,
    score_signals,
    spearman,
)


def record(
    i: int,
    sent: float,
    outcome: str = OUTCOME_OK,
    ttft: float | None = 0.2,
    cls: str = "realtime",
    retry: float | None = 0.5,
    e2e: float = 1.0,
) -> RequestRecord:
    return RequestRecord(
        index=i,
        tenant="A",
        workload_class=cls,
        scheduled_s=sent,
        sent_s=sent,
        ttft_s=ttft if outcome == OUTCOME_OK else None,
        tpot_s=0.05 if outcome == OUTCOME_OK else None,
        e2e_s=e2e,
        output_tokens=10 if outcome == OUTCOME_OK else 0,
        requested_tokens=10,
        prompt_tokens=5,
        status="OK" if outcome == OUTCOME_OK else "RESOURCE_EXHAUSTED",
        outcome=outcome,
        retry_after_s=retry if outcome == OUTCOME_REFUSED else None,
    )


def meets(r: RequestRecord) -> bool:
    return r.outcome == OUTCOME_OK and r.ttft_s is not None and r.ttft_s <= 2.0


def metrics(wait_sum: float, wait_count: float, tokens: float, queued: float) -> str:
    return (
        "sluice_scheduler_predicted_queue_wait_seconds_sum"
        f'{{workload_class="realtime"}} {wait_sum}\n'
        "sluice_scheduler_predicted_queue_wait_seconds_count"
        f'{{workload_class="realtime"}} {wait_count}\n'
        f'sluice_scheduler_node_tokens_in_flight{{node="n1"}} {tokens}\n'
        f'sluice_scheduler_node_tokens_in_flight{{node="n2"}} {tokens}\n'
        f'sluice_scheduler_node_sequences{{node="n1"}} 4\n'
        f'sluice_scheduler_node_sequences{{node="n2"}} 2\n'
        f'sluice_scheduler_queue_depth{{workload_class="realtime",tenant="A"}} {queued}\n'
    )


def test_ranks_spearman_and_auc() -> None:
    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    assert auc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auc([0.5, 0.5], [False, True]) == 0.5
    assert auc([1.0], [True]) is None
    cut = best_threshold([0.1, 0.2, 0.8, 0.9, 0.3], [False, False, True, True, True])
    assert cut == {"value": 0.3, "j": 1.0, "tpr": 1.0, "fpr": 0.0}
    assert best_threshold([0.1], [False]) is None


def test_bins_read_each_signal_and_the_realtime_share_not_served_in_slo() -> None:
    """Two 5-s bins: the first calm, the second with a refusal and a late answer; the
    predicted wait is the increase of sum over count within the bin, gauges are per node."""
    start = 1000.0
    points = [
        (start - 0.5, parse(metrics(0.0, 0, 0, 0))),
        (start + 2.0, parse(metrics(0.1, 10, 40, 0))),
        (start + 4.0, parse(metrics(0.2, 20, 60, 0))),
        (start + 7.0, parse(metrics(4.2, 30, 300, 12))),
    ]
    records = [
        record(0, 1.0),
        record(1, 3.0),
        record(2, 6.0, OUTCOME_REFUSED),
        record(3, 7.0, ttft=3.0),
        record(4, 8.0),
        record(5, 8.5),
        record(6, 9.0, cls="batch", ttft=9.0),
    ]
    out = bins(points, records, start, 10.0, meets)
    assert [b["realtime"] for b in out] == [2, 4]
    assert [b["bad_share"] for b in out] == [0.0, 0.5]
    calm, loaded = out
    assert calm["predicted_wait_s"] == pytest.approx(0.2 / 20)
    assert loaded["predicted_wait_s"] == pytest.approx(4.0 / 10)
    assert calm["tokens_in_flight"] == pytest.approx(50.0)  # mean of 40 and 60, per node
    assert calm["sequences"] == pytest.approx(3.0) and loaded["queue_depth"] == 12
    scores = score_signals(out * 2, risk_share=0.05)
    assert scores["predicted_wait_s"]["auc"] == 1.0 and scores["queue_depth"]["bins"] == 4


def test_class_figures_count_admitted_requests_and_refusals() -> None:
    records = [record(i, float(i)) for i in range(18)]
    records += [record(18, 18.0, ttft=5.0), record(19, 19.0, OUTCOME_REFUSED, e2e=0.004)]
    records += [record(20, 20.0, OUTCOME_REFUSED, retry=None, e2e=0.02)]
    figures = by_class(records, SLO(), 10.0)["realtime"]
    assert figures["admitted"] == 19 and figures["met_slo"] == 18
    assert figures["attainment_admitted"] == pytest.approx(18 / 19)
    assert figures["refused"] == 2 and figures["refused_without_retryinfo"] == 1
    assert figures["goodput_rps"] == pytest.approx(1.8)
    assert figures["errors"] == 0 and figures["unfinished"] == 0


def test_a_levels_refusal_p99_is_over_every_refusal_whatever_its_class() -> None:
    """Twelve REALTIME refusals, one of them slow, beside a hundred fast BATCH ones: the
    class's own p99 is about its slowest; the level's is the p99 of all 112."""
    records = [record(i, 0.0, OUTCOME_REFUSED, e2e=0.003) for i in range(11)]
    records += [record(11, 0.0, OUTCOME_REFUSED, e2e=0.030)]
    records += [record(12 + i, 0.0, OUTCOME_REFUSED, cls="batch", e2e=0.004) for i in range(100)]
    records += [record(200, 0.0)]  # answered: not a refusal
    assert by_class(records, SLO(), 10.0)["realtime"]["refusal_p99_s"] > 0.02
    pooled = refusals(records)
    assert pooled["count"] == 112 and pooled["p99_s"] == pytest.approx(0.004)
    assert refusals([record(0, 0.0)]) == {"count": 0, "p99_s": None}


def _level(attainment: float, goodput: float, refusal_p99: float | None) -> dict[str, Any]:
    rt = {
        "attainment_admitted": attainment,
        "goodput_rps": goodput,
        "errors": 0,
        "unfinished": 0,
        "refused_without_retryinfo": 0,
        "refusal_p99_s": refusal_p99,
    }
    batch = {**rt, "attainment_admitted": 0.2}
    return {
        "label": "2x capacity",
        "offered_rps": 3.0,
        "classes": {"realtime": rt, "batch": batch},
        "refusals": {"count": 0 if refusal_p99 is None else 40, "p99_s": refusal_p99},
    }


def test_level_verdicts_follow_the_targets() -> None:
    one_x = _level(0.99, 1.0, None)
    assert level_verdict(_level(0.96, 0.95, 0.008), one_x)["pass"]
    failed = level_verdict(_level(0.90, 0.85, 0.012), one_x)
    assert not failed["pass"]
    assert {k for k, c in failed["checks"].items() if not c["pass"]} == {
        "realtime_attainment_admitted",
        "realtime_goodput_vs_1x",
        "refusal_p99_s",
    }
    # The level's refusals decide, not the worst class's: a slow class p99 over a pooled 8 ms
    slow_class = _level(0.96, 0.95, 0.008)
    slow_class["classes"]["realtime"]["refusal_p99_s"] = 0.030
    assert level_verdict(slow_class, one_x)["checks"]["refusal_p99_s"] == {
        "value": 0.008,
        "pass": True,
    }
    assert capacity_verdict(1.8, 1.6)["pass"] and not capacity_verdict(1.2, 1.6)["pass"]
    assert not capacity_verdict(1.2, None)["pass"]
    assert not capacity_verdict(0.0, 0.0)["pass"]  # nothing met the SLO on either


def test_the_report_has_a_row_per_figure_and_the_signal_table() -> None:
    one_x = _level(0.99, 1.0, None)
    two_x = {**_level(0.97, 1.0, 0.005), "verdict": level_verdict(_level(0.97, 1.0, 0.005), one_x)}
    for level in (one_x, two_x):
        for c in level["classes"].values():
            c.update(requests=10, admitted=9, refused=1, ttft_p99_s=0.4, tpot_p99_s=None)
    entry = {
        "scenario": "chat-longtail",
        "reference": {"capacity_rps": 1.0, "search": []},
        "capacity_rps": 1.2,
        "search": [{"offered_rps": 1.2, "attainment": 0.97, "passed": True}],
        "levels": [one_x, two_x],
        "capacity": capacity_verdict(1.2, 1.0),
    }
    doc = {
        "generated_at": "now",
        "wall_s": 1.0,
        "scenarios": [entry],
        "signals": score_signals([]),
    }
    pooled = [level.pop("refusals") for level in (one_x, two_x)]
    older = markdown(doc)  # an slo.json from before the pooled figure (``--rescore``)
    for level, kept in zip((one_x, two_x), pooled, strict=True):
        level["refusals"] = kept
    assert "refusal_p99_s | 5.0 ms |" in older and "runs on" not in older
    doc.update(client_loop="uvloop", refusal_p99_over="level")
    text = markdown(doc)
    assert "| chat-longtail | capacity at SLO" in text and "1.20×" in text
    assert text.count("| chat-longtail | 2x capacity") == 5
    assert "| predicted_wait_s | 0 | 0 | – | – | – |" in text
    assert "refusal_p99_s | 5.0 ms (40 refusals) |" in text and "runs on uvloop" in text


# -- both suites in turns, the contested rate confirmed ---------------------------------------

SCENARIOS = Path(__file__).resolve().parents[1] / "bench" / "scenarios"
Attainment = Callable[[float, int], float]
"""(offered rate, window at that rate: 0 first, 1 the repeat) → the share meeting the SLO."""


class FakeSuite:
    """Stands in for ``SluiceSuite``: its start and stop noted in ``events``."""

    def __init__(self, events: list[tuple[Any, ...]], *args: Any, **kw: Any) -> None:
        self.events = events
        self.name = kw["name"]
        self.address = f"{self.name}:1"
        self.metrics_address = "127.0.0.1:1"  # nothing there: every sample is missing
        self.max_sequences = kw["max_sequences"]

    def start(self) -> None:
        self.events.append(("start", self.name))

    def stop(self) -> None:
        self.events.append(("stop", self.name))


class FakeTarget:
    def __init__(self, address: str) -> None:
        self.arm = address.split(":", maxsplit=1)[0]

    async def close(self) -> None:
        """Nothing to close."""


def run_arms(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, attainments: dict[str, Attainment]
) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
    """``run_scenario`` on the overload scenario with each arm's runs from a stand-in for
    ``run_load`` (as many REALTIME requests as the rate times the window, at least 20; the
    share ``attainments`` gives meeting the SLO); the entry and the events (starts, stops,
    ``(arm, rate, window)`` of every measured run)."""
    events: list[tuple[Any, ...]] = []
    windows: Counter[tuple[str, float]] = Counter()

    async def fake_run_load(
        s: Scenario, target: FakeTarget, *, duration_s: float, total_rps: float, salt: str = ""
    ) -> LoadResult:
        count = max(20, round(total_rps * duration_s))
        met = count
        if salt != "warm":
            n = windows[(target.arm, total_rps)]
            windows[(target.arm, total_rps)] += 1
            events.append((target.arm, total_rps, n))
            met = round(count * attainments[target.arm](total_rps, n))
        records = [record(i, float(i), ttft=0.2 if i < met else 9.0) for i in range(count)]
        return LoadResult(s, "sluice", records, duration_s, duration_s, total_rps, 0.0)

    monkeypatch.setattr(overload, "run_load", fake_run_load)
    monkeypatch.setattr(slo, "make_target", lambda kind, s, address, keys: FakeTarget(address))
    monkeypatch.setattr(slo, "SluiceSuite", lambda *a, **kw: FakeSuite(events, *a, **kw))
    opts = Options(
        step_s=30.0, min_requests=20, level_min_requests=60, max_step_s=120.0, settle_s=0.0,
        refine_steps=1, max_search_steps=5, realtime_min_requests=0,
    )  # fmt: skip
    scenario = load_scenario(SCENARIOS / "overload.yaml")
    entry = slo.run_scenario(scenario, opts, 0.5, tmp_path, reference=True)
    return json.loads(json.dumps(entry)), events


def below(capacity: float, **at: list[float]) -> Attainment:
    """All met at or below ``capacity``, half above; ``at``: the rate's windows in order
    (keys like ``r4_0`` for 4.0 req/s, ``r2_8284`` for 2.8284)."""

    def share(rate: float, window: int) -> float:
        given = at.get("r" + f"{rate:g}".replace(".", "_"))
        if given is not None and window < len(given):
            return given[window]
        return 1.0 if rate <= capacity else 0.5

    return share


def test_the_arms_search_in_turns_and_the_contested_rate_is_confirmed_on_pooled_probes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The 01:57 run's case: the default arm's single 4-req/s probe misses by a request (90 %
    here) and its search ends at 2.828; the reference passes 4. Both probe 4 once more, the
    default first, and are judged on both probes: the default's pool to 95 %, a pass, so
    both capacities are 4. The reference is stopped before the default's levels, which run
    from its confirmed capacity (1x reuses the pooled run)."""
    entry, events = run_arms(
        monkeypatch,
        tmp_path,
        {"default": below(2.8284, r4=[0.9, 1.0]), "reference": below(4.0)},
    )
    probes = [e for e in events if len(e) == 3]
    assert probes[:10] == [
        ("default", 0.5, 0), ("reference", 0.5, 0), ("default", 1.0, 0), ("reference", 1.0, 0),
        ("default", 2.0, 0), ("reference", 2.0, 0), ("default", 4.0, 0), ("reference", 4.0, 0),
        ("default", 2.8284, 0), ("reference", 8.0, 0),
    ]  # fmt: skip
    assert probes[10:12] == [("default", 4.0, 1), ("reference", 4.0, 1)], "the confirmation"
    stop = events.index(("stop", "reference"))
    assert events[stop + 1 :] == [("default", 8.0, 0), ("default", 16.0, 0), ("stop", "default")]
    assert [level["offered_rps"] for level in entry["levels"]] == [4.0, 8.0, 16.0]
    assert entry["levels"][0]["window_s"] == 60.0, "the 1x level is both 4-req/s windows"
    (mine,) = entry["confirmation"]
    assert mine["passed"] and mine["pooled_attainment"] == 0.95
    assert (mine["pooled_requests"], mine["probes"], mine["capacity_before_rps"]) == (
        240,
        2,
        2.8284,
    )
    assert entry["capacity_rps"] == 4.0 == entry["reference"]["capacity_rps"]
    assert entry["capacity"]["pass"] and "error" not in entry
    assert [s["offered_rps"] for s in entry["search"]] == [0.5, 1.0, 2.0, 4.0, 2.8284]
    runs = {b["run"] for b in entry["bins"]}
    assert {"reference 4 req/s", "reference 4 req/s (window 2)", "1x capacity (window 2)"} <= runs
    assert "search 2.8284 req/s" in runs and "search 4 req/s" not in runs
    records = sorted(p.name for p in (tmp_path / "overload-default" / "records").iterdir())
    assert "default-4-2.jsonl" in records and "default-4.jsonl" in records
    text = markdown(
        {
            "generated_at": "now",
            "wall_s": 1.0,
            "scenarios": [entry],
            "signals": {},
            "arms": "in turns",
        }
    )
    assert (
        "confirmed at 4 req/s: pooled 95.0 % over 240 requests (2 probes, this one 100.0 %), "
        "pass → capacity 4.000 req/s, was 2.828" in text
    )
    assert "one probe of each in turn" in text


def test_when_both_arms_fail_the_contested_rate_the_next_disagreement_is_confirmed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The default passed 4 and the reference 2.828 (its refinement after failing 4); at 4
    both pool to a fail, so the default falls to 2 (the highest it passed below 4) while the
    reference keeps 2.828: the arms are judged again at 2.828, where the default never probed
    (its one new probe decides) and the reference pools its search's probe with a new one."""
    entry, events = run_arms(
        monkeypatch,
        tmp_path,
        {"default": below(4.0, r4=[1.0, 0.8]), "reference": below(2.8284, r4=[0.9, 0.9])},
    )
    before_levels = events[: events.index(("stop", "reference"))]
    assert [e for e in before_levels if len(e) == 3][10:] == [
        ("default", 4.0, 1), ("reference", 4.0, 1), ("default", 2.8284, 0),
        ("reference", 2.8284, 1),
    ]  # fmt: skip
    assert [c["capacity_rps"] for c in entry["confirmation"]] == [2.0, 2.8284]
    assert [c["probes"] for c in entry["confirmation"]] == [2, 1]
    assert [c["passed"] for c in entry["reference"]["confirmation"]] == [False, True]
    assert entry["capacity_rps"] == 2.8284 == entry["reference"]["capacity_rps"]
    assert entry["capacity"]["pass"]


def test_one_round_decides_when_one_arm_passes_the_contested_rate_and_the_other_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The default's two 4-req/s probes pool to 85 %: it keeps 2.828 against the reference's
    4, and no further round runs (4 is confirmed already). Agreeing searches confirm nothing."""
    entry, events = run_arms(
        monkeypatch,
        tmp_path,
        {"default": below(2.8284, r4=[0.9, 0.8]), "reference": below(4.0)},
    )
    before_levels = events[: events.index(("stop", "reference"))]
    assert [e for e in before_levels if len(e) == 3 and e[2] == 1] == [
        ("default", 4.0, 1), ("reference", 4.0, 1),
    ]  # fmt: skip
    assert entry["capacity_rps"] == 2.8284 and entry["reference"]["capacity_rps"] == 4.0
    assert not entry["capacity"]["pass"] and not entry["confirmation"][0]["passed"]

    entry, events = run_arms(
        monkeypatch, tmp_path / "agree", {"default": below(4.0), "reference": below(4.0)}
    )
    assert entry["confirmation"] == [] == entry["reference"]["confirmation"]
    before_levels = events[: events.index(("stop", "reference"))]
    assert not [e for e in before_levels if len(e) == 3 and e[2] == 1]
    assert entry["capacity"]["pass"]


class Probed(Benchmark):
    """A benchmark whose search probes pass at or below ``capacity``, whose levels note
    themselves, and whose confirmation probes raise ``BudgetExhausted`` when told."""

    def __init__(self, events: list[tuple[Any, ...]], capacity: float, budget_left: bool):
        super().__init__(load_scenario(SCENARIOS / "overload.yaml"), {}, Options())
        self.events, self.capacity, self.budget_left = events, capacity, budget_left

    def warm(self, server: Any, rate: float, seconds: float) -> None:
        self.events.append(("warm", server.name))

    def attainment(self, server: Any, rate: float) -> float:
        self.events.append(("probe", server.name, rate))
        return 1.0 if rate <= self.capacity else 0.0

    def pooled_probe(self, server: Any, rate: float) -> PooledProbe:
        self.events.append(("confirm", server.name, rate))
        if not self.budget_left:
            raise BudgetExhausted("no time")
        return PooledProbe(rate, 1.0, 1.0, 40, 2)

    def levels(
        self, server: Any, plan: Any, realtime_judged_at: float | None = None
    ) -> list[tuple[float, str]]:
        self.events.append(("level", server.name, plan[0][0]))
        return list(plan)


class NotedServer:
    def __init__(self, name: str, events: list[tuple[Any, ...]]) -> None:
        self.name, self.address, self.events = name, "127.0.0.1:1", events

    def start(self) -> None: ...

    def stop(self) -> None:
        self.events.append(("stop", self.name))


def test_a_budget_that_allows_no_confirmation_leaves_the_searched_capacities() -> None:
    """The reference's confirmation probe is refused by the budget: no capacity moves (the
    default's probe made in that round counts for nothing), both searches say the budget
    stopped them, and the reference (search only) is stopped before the levels."""
    events: list[tuple[Any, ...]] = []
    default = Phase(Probed(events, 2.0, budget_left=True), NotedServer("default", events))
    reference = Phase(
        Probed(events, 4.0, budget_left=False), NotedServer("reference", events), search_only=True
    )
    plan = run_paired((default, reference), 1.0, (1.0, 5.0), lambda s: slo.level_plan(s, 1.0), True)
    assert [e for e in events if e[0] == "confirm"] == [
        ("confirm", "default", 4.0), ("confirm", "reference", 4.0),
    ]  # fmt: skip
    assert default.search is not None and reference.search is not None
    assert (default.search.capacity_rps, reference.search.capacity_rps) == (2.0, 4.0)
    assert default.search.stopped_by_budget and reference.search.stopped_by_budget
    assert default.search.confirmations == [] == reference.search.confirmations
    assert events.index(("stop", "reference")) < events.index(("level", "default", 2.0))
    assert [e for e in events if e[0] == "level"] == [
        ("level", "default", 2.0), ("level", "default", 4.0), ("level", "default", 8.0),
    ]  # fmt: skip
    assert plan == [(2.0, "1x capacity"), (4.0, "2x capacity"), (8.0, "4x capacity")]
    assert reference.levels == [] and reference.error is None and default.error is None
