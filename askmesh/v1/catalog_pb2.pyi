from askmesh.v1 import common_pb2 as _common_pb2
from askmesh.v1 import retriever_pb2 as _retriever_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetSearchViewRequest(_message.Message):
    __slots__ = ("knowledge_base", "tenant")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    tenant: str
    def __init__(self, knowledge_base: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class AuthenticateRequest(_message.Message):
    __slots__ = ("key_hash",)
    KEY_HASH_FIELD_NUMBER: _ClassVar[int]
    key_hash: str
    def __init__(self, key_hash: _Optional[str] = ...) -> None: ...

class Principal(_message.Message):
    __slots__ = ("tenant", "role", "key_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    role: str
    key_id: str
    def __init__(self, tenant: _Optional[str] = ..., role: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class SearchView(_message.Message):
    __slots__ = ("knowledge_base", "collection", "generation", "epoch", "pins", "search_mode")
    KNOWLEDGE_BASE_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PINS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MODE_FIELD_NUMBER: _ClassVar[int]
    knowledge_base: str
    collection: str
    generation: int
    epoch: int
    pins: _containers.RepeatedCompositeFieldContainer[_retriever_pb2.DocumentVersionPin]
    search_mode: _common_pb2.SearchMode
    def __init__(self, knowledge_base: _Optional[str] = ..., collection: _Optional[str] = ..., generation: _Optional[int] = ..., epoch: _Optional[int] = ..., pins: _Optional[_Iterable[_Union[_retriever_pb2.DocumentVersionPin, _Mapping]]] = ..., search_mode: _Optional[_Union[_common_pb2.SearchMode, str]] = ...) -> None: ...
