"""Panel helpers over grafana-foundation-sdk, shared by Sluice's dashboards (board_*.py).

Every panel reads the Prometheus data source chosen in the dashboard's ``datasource`` variable;
queries use Grafana's ``$__rate_interval`` and ``$__range`` and nothing else of Grafana's.
"""

from __future__ import annotations

from typing import Any

from grafana_foundation_sdk.builders import common, dashboard, prometheus, statetimeline, timeseries
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.common import StackingMode
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

DS = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
RI = "$__rate_interval"
PUBLIC = 'method=~"/sluice\\\\.v1\\\\.(Inference|Jobs)/.+"'
"""Matcher of the public calls (the scheduler's Inference and Jobs services)."""
FAULTS = 'code=~"INTERNAL|UNKNOWN|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS"'
"""Matcher of server faults, as the availability SLO counts them (see the rules file)."""
TTFT = "sluice_scheduler_time_to_first_token_seconds"
ITL = "sluice_scheduler_inter_token_seconds"
"""Time per output token of each streamed chunk after a stream's first (job lines left out)."""

Panel = Any
"""A panel builder of the SDK (each visualisation has its own class)."""
Targets = list[tuple[str, str]]
"""(PromQL expression, legend) pairs; the first is query A, then B, C..."""


def query(expr: str, legend: str = "", *, ref: str = "A", fmt: str = "") -> Any:
    """A Prometheus target; ``fmt`` "heatmap" (buckets by ``le``) or "instant"."""
    q = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DS)
    if legend:
        q = q.legend_format(legend)
    if fmt == "heatmap":
        q = q.format(PromQueryFormat.HEATMAP)
    if fmt == "instant":
        q = q.instant()
    return q


def with_targets(panel: Panel, targets: Targets, fmt: str = "") -> Panel:
    """``panel`` with ``targets`` as queries A, B, C..."""
    for i, (expr, legend) in enumerate(targets):
        panel = panel.with_target(query(expr, legend, ref=chr(ord("A") + i), fmt=fmt))
    return panel


def sized(panel: Panel, title: str, description: str, width: int, height: int = 8) -> Panel:
    """Title, description, data source and size of any panel."""
    return panel.title(title).description(description).datasource(DS).span(width).height(height)


def graph(
    title: str,
    unit: str,
    targets: Targets,
    *,
    description: str = "",
    width: int = 12,
    stacked: bool = False,
) -> Panel:
    """A time series panel."""
    panel = sized(timeseries.Panel(), title, description, width).unit(unit).fill_opacity(10)
    if stacked:
        panel = panel.stacking(common.StackingConfig().mode(StackingMode.NORMAL)).fill_opacity(60)
    return with_targets(panel, targets)


def right_axis(panel: Panel, ref: str, unit: str) -> Panel:
    """Put query ``ref`` on a right-hand axis in ``unit`` (volume against resources)."""
    return axis(panel, ref, unit, "right")


def axis(panel: Panel, ref: str, unit: str, placement: str) -> Panel:
    """Put query ``ref`` on an axis of its own in ``unit``, ``placement`` "left" or "right"
    (Grafana draws one axis per unit)."""
    return panel.override_by_query(
        ref,
        [
            model.DynamicConfigValue(id_val="custom.axisPlacement", value=placement),
            model.DynamicConfigValue(id_val="unit", value=unit),
        ],
    )


def thresholds(*steps: tuple[float | None, str]) -> Any:
    """Absolute thresholds: (value, colour) pairs, the first value None (the base)."""
    return (
        dashboard.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([model.Threshold(value=v, color=c) for v, c in steps])
    )


def states(
    title: str, description: str, expr: str, legend: str, names: dict[str, tuple[str, str]]
) -> Panel:
    """A state timeline; ``names`` maps each value to (text, colour)."""
    mapping = model.ValueMap(
        options={
            value: model.ValueMappingResult(text=text, color=color, index=i)
            for i, (value, (text, color)) in enumerate(names.items())
        }
    )
    panel = sized(statetimeline.Panel(), title, description, 12).mappings([mapping])
    return panel.with_target(query(expr, legend))


def row(board: Any, title: str, panels: list[Panel]) -> Any:
    """A row header followed by its panels, laid out left to right."""
    board = board.with_row(dashboard.Row(title))
    for panel in panels:
        board = board.with_panel(panel)
    return board


def new_board(uid: str, title: str, description: str) -> Any:
    """A dashboard with the data source variable and Sluice's defaults."""
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["sluice"])
        .editable()
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .with_variable(
            dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
    )
