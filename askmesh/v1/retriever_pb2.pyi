from askmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchRequest(_message.Message):
    __slots__ = ("knowledge_base", "vector", "top_k", "score_threshold", "filters")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    top_k: int
    score_threshold: float
    filters: _containers.RepeatedCompositeFieldContainer[_common_pb2.MetadataFilter]
    def __init__(self, knowledge_base: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., top_k: _Optional[int] = ..., score_threshold: _Optional[float] = ..., filters: _Optional[_Iterable[_Union[_common_pb2.MetadataFilter, _Mapping]]] = ...) -> None: ...

class ScoredChunk(_message.Message):
    __slots__ = ("chunk", "score")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    chunk: _common_pb2.Chunk
    score: float
    def __init__(self, chunk: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ..., score: _Optional[float] = ...) -> None: ...

class SearchTimings(_message.Message):
    __slots__ = ("search_ms",)
    SEARCH_MS_FIELD_NUMBER: _ClassVar[int]
    search_ms: float
    def __init__(self, search_ms: _Optional[float] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results", "timings")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoredChunk]
    timings: SearchTimings
    def __init__(self, results: _Optional[_Iterable[_Union[ScoredChunk, _Mapping]]] = ..., timings: _Optional[_Union[SearchTimings, _Mapping]] = ...) -> None: ...

class VectorChunk(_message.Message):
    __slots__ = ("chunk", "vector")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    chunk: _common_pb2.Chunk
    vector: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, chunk: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ..., vector: _Optional[_Iterable[float]] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("knowledge_base", "chunks", "create_if_missing", "embedding_model")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CREATE_IF_MISSING_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    chunks: _containers.RepeatedCompositeFieldContainer[VectorChunk]
    create_if_missing: bool
    embedding_model: str
    def __init__(self, knowledge_base: _Optional[str] = ..., chunks: _Optional[_Iterable[_Union[VectorChunk, _Mapping]]] = ..., create_if_missing: _Optional[bool] = ..., embedding_model: _Optional[str] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("upserted",)
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    def __init__(self, upserted: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("knowledge_base", "document_ids", "from_chunk_index")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    FROM_CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    document_ids: _containers.RepeatedScalarFieldContainer[str]
    from_chunk_index: int
    def __init__(self, knowledge_base: _Optional[str] = ..., document_ids: _Optional[_Iterable[str]] = ..., from_chunk_index: _Optional[int] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...
