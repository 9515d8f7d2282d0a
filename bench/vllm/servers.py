"""The two servers ``make bench-vllm`` compares, set up alike from one ``sluice up`` config.

* :class:`SluiceVllmSuite`: the suite as ``sluice up --engine vllm`` starts it (one node, the
  scenario's tenants), as :class:`bench.overload.servers.SluiceSuite` starts the built-in one.
* :class:`BareVllm`: vLLM's own OpenAI-compatible server (``vllm serve``) on the interpreter of
  ``.venv-vllm``, with what the node gives vLLM's engine (``VllmEngine._build`` in
  ``inference_node/engine/vllm_engine.py``): the same Hugging Face directory (the node's
  converted copy of the GGUF, :func:`checkpoint`), dtype, context length, batch (sequences and
  tokens per step) and KV cache bytes, prefix caching as the node has it (on by default, as in
  vLLM; each load run sends prompts of its own, so neither side is served from an earlier
  run's), its stats logging off. What stays vLLM's own: first-come-first-served scheduling
  (the node asks for ``priority`` to map Sluice's classes, which a bare server's clients
  cannot send) and one token per streamed chunk.

Both model processes run niced alike (``MODEL_CPU_NICE``) in the environment ``sluice up`` gives
its nodes. Every process is stopped by its PID: the bare server by SIGTERM, then SIGKILL to the
process group it leads (vLLM's engine core included), the suite by its supervisor.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bench.load.scenario import Scenario
from bench.overload.servers import MODEL_CPU_NICE, SluiceSuite
from bench.paths import REPO_ROOT
from inference_node.config import NodeSettings
from sluice.local.stores import environment_without_proxies, free_port
from sluice.local.up import UpConfig

VLLM_SERVER = "vllm"
"""The bare server's name: its runs are keyed by it, and it picks the OpenAI target."""
SERVE_MODULE = "vllm.entrypoints.cli.main"
"""``vllm serve``, run as a module of the given interpreter."""
NODE_ENV = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
"""What ``sluice up`` adds to a node's environment (its log format aside)."""
STOP_GRACE_S = 30.0


def node_settings(config: UpConfig) -> NodeSettings:
    """The settings a node of ``config`` runs with: its defaults (``sluice up`` passes no
    ``SLUICE_*`` variable down) plus the flags ``sluice up`` gives it."""
    from inference_node.loading import dtype_name  # noqa: PLC0415 (torch)

    defaults = NodeSettings.model_construct()
    return defaults.model_copy(
        update={
            # Resolved as the node resolves it: bare vLLM is given the same dtype.
            "dtype": dtype_name(config.device, config.dtype),
            "device": config.device,
            "max_sequences": defaults.max_sequences
            if config.max_sequences is None
            else config.max_sequences,
            "vllm_prefix_caching": config.vllm_prefix_caching,
            "vllm_pace": config.vllm_pace,
        }
    )


def checkpoint(settings: NodeSettings, model: str) -> tuple[Path, int]:
    """The Hugging Face directory the node gives vLLM for ``model`` and the model's context
    length, through the node's own functions: the model is loaded as the node loads it, which
    converts SmolLM2's GGUF into ``settings.model_cache_dir`` the first time (seconds; this
    process then holds the weights until it drops them here)."""
    from inference_node.engine.vllm_mapping import checkpoint_dir  # noqa: PLC0415 (torch)
    from inference_node.models import load_language_model  # noqa: PLC0415 (torch)

    lm = load_language_model(
        model, device=settings.device, dtype=settings.dtype, cache_dir=settings.model_cache_dir
    )
    context = lm.max_context_tokens
    del lm
    return checkpoint_dir(model, settings.model_path, settings.model_cache_dir), context


