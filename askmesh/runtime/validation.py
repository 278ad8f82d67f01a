"""Request checks that more than one service applies, with messages that name the field."""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from askmesh.runtime.errors import InvalidArgument, shown
from askmesh.v1 import common_pb2

# Titles of documents, chunks and passages, everywhere they are taken or made (the retriever's
# title column holds this many).
MAX_TITLE_CHARS = 1024
# Document ids, as a client gives them or a tier derives them (the retriever's document_id column
# holds this many).
MAX_DOCUMENT_ID_CHARS = 256

# A knowledge base's name is a label people type ("hr-policies"); the retriever never sees it.
KNOWLEDGE_BASE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# The retriever's key for a knowledge base's collections (the ingestor's id for it, or the name
# of one made before ids): what Milvus collection names may hold.
COLLECTION_KEY = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
DECLARED_FIELD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")
DECLARABLE_TYPES = frozenset(
    {common_pb2.METADATA_TYPE_STRING, common_pb2.METADATA_TYPE_INT, common_pb2.METADATA_TYPE_FLOAT, common_pb2.METADATA_TYPE_BOOL}
)


def check_knowledge_base_name(name: str, field: str = "knowledge_base") -> str:
    if not KNOWLEDGE_BASE_NAME.match(name):
        raise InvalidArgument(
            field,
            f"{shown(name)} is not a valid knowledge base name "
            "(lowercase letters, digits, '-', '.' and '_', starting with a letter or digit, at most 63)",
        )
    return name


def check_collection_key(key: str, field: str = "knowledge_base") -> str:
    if not COLLECTION_KEY.match(key):
        raise InvalidArgument(
            field, f"{shown(key)} is not a collection key (lowercase letters, digits and _, starting with a letter, at most 63)"
        )
    return key


def has_control_characters(value: str) -> bool:
    """Tabs, newlines, NUL, DEL and the C1 controls (Unicode category Cc): never in a name a user
    sees, types or filters on (the retriever's filter literals refuse them too)."""
    return any(unicodedata.category(c) == "Cc" for c in value)


def check_document_id(value: str, field: str, *, required: bool = True) -> str:
    """A document id: 1 to MAX_DOCUMENT_ID_CHARS characters, none a control character. Where a
    tier derives an id for an empty one (AddDocuments, uploads), `required=False` accepts ""."""
    if (required and not value) or len(value) > MAX_DOCUMENT_ID_CHARS or has_control_characters(value):
        bound = f"1 to {MAX_DOCUMENT_ID_CHARS}" if required else f"at most {MAX_DOCUMENT_ID_CHARS}"
        raise InvalidArgument(field, f"must be {bound} printable characters")
    return value


def check_title(value: str, field: str) -> str:
    """A title a client gives: optional, at most MAX_TITLE_CHARS characters."""
    return check_text(field, value, MAX_TITLE_CHARS, required=False)


def clip_title(value: str) -> str:
    """A title a tier makes (parsed from a file, or a file's name): cut to MAX_TITLE_CHARS rather
    than fail a whole ingestion over a long <title>."""
    return value[:MAX_TITLE_CHARS]


def check_score_threshold(value: float, field: str = "score_threshold") -> float:
    """A cosine similarity floor: in [-1, 1] (the tiers' vectors are unit length)."""
    if not -1.0 <= value <= 1.0:
        raise InvalidArgument(field, f"{value:g} is outside [-1, 1]")
    return value


SEARCH_MODES = (common_pb2.SEARCH_MODE_DENSE, common_pb2.SEARCH_MODE_KEYWORD, common_pb2.SEARCH_MODE_HYBRID)


def search_mode_name(mode: int) -> str:
    return common_pb2.SearchMode.Name(mode).removeprefix("SEARCH_MODE_").lower()


SEARCH_MODE_BY_NAME = {search_mode_name(mode): mode for mode in SEARCH_MODES}


def check_search_mode(mode: int, has_threshold: bool = False, field: str = "search_mode") -> int:
    """A search mode is one of the enum's values (UNSPECIFIED too), and a score threshold (a cosine
    similarity) goes with dense search only."""
    if mode != common_pb2.SEARCH_MODE_UNSPECIFIED and mode not in SEARCH_MODES:
        raise InvalidArgument(field, f"{mode} is not a search mode (dense, keyword or hybrid)")
    if has_threshold and mode in (common_pb2.SEARCH_MODE_KEYWORD, common_pb2.SEARCH_MODE_HYBRID):
        raise InvalidArgument(
            "score_threshold",
            f"is a cosine similarity, which {search_mode_name(mode)} search does not score; "
            "leave it unset or search in dense mode",
        )
    return mode


