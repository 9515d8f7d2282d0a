"""Packages by audience: the SDK and the CLI's client commands need no extra, and the code keeps
the size limits that keep it readable."""

from __future__ import annotations

import ast
import asyncio
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.harness import API_KEY, Suite

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("sluice", "scheduler", "inference_node", "cache_service")
SERVER_AND_MODEL_STACK = (
    "torch",
    "transformers",
    "gguf",
    "accelerate",
    "redis",
    "structlog",
    "prometheus_client",
    "pydantic_settings",
    "yaml",
    "uvloop",
    "psutil",
    "scheduler",
    "inference_node",
    "cache_service",
    "bench",
)

# Run in a fresh interpreter where every module of the server and model stack fails to import,
# as in a virtual environment with `pip install sluice` and no extras.
CLIENT_SCRIPT = """
import asyncio, importlib.abc, sys

BLOCKED = set(sys.argv[3].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed without extras")
        return None

sys.meta_path.insert(0, Block())
from sluice import AsyncClient, Client, WorkloadClass
import sluice.cli

address, key = sys.argv[1], sys.argv[2]
with Client(address, api_key=key) as client:
    text = client.generate_text("tiny-random-llama", "hello", max_new_tokens=4)
    nodes = client.list_nodes()

async def main():
    async with AsyncClient(address, api_key=key) as client:
        chunks = [c async for c in client.generate(
            "tiny-random-llama", "hi", max_new_tokens=3, workload_class=WorkloadClass.BATCH
        )]
        return len(chunks)

n = asyncio.run(main())
from typer.testing import CliRunner
up = CliRunner().invoke(sluice.cli.app, ["up"])
top = CliRunner().invoke(sluice.cli.app, [
    "top", "--once", "--interval", "0.1", "--endpoint", address, "--api-key", key,
    "--metrics", "127.0.0.1:9",
])
print(
    "ok", len(text) > 0, len(nodes), n > 0, up.exit_code, "sluice[node]" in up.output,
    top.exit_code, "sluice[server]" in top.output,
)
"""


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_installing_without_extras_brings_no_model_or_server_stack() -> None:
    """The base dependencies are the SDK's and the CLI's; torch, transformers and the stores'
    clients come only with the ``node`` and ``server`` extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = _requirement_names(project["dependencies"])
    assert base.isdisjoint({"torch", "transformers", "gguf", "accelerate", "redis", "structlog"})
    assert {"grpcio", "protobuf", "grpcio-status"} <= base
    extras = project["optional-dependencies"]
    assert "torch" in _requirement_names(extras["node"])
    assert "redis" in _requirement_names(extras["server"])


async def test_sdk_and_cli_work_against_a_running_suite_without_the_extras(
    running: Suite,
) -> None:
    """``from sluice import Client, AsyncClient`` and calls to a running suite work in an
    interpreter that cannot import any server or model package; ``sluice up`` there says
    which extra it needs, and ``sluice top`` shows its frame without rates."""
    assert running.scheduler is not None
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT_SCRIPT,
        running.scheduler.address,
        API_KEY,
        ",".join(SERVER_AND_MODEL_STACK),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().split() == ["ok", "True", "1", "True", "2", "True", "0", "True"]


def _modules() -> list[Path]:
    return [
        path
        for package in PRODUCT
        for path in sorted((ROOT / package).rglob("*.py"))
        if "v1" not in path.relative_to(ROOT).parts
    ]


def test_no_product_module_is_over_500_lines() -> None:
    """Product modules (not tests, benchmarks or generated code) stay under 500 lines."""
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert long == {}


def test_no_function_outside_tests_and_benchmarks_is_over_80_lines() -> None:
    """Functions of product code stay under 80 lines."""
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > 80:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    assert long == {}
