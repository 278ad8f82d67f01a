import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from askmesh.v1 import common_pb2 as _common_pb2
from askmesh.v1 import ingestion_pb2 as _ingestion_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KnowledgeBaseState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KNOWLEDGE_BASE_STATE_UNSPECIFIED: _ClassVar[KnowledgeBaseState]
    KNOWLEDGE_BASE_STATE_READY: _ClassVar[KnowledgeBaseState]
    KNOWLEDGE_BASE_STATE_REBUILDING: _ClassVar[KnowledgeBaseState]
KNOWLEDGE_BASE_STATE_UNSPECIFIED: KnowledgeBaseState
KNOWLEDGE_BASE_STATE_READY: KnowledgeBaseState
KNOWLEDGE_BASE_STATE_REBUILDING: KnowledgeBaseState

class KnowledgeBase(_message.Message):
    __slots__ = ("name", "description", "metadata_schema", "chunking", "embedding_model", "dimension", "document_count", "chunk_count", "size_bytes", "generation", "state", "created_at", "updated_at", "search_mode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    METADATA_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    CHUNKING_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    metadata_schema: _containers.RepeatedCompositeFieldContainer[_common_pb2.MetadataField]
    chunking: _common_pb2.ChunkingOptions
    embedding_model: str
    dimension: int
    document_count: int
    chunk_count: int
    size_bytes: int
    generation: int
    state: KnowledgeBaseState
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    search_mode: _common_pb2.SearchMode
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., metadata_schema: _Optional[_Iterable[_Union[_common_pb2.MetadataField, _Mapping]]] = ..., chunking: _Optional[_Union[_common_pb2.ChunkingOptions, _Mapping]] = ..., embedding_model: _Optional[str] = ..., dimension: _Optional[int] = ..., document_count: _Optional[int] = ..., chunk_count: _Optional[int] = ..., size_bytes: _Optional[int] = ..., generation: _Optional[int] = ..., state: _Optional[_Union[KnowledgeBaseState, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., search_mode: _Optional[_Union[_common_pb2.SearchMode, str]] = ...) -> None: ...

class CreateKnowledgeBaseRequest(_message.Message):
    __slots__ = ("name", "description", "metadata_schema", "chunking", "search_mode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    METADATA_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    CHUNKING_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    metadata_schema: _containers.RepeatedCompositeFieldContainer[_common_pb2.MetadataField]
    chunking: _common_pb2.ChunkingOptions
    search_mode: _common_pb2.SearchMode
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., metadata_schema: _Optional[_Iterable[_Union[_common_pb2.MetadataField, _Mapping]]] = ..., chunking: _Optional[_Union[_common_pb2.ChunkingOptions, _Mapping]] = ..., search_mode: _Optional[_Union[_common_pb2.SearchMode, str]] = ...) -> None: ...

class ListKnowledgeBasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListKnowledgeBasesResponse(_message.Message):
    __slots__ = ("knowledge_bases",)
    KNOWLEDGE_BASES_FIELD_NUMBER: _ClassVar[int]
    knowledge_bases: _containers.RepeatedCompositeFieldContainer[KnowledgeBase]
    def __init__(self, knowledge_bases: _Optional[_Iterable[_Union[KnowledgeBase, _Mapping]]] = ...) -> None: ...

class GetKnowledgeBaseRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteKnowledgeBaseRequest(_message.Message):
    __slots__ = ("name", "allow_missing")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALLOW_MISSING_FIELD_NUMBER: _ClassVar[int]
    name: str
    allow_missing: bool
    def __init__(self, name: _Optional[str] = ..., allow_missing: _Optional[bool] = ...) -> None: ...

class DeleteKnowledgeBaseResponse(_message.Message):
    __slots__ = ("deleted_documents",)
    DELETED_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    deleted_documents: int
    def __init__(self, deleted_documents: _Optional[int] = ...) -> None: ...

class RebuildKnowledgeBaseRequest(_message.Message):
    __slots__ = ("name", "chunking", "search_mode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHUNKING_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    chunking: _common_pb2.ChunkingOptions
    search_mode: _common_pb2.SearchMode
    def __init__(self, name: _Optional[str] = ..., chunking: _Optional[_Union[_common_pb2.ChunkingOptions, _Mapping]] = ..., search_mode: _Optional[_Union[_common_pb2.SearchMode, str]] = ...) -> None: ...

class DocumentInfo(_message.Message):
    __slots__ = ("id", "knowledge_base", "title", "metadata", "version", "chunk_count", "size_bytes", "file_name", "content_type", "updated_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    knowledge_base: str
    title: str
    metadata: _struct_pb2.Struct
    version: int
    chunk_count: int
    size_bytes: int
    file_name: str
    content_type: str
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., knowledge_base: _Optional[str] = ..., title: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., version: _Optional[int] = ..., chunk_count: _Optional[int] = ..., size_bytes: _Optional[int] = ..., file_name: _Optional[str] = ..., content_type: _Optional[str] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListDocumentsRequest(_message.Message):
    __slots__ = ("knowledge_base", "page_size", "page_token")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    page_size: int
    page_token: str
    def __init__(self, knowledge_base: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDocumentsResponse(_message.Message):
    __slots__ = ("documents", "next_page_token")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[DocumentInfo]
    next_page_token: str
    def __init__(self, documents: _Optional[_Iterable[_Union[DocumentInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetDocumentRequest(_message.Message):
    __slots__ = ("knowledge_base", "id")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    id: str
    def __init__(self, knowledge_base: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class DeleteDocumentRequest(_message.Message):
    __slots__ = ("knowledge_base", "id", "allow_missing")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    ALLOW_MISSING_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    id: str
    allow_missing: bool
    def __init__(self, knowledge_base: _Optional[str] = ..., id: _Optional[str] = ..., allow_missing: _Optional[bool] = ...) -> None: ...

class DeleteDocumentResponse(_message.Message):
    __slots__ = ("deleted_chunks",)
    DELETED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    deleted_chunks: int
    def __init__(self, deleted_chunks: _Optional[int] = ...) -> None: ...