def check_text(field: str, value: str, max_chars: int, *, required: bool = True) -> str:
    if required and not value.strip():
        raise InvalidArgument(field, "is empty")
    if len(value) > max_chars:
        raise InvalidArgument(field, f"has {len(value)} characters; the limit is {max_chars}")
    return value


def check_count(field: str, count: int, maximum: int, *, minimum: int = 0) -> None:
    if count < minimum:
        raise InvalidArgument(field, f"must contain at least {minimum}")
    if count > maximum:
        raise InvalidArgument(field, f"{count} items exceed the limit of {maximum}")


# A metadata string, declared or filtered on (a filter value longer than this matches nothing).
MAX_DECLARED_STRING = 1024


def typed_value(value: Any, declared: int, where: str) -> Any:
    """A metadata value checked against the type its knowledge base declares (None: absent)."""
    if value is None:
        return None
    if declared == common_pb2.METADATA_TYPE_STRING and isinstance(value, str):
        if len(value) > MAX_DECLARED_STRING:
            raise InvalidArgument(where, f"is longer than {MAX_DECLARED_STRING} characters")
        return value
    if declared == common_pb2.METADATA_TYPE_BOOL and isinstance(value, bool):
        return value
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if declared == common_pb2.METADATA_TYPE_INT and is_number and float(value).is_integer():
        return int(value)  # protobuf Struct numbers are doubles
    if declared == common_pb2.METADATA_TYPE_FLOAT and is_number and math.isfinite(value):
        return float(value)
    expected = common_pb2.MetadataType.Name(declared).removeprefix("METADATA_TYPE_").lower()
    raise InvalidArgument(where, f"{shown(value)} is not a valid {expected}")


def check_schema(schema: Sequence[common_pb2.MetadataField], where: str = "metadata_schema") -> dict[str, int]:
    """A knowledge base's declared metadata fields, checked: name -> MetadataType."""
    declared: dict[str, int] = {}
    for index, item in enumerate(schema):
        if not DECLARED_FIELD_NAME.match(item.name):
            raise InvalidArgument(
                f"{where}[{index}].name", f"{shown(item.name)} must be letters, digits and _, starting with a letter, at most 48"
            )
        if item.type not in DECLARABLE_TYPES:
            raise InvalidArgument(f"{where}[{index}].type", "must be STRING, INT, FLOAT or BOOL")
        if item.name in declared:
            raise InvalidArgument(f"{where}[{index}].name", f"{shown(item.name)} is declared twice")
        declared[item.name] = item.type
    return declared


MAX_TEMPERATURE = 2.0
MAX_STOP_CHARS = 64


def check_generation_parameters(
    parameters: common_pb2.GenerationParameters,
    *,
    max_new_tokens: int | None = None,
    max_stop_sequences: int | None = None,
    field: str = "parameters",
) -> None:
    """Sampling parameters in range. The limits that are one generator's configuration
    (`max_new_tokens`, `max_stop_sequences`) are checked only where given."""
    if parameters.HasField("max_new_tokens"):
        if max_new_tokens is not None and not 1 <= parameters.max_new_tokens <= max_new_tokens:
            raise InvalidArgument(f"{field}.max_new_tokens", f"{parameters.max_new_tokens} is out of range 1..{max_new_tokens}")
        if parameters.max_new_tokens < 1:
            raise InvalidArgument(f"{field}.max_new_tokens", f"{parameters.max_new_tokens} must be at least 1")
    if parameters.HasField("temperature") and not 0.0 <= parameters.temperature <= MAX_TEMPERATURE:
        raise InvalidArgument(f"{field}.temperature", f"{parameters.temperature:g} is out of range 0..{MAX_TEMPERATURE:g}")
    if parameters.HasField("top_p") and not 0.0 < parameters.top_p <= 1.0:
        raise InvalidArgument(f"{field}.top_p", f"{parameters.top_p:g} is out of range (0, 1]")
    if max_stop_sequences is not None and len(parameters.stop) > max_stop_sequences:
        raise InvalidArgument(f"{field}.stop", f"{len(parameters.stop)} stop sequences exceed the limit of {max_stop_sequences}")
    for index, stop in enumerate(parameters.stop):
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise InvalidArgument(f"{field}.stop[{index}]", f"must be 1 to {MAX_STOP_CHARS} characters")
