from sluice.v1 import common_pb2 as _common_pb2
from sluice.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_COMPLETED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
    JOB_STATE_EXPIRED: _ClassVar[JobState]
    JOB_STATE_CANCELLING: _ClassVar[JobState]

class JobKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_KIND_UNSPECIFIED: _ClassVar[JobKind]
    JOB_KIND_BATCH: _ClassVar[JobKind]
    JOB_KIND_FINETUNE: _ClassVar[JobKind]

class LrSchedule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LR_SCHEDULE_UNSPECIFIED: _ClassVar[LrSchedule]
    LR_SCHEDULE_CONSTANT: _ClassVar[LrSchedule]
    LR_SCHEDULE_LINEAR: _ClassVar[LrSchedule]
    LR_SCHEDULE_COSINE: _ClassVar[LrSchedule]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_COMPLETED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
JOB_STATE_EXPIRED: JobState
JOB_STATE_CANCELLING: JobState
JOB_KIND_UNSPECIFIED: JobKind
JOB_KIND_BATCH: JobKind
JOB_KIND_FINETUNE: JobKind
LR_SCHEDULE_UNSPECIFIED: LrSchedule
LR_SCHEDULE_CONSTANT: LrSchedule
LR_SCHEDULE_LINEAR: LrSchedule
LR_SCHEDULE_COSINE: LrSchedule

class JobLine(_message.Message):
    __slots__ = ("custom_id", "generate", "embed", "train")
    CUSTOM_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    EMBED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    custom_id: str
    generate: _inference_pb2.GenerateRequest
    embed: _inference_pb2.EmbedRequest
    train: TrainingExample
    def __init__(self, custom_id: _Optional[str] = ..., generate: _Optional[_Union[_inference_pb2.GenerateRequest, _Mapping]] = ..., embed: _Optional[_Union[_inference_pb2.EmbedRequest, _Mapping]] = ..., train: _Optional[_Union[TrainingExample, _Mapping]] = ...) -> None: ...

class TrainingExample(_message.Message):
    __slots__ = ("prompt", "completion", "messages")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    completion: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    def __init__(self, prompt: _Optional[str] = ..., completion: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ...) -> None: ...

class LoraSettings(_message.Message):
    __slots__ = ("rank", "alpha", "dropout", "target_modules")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    rank: int
    alpha: float
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, rank: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ...) -> None: ...

class OptimizerSettings(_message.Message):
    __slots__ = ("learning_rate", "weight_decay", "schedule", "warmup_steps", "max_grad_norm")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    weight_decay: float
    schedule: LrSchedule
    warmup_steps: int
    max_grad_norm: float
    def __init__(self, learning_rate: _Optional[float] = ..., weight_decay: _Optional[float] = ..., schedule: _Optional[_Union[LrSchedule, str]] = ..., warmup_steps: _Optional[int] = ..., max_grad_norm: _Optional[float] = ...) -> None: ...

class FinetuneSpec(_message.Message):
    __slots__ = ("base_model", "lora", "optimizer", "epochs", "max_steps", "micro_batch_size", "gradient_accumulation_steps", "seed", "adapter_name", "max_sequence_tokens", "checkpoint_every_steps", "shared")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    lora: LoraSettings
    optimizer: OptimizerSettings
    epochs: int
    max_steps: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    seed: int
    adapter_name: str
    max_sequence_tokens: int
    checkpoint_every_steps: int
    shared: bool
    def __init__(self, base_model: _Optional[str] = ..., lora: _Optional[_Union[LoraSettings, _Mapping]] = ..., optimizer: _Optional[_Union[OptimizerSettings, _Mapping]] = ..., epochs: _Optional[int] = ..., max_steps: _Optional[int] = ..., micro_batch_size: _Optional[int] = ..., gradient_accumulation_steps: _Optional[int] = ..., seed: _Optional[int] = ..., adapter_name: _Optional[str] = ..., max_sequence_tokens: _Optional[int] = ..., checkpoint_every_steps: _Optional[int] = ..., shared: _Optional[bool] = ...) -> None: ...

class TrainingProgress(_message.Message):
    __slots__ = ("step", "total_steps", "loss", "learning_rate", "tokens_per_second", "waiting_seconds", "eta_unix_ms", "node_id", "checkpoint_step")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    WAITING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ETA_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    loss: float
    learning_rate: float
    tokens_per_second: float
    waiting_seconds: float
    eta_unix_ms: int
    node_id: str
    checkpoint_step: int
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., waiting_seconds: _Optional[float] = ..., eta_unix_ms: _Optional[int] = ..., node_id: _Optional[str] = ..., checkpoint_step: _Optional[int] = ...) -> None: ...

class TrainingStep(_message.Message):
    __slots__ = ("step", "loss", "learning_rate", "tokens", "at_unix_ms")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    learning_rate: float
    tokens: int
    at_unix_ms: int
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., tokens: _Optional[int] = ..., at_unix_ms: _Optional[int] = ...) -> None: ...

