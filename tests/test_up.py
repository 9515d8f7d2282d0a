"""`sluice up` as a user runs it: real child processes, the CLI against them, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SLUICE = [sys.executable, "-c", "from sluice.cli import main; main()"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(180)
def test_sluice_up_serves_the_cli_and_stops_everything_on_sigterm(tmp_path: Path) -> None:
    """`sluice up` writes endpoints.json, starts its node at a lower CPU priority than the
    scheduler, `sluice generate` and `sluice nodes` work against it, and SIGTERM stops every
    child and store."""
    run_dir = tmp_path / "run"
    up = subprocess.Popen(
        [*SLUICE, "up", "--run-dir", str(run_dir), "--models", "tiny-random-llama"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        endpoints_file = run_dir / "endpoints.json"
        deadline = time.monotonic() + 150
        while not endpoints_file.exists():
            assert up.poll() is None, up.stdout.read().decode() if up.stdout else ""
            assert time.monotonic() < deadline, "sluice up did not come up"
            time.sleep(0.2)
        endpoints = json.loads(endpoints_file.read_text())
        assert {"scheduler", "cache", "nodes", "etcd", "redis"} <= set(endpoints)
        assert (run_dir / "dev-api-key").read_text().startswith("sk-sluice-")
        assert "sha256:" in (run_dir / "tenants.yaml").read_text()

        common = ["--run-dir", str(run_dir)]
        gen = subprocess.run(
            [*SLUICE, "generate", "hello", "--model", "tiny-random-llama", "--no-chat",
             "--max-new-tokens", "5", *common],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert gen.returncode == 0, gen.stderr
        assert "node-1" in gen.stderr and "5 tokens" in gen.stderr
        nodes = subprocess.run(
            [*SLUICE, "nodes", *common], capture_output=True, text=True, timeout=60, check=False
        )
        assert nodes.returncode == 0, nodes.stderr
        assert "node-1" in nodes.stdout
        bad = subprocess.run(
            [*SLUICE, "generate", "hello", "--model", "nope", "--no-chat", *common],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert bad.returncode == 1
        assert "INVALID_ARGUMENT" in bad.stderr and "model" in bad.stderr

        pids = [int(p) for p in _child_pids(up.pid)]
        assert len(pids) >= 5  # etcd, redis, cache, node, scheduler
        # Model compute yields the CPU: every thread of the node (torch's, gRPC's) is niced.
        base = os.getpriority(os.PRIO_PROCESS, 0)  # what this test runs at, inherited
        by_module = {_module(p): p for p in pids}
        assert set(_thread_nices(by_module["inference_node"])) == {min(19, base + 10)}
        assert set(_thread_nices(by_module["scheduler"])) == {base}
        up.send_signal(signal.SIGTERM)
        out, _ = up.communicate(timeout=60)
        assert up.returncode == 0, out.decode()
        assert not [p for p in pids if _alive(p)]
        assert not endpoints_file.exists()
    finally:
        if up.poll() is None:  # a failed assertion: let the supervisor stop its children
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()


def _module(pid: int) -> str:
    """The ``-m`` module a Python child runs ('' for other programs)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    return argv[argv.index("-m") + 1] if "-m" in argv else ""


def _thread_nices(pid: int) -> list[int]:
    """The nice value of each thread of ``pid`` (Linux keeps one per thread)."""
    nices = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            nices.append(int(f.read().rsplit(")", 1)[1].split()[16]))
    return nices


def _child_pids(pid: int) -> list[str]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return f.read().split()