@dataclass(frozen=True)
class VllmServe:
    """vLLM's server set up as the node sets up its engine (module doc)."""

    model_dir: Path
    served_model_name: str
    dtype: str
    max_model_len: int
    """The model's context (``LanguageModel.max_context_tokens``, the node's ``max_model_len``)."""
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_memory_bytes: int
    """The node's ``memory_budget_bytes``, which it passes as ``kv_cache_memory_bytes``."""
    prefix_caching: bool = True
    """The node's ``vllm_prefix_caching`` (vLLM's own default is on)."""

    @classmethod
    def like_node(
        cls, settings: NodeSettings, model: str, model_dir: Path, max_model_len: int
    ) -> VllmServe:
        """The server for ``model`` with the engine settings of a node of ``settings``."""
        return cls(
            model_dir=model_dir,
            served_model_name=model,
            dtype=settings.dtype,
            max_model_len=max_model_len,
            max_num_seqs=settings.max_sequences,
            max_num_batched_tokens=settings.max_batched_tokens,
            kv_cache_memory_bytes=settings.memory_budget_bytes,
            prefix_caching=settings.vllm_prefix_caching,
        )

    def argv(self, python: Path, host: str, port: int) -> list[str]:
        """``vllm serve`` on ``python`` at ``host:port``."""
        return [
            str(python), "-m", SERVE_MODULE, "serve", str(self.model_dir),
            "--host", host, "--port", str(port),
            "--served-model-name", self.served_model_name,
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            "--max-num-batched-tokens", str(self.max_num_batched_tokens),
            "--kv-cache-memory-bytes", str(self.kv_cache_memory_bytes),
            "--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching",
            "--disable-log-stats",
            # One log line per request would cost the 2 cores what the node never pays.
            "--disable-uvicorn-access-log",
        ]  # fmt: skip


def http_status(host: str, port: int, path: str, timeout_s: float = 2.0) -> int | None:
    """The status of ``GET path``; None when the server does not answer."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


class BareVllm:
    """``vllm serve`` as a child process on a free loopback port (a ``Server``)."""

    name = VLLM_SERVER

    def __init__(
        self,
        serve: VllmServe,
        python: Path,
        run_dir: Path,
        nice: int = MODEL_CPU_NICE,
        startup_timeout_s: float = 900.0,
    ) -> None:
        self.serve = serve
        self.python = python
        self.run_dir = run_dir
        self.nice = nice
        self.startup_timeout_s = startup_timeout_s
        self.host = "127.0.0.1"
        self.address = ""
        self.argv: list[str] = []
        self.log_path = run_dir / "vllm.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        """Start the server in a session of its own; return once ``/health`` answers 200."""
        port = free_port(self.host)
        self.address = f"{self.host}:{port}"
        self.argv = ["nice", "-n", str(self.nice), *self.serve.argv(self.python, self.host, port)]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        env = {**environment_without_proxies(), **NODE_ENV}
        self._proc = subprocess.Popen(
            self.argv,
            cwd=REPO_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its process group: the engine core is stopped with it
        )
        self._wait_healthy(port)

    def _wait_healthy(self, port: int) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while http_status(self.host, port, "/health") != 200:
            if self._proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"vLLM exited with {self._proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM not healthy after {self.startup_timeout_s:.0f} s")
            time.sleep(1.0)

    def stop(self) -> None:
        """SIGTERM to the server, SIGKILL to its process group after ``STOP_GRACE_S`` or once
        it has exited (whatever of it is left); by its PID only."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    _kill_group(proc.pid)
                    proc.wait()
            _kill_group(proc.pid)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


def _kill_group(pgid: int) -> None:
    """SIGKILL to the process group ``pgid`` (the session our child leads), if any is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class SluiceVllmSuite(SluiceSuite):
    """:class:`~bench.overload.servers.SluiceSuite` with its one node on vLLM's engine."""

    def __init__(
        self, scenario: Scenario, keys: dict[str, str], run_dir: Path, vllm_python: Path
    ) -> None:
        super().__init__(scenario, keys, run_dir, engine="vllm", vllm_python=vllm_python)
