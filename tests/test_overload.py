"""The overload benchmark's level windows, its repeated and pooled runs, the confirmation of a
contested capacity, and its report's checks, on synthetic runs.

No servers: windows and the confirmation are pure functions, ``Benchmark.levels`` and
``Benchmark.repeat`` run against a stand-in for ``run_load``, and the checks are computed from
hand-made records.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bench.load.records import RequestRecord
from bench.load.run import LoadResult
from bench.load.scenario import Scenario, load_scenario, plan_requests
from bench.overload import benchmark as overload
from bench.overload.benchmark import Benchmark, realtime_share
from bench.overload.cli import parse_args
from bench.overload.options import Options
from bench.overload.render import check_lines
from bench.overload.report import build_report
from bench.overload.search import PooledProbe, SearchResult
from bench.stats import percentile
from tests.test_load import rec as load_record

OVERLOAD = Path(__file__).resolve().parents[1] / "bench" / "scenarios" / "overload.yaml"
NAIVE_CAP, SLUICE_CAP = 0.12, 2.0


def scenario(**update: Any) -> Scenario:
    """The overload scenario (A, B realtime at 0.15 req/s, C batch at 0.7), maybe changed."""
    return load_scenario(OVERLOAD).model_copy(update=update)


def realtime_planned(s: Scenario, rate: float, window: float) -> int:
    return sum(
        r.workload_class == "realtime" for r in plan_requests(s, duration_s=window, total_rps=rate)
    )


# -- level windows ---------------------------------------------------------------------------


def test_realtime_share_is_the_realtime_tenants_share_of_the_rate() -> None:
    assert realtime_share(scenario()) == pytest.approx(0.3)
    batch_only = [t.model_copy(update={"workload_class": "batch"}) for t in scenario().tenants]
    assert realtime_share(scenario(tenants=batch_only)) == 0.0


def test_only_a_level_asking_for_realtime_requests_gets_a_longer_window() -> None:
    """At 0.06 req/s 16 REALTIME requests take 16 / (0.06 x 0.3) = 889 s on average: past
    max_step_s (300 s), within max_level_s (900 s); other windows are unchanged."""
    bench = Benchmark(scenario(), {}, Options())
    assert bench.duration_for(0.06, 25) == 300.0, "25 / 0.06 = 417 s, capped at max_step_s"
    long = bench.duration_for(0.06, 25, realtime_min_requests=16)
    assert long >= 16 / (0.06 * 0.3) and long <= 900.0
    assert realtime_planned(bench.scenario, 0.06, long) >= 16
    assert bench.duration_for(0.05, 25, realtime_min_requests=16) == 900.0, "capped"
    assert bench.duration_for(10.0, 25, realtime_min_requests=16) == 45.0, "never shorter"
    batch_only = [t.model_copy(update={"workload_class": "batch"}) for t in scenario().tenants]
    nothing = Benchmark(scenario(tenants=batch_only), {}, Options())
    assert nothing.duration_for(0.06, 25, realtime_min_requests=16) == 300.0


def test_a_short_seeded_draw_lengthens_the_window_until_the_plan_holds_enough() -> None:
    """With seed 3 the plan at the average window (444 s) holds only 15 REALTIME requests; the
    window grows to the whole second after the 16th arrival."""
    s = scenario(seed=3)
    average = 16 / (0.12 * 0.3)
    assert realtime_planned(s, 0.12, average) < 16
    window = Benchmark(s, {}, Options()).duration_for(0.12, 25, realtime_min_requests=16)
    assert window > average and window == int(window)
    assert realtime_planned(s, 0.12, window) == 16
    assert realtime_planned(s, 0.12, window - 1) < 16


def test_a_search_window_grows_until_its_seeded_plan_holds_min_requests() -> None:
    """Bursty arrivals draw fewer requests than the average in some windows: the window grows
    to the whole second after the 15th planned arrival (never shorter than the average's,
    capped at max_step_s)."""
    s = scenario()
    bench = Benchmark(s, {}, Options())
    planned = len(plan_requests(s, duration_s=15 / 0.12, total_rps=0.12))
    assert planned < 15, "the seed's plan at the average window falls short"
    window = bench.duration_for(0.12)
    assert window > 15 / 0.12 and window == int(window)
    assert len(plan_requests(s, duration_s=window, total_rps=0.12)) == 15
    assert len(plan_requests(s, duration_s=window - 1, total_rps=0.12)) < 15
    assert bench.duration_for(0.001) == 300.0, "capped"
    assert bench.duration_for(10.0) == 45.0, "step_s when the plan holds enough"


class FakeServer:
    """Stands in for a started server: ``Benchmark.measure`` only reads these."""

    name = "naive"
    address = "unused"


class FakeTarget:
    async def close(self) -> None:
        """Nothing to close."""


def test_levels_lengthen_the_judged_level_and_reuse_runs_no_shorter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The search's run at the naive capacity is too short for the judged level, so that level
    is measured again, longer, with prompts of its own; the other levels reuse runs as long as
    theirs."""
    windows: list[tuple[float, float]] = []
    salts: list[str] = []

    async def fake_run_load(
        s: Scenario, target: object, *, duration_s: float, total_rps: float, salt: str = ""
    ) -> LoadResult:
        windows.append((total_rps, duration_s))
        salts.append(salt)
        return LoadResult(s, "naive", [], duration_s, duration_s, total_rps, 0.0)

    monkeypatch.setattr(overload, "run_load", fake_run_load)
    monkeypatch.setattr(overload, "make_target", lambda *args: FakeTarget())
    bench = Benchmark(scenario(), {}, Options(settle_s=0.0))
    server = FakeServer()
    bench.measure(server, 0.12)  # search steps: 15 requests (planned: 151 s and 76 s)
    bench.measure(server, 0.24)  # a level wants 25 requests (planned: 128 s)
    plan = [(0.12, "1x naive capacity"), (0.24, "2x naive capacity")]
    done = bench.levels(server, plan, realtime_judged_at=0.12)
    assert done == plan
    judged = bench.duration_for(0.12, 25, realtime_min_requests=16)
    step, level = bench.duration_for, bench.duration_for(0.24, 25)
    assert windows == [(0.12, step(0.12)), (0.24, step(0.24)), (0.12, judged), (0.24, level)]
    assert bench.runs[("naive", 0.12)].duration_s == judged > 200.0
    bench.levels(server, plan, realtime_judged_at=0.12)
    bench.measure(server, 0.12, 25)
    assert len(windows) == 4, "every later run was no longer than one already made"
    assert len(set(salts)) == 4, "each run sends prompts of its own (prefix caches)"


