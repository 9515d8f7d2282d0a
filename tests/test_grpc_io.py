"""The services' choice of gRPC core's I/O engine (sluice.runtime.grpc_io)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sluice.runtime import grpc_io


def test_iomgr_is_the_default_and_turns_the_event_engine_experiments_off() -> None:
    env: dict[str, str] = {}
    assert grpc_io.configure(env) == "iomgr"
    assert env["GRPC_EXPERIMENTS"].split(",") == [
        f"-{name}" for name in grpc_io.EVENT_ENGINE_EXPERIMENTS
    ]


def test_eventengine_keeps_grpcs_default() -> None:
    env = {grpc_io.IO_ENGINE_ENV: "EventEngine"}
    assert grpc_io.configure(env) == "eventengine"
    assert "GRPC_EXPERIMENTS" not in env


def test_an_operators_experiment_list_wins() -> None:
    env = {"GRPC_EXPERIMENTS": "tcp_frame_size_tuning"}
    assert grpc_io.configure(env) == "operator"
    assert env["GRPC_EXPERIMENTS"] == "tcp_frame_size_tuning"


def test_an_unknown_engine_is_refused() -> None:
    with pytest.raises(ValueError, match="SLUICE_GRPC_IO"):
        grpc_io.configure({grpc_io.IO_ENGINE_ENV: "epoll"})


def test_a_service_picks_the_engine_before_anything_loads_grpc() -> None:
    """In a fresh interpreter, importing ``sluice.runtime.grpc_io`` (each service's first
    import) loads no grpc, so ``configure()`` still decides; the scheduling core does not load
    grpc either (importing ``sluice`` must not pull the SDK in eagerly)."""
    script = (
        "import sys\n"
        "from sluice.runtime import grpc_io\n"
        "import scheduler.queues, scheduler.admission\n"
        "print('grpc' in sys.modules, grpc_io.configure({}))\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "iomgr"]
