from sluice.v1 import common_pb2 as _common_pb2
from sluice.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CachedResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "usage", "node_id", "stored_at_unix_ms")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STORED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    node_id: str
    stored_at_unix_ms: int
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., node_id: _Optional[str] = ..., stored_at_unix_ms: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("tenant", "request")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    request: _inference_pb2.GenerateRequest
    def __init__(self, tenant: _Optional[str] = ..., request: _Optional[_Union[_inference_pb2.GenerateRequest, _Mapping]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("hit", "response", "key", "cacheable")
    HIT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    CACHEABLE_FIELD_NUMBER: _ClassVar[int]
    hit: bool
    response: CachedResponse
    key: str
    cacheable: bool
    def __init__(self, hit: _Optional[bool] = ..., response: _Optional[_Union[CachedResponse, _Mapping]] = ..., key: _Optional[str] = ..., cacheable: _Optional[bool] = ...) -> None: ...

class StoreRequest(_message.Message):
    __slots__ = ("tenant", "request", "response", "ttl_seconds")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    request: _inference_pb2.GenerateRequest
    response: CachedResponse
    ttl_seconds: int
    def __init__(self, tenant: _Optional[str] = ..., request: _Optional[_Union[_inference_pb2.GenerateRequest, _Mapping]] = ..., response: _Optional[_Union[CachedResponse, _Mapping]] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class StoreResponse(_message.Message):
    __slots__ = ("stored", "reason", "key")
    STORED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    reason: str
    key: str
    def __init__(self, stored: _Optional[bool] = ..., reason: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class InvalidateRequest(_message.Message):
    __slots__ = ("tenant", "model")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class InvalidateResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("hits", "misses", "stores", "errors", "redis_available")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    STORES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    REDIS_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    hits: int
    misses: int
    stores: int
    errors: int
    redis_available: bool
    def __init__(self, hits: _Optional[int] = ..., misses: _Optional[int] = ..., stores: _Optional[int] = ..., errors: _Optional[int] = ..., redis_available: _Optional[bool] = ...) -> None: ...
