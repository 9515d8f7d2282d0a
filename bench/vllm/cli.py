"""``python -m bench.vllm`` (``make bench-vllm``): Sluice + vLLM against bare vLLM (issue 20,
deliverable 4); writes ``vllm.json`` and ``vllm.md`` under ``--out-dir`` with this run's
figures only.

For each scenario (default: ``overload.yaml`` and ``chat-longtail.yaml``; one bare vLLM cannot
run as Sluice runs it is skipped and the report says why, :func:`skip_reason`):

1. the model's Hugging Face directory and context, as the node resolves them (converting
   SmolLM2's GGUF the first time, :func:`bench.vllm.servers.checkpoint`);
2. both servers up at once: *bare vLLM*, ``vllm serve`` with the node's engine settings
   (:mod:`bench.vllm.servers`), and *Sluice + vLLM*, ``sluice up`` with one node on vLLM's
   engine;
3. each warmed with ``--warm-s`` of the scenario at ``--start-rps`` (unmeasured), then their
   capacity searches at SLO (the overload benchmark's search, both from ``--start-rps``) one
   probe of each in turn, then the scenario at 2x and 4x *bare vLLM's* capacity on each in
   turn; both stopped. Taking turns puts both servers' runs of a stretch on the machine as it
   was then (docs/decisions/bench-vllm-paired.md), and both searches climb alike (a level's
   result turns on how much the engine ran before it: bench-vllm-same-search.md).

Both servers get the same scenario, seed and arrivals (:mod:`bench.vllm.measure`, in turns by
:mod:`bench.overload.paired`); the figures are :mod:`bench.vllm.figures`'. ``--smoke`` runs the
whole path with short steps on the overload scenario alone and writes under
``.sluice/bench/vllm-smoke``: its numbers mean nothing. Every process started is stopped by its
PID, on errors too.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from bench.load.run import LoadResult
from bench.load.scenario import Scenario, ScenarioError, load_scenario
from bench.overload.paired import Phase, run_paired
from bench.overload.report import machine_info
from bench.paths import REPO_ROOT, RESULTS_DIR, SCENARIOS_DIR, SCRATCH_DIR
from bench.slo.cli import WARM_S, options
from bench.slo.figures import by_class
from bench.vllm.figures import capacity_verdict, level_verdict
from bench.vllm.measure import TargetBenchmark, level_plan, target_factory
from bench.vllm.report import markdown
from bench.vllm.servers import BareVllm, SluiceVllmSuite, VllmServe, checkpoint, node_settings
from inference_node.config import NodeSettings
from sluice.local.up import UpConfig
from sluice.runtime.auth import new_api_key

DEFAULT_SCENARIOS = ("overload.yaml", "chat-longtail.yaml")
SMOKE_SCENARIOS = ("overload.yaml",)
SMOKE_DEFAULTS: dict[str, Any] = {
    "step_s": 10.0,
    "min_requests": 5,
    "level_min_requests": 8,
    "max_step_s": 20.0,
    "max_search_steps": 2,
    "refine_steps": 0,
    "drain_s": 15.0,
    "warm_s": 5.0,
}
"""``--smoke``'s defaults (flags given still win)."""
SMOKE_DIR = SCRATCH_DIR / "vllm-smoke"


