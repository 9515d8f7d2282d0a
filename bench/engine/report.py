"""Reporting for the engine benchmark: roofline fractions, ratios, targets, table, plot.

Everything here works on the report dictionary that is written to ``engine.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.engine.common import (
    GIB,
    HF_GENERATE_BATCH,
    HF_SEQUENTIAL,
    HF_STATIC,
    MIB,
    SLUICE,
    SYSTEM_LABELS,
    SYSTEMS,
    VLLM,
)
from bench.engine.teacher_forced import TIE_STEPS

RSS_HEADROOM_BYTES = int(1.5 * GIB)
TABLE_HEADER = (
    "system",
    "C",
    "requests",
    "out tok/s",
    "TTFT p50 (s)",
    "TTFT p99 (s)",
    "peak RSS (MiB)",
    "roofline out",
    "roofline out+prompt",
    "wall (s)",
    "other CPU",
    "note",
)
BUSY_RUN_FRACTION = 0.10  # other processes' share of machine CPU above which a run is suspect
VLLM_TARGET = "C=32: sluice >= 0.6x vllm (output tok/s)"
VLLM_TARGET_RATIO = 0.6
# Share of request 0's leading greedy tokens Sluice must share with HF generate: all in
# float32. In bfloat16 two correct forwards round differently and free-running output parts for
# good at the first near tie, so the stated tolerance is teacher-forced instead: on HF's own
# greedy tokens the engine's argmax may differ only on a tie (bench/engine/teacher_forced.py);
# the leading-token share is reported.
GREEDY_AGREEMENT = {"float32": 1.0}


def add_roofline(runs: Sequence[dict[str, Any]], matmul_gflops: float, parameters: int) -> None:
    """Add each run's fraction of the matmul roofline (2 FLOPs per parameter per token),
    counting output tokens only and output plus prompt tokens."""
    peak = matmul_gflops * 1e9
    for run in runs:
        flops_per_token = 2.0 * parameters
        ok = peak > 0 and not run.get("error")
        run["roofline_fraction"] = (
            run["output_tokens_per_s"] * flops_per_token / peak if ok else 0.0
        )
        run["roofline_fraction_with_prompt"] = (
            run["total_tokens_per_s"] * flops_per_token / peak if ok else 0.0
        )


def find_run(
    runs: Sequence[dict[str, Any]], system: str, concurrency: int
) -> dict[str, Any] | None:
    """The successful run of ``system`` at ``concurrency``, if any."""
    for run in runs:
        if run["system"] == system and run["concurrency"] == concurrency and not run.get("error"):
            return run
    return None


def _ratio(
    runs: Sequence[dict[str, Any]], num: tuple[str, int], den: tuple[str, int]
) -> float | None:
    top, bottom = find_run(runs, *num), find_run(runs, *den)
    if top is None or bottom is None or bottom["output_tokens_per_s"] <= 0:
        return None
    return float(top["output_tokens_per_s"] / bottom["output_tokens_per_s"])


def compute_ratios(runs: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Output-throughput ratios of Sluice over each baseline at the same C, plus C=64 vs b@32,
    plus Sluice over vllm at every C vllm ran at."""
    ratios: dict[str, float | None] = {
        "sluice/hf_sequential@1": _ratio(runs, (SLUICE, 1), (HF_SEQUENTIAL, 1))
    }
    batched = {r["concurrency"] for r in runs if r["system"] in (HF_STATIC, HF_GENERATE_BATCH)}
    for c in sorted(batched):
        for base in (HF_STATIC, HF_GENERATE_BATCH):
            ratios[f"sluice/{base}@{c}"] = _ratio(runs, (SLUICE, c), (base, c))
    ratios["sluice@64/hf_static@32"] = _ratio(runs, (SLUICE, 64), (HF_STATIC, 32))
    for c in sorted({r["concurrency"] for r in runs if r["system"] == VLLM}):
        ratios[f"sluice/{VLLM}@{c}"] = _ratio(runs, (SLUICE, c), (VLLM, c))
    return ratios


