"""``python -m bench.load SCENARIO --target sluice|naive|openai``: one load run from the command
line.

Runs :func:`bench.load.run.run_load` against a running suite (``sluice up``), the naive server
or an OpenAI-compatible server such as vLLM's own (``--target openai --endpoint host:port``),
prints a per-tenant summary and writes the run's JSON report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.load.openai_target import OpenAITarget, openai_target
from bench.load.run import LoadResult, make_target, resolve_api_keys, run_client, run_load
from bench.load.scenario import Scenario, ScenarioError, load_scenario
from bench.load.targets import TARGETS, Target


def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "-"


def render_summary(report: Mapping[str, Any]) -> str:
    """A plain-text table of a run report: one row per tenant and one for all."""
    header = (
        f"{'tenant':<10}{'class':<10}{'reqs':>6}{'ok':>6}{'refused':>8}{'timeout':>8}"
        f"{'error':>6}{'cut':>5}{'goodput/s':>10}{'ttft p50':>9}{'ttft p99':>9}{'e2e p99':>9}"
        f"{'tok/s':>8}"
    )
    rows = [
        f"{report['target']} at {report['offered_rps']:.2f} req/s offered for "
        f"{report['duration_s']:.0f} s ({report['elapsed_s']:.0f} s with drain), "
        f"SLO TTFT <= {report['slo']['ttft_s']} s, TPOT <= {report['slo']['tpot_s']} s",
        header,
    ]
    groups = [(name, s["class"], s) for name, s in report["tenants"].items()]
    groups.append(("all", "", report["all"]))
    for name, cls, s in groups:
        rows.append(
            f"{name:<10}{cls:<10}{s['requests']:>6}{s['finished']:>6}{s['refused']:>8}"
            f"{s['timed_out']:>8}{s['errors']:>6}{s['cut_off']:>5}{_fmt(s['goodput_rps']):>10}"
            f"{_fmt(s['ttft_p50_s']):>9}{_fmt(s['ttft_p99_s']):>9}{_fmt(s['e2e_p99_s']):>9}"
            f"{_fmt(s['output_tokens_per_s'], 1):>8}"
        )
    rows.append(
        f"SLO attainment {report['all']['slo_attainment']:.1%}; "
        f"fairness (Jain, within class) {report['fairness_jain']:.3f}"
    )
    return "\n".join(rows)


def _default_endpoint(target: str) -> str | None:
    if target != "sluice":
        return None
    env = os.environ.get("SLUICE_ENDPOINTS", "").split(",")[0].strip()
    if env:
        return env
    from sluice.local.rundir import read_endpoints  # noqa: PLC0415 - only for a local `sluice up`

    try:
        return str(read_endpoints(Path(".sluice"))["scheduler"]["grpc"])
    except (OSError, KeyError, ValueError):
        return None


def _make(target: str, spec: Scenario, address: str, keys: Mapping[str, str]) -> Target:
    if target == OpenAITarget.name:
        return openai_target(spec, address)
    return make_target(target, spec, address, keys)


def _default_key() -> str | None:
    from sluice.local.rundir import dev_api_key  # noqa: PLC0415 - only for a local `sluice up`

    return os.environ.get("SLUICE_API_KEY") or dev_api_key(Path(".sluice"))


async def _run_cli(
    scenario: Scenario,
    make: Callable[[], Target],
    duration_s: float | None,
    say: Callable[[str], None],
) -> LoadResult:
    target = make()  # here: grpc.aio channels belong to the loop that creates them
    last = [0.0]

    def progress(launched: int, done: int, planned: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 5.0:
            last[0] = now
            say(f"  {launched}/{planned} launched, {done} done")

    try:
        return await run_load(scenario, target, duration_s=duration_s, on_progress=progress)
    finally:
        await target.close()


def cli_main(
    scenario: Path,
    target: str,
    endpoint: str | None,
    api_key: str | None,
    out: Path | None,
    duration_s: float | None,
) -> int:
    """Run a scenario, print its summary, write its JSON report; the exit code.

    0: the run completed and some requests succeeded; 1: none succeeded; 2: bad arguments or
    scenario (the message says which field).
    """
    try:
        spec = load_scenario(scenario)
        if target not in TARGETS:
            raise ScenarioError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
        address = endpoint or _default_endpoint(target)
        if not address:
            raise ScenarioError(
                f"no endpoint for target {target}: pass --endpoint"
                + (" or set SLUICE_ENDPOINTS" if target == "sluice" else "")
            )
        if duration_s is not None and duration_s <= 0:
            raise ScenarioError("duration must be positive")
        keys = resolve_api_keys(spec, api_key or _default_key()) if target == "sluice" else {}
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    window = duration_s if duration_s is not None else spec.duration_s
    print(
        f"load {spec.name} -> {target} at {address}: {spec.total_rps:.2f} req/s for {window:g} s "
        f"(+ up to {spec.drain_seconds():g} s drain)",
        flush=True,
    )
    result = run_client(
        _run_cli(spec, lambda: _make(target, spec, address, keys), duration_s, print)
    )
    report = result.report()
    path = out or Path(".sluice") / "bench" / f"load-{spec.name}-{target}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(render_summary(report))
    print(f"wrote {path}")
    return 0 if report["all"]["finished"] > 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.load``."""
    p = argparse.ArgumentParser(
        prog="python -m bench.load",
        description="Run a load scenario against Sluice, the naive server or an "
        "OpenAI-compatible server (vLLM's own).",
    )
    p.add_argument("scenario", type=Path, help="scenario YAML (see bench/scenarios/)")
    p.add_argument("--target", choices=TARGETS, default="sluice")
    p.add_argument("--endpoint", help="host:port (sluice's default: SLUICE_ENDPOINTS or .sluice/)")
    p.add_argument("--api-key", help="key for tenants without one in the scenario")
    p.add_argument("--out", type=Path, help="JSON report path")
    p.add_argument("--duration-s", type=float, help="override the scenario's arrival window")
    args = p.parse_args(argv)
    return cli_main(
        args.scenario, args.target, args.endpoint, args.api_key, args.out, args.duration_s
    )
