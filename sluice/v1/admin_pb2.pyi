from sluice.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CircuitState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CIRCUIT_STATE_UNSPECIFIED: _ClassVar[CircuitState]
    CIRCUIT_STATE_CLOSED: _ClassVar[CircuitState]
    CIRCUIT_STATE_OPEN: _ClassVar[CircuitState]
    CIRCUIT_STATE_HALF_OPEN: _ClassVar[CircuitState]
CIRCUIT_STATE_UNSPECIFIED: CircuitState
CIRCUIT_STATE_CLOSED: CircuitState
CIRCUIT_STATE_OPEN: CircuitState
CIRCUIT_STATE_HALF_OPEN: CircuitState

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("info", "healthy", "circuit", "load", "in_flight", "ejected", "load_score", "estimated_sequences", "ttft_seconds", "inter_token_seconds", "service_tokens_per_second")
    INFO_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    EJECTED_FIELD_NUMBER: _ClassVar[int]
    LOAD_SCORE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TTFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INTER_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    info: _common_pb2.NodeInfo
    healthy: bool
    circuit: CircuitState
    load: _common_pb2.LoadReport
    in_flight: int
    ejected: bool
    load_score: float
    estimated_sequences: int
    ttft_seconds: float
    inter_token_seconds: float
    service_tokens_per_second: float
    def __init__(self, info: _Optional[_Union[_common_pb2.NodeInfo, _Mapping]] = ..., healthy: _Optional[bool] = ..., circuit: _Optional[_Union[CircuitState, str]] = ..., load: _Optional[_Union[_common_pb2.LoadReport, _Mapping]] = ..., in_flight: _Optional[int] = ..., ejected: _Optional[bool] = ..., load_score: _Optional[float] = ..., estimated_sequences: _Optional[int] = ..., ttft_seconds: _Optional[float] = ..., inter_token_seconds: _Optional[float] = ..., service_tokens_per_second: _Optional[float] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ...) -> None: ...

class GetTenantUsageRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class TenantUsage(_message.Message):
    __slots__ = ("tenant", "requests", "refused", "prompt_tokens", "completion_tokens", "in_flight", "cache_hits", "queued", "refused_by_reason", "weight", "quotas", "scheduler_id")
    class RefusedByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    requests: int
    refused: int
    prompt_tokens: int
    completion_tokens: int
    in_flight: int
    cache_hits: int
    queued: int
    refused_by_reason: _containers.ScalarMap[str, int]
    weight: float
    quotas: TenantQuotas
    scheduler_id: str
    def __init__(self, tenant: _Optional[str] = ..., requests: _Optional[int] = ..., refused: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., in_flight: _Optional[int] = ..., cache_hits: _Optional[int] = ..., queued: _Optional[int] = ..., refused_by_reason: _Optional[_Mapping[str, int]] = ..., weight: _Optional[float] = ..., quotas: _Optional[_Union[TenantQuotas, _Mapping]] = ..., scheduler_id: _Optional[str] = ...) -> None: ...

class TenantQuotas(_message.Message):
    __slots__ = ("requests_per_second", "burst", "tokens_per_minute", "max_concurrent")
    REQUESTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    requests_per_second: float
    burst: int
    tokens_per_minute: int
    max_concurrent: int
    def __init__(self, requests_per_second: _Optional[float] = ..., burst: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., max_concurrent: _Optional[int] = ...) -> None: ...
