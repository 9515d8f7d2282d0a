"""Write Sluice's Grafana dashboards (JSON) and the PrometheusRule that wraps the alert rules.

Run from anywhere after changing a panel (board_*.py) or a rule::

    .venv/bin/python deploy/monitoring/dashboards/generate.py          # write the files
    .venv/bin/python deploy/monitoring/dashboards/generate.py --check  # exit 1 if stale

Outputs: ``deploy/monitoring/dashboards/*.json`` (Grafana dashboard models; kustomize ships
each as a ConfigMap labelled ``grafana_dashboard: "1"`` for Grafana's dashboard sidecar) and
``deploy/monitoring/prometheusrule.yaml`` (``rules/sluice.rules.yaml``'s groups in a
Prometheus operator ``PrometheusRule``). tests/test_dashboards.py fails when a committed file
differs from what this script makes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # imported from a test rather than run as a script
    sys.path.insert(0, str(HERE))

from board_jobs import jobs  # noqa: E402 - needs HERE on the path
from board_overview import overview  # noqa: E402
from board_serving import serving  # noqa: E402

MONITORING = HERE.parent
RULES = MONITORING / "rules" / "sluice.rules.yaml"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"
DASHBOARDS = {
    "sluice-overview.json": overview,
    "sluice-serving.json": serving,
    "sluice-jobs.json": jobs,
}
"""File name → the function building it (board_*.py; helpers in sluice_panels.py)."""


def _numbered(panels: list[dict[str, Any]]) -> None:
    """Stable panel ids, in layout order (Grafana would otherwise make its own)."""
    for i, panel in enumerate(panels, start=1):
        panel["id"] = i


def render_dashboard(name: str) -> str:
    """The JSON of dashboard file ``name``, as committed."""
    model = json.loads(json.dumps(DASHBOARDS[name]().build(), cls=JSONEncoder))
    _numbered(model["panels"])
    return json.dumps(model, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the PromQL expressions) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render_prometheus_rule(rules_text: str) -> str:
    """``rules_text`` (a Prometheus rules file) as a PrometheusRule custom resource."""
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "sluice",
            "labels": {
                "app.kubernetes.io/name": "sluice",
                "app.kubernetes.io/part-of": "sluice",
                "app.kubernetes.io/component": "monitoring",
            },
        },
        "spec": {"groups": yaml.safe_load(rules_text)["groups"]},
    }
    header = (
        "# Generated from rules/sluice.rules.yaml by dashboards/generate.py: do not edit.\n"
        "# Your Prometheus's ruleSelector must match these labels (kube-prometheus-stack:\n"
        "# set prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false, or add its\n"
        "# `release` label in an overlay).\n"
    )
    body = yaml.dump(resource, Dumper=_Dumper, sort_keys=False, width=200, allow_unicode=True)
    return header + body


def outputs() -> dict[Path, str]:
    """Every generated file and its content."""
    files = {HERE / name: render_dashboard(name) for name in DASHBOARDS}
    files[PROMETHEUS_RULE] = render_prometheus_rule(RULES.read_text())
    return files


def main(argv: list[str] | None = None) -> int:
    """Write the files, or with ``--check`` list the stale ones and return 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
        else:
            path.write_text(text)
    for path in stale:
        print(f"stale: {path} (run {Path(__file__).name})", file=sys.stderr)  # noqa: T201
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
