"""What a running `sluice up` leaves in its run directory for clients to find: the endpoints of
every service and, without a tenants file, the development API key. Standard library only, so
the CLI's client commands read it without the ``server`` extra."""

from __future__ import annotations

import json
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
