"""The figures table the jobs and fine-tune benchmarks write (``jobs.md``, ``finetune.md``) and
what stands around it: one row per figure with the baseline it is compared to (measured in the
same run), the ratio, the target and whether it is met; a warning for an experiment disturbed by
other processes; each experiment's section. Pure functions of the experiments' entries; each
benchmark makes one :class:`Report` of its titles, row makers and details."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Row = dict[str, Any]
"""``experiment, figure, measured, baseline, ratio, target, pass`` (pass: True, False or None
for a figure only reported)."""

DISTURBED_SHARE = 0.1
"""Other processes taking more of the machine than this during an experiment make its figures
unrepresentative: the nodes run at nice 10 and yield to them."""


def ms(seconds: float | None) -> str:
    """Seconds as milliseconds (``–`` for none)."""
    return "–" if seconds is None else f"{seconds * 1000:.1f} ms"


def pct(value: float | None) -> str:
    """A fraction as a percentage (``–`` for none)."""
    return "–" if value is None else f"{value * 100:.1f} %"


def times(value: float | None) -> str:
    """A ratio as a multiple, ``1.20×`` (``–`` for none)."""
    return "–" if value is None else f"{value:.2f}×"


def served(phase: dict[str, Any]) -> str:
    """How many of a phase's planned requests were not refused."""
    outcomes = phase.get("outcomes", {})
    return f"{outcomes.get('planned', 0) - outcomes.get('refused', 0)} served"


def row(
    experiment: str,
    figure: str,
    measured: str,
    baseline: str = "–",
    ratio: str = "–",
    target: str = "report",
    passed: bool | None = None,
) -> Row:
    """One figure's row (a figure without a target is only reported)."""
    return {
        "experiment": experiment,
        "figure": figure,
        "measured": measured,
        "baseline": baseline,
        "ratio": ratio,
        "target": target,
        "pass": passed,
    }


def _verdict(value: bool | None) -> str:
    return "–" if value is None else ("pass" if value else "**FAIL**")


def cpu_line(cpu: dict[str, Any]) -> str:
    """Who used the CPUs during an experiment, in words."""
    return (
        f"- CPU: {cpu['available_s']} core-seconds available; the suite and the bench used "
        f"{cpu['suite_and_bench_s']}, other processes on the machine "
        f"{cpu['other_processes_s']} ({pct(cpu['other_processes_share'])} of the machine)"
    )


Entry = dict[str, Any]


@dataclass(frozen=True)
class Report:
    """One benchmark's report, by experiment name: the titles, what makes the rows and what
    writes the details."""

    titles: Mapping[str, str]
    makers: Mapping[str, Callable[[Entry], list[Row]]]
    details: Mapping[str, Callable[[Entry], list[str]]]
    where: Callable[[Entry], str]
    """An experiment's line after its details: its run directory, its wall time."""

    def rows(self, experiments: dict[str, Entry]) -> list[Row]:
        """Every row, in the experiments' order; an experiment that failed gives one ``error``
        row."""
        out: list[Row] = []
        for name, entry in experiments.items():
            if "error" in entry:
                out.append(row(name, self.titles[name], f"error: {entry['error']}", passed=False))
            else:
                out += self.makers[name](entry)
        return out

    def table(self, figures: list[Row]) -> list[str]:
        """The markdown table of ``figures``."""
        lines = [
            "| experiment | figure | measured | baseline (same run) | ratio | target | pass |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in figures:
            cells = [self.titles.get(r["experiment"], r["experiment"]), r["figure"], r["measured"]]
            cells += [r["baseline"], r["ratio"], r["target"], _verdict(r["pass"])]
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
        return lines

    def disturbed(self, experiments: dict[str, Entry]) -> list[str]:
        """A warning line per experiment during which other processes took more than 10 % of
        the machine's CPU time (and a blank line after), or nothing."""
        lines = []
        for name, entry in experiments.items():
            share = (entry.get("cpu") or {}).get("other_processes_share")
            if share is not None and share > DISTURBED_SHARE:
                lines.append(
                    f"**Disturbed:** other processes on the machine took {share * 100:.0f} % of "
                    f"its CPU time during *{self.titles[name]}*; its figures are not "
                    "representative."
                )
        return [*lines, ""] if lines else []

    def body(self, doc: dict[str, Any]) -> list[str]:
        """What follows the markdown's introduction: the table, the disturbed warnings and a
        section per experiment (its details or why it was not measured, :attr:`where`, who
        used the CPUs, its timeline)."""
        lines = [
            *self.table(doc["figures"]),
            "",
            *self.disturbed(doc["experiments"]),
            "## Per experiment",
            "",
        ]
        for name, entry in doc["experiments"].items():
            lines += [f"### {self.titles[name]}", ""]
            if "error" in entry:
                lines += [f"Not measured: {entry['error']}", ""]
            else:
                lines += self.details[name](entry)
            lines.append(self.where(entry))
            if entry.get("cpu"):
                lines.append(cpu_line(entry["cpu"]))
            timeline = "; ".join(f"{t['t_s']:g} s {t['event']}" for t in entry.get("timeline", []))
            lines += [f"- timeline: {timeline}", ""]
        return lines