def _target(
    name: str,
    value: float | None,
    threshold: float | None,
    *,
    at_most: bool = False,
    note: str = "",
) -> dict[str, Any]:
    if value is None or threshold is None:
        status = "n/a"
    else:
        passed = value <= threshold if at_most else value >= threshold
        status = "PASS" if passed else "FAIL"
    return {"name": name, "value": value, "threshold": threshold, "status": status, "note": note}


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's pass/fail targets (``n/a`` where a needed run is missing or failed)."""
    ratios = report["ratios"]
    targets = [
        _target(
            "C=32: sluice >= 1.5x hf_static (output tok/s)", ratios.get("sluice/hf_static@32"), 1.5
        ),
        _target(
            "C=32: sluice >= 3x hf_generate_batch (output tok/s)",
            ratios.get("sluice/hf_generate_batch@32"),
            3.0,
        ),
        _target(
            "C=64: sluice >= 2x hf_static at C=32 (output tok/s)",
            ratios.get("sluice@64/hf_static@32"),
            2.0,
        ),
        _target(
            "C=1: sluice >= 0.9x hf_sequential (output tok/s)",
            ratios.get("sluice/hf_sequential@1"),
            0.9,
        ),
        _target(
            VLLM_TARGET,
            ratios.get(f"sluice/{VLLM}@32"),
            VLLM_TARGET_RATIO,
            note=_skipped_note(report, VLLM),
        ),
    ]
    targets.append(_greedy_target(report))
    midbatch = report.get("midbatch", {})
    if midbatch.get("ran"):
        bound = report["prefill_s"] + 2 * report["decode_step_s"]
        target = _target(
            "mid-batch TTFT p99 <= prefill_s + 2 x decode_step_s",
            report["midbatch_ttft_p99_s"],
            bound,
            at_most=True,
        )
        if midbatch.get("timed_out"):
            target.update(status="FAIL", note="a probe got no token within the probe timeout")
        elif not midbatch.get("valid"):
            # Probes that did not arrive mid-batch measure nothing the target is about.
            target.update(
                status="n/a",
                note=f"invalid: only {midbatch.get('background_running_min')} of "
                f"{midbatch.get('background')} background requests were decoding",
            )
        targets.append(target)
    else:
        targets.append(
            _target(
                "mid-batch TTFT p99 <= prefill_s + 2 x decode_step_s",
                None,
                None,
                note=midbatch.get("error", "skipped"),
            )
        )
    sluice_rss = [
        r["peak_rss_bytes"] for r in report["runs"] if r["system"] == SLUICE and not r.get("error")
    ]
    weights = report.get("weight_bytes")
    bound_rss = (
        weights + report["config"]["kv_budget_bytes"] + RSS_HEADROOM_BYTES if weights else None
    )
    targets.append(
        _target(
            "peak RSS of sluice <= weights + KV budget + 1.5 GiB",
            float(max(sluice_rss)) if sluice_rss else None,
            float(bound_rss) if bound_rss else None,
            at_most=True,
        )
    )
    return targets


def _greedy_target(report: dict[str, Any]) -> dict[str, Any]:
    """Every Sluice run's share of request 0's leading greedy tokens equal to HF generate's
    (the least of them) against :data:`GREEDY_AGREEMENT` for the run's dtype; outside
    float32, the teacher-forced flips beyond a tie (none allowed)."""
    dtype = report["config"]["dtype"]
    if dtype not in GREEDY_AGREEMENT:
        forced = report.get("teacher_forced") or {}
        beyond = forced.get("flips_beyond_tie")
        note = forced.get("error", "")
        if beyond is not None:
            note = (
                f"argmax agrees at {forced['agree']} of {forced['positions']} positions "
                f"({forced['requests']} requests x {forced['tokens']}); "
                f"{len(forced['flips'])} flips, {beyond} beyond a tie"
            )
        return _target(
            f"greedy ({dtype}): teacher-forced on HF generate's tokens, flips only on ties "
            f"(HF margin <= {TIE_STEPS} {dtype} steps)",
            beyond,
            0,
            at_most=True,
            note=note,
        )
    need = GREEDY_AGREEMENT[dtype]
    shares = []
    for run, agreed in report.get("greedy_agreement", {}).items():
        same, _, total = agreed.partition("/")
        if run.startswith(f"{SLUICE}@") and int(total) > 0:
            shares.append(int(same) / int(total))
    return _target(
        f"greedy ({dtype}): sluice shares >= {need:.0%} of HF generate's leading tokens",
        min(shares) if shares else None,
        need,
    )


