"""What a running `sluice up` leaves in its run directory for clients to find: the endpoints of
every service, the TLS files clients use (unless started ``--insecure``) and, without a tenants
file, the development API key. Standard library only, so the CLI's client commands read it
without the ``server`` extra."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEV_KEY_FILE = "dev-api-key"
ENDPOINTS_FILE = "endpoints.json"


def read_endpoints(run_dir: Path) -> dict[str, Any]:
    """The endpoints a running `sluice up` wrote."""
    data: dict[str, Any] = json.loads((run_dir / ENDPOINTS_FILE).read_text())
    return data


def dev_api_key(run_dir: Path) -> str | None:
    """The development key a `sluice up` without tenants file created, if any."""
    path = run_dir / DEV_KEY_FILE
    return path.read_text().strip() if path.exists() else None


def suite_tls(run_dir: Path, addresses: Sequence[str]) -> dict[str, str] | None:
    """The ``tls`` block a running `sluice up` wrote (``{"ca", "cert", "key"}``: absolute paths
    of its CA and of a client certificate and key) when ``addresses`` are its scheduler or its
    etcd (all of them; none: the suite's own). None when that suite is plaintext (``"tls":
    null``, or a file from before TLS), when no suite runs there, or for another suite's
    addresses."""
    try:
        endpoints = read_endpoints(run_dir)
    except (OSError, ValueError):
        return None
    ours = {endpoints.get("scheduler", {}).get("grpc"), endpoints.get("etcd")}
    if not set(addresses) <= ours:
        return None
    tls = endpoints.get("tls")
    if not isinstance(tls, dict) or not isinstance(tls.get("ca"), str):
        return None
    wanted = ("ca", "cert", "key", "server_name")
    return {k: v for k, v in tls.items() if k in wanted and isinstance(v, str)}
