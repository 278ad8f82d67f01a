from google.protobuf import struct_pb2 as _struct_pb2
from askmesh.v1 import common_pb2 as _common_pb2
from askmesh.v1 import embedder_pb2 as _embedder_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmbedTextsRequest(_message.Message):
    __slots__ = ("knowledge_base", "texts")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, knowledge_base: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ...) -> None: ...

class AskRequest(_message.Message):
    __slots__ = ("question", "knowledge_base", "top_k", "score_threshold", "filters", "history", "parameters", "context_token_budget", "search_mode", "rerank")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MODE_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    question: str
    knowledge_base: str
    top_k: int
    score_threshold: float
    filters: _containers.RepeatedCompositeFieldContainer[_common_pb2.MetadataFilter]
    history: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    parameters: _common_pb2.GenerationParameters
    context_token_budget: int
    search_mode: _common_pb2.SearchMode
    rerank: bool
    def __init__(self, question: _Optional[str] = ..., knowledge_base: _Optional[str] = ..., top_k: _Optional[int] = ..., score_threshold: _Optional[float] = ..., filters: _Optional[_Iterable[_Union[_common_pb2.MetadataFilter, _Mapping]]] = ..., history: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., parameters: _Optional[_Union[_common_pb2.GenerationParameters, _Mapping]] = ..., context_token_budget: _Optional[int] = ..., search_mode: _Optional[_Union[_common_pb2.SearchMode, str]] = ..., rerank: _Optional[bool] = ...) -> None: ...

class Citation(_message.Message):
    __slots__ = ("number", "document_id", "title", "text", "score", "metadata", "chunk_id", "chunk_index", "in_prompt", "rerank_score")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    IN_PROMPT_FIELD_NUMBER: _ClassVar[int]
    RERANK_SCORE_FIELD_NUMBER: _ClassVar[int]
    number: int
    document_id: str
    title: str
    text: str
    score: float
    metadata: _struct_pb2.Struct
    chunk_id: str
    chunk_index: int
    in_prompt: bool
    rerank_score: float
    def __init__(self, number: _Optional[int] = ..., document_id: _Optional[str] = ..., title: _Optional[str] = ..., text: _Optional[str] = ..., score: _Optional[float] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., chunk_id: _Optional[str] = ..., chunk_index: _Optional[int] = ..., in_prompt: _Optional[bool] = ..., rerank_score: _Optional[float] = ...) -> None: ...

class Sources(_message.Message):
    __slots__ = ("citations", "search_mode", "search_notice")
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MODE_FIELD_NUMBER: _ClassVar[int]
    SEARCH_NOTICE_FIELD_NUMBER: _ClassVar[int]
    citations: _containers.RepeatedCompositeFieldContainer[Citation]
    search_mode: _common_pb2.SearchMode
    search_notice: str
    def __init__(self, citations: _Optional[_Iterable[_Union[Citation, _Mapping]]] = ..., search_mode: _Optional[_Union[_common_pb2.SearchMode, str]] = ..., search_notice: _Optional[str] = ...) -> None: ...

class SearchQuery(_message.Message):
    __slots__ = ("question", "knowledge_base", "top_k", "score_threshold", "filters", "search_mode", "rerank")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MODE_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    question: str
    knowledge_base: str
    top_k: int
    score_threshold: float
    filters: _containers.RepeatedCompositeFieldContainer[_common_pb2.MetadataFilter]
    search_mode: _common_pb2.SearchMode
    rerank: bool
    def __init__(self, question: _Optional[str] = ..., knowledge_base: _Optional[str] = ..., top_k: _Optional[int] = ..., score_threshold: _Optional[float] = ..., filters: _Optional[_Iterable[_Union[_common_pb2.MetadataFilter, _Mapping]]] = ..., search_mode: _Optional[_Union[_common_pb2.SearchMode, str]] = ..., rerank: _Optional[bool] = ...) -> None: ...

class SearchResultsTimings(_message.Message):
    __slots__ = ("embed_ms", "search_ms", "total_ms", "rerank_ms")
    EMBED_MS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    RERANK_MS_FIELD_NUMBER: _ClassVar[int]
    embed_ms: float
    search_ms: float
    total_ms: float
    rerank_ms: float
    def __init__(self, embed_ms: _Optional[float] = ..., search_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., rerank_ms: _Optional[float] = ...) -> None: ...