def _skipped_note(report: dict[str, Any], system: str) -> str:
    why = report.get("skipped_systems", {}).get(system)
    return f"{system} skipped: {why}" if why else ""


def _fmt(value: float | None, digits: int) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per run, in system then concurrency order."""
    order = {s: i for i, s in enumerate(SYSTEMS)}
    rows = []
    for run in sorted(report["runs"], key=lambda r: (order.get(r["system"], 9), r["concurrency"])):
        failed = bool(run.get("error"))
        rows.append(
            [
                run["system"],
                str(run["concurrency"]),
                str(run["requests"]),
                "-" if failed else _fmt(run["output_tokens_per_s"], 1),
                "-" if failed else _fmt(run["ttft_p50_s"], 3),
                "-" if failed else _fmt(run["ttft_p99_s"], 3),
                "-" if failed else _fmt(run["peak_rss_bytes"] / MIB, 0),
                "-" if failed else f"{100 * run['roofline_fraction']:.2f}%",
                "-" if failed else f"{100 * run['roofline_fraction_with_prompt']:.2f}%",
                "-" if failed else _fmt(run["wall_s"], 1),
                "-" if failed else f"{100 * run.get('other_cpu_fraction', 0.0):.0f}%",
                _short(str(run["error"])) if failed else str(run.get("note", "")),
            ]
        )
    return rows


def _short(text: str, limit: int = 60) -> str:
    line = text.strip().splitlines()[-1] if text.strip() else text
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _ratio_lines(report: dict[str, Any]) -> list[str]:
    return [
        f"{name}: {_fmt(value, 2)}x" if value is not None else f"{name}: n/a"
        for name, value in report["ratios"].items()
    ]


def _target_lines(report: dict[str, Any], *, markdown: bool = False) -> list[str]:
    lines = []
    for t in report["targets"]:
        detail = ""
        if t["value"] is not None and t["threshold"] is not None:
            if "RSS" in t["name"]:
                detail = f" ({t['value'] / MIB:.0f} MiB vs {t['threshold'] / MIB:.0f} MiB)"
            elif "TTFT" in t["name"]:
                detail = f" ({t['value']:.3f} s vs {t['threshold']:.3f} s)"
            elif t["name"].startswith("greedy"):
                detail = f" ({t['value']:.0%} vs {t['threshold']:.0%})"
            else:
                detail = f" ({t['value']:.2f}x vs {t['threshold']:.2f}x)"
        note = f" [{t['note']}]" if t.get("note") else ""
        status = f"**{t['status']}**" if markdown else f"{t['status']:>4}"
        lines.append(f"{status}  {t['name']}{detail}{note}")
    return lines


def _summary_lines(report: dict[str, Any]) -> list[str]:
    workload = report["workload"]
    mb = report.get("midbatch", {})
    lines = [
        f"workload: {workload['requests']} requests (seed {workload['seed']}), prompts "
        f"{workload['prompt_tokens_min']}-{workload['prompt_tokens_max']} tokens, max_new_tokens "
        f"from {workload['max_new_tokens_choices']}, greedy, EOS ignored"
        + (
            f"; C=1 runs serve the first {workload['sequential_requests']} requests"
            if any(r["concurrency"] == 1 for r in report["runs"])
            else ""
        ),
        f"matmul roofline: {report['matmul_gflops']:.1f} GFLOP/s "
        f"({report.get('matmul', {}).get('dtype', '?')}); model parameters: "
        f"{report.get('parameter_count', 0):,}",
    ]
    if mb.get("ran"):
        lines.append(
            f"mid-batch: TTFT p50 {report['midbatch_ttft_p50_s']:.3f} s, p99 "
            f"{report['midbatch_ttft_p99_s']:.3f} s over {mb.get('probes_sent')} probes while "
            f">= {mb.get('background_running_min')} of {mb.get('background')} requests decode; "
            f"idle prefill {report['prefill_s']:.3f} s, decode step {report['decode_step_s']:.3f} s"
        )
    else:
        lines.append(f"mid-batch: not measured ({mb.get('error', 'skipped')})")
    busy = [
        f"{r['system']}@{r['concurrency']}"
        for r in report["runs"]
        if r.get("other_cpu_fraction", 0.0) > BUSY_RUN_FRACTION
    ]
    if busy:
        lines.append(
            f"WARNING: other processes used over {BUSY_RUN_FRACTION:.0%} of the machine's CPU "
            f"during {', '.join(busy)}: those numbers are unreliable; rerun on an idle machine"
        )
    for system, why in report.get("skipped_systems", {}).items():
        lines.append(f"{system}: skipped, {why}")
    heads = report.get("greedy_agreement", {})
    if heads:
        parts = [f"{k} {v}" for k, v in heads.items()]
        lines.append(
            "greedy agreement with hf_sequential (request 0, leading tokens): " + ", ".join(parts)
        )
    return lines


def render_text(report: dict[str, Any]) -> str:
    """The console report: table, summary, ratios and targets."""
    rows = table_rows(report)
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
        for i, h in enumerate(TABLE_HEADER)
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [line(TABLE_HEADER), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out += ["", *_summary_lines(report), "", "ratios (output tokens/s):"]
    out += ["  " + r for r in _ratio_lines(report)]
    out += ["", "targets:"] + ["  " + t for t in _target_lines(report)]
    return "\n".join(out)


def render_markdown(report: dict[str, Any]) -> str:
    """``engine.md``: command, machine, the table, ratios and targets."""
    machine = report["machine"]
    out = [
        "# Engine benchmark",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['created_at']}  ",
        f"Machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs, "
        f"{report.get('threads', '?')} torch threads, device {machine.get('device_name', '?')}, "
        f"torch {machine.get('torch_version', '?')}, transformers "
        f"{machine.get('transformers_version', '?')}"
        + (
            f"; vLLM {machine['vllm_version']} (torch {machine.get('vllm_torch_version', '?')})"
            if "vllm_version" in machine
            else ""
        )
        + "  ",
        f"Model: {report['config']['model']} ({report['config']['dtype']}); KV budget "
        f"{report['config']['kv_budget_bytes'] / GIB:.2f} GiB; load average at start/end "
        f"{machine['loadavg_start']} / {machine.get('loadavg_end')}",
        "",
        "Systems: " + "; ".join(f"`{k}` = {v}" for k, v in SYSTEM_LABELS.items()) + ".",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "|".join("---" for _ in TABLE_HEADER) + "|",
    ]
    out += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in table_rows(report)]
    out += ["", *(f"- {s}" for s in _summary_lines(report)), "", "## Ratios (output tokens/s)", ""]
    out += [f"- {r}" for r in _ratio_lines(report)]
    out += ["", "## Targets", ""] + [f"- {t}" for t in _target_lines(report, markdown=True)]
    return "\n".join(out) + "\n"


def write_plot(report: dict[str, Any], path: Path) -> None:
    """``engine.png``: output tokens/s and TTFT p99 against concurrency, one line per system."""
    import matplotlib  # noqa: PLC0415 - only needed for the picture

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (throughput, ttft) = plt.subplots(1, 2, figsize=(12, 4.5))
    concurrencies = sorted({r["concurrency"] for r in report["runs"]}) or [1]
    for system in SYSTEMS:
        runs = sorted(
            (r for r in report["runs"] if r["system"] == system and not r.get("error")),
            key=lambda r: r["concurrency"],
        )
        if not runs:
            continue
        cs = [r["concurrency"] for r in runs]
        throughput.plot(cs, [r["output_tokens_per_s"] for r in runs], marker="o", label=system)
        ttft.plot(cs, [max(r["ttft_p99_s"], 1e-4) for r in runs], marker="o", label=system)
    for axis, title, ylabel in (
        (throughput, "Output throughput", "output tokens/s"),
        (ttft, "Time to first token, p99", "TTFT p99 (s)"),
    ):
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
        axis.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
        axis.set_yscale("log")
        axis.set_xlabel("concurrency C (closed loop)")
        axis.set_ylabel(ylabel)
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    fig.suptitle(f"{report['config']['model']} on {report['machine'].get('device_name', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
