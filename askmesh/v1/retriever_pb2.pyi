from askmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchRequest(_message.Message):
    __slots__ = ("knowledge_base", "vector", "top_k", "score_threshold", "filters", "pins", "search_mode", "query_text")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    PINS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MODE_FIELD_NUMBER: _ClassVar[int]
    QUERY_TEXT_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    top_k: int
    score_threshold: float
    filters: _containers.RepeatedCompositeFieldContainer[_common_pb2.MetadataFilter]
    pins: _containers.RepeatedCompositeFieldContainer[DocumentVersionPin]
    search_mode: _common_pb2.SearchMode
    query_text: str
    def __init__(self, knowledge_base: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., top_k: _Optional[int] = ..., score_threshold: _Optional[float] = ..., filters: _Optional[_Iterable[_Union[_common_pb2.MetadataFilter, _Mapping]]] = ..., pins: _Optional[_Iterable[_Union[DocumentVersionPin, _Mapping]]] = ..., search_mode: _Optional[_Union[_common_pb2.SearchMode, str]] = ..., query_text: _Optional[str] = ...) -> None: ...

class DocumentVersionPin(_message.Message):
    __slots__ = ("document_id", "version")
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    version: int
    def __init__(self, document_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("results", "timings", "search_mode", "notice")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MODE_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoredChunk]
    timings: SearchTimings
    search_mode: _common_pb2.SearchMode
    notice: str
    def __init__(self, results: _Optional[_Iterable[_Union[ScoredChunk, _Mapping]]] = ..., timings: _Optional[_Union[SearchTimings, _Mapping]] = ..., search_mode: _Optional[_Union[_common_pb2.SearchMode, str]] = ..., notice: _Optional[str] = ...) -> None: ...

class VectorChunk(_message.Message):
    __slots__ = ("chunk", "vector")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    chunk: _common_pb2.Chunk
    vector: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, chunk: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ..., vector: _Optional[_Iterable[float]] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("knowledge_base", "chunks", "create_if_missing", "embedding_model", "generation")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CREATE_IF_MISSING_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    chunks: _containers.RepeatedCompositeFieldContainer[VectorChunk]
    create_if_missing: bool
    embedding_model: str
    generation: int
    def __init__(self, knowledge_base: _Optional[str] = ..., chunks: _Optional[_Iterable[_Union[VectorChunk, _Mapping]]] = ..., create_if_missing: _Optional[bool] = ..., embedding_model: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("upserted",)
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    def __init__(self, upserted: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("knowledge_base", "document_ids", "from_chunk_index", "except_version", "generation", "below_version", "only_version")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    FROM_CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    EXCEPT_VERSION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    BELOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    ONLY_VERSION_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    document_ids: _containers.RepeatedScalarFieldContainer[str]
    from_chunk_index: int
    except_version: int
    generation: int
    below_version: int
    only_version: int
    def __init__(self, knowledge_base: _Optional[str] = ..., document_ids: _Optional[_Iterable[str]] = ..., from_chunk_index: _Optional[int] = ..., except_version: _Optional[int] = ..., generation: _Optional[int] = ..., below_version: _Optional[int] = ..., only_version: _Optional[int] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class CreateCollectionRequest(_message.Message):
    __slots__ = ("knowledge_base", "generation", "dimension", "embedding_model", "metadata_schema")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    METADATA_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    generation: int
    dimension: int
    embedding_model: str
    metadata_schema: _containers.RepeatedCompositeFieldContainer[_common_pb2.MetadataField]
    def __init__(self, knowledge_base: _Optional[str] = ..., generation: _Optional[int] = ..., dimension: _Optional[int] = ..., embedding_model: _Optional[str] = ..., metadata_schema: _Optional[_Iterable[_Union[_common_pb2.MetadataField, _Mapping]]] = ...) -> None: ...

class CollectionInfo(_message.Message):
    __slots__ = ("knowledge_base", "active_generation", "dimension", "embedding_model", "metadata_schema", "chunk_count", "keyword_search")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    METADATA_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    KEYWORD_SEARCH_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    active_generation: int
    dimension: int
    embedding_model: str
    metadata_schema: _containers.RepeatedCompositeFieldContainer[_common_pb2.MetadataField]
    chunk_count: int
    keyword_search: bool
    def __init__(self, knowledge_base: _Optional[str] = ..., active_generation: _Optional[int] = ..., dimension: _Optional[int] = ..., embedding_model: _Optional[str] = ..., metadata_schema: _Optional[_Iterable[_Union[_common_pb2.MetadataField, _Mapping]]] = ..., chunk_count: _Optional[int] = ..., keyword_search: _Optional[bool] = ...) -> None: ...

class SwitchGenerationRequest(_message.Message):
    __slots__ = ("knowledge_base", "generation")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    generation: int
    def __init__(self, knowledge_base: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class DropKnowledgeBaseRequest(_message.Message):
    __slots__ = ("knowledge_base",)
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    def __init__(self, knowledge_base: _Optional[str] = ...) -> None: ...

class DropKnowledgeBaseResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class DescribeCollectionRequest(_message.Message):
    __slots__ = ("knowledge_base", "generation")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    generation: int
    def __init__(self, knowledge_base: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...
