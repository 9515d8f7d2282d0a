from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkloadClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKLOAD_CLASS_UNSPECIFIED: _ClassVar[WorkloadClass]
    WORKLOAD_CLASS_REALTIME: _ClassVar[WorkloadClass]
    WORKLOAD_CLASS_BATCH: _ClassVar[WorkloadClass]
    WORKLOAD_CLASS_FINETUNE: _ClassVar[WorkloadClass]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_GENERATE: _ClassVar[ModelKind]
    MODEL_KIND_EMBED: _ClassVar[ModelKind]

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_SERVING: _ClassVar[NodeState]
    NODE_STATE_DRAINING: _ClassVar[NodeState]
WORKLOAD_CLASS_UNSPECIFIED: WorkloadClass
WORKLOAD_CLASS_REALTIME: WorkloadClass
WORKLOAD_CLASS_BATCH: WorkloadClass
WORKLOAD_CLASS_FINETUNE: WorkloadClass
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_CANCELLED: FinishReason
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_GENERATE: ModelKind
MODEL_KIND_EMBED: ModelKind
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_SERVING: NodeState
NODE_STATE_DRAINING: NodeState

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class GenerationOptions(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "kind", "max_context_tokens", "chat", "paces_prompts")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    PACES_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: ModelKind
    max_context_tokens: int
    chat: bool
    paces_prompts: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., max_context_tokens: _Optional[int] = ..., chat: _Optional[bool] = ..., paces_prompts: _Optional[bool] = ...) -> None: ...

class Capacity(_message.Message):
    __slots__ = ("max_sequences", "max_batched_tokens", "memory_budget_bytes")
    MAX_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_sequences: int
    max_batched_tokens: int
    memory_budget_bytes: int
    def __init__(self, max_sequences: _Optional[int] = ..., max_batched_tokens: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "address", "models", "pools", "capacity", "version", "state", "metrics_address", "device", "started_at_unix_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    pools: _containers.RepeatedScalarFieldContainer[str]
    capacity: Capacity
    version: str
    state: NodeState
    metrics_address: str
    device: str
    started_at_unix_ms: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., pools: _Optional[_Iterable[str]] = ..., capacity: _Optional[_Union[Capacity, _Mapping]] = ..., version: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., metrics_address: _Optional[str] = ..., device: _Optional[str] = ..., started_at_unix_ms: _Optional[int] = ...) -> None: ...

class SchedulerInfo(_message.Message):
    __slots__ = ("scheduler_id", "address", "version")
    SCHEDULER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    scheduler_id: str
    address: str
    version: str
    def __init__(self, scheduler_id: _Optional[str] = ..., address: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ClassCounts(_message.Message):
    __slots__ = ("workload_class", "running", "waiting")
    WORKLOAD_CLASS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    workload_class: WorkloadClass
    running: int
    waiting: int
    def __init__(self, workload_class: _Optional[_Union[WorkloadClass, str]] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("node_id", "classes", "kv_used_bytes", "kv_budget_bytes", "decode_tokens_per_s", "rss_bytes", "queued_tokens", "gpu_free_bytes", "gpu_total_bytes", "gpu_utilization_percent", "state", "timestamp_unix_ms", "reserved_sequences", "step_costs", "pinned_sequences", "realtime_prefill_ahead_tokens", "prefix_cache_hit_ratio")
    class RealtimePrefillAheadTokensEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class PrefixCacheHitRatioEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    KV_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GPU_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    STEP_COSTS_FIELD_NUMBER: _ClassVar[int]
    PINNED_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    REALTIME_PREFILL_AHEAD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_RATIO_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    classes: _containers.RepeatedCompositeFieldContainer[ClassCounts]
    kv_used_bytes: int
    kv_budget_bytes: int
    decode_tokens_per_s: float
    rss_bytes: int
    queued_tokens: int
    gpu_free_bytes: int
    gpu_total_bytes: int
    gpu_utilization_percent: float
    state: NodeState
    timestamp_unix_ms: int
    reserved_sequences: int
    step_costs: _containers.RepeatedCompositeFieldContainer[StepCost]
    pinned_sequences: int
    realtime_prefill_ahead_tokens: _containers.ScalarMap[str, int]
    prefix_cache_hit_ratio: _containers.ScalarMap[str, float]
    def __init__(self, node_id: _Optional[str] = ..., classes: _Optional[_Iterable[_Union[ClassCounts, _Mapping]]] = ..., kv_used_bytes: _Optional[int] = ..., kv_budget_bytes: _Optional[int] = ..., decode_tokens_per_s: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., queued_tokens: _Optional[int] = ..., gpu_free_bytes: _Optional[int] = ..., gpu_total_bytes: _Optional[int] = ..., gpu_utilization_percent: _Optional[float] = ..., state: _Optional[_Union[NodeState, str]] = ..., timestamp_unix_ms: _Optional[int] = ..., reserved_sequences: _Optional[int] = ..., step_costs: _Optional[_Iterable[_Union[StepCost, _Mapping]]] = ..., pinned_sequences: _Optional[int] = ..., realtime_prefill_ahead_tokens: _Optional[_Mapping[str, int]] = ..., prefix_cache_hit_ratio: _Optional[_Mapping[str, float]] = ...) -> None: ...

class StepCost(_message.Message):
    __slots__ = ("model", "base_s", "per_sequence_s", "per_prefill_token_s", "samples", "timed")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_S_FIELD_NUMBER: _ClassVar[int]
    PER_SEQUENCE_S_FIELD_NUMBER: _ClassVar[int]
    PER_PREFILL_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TIMED_FIELD_NUMBER: _ClassVar[int]
    model: str
    base_s: float
    per_sequence_s: float
    per_prefill_token_s: float
    samples: int
    timed: StepCost
    def __init__(self, model: _Optional[str] = ..., base_s: _Optional[float] = ..., per_sequence_s: _Optional[float] = ..., per_prefill_token_s: _Optional[float] = ..., samples: _Optional[int] = ..., timed: _Optional[_Union[StepCost, _Mapping]] = ...) -> None: ...
