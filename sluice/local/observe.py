"""`sluice up --observe`: a real Prometheus scraping the local suite, with Sluice's rules loaded.

Prometheus is not a Python package: the ``prometheus`` binary must be on PATH (Debian:
``apt-get install prometheus``, which also brings ``promtool``). Without it the suite runs as
usual and :func:`start_observer` says how to get one. The scrape jobs are named as the alert
rules expect (``sluice-scheduler``, ``sluice-cache``, ``sluice-node``, each node also labelled
``node``); the rules are ``deploy/monitoring/rules/sluice.rules.yaml`` of the checkout.
Prometheus keeps its data in ``<run-dir>/prometheus`` and logs to ``<run-dir>/logs``; it is
stopped by PID, before the suite.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from sluice.local.stores import environment_without_proxies, free_port
from sluice.local.up import Endpoints

RULES_FILE = Path(__file__).resolve().parents[2] / "deploy/monitoring/rules/sluice.rules.yaml"
"""Sluice's recording and alerting rules, in a checkout (not shipped in the wheel)."""
INSTALL_HINT = "apt-get install prometheus (Debian/Ubuntu), or put a prometheus binary on PATH"


@dataclass(frozen=True)
class ObserveConfig:
    """How the suite's Prometheus runs."""

    scrape_interval_s: float = 5.0
    """How often every service's /metrics is scraped."""
    evaluation_interval_s: float = 5.0
    """How often the rules are evaluated."""
    rule_files: Sequence[Path] = field(default_factory=lambda: [RULES_FILE])
    """Rules to load; missing files are left out (and said)."""
    host: str = "127.0.0.1"
    port: int = 0
    """Web and API port; 0 picks a free one."""
    binary: str = "prometheus"
    """The executable, found on PATH unless a path."""
    ready_timeout_s: float = 30.0


def _duration(seconds: float) -> str:
    """A Prometheus duration (whole milliseconds)."""
    return f"{max(1, round(seconds * 1000))}ms"


def scrape_config(
    endpoints: Endpoints, config: ObserveConfig, rules: Sequence[Path]
) -> dict[str, Any]:
    """The Prometheus configuration for a suite at ``endpoints``."""
    interval = _duration(config.scrape_interval_s)
    nodes = [{"targets": [n["metrics"]], "labels": {"node": n["id"]}} for n in endpoints.nodes]
    return {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": _duration(min(config.scrape_interval_s, 10.0)),
            "evaluation_interval": _duration(config.evaluation_interval_s),
        },
        "rule_files": [str(p) for p in rules],
        "scrape_configs": [
            {
                "job_name": "sluice-scheduler",
                "static_configs": [{"targets": [endpoints.scheduler["metrics"]]}],
            },
            {
                "job_name": "sluice-cache",
                "static_configs": [{"targets": [endpoints.cache["metrics"]]}],
            },
            {"job_name": "sluice-node", "static_configs": nodes},
        ],
    }


@dataclass
class PrometheusProcess:
    """A Prometheus we started; :meth:`stop` ends it by PID."""

    proc: subprocess.Popen[bytes]
    url: str
    config_path: Path
    log: IO[bytes]

    @property
    def pid(self) -> int:
        """Its process id."""
        return self.proc.pid

    def ready(self) -> bool:
        """Whether it answers ``/-/ready``."""
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        """Return once it is ready; ``RuntimeError`` if it exits, ``TimeoutError`` after
        ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}; see its log")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready after {timeout_s:.0f}s")
            time.sleep(0.1)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def start_prometheus(
    endpoints: Endpoints, run_dir: Path, config: ObserveConfig | None = None
) -> PrometheusProcess:
    """Write the configuration into ``run_dir`` and start Prometheus on it; returns once it is
    ready. Raises ``FileNotFoundError`` when there is no ``prometheus`` binary."""
    config = config or ObserveConfig()
    binary = shutil.which(config.binary)
    if binary is None:
        raise FileNotFoundError(f"no {config.binary} binary: {INSTALL_HINT}")
    rules = [p.resolve() for p in config.rule_files if p.exists()]
    config_path = run_dir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(scrape_config(endpoints, config, rules), sort_keys=False))
    port = config.port or free_port(config.host)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    log = (run_dir / "logs" / "prometheus.log").open("ab")
    argv = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={run_dir / 'prometheus'}",
        f"--web.listen-address={config.host}:{port}",
        "--storage.tsdb.retention.time=2d",
    ]
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, env=environment_without_proxies()
    )
    prometheus = PrometheusProcess(proc, f"http://{config.host}:{port}", config_path, log)
    try:
        prometheus.wait_ready(config.ready_timeout_s)
    except BaseException:
        prometheus.stop()
        raise
    return prometheus


def start_observer(
    endpoints: Endpoints,
    run_dir: Path,
    say: Callable[[str], None],
    config: ObserveConfig | None = None,
) -> PrometheusProcess | None:
    """`sluice up --observe`: start Prometheus and say its URL, or say why not (no binary, it
    failed to start) and return None: the suite runs on either way."""
    config = config or ObserveConfig()
    missing = [p for p in config.rule_files if not p.exists()]
    for path in missing:
        say(f"rules file {path} not found: Prometheus runs without Sluice's alerts")
    try:
        prometheus = start_prometheus(endpoints, run_dir, config)
    except FileNotFoundError as exc:
        say(f"--observe: {exc}; the suite runs without it")
        return None
    except (RuntimeError, TimeoutError) as exc:
        say(f"--observe: Prometheus did not start ({exc}; log {run_dir / 'logs'}); going on")
        return None
    say(
        f"Prometheus (pid {prometheus.pid}) scrapes the suite at {prometheus.url} "
        f"(alerts: {prometheus.url}/alerts, config {prometheus.config_path})"
    )
    return prometheus
