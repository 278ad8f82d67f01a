from askmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("messages", "parameters", "passages", "context_token_budget")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    parameters: _common_pb2.GenerationParameters
    passages: _containers.RepeatedCompositeFieldContainer[ContextPassage]
    context_token_budget: int
    def __init__(self, messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., parameters: _Optional[_Union[_common_pb2.GenerationParameters, _Mapping]] = ..., passages: _Optional[_Iterable[_Union[ContextPassage, _Mapping]]] = ..., context_token_budget: _Optional[int] = ...) -> None: ...

class ContextPassage(_message.Message):
    __slots__ = ("number", "title", "text")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    number: int
    title: str
    text: str
    def __init__(self, number: _Optional[int] = ..., title: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class Admission(_message.Message):
    __slots__ = ("max_wait_s",)
    MAX_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    max_wait_s: float
    def __init__(self, max_wait_s: _Optional[float] = ...) -> None: ...

class AdmitAndGenerateRequest(_message.Message):
    __slots__ = ("admission", "generate")
    ADMISSION_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    admission: Admission
    generate: GenerateRequest
    def __init__(self, admission: _Optional[_Union[Admission, _Mapping]] = ..., generate: _Optional[_Union[GenerateRequest, _Mapping]] = ...) -> None: ...

class GenerateStarted(_message.Message):
    __slots__ = ("passages_used", "queue_ms")
    PASSAGES_USED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    passages_used: _containers.RepeatedScalarFieldContainer[int]
    queue_ms: float
    def __init__(self, passages_used: _Optional[_Iterable[int]] = ..., queue_ms: _Optional[float] = ...) -> None: ...

class GenerateTimings(_message.Message):
    __slots__ = ("queue_ms", "time_to_first_token_ms", "total_ms", "tokens_per_second")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    time_to_first_token_ms: float
    total_ms: float
    tokens_per_second: float
    def __init__(self, queue_ms: _Optional[float] = ..., time_to_first_token_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., tokens_per_second: _Optional[float] = ...) -> None: ...

class GenerateDone(_message.Message):
    __slots__ = ("finish_reason", "usage", "timings", "model")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    timings: GenerateTimings
    model: str
    def __init__(self, finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., timings: _Optional[_Union[GenerateTimings, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("delta", "done", "error", "queued", "started")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    delta: _common_pb2.TokenDelta
    done: GenerateDone
    error: _common_pb2.StreamError
    queued: _common_pb2.QueueStatus
    started: GenerateStarted
    def __init__(self, delta: _Optional[_Union[_common_pb2.TokenDelta, _Mapping]] = ..., done: _Optional[_Union[GenerateDone, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.StreamError, _Mapping]] = ..., queued: _Optional[_Union[_common_pb2.QueueStatus, _Mapping]] = ..., started: _Optional[_Union[GenerateStarted, _Mapping]] = ...) -> None: ...

class GetLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GeneratorLoad(_message.Message):
    __slots__ = ("running", "waiting", "slots")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    slots: int
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., slots: _Optional[int] = ...) -> None: ...
