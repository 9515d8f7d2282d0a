"""Inference node settings."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from sluice.runtime.settings import ServiceSettings


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "sluice" / "models"


def _default_adapters_dir() -> Path:
    return Path.home() / ".cache" / "sluice" / "adapters"


def _default_checkpoint_dir() -> Path:
    return Path.home() / ".cache" / "sluice" / "checkpoints"


class NodeSettings(ServiceSettings):
    """Settings of an inference node (``SLUICE_*`` env, YAML file or flags)."""

    node_id: str = ""
    """Id in the registry; empty picks ``node-<random>``."""
    models: list[str] = Field(default_factory=lambda: ["smollm2-135m-instruct", "all-minilm-l6-v2"])
    """Models to load: generators (smollm2-135m-instruct, tiny-random-llama) and embedders
    (all-minilm-l6-v2)."""
    model_path: Path | None = None
    """A Hugging Face causal-LM directory, served under the first generator name in ``models``."""
    model_cache_dir: Path = Field(default_factory=_default_cache_dir)
    """Where converted weights (GGUF → safetensors) are kept for fast later starts."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Device the models run on."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Weights and activations dtype, of generators and embedders; ``auto``: bfloat16 where
    the hardware computes in it (AVX-512 BF16 or AMX CPUs, CUDA), else float32
    (inference_node/loading.py: ``dtype_name``)."""
    engine: Literal["builtin", "vllm"] = "builtin"
    """Generation engine: the built-in continuous batching engine, or vLLM's ``AsyncLLM`` in
    this process (needs ``.venv-vllm``, ``make setup-vllm``; no fine-tuning, no adapters;
    inference_node/engine/vllm_engine.py)."""
    vllm_prefix_caching: bool = True
    """With ``engine vllm``: vLLM's prefix caching (its own default), and with it, before a
    REALTIME prompt goes to vLLM, the lower-class prefills it has begun (longer than a step) go
    back to its queue and resume after their cached blocks (docs/decisions/
    node-vllm-prefill-pausing.md). Off: neither."""
    vllm_pace: bool = True
    """With ``engine vllm``: each step carries only as many prompt tokens as keep every
    decoding stream at its pace (its step budget a token, on average from its first token:
    inference_node/engine/pace.py); off: vLLM fills every step to ``max_batched_tokens``."""
    pools: list[str] = Field(default_factory=lambda: ["realtime"])
    """Pools this node serves: realtime, finetune, or both. Only a node of the finetune pool
    accepts Train (fine-tunes run on its engine thread, in the gaps inference leaves)."""
    max_sequences: int = 32
    """Most sequences the engine runs at once (published as capacity)."""
    max_batched_tokens: int = 512
    """Most tokens per engine step (decode plus prefill chunks; published as capacity)."""
    memory_budget_bytes: int = 2 * 1024**3
    """Bytes the KV cache may use."""
    adapters_dir: Path = Field(default_factory=_default_adapters_dir)
    """The fleet's LoRA adapter store, shared by every node and trainer:
    ``<tenant>/<base_model>/<adapter_name>/`` with peft's ``adapter_config.json`` and
    ``adapter_model.safetensors`` (inference_node/adapters.py)."""
    adapter_cache_bytes: int = Field(default=256 * 1024**2, ge=0)
    """Bytes of LoRA adapters each generation model may hold loaded (an LRU), on top of
    ``memory_budget_bytes``; 0 serves no adapters."""
    checkpoint_dir: Path = Field(default_factory=_default_checkpoint_dir)
    """The fleet's fine-tune checkpoint store, ``<job_id>/<step>/`` (safetensors and JSON,
    inference_node/training/checkpoint.py): every node of the finetune pool mounts the same
    shared directory (a file system with POSIX rename), so a job moved to another node
    resumes from its last checkpoint there."""
    checkpoints_kept: int = Field(default=3, ge=1)
    """Newest checkpoints kept per fine-tune job."""
    training_yield_bound_ms: float = Field(default=50.0, gt=0)
    """Longest a fine-tune's unit of work may be predicted to take: the most an inference
    request waits for training (docs/decisions/node-training-units.md)."""
    training_itl_budget_ms: float = Field(default=0.0, ge=0)
    """Inter-token target of running requests: a fine-tune's units may stretch their gaps
    (decode step plus training) up to it; 0 (default): none, the gap policy's share and the
    model's own step-time tail bound training instead (inference_node/training/gaps.py)."""
    training_itl_share: float = Field(default=0.15, ge=0, le=1)
    """Training beside running requests adds at most this share of their decode time to their
    inter-token gaps, on average."""
    training_concurrency: Literal["auto", "gaps", "thread"] = "auto"
    """Where fine-tunes run: ``gaps``, unit by unit in the engine thread's gaps (the three
    settings above); ``thread``, on a thread and CUDA stream of their own beside decode, busy
    at most ``training_duty`` of the time while inference runs
    (docs/decisions/node-training-own-stream.md); ``auto``: ``thread`` on CUDA, ``gaps`` on
    the CPU (where two threads would only split the cores)."""
    training_duty: float = Field(default=0.5, gt=0, le=1)
    """With ``thread``: the most of its time training is busy while inference runs."""
    detached_retain_seconds: float = Field(default=120.0, gt=0)
    """How long a detached generation (a job line, ``NodeGenerateRequest.detached``) is kept
    after it ends for a replica that takes the line over: longer than the schedulers'
    ``job_reclaim_idle_seconds``."""
    max_waiting: int = 256
    """Requests queued in the engine beyond which new ones are refused (RESOURCE_EXHAUSTED)."""
    embed_max_batch: int = Field(default=64, ge=1)
    """Most texts one embedding forward takes: concurrent Embed calls (any tenants) are merged
    up to a size the node picks from its measured latency curve (inference_node/
    embed_batcher.py); 1 runs each call alone."""
    embed_max_wait_ms: float = Field(default=5.0, ge=0)
    """Longest an embedding thread, once free, waits for more calls to fill a batch (only
    while calls come concurrently: a lone caller never waits)."""
    embed_batch_latency_ms: float = Field(default=500.0, gt=0)
    """Latency bound of one embedding forward: the batch grows only while it stays within."""
    embed_lower_class_forward_ms: float = Field(default=150.0, ge=0)
    """Lower-class (BATCH, FINETUNE) texts fill an embedding forward only as far as they take
    about this long at the pace the node measures, so a REALTIME Embed arriving behind them
    waits about this long, not the latency bound (0: no such cap; inference_node/
    embed_batcher.py)."""
    embed_workers: int = Field(default=0, ge=0)
    """Embedding forwards run at once, each on an equal share of torch's CPU threads; 0: two
    on a CPU node that serves only embedders where torch has two threads or more, else one
    (a generator's engine steps share the cores: docs/decisions/node-embed-workers.md)."""
    advertise_host: str = ""
    """Host published in the registry; empty means ``host``."""
    advertise_port: int = 0
    """Port published in the registry (a proxy in front of the node); 0 means the bound port."""
    load_report_interval_ms: int = 200
    """Default interval of load reports."""
    stream_interval_ms: float = Field(default=20.0, ge=0)
    """Least time between two chunks of one stream after the first (0: a chunk per token).
    Tokens made meanwhile go out together in the next chunk (vLLM's ``stream_interval``, in
    time rather than tokens): a fast model streams at most 50 chunks/s per request, which is
    what every gRPC hop on the way, the scheduler above all, pays for per message. The first
    token is never held back; a stream's last chunk is at most this late."""
    cpu_nice: int = Field(default=0, ge=0, le=19)
    """Nice increment the node applies to every one of its threads at start (``sluice up``,
    which runs everything on one machine, passes 10): model compute, and with it the node's
    own gRPC threads, then yields the CPU to the scheduler, the stores and clients on the same
    machine. 0 for a node with a machine or pod to itself."""
    keep_engine_cores: bool = True
    """Once its engine is up, move the node's own threads and its engine's unbound ones (vLLM's
    engine-core process) off the cores the engine bound its compute threads to (vLLM's CPU
    worker binds all but one core; sluice/runtime/affinity.py). Linux only; nothing moves when
    no thread is bound (the built-in engine, CUDA)."""
    drain_grace_seconds: float = 30.0
    """How long a drain waits for in-flight requests before cancelling them."""