def _run_json(result: LoadResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {
        "window_s": result.duration_s,
        "classes": by_class(result.records, result.slo, result.duration_s),
    }


def _phase_json(phase: Phase | None) -> dict[str, Any]:
    search = phase.search if phase else None
    out: dict[str, Any] = {
        "capacity_rps": search.capacity_rps if search else None,
        "bracketed": search.bracketed if search else None,
        "search": [vars(s) for s in search.steps] if search else [],
    }
    if phase is not None and phase.error:
        out["error"] = phase.error
    return out


def scenario_entry(
    scenario: Scenario,
    settings: dict[str, Any],
    bare: Phase | None,
    sluice: Phase | None,
    plan: Sequence[tuple[float, str]],
    error: str | None = None,
) -> dict[str, Any]:
    """A measured scenario's entry: settings, both searches, the levels and the verdicts
    (``error``: what kept the scenario from running at all)."""
    entry: dict[str, Any] = {"scenario": scenario.name, "model": scenario.model}
    errors = [f"{p.server.name}: {p.error}" for p in (bare, sluice) if p is not None and p.error]
    errors += [error] if error else []
    if errors:
        entry["error"] = "; ".join(errors)
    entry["settings"] = settings
    entry["bare"], entry["sluice"] = _phase_json(bare), _phase_json(sluice)
    levels = []
    for rate, label in plan:
        runs = {
            key: _run_json(phase.level_result(rate) if phase else None)
            for key, phase in (("bare", bare), ("sluice", sluice))
        }
        sluice_classes = runs["sluice"]["classes"] if runs["sluice"] else None
        bare_classes = runs["bare"]["classes"] if runs["bare"] else None
        verdict = level_verdict(sluice_classes, bare_classes)
        levels.append({"label": label, "offered_rps": rate, **runs, "verdict": verdict})
    entry["levels"] = levels
    entry["capacity"] = capacity_verdict(
        entry["sluice"]["capacity_rps"], entry["bare"]["capacity_rps"]
    )
    if errors:
        entry["capacity"]["pass"] = False
    return entry


def settings_json(
    config: UpConfig, node: NodeSettings, serve: VllmServe | None, argv: Sequence[str]
) -> dict[str, Any]:
    """What both servers ran with."""
    return {
        "vllm_server": {**asdict(serve), "model_dir": str(serve.model_dir)} if serve else None,
        "vllm_argv": list(argv),
        "sluice_up": {
            "engine": config.engine,
            "nodes": config.nodes,
            "dtype": node.dtype,
            "max_sequences": node.max_sequences,
            "max_batched_tokens": node.max_batched_tokens,
            "memory_budget_bytes": node.memory_budget_bytes,
            "node_cpu_nice": config.node_cpu_nice,
            "vllm_pace": node.vllm_pace,
        },
    }


def skip_reason(scenario: Scenario) -> str | None:
    """Why bare vLLM cannot run ``scenario`` as Sluice does, if it cannot: embed tenants (a
    vLLM server of a generation model has no ``/v1/embeddings``) or several models (it serves
    one)."""
    embed = [t.name for t in scenario.tenants if t.kind == "embed"]
    if embed:
        return (
            f"embed tenants ({', '.join(embed)}): a vLLM server of a generation model has no "
            "/v1/embeddings"
        )
    if len(scenario.models()) > 1:
        return f"several models ({', '.join(scenario.models())}): a vLLM server serves one"
    return None


def run_scenario(scenario: Scenario, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """Both servers on one scenario, up together and measured in turns (bare vLLM's capacity
    sets the levels)."""
    skipped = skip_reason(scenario)
    if skipped:
        print(f"{scenario.name}: skipped, {skipped}", flush=True)
        return {"scenario": scenario.name, "model": scenario.model, "skipped": skipped}
    keys = {t.name: new_api_key() for t in scenario.tenants}
    make = target_factory(keys)
    opts = options(args)
    suite = SluiceVllmSuite(scenario, keys, run_dir / scenario.name / "sluice", args.vllm_python)
    config = suite.config()
    node = node_settings(config)
    try:
        serve = VllmServe.like_node(node, scenario.model, *checkpoint(node, scenario.model))
    except Exception as exc:  # no model directory: nothing can run; the entry says why
        error = f"model directory: {type(exc).__name__}: {exc}"
        print(f"{scenario.name}: {error}", file=sys.stderr, flush=True)
        return scenario_entry(
            scenario, settings_json(config, node, None, []), None, None, [], error
        )
    server = BareVllm(serve, args.vllm_python, run_dir / scenario.name / "vllm")
    bare = Phase(TargetBenchmark(scenario, keys, opts, make), server)
    bare.bench.records_dir = run_dir / scenario.name / "vllm" / "records"
    sluice = Phase(TargetBenchmark(scenario, keys, opts, make), suite)
    sluice.bench.records_dir = run_dir / scenario.name / "sluice" / "records"
    warming = (args.start_rps, args.warm_s)
    plan = run_paired(
        (bare, sluice), args.start_rps, warming, partial(level_plan, start_rps=args.start_rps)
    )
    argv = server.argv or serve.argv(args.vllm_python, server.host, 0)
    return scenario_entry(scenario, settings_json(config, node, serve, argv), bare, sluice, plan)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (``--smoke`` changes the defaults of the step flags)."""
    p = argparse.ArgumentParser(prog="python -m bench.vllm", description=__doc__)
    p.add_argument("--scenario", type=Path, action="append", help="repeatable")
    p.add_argument("--out-dir", type=Path, help=f"default {RESULTS_DIR} ({SMOKE_DIR} with --smoke)")
    p.add_argument("--vllm-python", type=Path, default=REPO_ROOT / ".venv-vllm" / "bin" / "python")
    p.add_argument("--start-rps", type=float, default=0.5, help="both servers' first search rate")
    p.add_argument("--warm-s", type=float, default=WARM_S, help="unmeasured traffic per server")
    p.add_argument("--step-s", type=float, default=30.0)
    p.add_argument("--min-requests", type=int, default=20)
    p.add_argument("--level-min-requests", type=int, default=60)
    p.add_argument("--max-step-s", type=float, default=120.0)
    p.add_argument("--drain-s", type=float, default=None)
    p.add_argument("--settle-s", type=float, default=2.0)
    p.add_argument(  # 3: a grid of 2^(1/8) = 1.09x, fine enough to judge a 0.9x ratio
        "--refine-steps", type=int, default=3, help="midpoints probed once bracketed"
    )
    p.add_argument(  # the climb from 0.5 to 16 req/s (6 probes) and all 3 midpoints
        "--max-search-steps", type=int, default=9
    )
    p.add_argument("--smoke", action="store_true", help="the whole path, short steps")
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(**SMOKE_DEFAULTS)
        args = p.parse_args(argv)
    return args


def vllm_version(python: Path) -> str:
    """The vLLM distribution's version in ``python``'s environment (without importing it)."""
    code = "import importlib.metadata as m; print(m.version('vllm'))"
    try:
        done = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip()


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every scenario, write vllm.json and vllm.md; 1 when one could not be measured, 2
    for bad arguments."""
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every server started is stopped by the finally blocks.
    signal.signal(signal.SIGTERM, _terminated)
    args.vllm_python = args.vllm_python.absolute()  # not resolved: a venv's python is a link
    names = SMOKE_SCENARIOS if args.smoke else DEFAULT_SCENARIOS
    paths = args.scenario or [SCENARIOS_DIR / n for n in names]
    if not args.vllm_python.exists():
        print(f"error: {args.vllm_python} not found: run `make setup-vllm`", file=sys.stderr)
        return 2
    try:
        scenarios = [load_scenario(p) for p in paths]
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_dir = args.out_dir or (SMOKE_DIR if args.smoke else RESULTS_DIR)
    SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="vllm-", dir=SCRATCH_DIR))
    started, started_at = time.monotonic(), datetime.now(UTC)
    print(f"bench-vllm: {len(scenarios)} scenarios; logs in {run_dir}", flush=True)
    entries = []
    for scenario in scenarios:
        print(f"== {scenario.name}", flush=True)
        entries.append(run_scenario(scenario, args, run_dir))
    doc: dict[str, Any] = {
        "generated_at": started_at.isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - started, 1),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "smoke": args.smoke,
        "options": asdict(options(args)),
        "warm_s": args.warm_s,
        "start_rps": args.start_rps,
        "machine": machine_info(),
        "vllm_version": vllm_version(args.vllm_python),
        "scenarios": entries,
    }
    write(doc, out_dir)
    return 1 if any("error" in e for e in entries) else 0


def write(doc: dict[str, Any], out_dir: Path) -> None:
    """``vllm.json`` and ``vllm.md`` under ``out_dir``; the report printed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vllm.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out_dir / "vllm.md").write_text(markdown(doc) + "\n")
    print(markdown(doc))
    print(f"wrote {out_dir / 'vllm.json'} and vllm.md (run of {doc['wall_s']:.0f} s)")
