from sluice.v1 import common_pb2 as _common_pb2
from sluice.v1 import inference_pb2 as _inference_pb2
from sluice.v1 import jobs_pb2 as _jobs_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeGenerateRequest(_message.Message):
    __slots__ = ("request", "tenant", "request_id", "adapter", "detached", "attach_only", "stream_interval_ms", "step_budget_s", "first_token_budget_s")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    DETACHED_FIELD_NUMBER: _ClassVar[int]
    ATTACH_ONLY_FIELD_NUMBER: _ClassVar[int]
    STREAM_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    STEP_BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    request: _inference_pb2.GenerateRequest
    tenant: str
    request_id: str
    adapter: str
    detached: bool
    attach_only: bool
    stream_interval_ms: int
    step_budget_s: float
    first_token_budget_s: float
    def __init__(self, request: _Optional[_Union[_inference_pb2.GenerateRequest, _Mapping]] = ..., tenant: _Optional[str] = ..., request_id: _Optional[str] = ..., adapter: _Optional[str] = ..., detached: _Optional[bool] = ..., attach_only: _Optional[bool] = ..., stream_interval_ms: _Optional[int] = ..., step_budget_s: _Optional[float] = ..., first_token_budget_s: _Optional[float] = ...) -> None: ...

class NodeEmbedRequest(_message.Message):
    __slots__ = ("request", "tenant", "request_id")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request: _inference_pb2.EmbedRequest
    tenant: str
    request_id: str
    def __init__(self, request: _Optional[_Union[_inference_pb2.EmbedRequest, _Mapping]] = ..., tenant: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class StreamLoadRequest(_message.Message):
    __slots__ = ("min_interval_ms",)
    MIN_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    min_interval_ms: int
    def __init__(self, min_interval_ms: _Optional[int] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("grace_seconds",)
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    grace_seconds: int
    def __init__(self, grace_seconds: _Optional[int] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("in_flight",)
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    in_flight: int
    def __init__(self, in_flight: _Optional[int] = ...) -> None: ...

class NodeTrainRequest(_message.Message):
    __slots__ = ("job_id", "tenant", "spec", "examples")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    tenant: str
    spec: _jobs_pb2.FinetuneSpec
    examples: _containers.RepeatedCompositeFieldContainer[_jobs_pb2.TrainingExample]
    def __init__(self, job_id: _Optional[str] = ..., tenant: _Optional[str] = ..., spec: _Optional[_Union[_jobs_pb2.FinetuneSpec, _Mapping]] = ..., examples: _Optional[_Iterable[_Union[_jobs_pb2.TrainingExample, _Mapping]]] = ...) -> None: ...

class TrainedAdapter(_message.Message):
    __slots__ = ("path", "size_bytes", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class NodeTrainEvent(_message.Message):
    __slots__ = ("step", "progress", "checkpoint_step", "adapter")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    step: _jobs_pb2.TrainingStep
    progress: _jobs_pb2.TrainingProgress
    checkpoint_step: int
    adapter: TrainedAdapter
    def __init__(self, step: _Optional[_Union[_jobs_pb2.TrainingStep, _Mapping]] = ..., progress: _Optional[_Union[_jobs_pb2.TrainingProgress, _Mapping]] = ..., checkpoint_step: _Optional[int] = ..., adapter: _Optional[_Union[TrainedAdapter, _Mapping]] = ...) -> None: ...
