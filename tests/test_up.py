"""`sluice up` as a user runs it: real child processes, the CLI against them, clean stop; and
the interpreter and flags it gives vLLM nodes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice import Client, TlsConfig
from sluice.local.up import Supervisor, UpConfig
from sluice.runtime.tls import Mesh, TlsFiles, node_identity
from sluice.v1 import common_pb2, node_pb2, node_pb2_grpc

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
    scheduler, `sluice generate` and `sluice nodes` work against it (over TLS, the default, with
    the CA endpoints.json names; a node refuses plaintext and a client certificate; no Redis
    password on any command line), and SIGTERM stops
    every child and store."""
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
        assert Path(endpoints["tls"]["ca"]).is_file()
        node = endpoints["nodes"][0]["grpc"]
        assert _node_call(grpc.insecure_channel(node)) == grpc.StatusCode.UNAVAILABLE
        tls = endpoints["tls"]
        client = Mesh(TlsFiles(Path(tls["ca"]), Path(tls["cert"]), Path(tls["key"])))
        wrong_role = client.sync_channel(node, node_identity("node-1"))
        assert _node_call(wrong_role) == grpc.StatusCode.PERMISSION_DENIED
        for pid in pids:
            assert "@" not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
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


@pytest.mark.timeout(240)
def test_sluice_up_restarts_a_killed_node_on_its_port_while_the_other_keeps_streaming(
    tmp_path: Path,
) -> None:
    """`kill -9` of one of two nodes: a stream on the other node completes normally; the killed
    node is restarted on the same port (endpoints.json stays right), serves, and the scheduler
    lists it healthy again; the crash and restart are on the console and in supervisor.log;
    SIGTERM then stops everything, the restarted node included."""
    run_dir = tmp_path / "run"
    console = tmp_path / "up.out"
    with console.open("wb") as out:
        up = subprocess.Popen(
            [*SLUICE, "up", "--run-dir", str(run_dir), "--nodes", "2",
             "--models", "tiny-random-llama"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
    try:
        _wait_for((run_dir / "endpoints.json").exists, 150, up, console)
        endpoints = json.loads((run_dir / "endpoints.json").read_text())
        node_ports = {n["id"]: n["grpc"] for n in endpoints["nodes"]}
        key = (run_dir / "dev-api-key").read_text().strip()
        tls = TlsConfig(ca=endpoints["tls"]["ca"])  # secure by default
        with Client(endpoints["scheduler"]["grpc"], api_key=key, tls=tls) as client:
            # ~1000 tokens stream for seconds (at most one chunk per 20 ms), well past the kill.
            stream = client.generate("tiny-random-llama", "hello", max_new_tokens=1000)
            first = next(stream)
            victim = next(n for n in node_ports if n != first.node_id)
            pids = {_node_id(p): p for p in _child_pids_int(up.pid) if _node_id(p)}
            os.kill(pids[victim], signal.SIGKILL)
            supervisor_log = run_dir / "logs" / "supervisor.log"
            last, read_after_crash_noticed = first, 0
            for chunk in stream:
                read_after_crash_noticed += supervisor_log.exists()
                last = chunk
            assert read_after_crash_noticed  # the stream outlived the crash handling
            assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert last.usage.completion_tokens == 1000
            assert last.node_id == first.node_id

            def victim_back() -> bool:
                nodes = {n.info.node_id: n for n in client.list_nodes()}
                return victim in nodes and nodes[victim].healthy

            _wait_for(victim_back, 90, up, console)
            listed = {n.info.node_id: n.info.address for n in client.list_nodes()}
            assert listed[victim] == node_ports[victim]
        assert _serving(node_ports[victim], endpoints["tls"], victim)
        restarted = {_node_id(p): p for p in _child_pids_int(up.pid) if _node_id(p)}
        assert restarted[victim] != pids[victim]
        assert restarted[first.node_id] == pids[first.node_id]
        assert json.loads((run_dir / "endpoints.json").read_text()) == endpoints
        events = [json.loads(line) for line in (run_dir / "logs" / "supervisor.log").open()]
        assert [(e["event"], e["child"]) for e in events][:2] == [
            ("child_exited", victim),
            ("child_restarted", victim),
        ]
        assert events[0]["signal"] == "SIGKILL" and events[0]["next_delay_s"] == 0.5
        said = console.read_text()
        assert f"{victim} (pid {pids[victim]}) was killed by SIGKILL" in said
        assert f"restarted {victim} (pid {restarted[victim]}, restart 1)" in said
        all_pids = _child_pids_int(up.pid)
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0, console.read_text()
        assert not [p for p in all_pids if _alive(p)]
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()


def _wait_for(
    predicate: Callable[[], bool], timeout_s: float, up: subprocess.Popen[bytes], console: Path
) -> None:
    """Poll ``predicate`` while `sluice up` runs; fail with its console after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert up.poll() is None, console.read_text()
        assert time.monotonic() < deadline, console.read_text()
        time.sleep(0.2)


def _node_call(channel: grpc.Channel) -> grpc.StatusCode:
    """The status of a Node/Embed call on ``channel`` (closed after)."""
    with channel:
        try:
            node_pb2_grpc.NodeStub(channel).Embed(node_pb2.NodeEmbedRequest(), timeout=5)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _serving(address: str, tls: dict[str, str], node_id: str) -> bool:
    """Whether the node answers SERVING, asked over mutual TLS with the suite's client
    certificate (health is open to any certificate of the suite)."""
    files = TlsFiles(Path(tls["ca"]), Path(tls["cert"]), Path(tls["key"]))
    with Mesh(files).sync_channel(address, node_identity(node_id)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _node_id(pid: int) -> str:
    """The ``--node-id`` of an inference node process ('' for other processes)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    return argv[argv.index("--node-id") + 1] if "--node-id" in argv else ""


def _child_pids_int(pid: int) -> list[int]:
    return [int(p) for p in _child_pids(pid)]


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


def test_sluice_up_gives_vllm_nodes_their_interpreter_pool_and_prefix_caching(
    tmp_path: Path,
) -> None:
    """`sluice up --engine vllm` runs nodes on ``.venv-vllm``'s interpreter, in the realtime
    pool only (vLLM runs no fine-tunes), with prefix caching as asked (on by default)."""
    python = tmp_path / "python"
    python.touch()
    for caching, flag in ((True, "true"), (False, "false")):
        config = UpConfig(
            run_dir=tmp_path, engine="vllm", vllm_python=python, vllm_prefix_caching=caching
        )
        args = ["--pools", "realtime,finetune"]
        assert Supervisor(config)._node_python(args) == str(python.absolute())
        assert args[1] == "realtime" and args[args.index("--engine") + 1] == "vllm"
        assert args[args.index("--vllm-prefix-caching") + 1] == flag
        assert args[args.index("--vllm-pace") + 1] == "true"  # on by default
    config = UpConfig(run_dir=tmp_path, engine="vllm", vllm_python=python, vllm_pace=False)
    args = ["--pools", "realtime"]
    Supervisor(config)._node_python(args)
    assert args[args.index("--vllm-pace") + 1] == "false"  # `sluice up --no-pace`
    with pytest.raises(RuntimeError, match="make setup-vllm"):
        Supervisor(UpConfig(engine="vllm", vllm_python=tmp_path / "none"))._node_python([])