class JobHeader(_message.Message):
    __slots__ = ("kind", "idempotency_key", "completion_window_seconds", "workload_class", "line_count", "finetune", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_CLASS_FIELD_NUMBER: _ClassVar[int]
    LINE_COUNT_FIELD_NUMBER: _ClassVar[int]
    FINETUNE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    kind: JobKind
    idempotency_key: str
    completion_window_seconds: int
    workload_class: _common_pb2.WorkloadClass
    line_count: int
    finetune: FinetuneSpec
    labels: _containers.ScalarMap[str, str]
    def __init__(self, kind: _Optional[_Union[JobKind, str]] = ..., idempotency_key: _Optional[str] = ..., completion_window_seconds: _Optional[int] = ..., workload_class: _Optional[_Union[_common_pb2.WorkloadClass, str]] = ..., line_count: _Optional[int] = ..., finetune: _Optional[_Union[FinetuneSpec, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class JobLines(_message.Message):
    __slots__ = ("lines",)
    LINES_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedCompositeFieldContainer[JobLine]
    def __init__(self, lines: _Optional[_Iterable[_Union[JobLine, _Mapping]]] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("header", "lines")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    header: JobHeader
    lines: JobLines
    def __init__(self, header: _Optional[_Union[JobHeader, _Mapping]] = ..., lines: _Optional[_Union[JobLines, _Mapping]] = ...) -> None: ...

class RequestCounts(_message.Message):
    __slots__ = ("total", "completed", "failed", "cancelled", "expired", "dead_lettered")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERED_FIELD_NUMBER: _ClassVar[int]
    total: int
    completed: int
    failed: int
    cancelled: int
    expired: int
    dead_lettered: int
    def __init__(self, total: _Optional[int] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ..., cancelled: _Optional[int] = ..., expired: _Optional[int] = ..., dead_lettered: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "tenant", "state", "kind", "request_counts", "error", "workload_class", "idempotency_key", "created_at_unix_ms", "started_at_unix_ms", "finished_at_unix_ms", "deadline_unix_ms", "predicted_completion_unix_ms", "expires_at_unix_ms", "labels", "training", "adapter")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_CLASS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_COMPLETION_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    tenant: str
    state: JobState
    kind: JobKind
    request_counts: RequestCounts
    error: str
    workload_class: _common_pb2.WorkloadClass
    idempotency_key: str
    created_at_unix_ms: int
    started_at_unix_ms: int
    finished_at_unix_ms: int
    deadline_unix_ms: int
    predicted_completion_unix_ms: int
    expires_at_unix_ms: int
    labels: _containers.ScalarMap[str, str]
    training: TrainingProgress
    adapter: str
    def __init__(self, job_id: _Optional[str] = ..., tenant: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., kind: _Optional[_Union[JobKind, str]] = ..., request_counts: _Optional[_Union[RequestCounts, _Mapping]] = ..., error: _Optional[str] = ..., workload_class: _Optional[_Union[_common_pb2.WorkloadClass, str]] = ..., idempotency_key: _Optional[str] = ..., created_at_unix_ms: _Optional[int] = ..., started_at_unix_ms: _Optional[int] = ..., finished_at_unix_ms: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., predicted_completion_unix_ms: _Optional[int] = ..., expires_at_unix_ms: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., training: _Optional[_Union[TrainingProgress, _Mapping]] = ..., adapter: _Optional[str] = ...) -> None: ...

class LineError(_message.Message):
    __slots__ = ("code", "reason", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    message: str
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("custom_id", "generate", "embed", "error", "step", "deliveries", "finished_at_unix_ms", "line_number")
    CUSTOM_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    EMBED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LINE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    custom_id: str
    generate: GenerateResult
    embed: _inference_pb2.EmbedResponse
    error: LineError
    step: TrainingStep
    deliveries: int
    finished_at_unix_ms: int
    line_number: int
    def __init__(self, custom_id: _Optional[str] = ..., generate: _Optional[_Union[GenerateResult, _Mapping]] = ..., embed: _Optional[_Union[_inference_pb2.EmbedResponse, _Mapping]] = ..., error: _Optional[_Union[LineError, _Mapping]] = ..., step: _Optional[_Union[TrainingStep, _Mapping]] = ..., deliveries: _Optional[int] = ..., finished_at_unix_ms: _Optional[int] = ..., line_number: _Optional[int] = ...) -> None: ...

class GenerateResult(_message.Message):
    __slots__ = ("text", "finish_reason", "usage", "model")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    model: str
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job", "lines_per_second")
    JOB_FIELD_NUMBER: _ClassVar[int]
    LINES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    job: Job
    lines_per_second: float
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., lines_per_second: _Optional[float] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: JobState
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetJobResultsRequest(_message.Message):
    __slots__ = ("job_id", "custom_ids", "page_size", "page_token")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_IDS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    custom_ids: _containers.RepeatedScalarFieldContainer[str]
    page_size: int
    page_token: str
    def __init__(self, job_id: _Optional[str] = ..., custom_ids: _Optional[_Iterable[str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class JobResultsPage(_message.Message):
    __slots__ = ("results", "next_page_token")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[JobResult]
    next_page_token: str
    def __init__(self, results: _Optional[_Iterable[_Union[JobResult, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