class SearchResults(_message.Message):
    __slots__ = ("citations", "search_mode", "search_notice", "embedding_model", "timings")
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MODE_FIELD_NUMBER: _ClassVar[int]
    SEARCH_NOTICE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    citations: _containers.RepeatedCompositeFieldContainer[Citation]
    search_mode: _common_pb2.SearchMode
    search_notice: str
    embedding_model: str
    timings: SearchResultsTimings
    def __init__(self, citations: _Optional[_Iterable[_Union[Citation, _Mapping]]] = ..., search_mode: _Optional[_Union[_common_pb2.SearchMode, str]] = ..., search_notice: _Optional[str] = ..., embedding_model: _Optional[str] = ..., timings: _Optional[_Union[SearchResultsTimings, _Mapping]] = ...) -> None: ...

class AskTimings(_message.Message):
    __slots__ = ("embed_ms", "search_ms", "time_to_first_token_ms", "generate_ms", "total_ms", "gateway_overhead_ms", "queue_ms", "rerank_ms")
    EMBED_MS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    GENERATE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_OVERHEAD_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    RERANK_MS_FIELD_NUMBER: _ClassVar[int]
    embed_ms: float
    search_ms: float
    time_to_first_token_ms: float
    generate_ms: float
    total_ms: float
    gateway_overhead_ms: float
    queue_ms: float
    rerank_ms: float
    def __init__(self, embed_ms: _Optional[float] = ..., search_ms: _Optional[float] = ..., time_to_first_token_ms: _Optional[float] = ..., generate_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., gateway_overhead_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., rerank_ms: _Optional[float] = ...) -> None: ...

class AskDone(_message.Message):
    __slots__ = ("finish_reason", "usage", "timings", "model", "cached", "embedding_model")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    timings: AskTimings
    model: str
    cached: bool
    embedding_model: str
    def __init__(self, finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., timings: _Optional[_Union[AskTimings, _Mapping]] = ..., model: _Optional[str] = ..., cached: _Optional[bool] = ..., embedding_model: _Optional[str] = ...) -> None: ...

class AskResponse(_message.Message):
    __slots__ = ("sources", "delta", "done", "error", "queued")
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    sources: Sources
    delta: _common_pb2.TokenDelta
    done: AskDone
    error: _common_pb2.StreamError
    queued: _common_pb2.QueueStatus
    def __init__(self, sources: _Optional[_Union[Sources, _Mapping]] = ..., delta: _Optional[_Union[_common_pb2.TokenDelta, _Mapping]] = ..., done: _Optional[_Union[AskDone, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.StreamError, _Mapping]] = ..., queued: _Optional[_Union[_common_pb2.QueueStatus, _Mapping]] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("id", "title", "text", "metadata")
    ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    title: str
    text: str
    metadata: _struct_pb2.Struct
    def __init__(self, id: _Optional[str] = ..., title: _Optional[str] = ..., text: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class AddDocumentsRequest(_message.Message):
    __slots__ = ("knowledge_base", "documents", "chunking")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKING_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    chunking: _common_pb2.ChunkingOptions
    def __init__(self, knowledge_base: _Optional[str] = ..., documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ..., chunking: _Optional[_Union[_common_pb2.ChunkingOptions, _Mapping]] = ...) -> None: ...

class DocumentResult(_message.Message):
    __slots__ = ("id", "chunk_count")
    ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    id: str
    chunk_count: int
    def __init__(self, id: _Optional[str] = ..., chunk_count: _Optional[int] = ...) -> None: ...

class AddDocumentsResponse(_message.Message):
    __slots__ = ("documents", "chunk_count", "embed_ms", "upsert_ms")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    EMBED_MS_FIELD_NUMBER: _ClassVar[int]
    UPSERT_MS_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[DocumentResult]
    chunk_count: int
    embed_ms: float
    upsert_ms: float
    def __init__(self, documents: _Optional[_Iterable[_Union[DocumentResult, _Mapping]]] = ..., chunk_count: _Optional[int] = ..., embed_ms: _Optional[float] = ..., upsert_ms: _Optional[float] = ...) -> None: ...