def test_each_run_s_requests_are_written_where_the_benchmark_is_told(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With ``records_dir`` set, a run leaves ``<server>-<rate>.jsonl``: one line a request."""
    records = [rec(0, "A"), refusal(1)]

    async def fake_run_load(
        s: Scenario, target: object, *, duration_s: float, total_rps: float, salt: str = ""
    ) -> LoadResult:
        return LoadResult(s, "naive", records, duration_s, duration_s, total_rps, 0.0)

    monkeypatch.setattr(overload, "run_load", fake_run_load)
    monkeypatch.setattr(overload, "make_target", lambda *args: FakeTarget())
    bench = Benchmark(scenario(), {}, Options(settle_s=0.0))
    bench.records_dir = tmp_path / "records"
    bench.measure(FakeServer(), 0.5)
    lines = (tmp_path / "records" / "naive-0.5.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [r.to_json() for r in records]


def test_a_repeat_pools_its_window_with_the_earlier_run_and_keeps_each_window(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A repeat at a measured rate runs a search-length window with the same arrivals and
    prompts of its own; the run kept at the rate holds both windows' records over their summed
    windows, each window is kept (and watched, and written) on its own, and a later run no
    longer than the pooled one reuses it. A rate never measured gets just the new window."""
    calls: list[tuple[float, float, str]] = []
    watched: list[tuple[str, float, int]] = []
    outcomes = iter([[rec(0, "A"), rec(1, "A", ttft_s=9.0)], [rec(0, "A"), rec(1, "A")]])

    async def fake_run_load(
        s: Scenario, target: object, *, duration_s: float, total_rps: float, salt: str = ""
    ) -> LoadResult:
        calls.append((total_rps, duration_s, salt))
        records = next(outcomes, [rec(0, "A")])
        return LoadResult(s, "naive", records, duration_s, duration_s + 1, total_rps, 0.0)

    class Watcher:
        @contextmanager
        def watch(self, key: tuple[str, float, int]) -> Iterator[None]:
            watched.append(key)
            yield

    monkeypatch.setattr(overload, "run_load", fake_run_load)
    monkeypatch.setattr(overload, "make_target", lambda *args: FakeTarget())
    bench = Benchmark(scenario(), {}, Options(settle_s=0.0), observer=Watcher())
    bench.records_dir = tmp_path
    server = FakeServer()
    assert bench.attainment(server, 0.5) == 0.5
    probe = bench.pooled_probe(server, 0.5)
    assert probe == PooledProbe(0.5, 1.0, 0.75, 4, 2)
    window = bench.duration_for(0.5)
    assert [c[:2] for c in calls] == [(0.5, window), (0.5, window)]
    assert len({c[2] for c in calls}) == 2, "the repeat sends prompts of its own"
    kept = bench.runs[("naive", 0.5)]
    assert (len(kept.records), kept.duration_s, kept.elapsed_s) == (4, 2 * window, 2 * window + 2)
    assert [len(w.records) for w in bench.windows[("naive", 0.5)]] == [2, 2]
    assert watched == [("naive", 0.5, 0), ("naive", 0.5, 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["naive-0.5-2.jsonl", "naive-0.5.jsonl"]
    assert bench.duration_for(0.5, 4) <= 2 * window
    assert bench.measure(server, 0.5, min_requests=4) is kept, "no longer than both, as many"
    assert len(calls) == 2
    fresh = bench.pooled_probe(server, 0.25)
    assert (fresh.probes, fresh.pooled_requests, fresh.attainment) == (1, 1, 1.0)
    assert bench.windows[("naive", 0.25)] == [bench.runs[("naive", 0.25)]]
    longer = bench.duration_for(0.5, 1000)
    assert longer > 2 * window
    bench.measure(server, 0.5, 1000)  # a longer run replaces the pooled one and its files
    assert len(bench.windows[("naive", 0.5)]) == 1
    assert not (tmp_path / "naive-0.5-2.jsonl").exists()


def test_a_pooled_run_with_fewer_requests_than_a_level_needs_is_not_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two pooled windows repeat one window's arrivals: long enough in summed time, they may
    still hold fewer requests than the level asks for, and the level is then run anew."""
    calls: list[float] = []

    async def fake_run_load(
        s: Scenario, target: object, *, duration_s: float, total_rps: float, salt: str = ""
    ) -> LoadResult:
        calls.append(duration_s)
        return LoadResult(s, "naive", [rec(0, "A")], duration_s, duration_s, total_rps, 0.0)

    monkeypatch.setattr(overload, "run_load", fake_run_load)
    monkeypatch.setattr(overload, "make_target", lambda *args: FakeTarget())
    bench = Benchmark(scenario(), {}, Options(settle_s=0.0))
    server = FakeServer()
    bench.attainment(server, 0.5)
    bench.pooled_probe(server, 0.5)
    window = bench.duration_for(0.5)
    assert bench.duration_for(0.5, 2 * 15) <= 2 * window, "summed time would do"
    fresh = bench.measure(server, 0.5, min_requests=2 * 15)
    assert len(calls) == 3 and bench.runs[("naive", 0.5)] is fresh
    assert bench.windows[("naive", 0.5)] == [fresh]


def rec(index: int, tenant: str, **kw: Any) -> RequestRecord:
    """An OK request within the SLO (TTFT 0.5 s, TPOT 0.1 s) unless told otherwise; C is the
    BATCH tenant."""
    fields: dict[str, Any] = {"ttft_s": 0.5, "e2e_s": 1.5, **kw}
    return load_record(index, tenant, "batch" if tenant == "C" else "realtime", **fields)


def refusal(index: int, tenant: str = "C", seconds: float = 0.004, **kw: Any) -> RequestRecord:
    """A refusal with RetryInfo answered in ``seconds``."""
    fields: dict[str, Any] = {"ttft_s": None, "tpot_s": None, "e2e_s": seconds}
    fields.update(status="RESOURCE_EXHAUSTED", outcome="refused", output_tokens=0, **kw)
    fields.setdefault("retry_after_s", 0.5)
    return rec(index, tenant, **fields)


def trace(
    per_realtime_tenant: int, ttft_a: float = 0.5, ttft_b: float = 0.5
) -> list[RequestRecord]:
    """``per_realtime_tenant`` requests each of A and B, and as many of C."""
    out = []
    for i in range(per_realtime_tenant):
        out += [rec(3 * i, "A", ttft_s=ttft_a), rec(3 * i + 1, "B", ttft_s=ttft_b)]
        out.append(rec(3 * i + 2, "C"))
    return out


def run(target: str, rate: float, records: list[RequestRecord]) -> LoadResult:
    """A 10 s run: goodput is the requests meeting the SLO divided by 10."""
    return LoadResult(scenario(), target, records, 10.0, 12.0, rate, 0.0)


def report_of(
    runs: dict[tuple[str, float], LoadResult],
    levels: dict[str, list[tuple[float, str]]] | None = None,
) -> dict[str, Any]:
    """The report (through JSON) of ``runs`` with the naive and Sluice capacities above."""
    default_levels = {
        "naive": [(NAIVE_CAP, "1x naive capacity")],
        "sluice": [
            (NAIVE_CAP, "1x naive capacity"),
            (SLUICE_CAP, "1x sluice capacity"),
            (2 * SLUICE_CAP, "2x sluice capacity"),
            (4 * SLUICE_CAP, "4x sluice capacity"),
        ],
    }
    report = build_report(
        scenario=scenario(),
        runs=runs,
        searches={"naive": SearchResult(NAIVE_CAP), "sluice": SearchResult(SLUICE_CAP)},
        levels=default_levels if levels is None else levels,
        options=Options(),
        argv=[],
        started_at=0.0,
        duration_s=1.0,
    )
    return dict(json.loads(json.dumps(report)))


def healthy_runs(**replace: list[RequestRecord]) -> dict[tuple[str, float], LoadResult]:
    """Every level measured, every check passing; ``replace`` swaps a run's records (keys
    ``naive``, ``sluice``: the naive capacity; ``own1``, ``own2``, ``own4``)."""
    records = {
        "naive": trace(8, ttft_a=1.0, ttft_b=1.5),
        "sluice": trace(8, ttft_a=0.1, ttft_b=0.2),
        "own1": trace(10),
        "own2": [*trace(10), refusal(90), refusal(91, seconds=0.009)],
        "own4": [*trace(10), refusal(90), refusal(91, "A")],
    }
    records.update(replace)
    return {
        ("naive", NAIVE_CAP): run("naive", NAIVE_CAP, records["naive"]),
        ("sluice", NAIVE_CAP): run("sluice", NAIVE_CAP, records["sluice"]),
        ("sluice", SLUICE_CAP): run("sluice", SLUICE_CAP, records["own1"]),
        ("sluice", 2 * SLUICE_CAP): run("sluice", 2 * SLUICE_CAP, records["own2"]),
        ("sluice", 4 * SLUICE_CAP): run("sluice", 4 * SLUICE_CAP, records["own4"]),
    }


def test_realtime_ttft_check_pools_the_realtime_tenants_and_counts_their_samples() -> None:
    """8 requests each of A and B: 16 pooled samples per target, the minimum; the p99 is taken
    over both tenants together, batch requests left out."""
    report = report_of(healthy_runs())
    c = report["checks"]
    assert c["realtime_ttft_samples"] == {"naive": 16, "sluice": 16}
    assert c["realtime_ttft_min_samples"] == 16 and c["realtime_ttft_shown"]
    naive_p99 = percentile([1.0] * 8 + [1.5] * 8, 99)
    sluice_p99 = percentile([0.1] * 8 + [0.2] * 8, 99)
    assert c["realtime_ttft_p99_at_naive_capacity_s"] == {
        "naive": pytest.approx(naive_p99),
        "sluice": pytest.approx(sluice_p99),
    }
    assert c["realtime_ttft_ratio"] == pytest.approx(sluice_p99 / naive_p99)
    assert c["realtime_ttft_ratio_met"]
    line = next(x for x in check_lines(report) if x.startswith("REALTIME TTFT"))
    assert "over 16 REALTIME samples" in line and "over 16," in line and line.endswith(": met")


@pytest.mark.parametrize(("short", "ttfts"), [("naive", (1.0, 1.5)), ("sluice", (0.1, 0.2))])
def test_realtime_ttft_check_is_not_met_with_too_few_samples_on_either_target(
    short: str, ttfts: tuple[float, float]
) -> None:
    """A target with 15 REALTIME samples (one of B's left out): the ratio, which would meet the
    target, is still computed but not shown as met."""
    records = [r for r in trace(8, *ttfts) if r.index != 22]
    report = report_of(healthy_runs(**{short: records}))
    c = report["checks"]
    assert c["realtime_ttft_samples"][short] == 15
    assert not c["realtime_ttft_shown"] and not c["realtime_ttft_ratio_met"]
    assert c["realtime_ttft_ratio"] is not None
    line = next(x for x in check_lines(report) if x.startswith("REALTIME TTFT"))
    assert "over 15" in line and "NOT met (not shown: fewer than 16 REALTIME samples" in line


def test_realtime_ttft_samples_leave_out_refused_and_failed_requests() -> None:
    records = [*trace(8), refusal(100, "A"), rec(101, "B", outcome="error", status="INTERNAL")]
    records.append(rec(102, "A", outcome="timed_out", ttft_s=None, e2e_s=20.0))
    report = report_of(healthy_runs(sluice=records))
    assert report["checks"]["realtime_ttft_samples"]["sluice"] == 17, "16 + the timed-out one"


OVERLOAD_NAMES = [
    f"{metric}_at_{m}x_sluice_capacity"
    for m in (2, 4)
    for metric in (
        "realtime_goodput_vs_1x",
        "errors",
        "unfinished",
        "refused_without_retryinfo",
        "refusal_p99_s",
    )
]


def overload_checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in report["checks"]["sluice_overload"]}


def test_overload_checks_pass_when_sluice_holds_up_at_2x_and_4x_its_capacity() -> None:
    report = report_of(healthy_runs())
    checks = overload_checks(report)
    assert list(checks) == OVERLOAD_NAMES
    for entry in checks.values():
        assert set(entry) == {"name", "level", "offered_rps", "value", "op", "limit", "pass"}
        assert entry["pass"], entry
    goodput = checks["realtime_goodput_vs_1x_at_2x_sluice_capacity"]
    assert (goodput["value"], goodput["op"], goodput["limit"]) == (1.0, ">=", 0.9)
    refusals = checks["refusal_p99_s_at_2x_sluice_capacity"]
    assert refusals["value"] == pytest.approx(percentile([0.004, 0.009], 99))
    assert (refusals["op"], refusals["limit"]) == ("<=", 0.010)
    assert checks["errors_at_4x_sluice_capacity"]["offered_rps"] == 4 * SLUICE_CAP
    lines = [x for x in check_lines(report) if x.startswith("sluice at")]
    assert [x.split(" (")[0] for x in lines] == [
        "sluice at 2x sluice capacity",
        "sluice at 4x sluice capacity",
    ]
    assert all(x.endswith(": met") for x in lines)


def test_each_overload_check_fails_on_its_own_figure() -> None:
    """4x: REALTIME goodput 17/20 of 1x, an error, a timeout, a refusal without RetryInfo, a
    refusal after 50 ms; 2x stays healthy."""
    own4 = [r for r in trace(10) if r.index not in (0, 3, 6)]  # three of A's ten
    own4 += [
        rec(90, "C", outcome="error", status="INTERNAL"),
        rec(91, "C", outcome="timed_out", ttft_s=None, e2e_s=20.0),
        refusal(92, retry_after_s=None),
        refusal(93, seconds=0.050),
    ]
    report = report_of(healthy_runs(own4=own4))
    checks = overload_checks(report)
    assert [name for name, e in checks.items() if not e["pass"]] == OVERLOAD_NAMES[5:]
    values = {name: e["value"] for name, e in checks.items()}
    assert values["realtime_goodput_vs_1x_at_4x_sluice_capacity"] == pytest.approx(0.85)
    assert values["errors_at_4x_sluice_capacity"] == 1
    assert values["unfinished_at_4x_sluice_capacity"] == 1
    assert values["refused_without_retryinfo_at_4x_sluice_capacity"] == 1
    assert values["refusal_p99_s_at_4x_sluice_capacity"] > 0.010
    line = next(x for x in check_lines(report) if x.startswith("sluice at 4x"))
    assert "errors 1 (<= 0) FAIL" in line and line.endswith("NOT met")


def test_realtime_goodput_passes_at_nine_tenths_of_1x_and_fails_below() -> None:
    """Goodput counts requests meeting the SLO: 18, then 17, of 20 REALTIME requests on time
    (all 20 at 1x)."""
    late = [rec(r.index, r.tenant, ttft_s=3.0) if r.index in (0, 3) else r for r in trace(10)]
    checks = overload_checks(report_of(healthy_runs(own2=late)))
    goodput = checks["realtime_goodput_vs_1x_at_2x_sluice_capacity"]
    assert goodput["value"] == pytest.approx(0.9) and goodput["pass"]
    later = [rec(r.index, r.tenant, ttft_s=3.0) if r.index in (0, 3, 6) else r for r in trace(10)]
    checks = overload_checks(report_of(healthy_runs(own2=later)))
    goodput = checks["realtime_goodput_vs_1x_at_2x_sluice_capacity"]
    assert goodput["value"] == pytest.approx(0.85) and not goodput["pass"]


def test_overload_checks_fail_when_a_level_was_not_measured() -> None:
    """Without the 1x level there is nothing to compare goodput with; a level the budget
    skipped has no figures at all. Neither passes."""
    runs = healthy_runs()
    levels = {
        "naive": [(NAIVE_CAP, "1x naive capacity")],
        "sluice": [(NAIVE_CAP, "1x naive capacity"), (2 * SLUICE_CAP, "2x sluice capacity")],
    }
    report = report_of(runs, levels)
    checks = overload_checks(report)
    assert list(checks) == OVERLOAD_NAMES
    goodput = checks["realtime_goodput_vs_1x_at_2x_sluice_capacity"]
    assert goodput["value"] is None and not goodput["pass"]
    assert checks["errors_at_2x_sluice_capacity"]["pass"]
    for name in OVERLOAD_NAMES[5:]:
        assert checks[name]["value"] is None and checks[name]["offered_rps"] is None
        assert not checks[name]["pass"]
    line = next(x for x in check_lines(report) if x.startswith("sluice at 4x"))
    assert "(not measured)" in line and line.endswith("NOT met")


def test_flags_set_the_new_options() -> None:
    args = parse_args(["--realtime-min-requests", "20", "--max-level-s", "900"])
    assert (args.realtime_min_requests, args.max_level_s) == (20, 900.0)
    defaults = parse_args([])
    assert (defaults.realtime_min_requests, defaults.max_level_s) == (16, 900.0)
    assert defaults.own_multiples == (1.0, 2.0, 4.0)
    with pytest.raises(SystemExit):
        parse_args(["--realtime-min-requests", "-1"])
