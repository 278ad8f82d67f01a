"""The checks every tier shares (askmesh.runtime.validation), and the retriever applying them."""

from __future__ import annotations

import pytest

from askmesh.runtime.errors import InvalidArgument
from askmesh.runtime.validation import (
    MAX_DOCUMENT_ID_CHARS,
    MAX_TITLE_CHARS,
    check_document_id,
    check_collection_key,
    check_knowledge_base_name,
    check_score_threshold,
    check_title,
    clip_title,
)
from askmesh.v1 import common_pb2, retriever_pb2
from services.retriever.engine import validate_chunks


def refusal(check: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(InvalidArgument) as raised:
        check(*args, **kwargs)  # type: ignore[operator]
    return raised.value.message


@pytest.mark.parametrize(
    "document_id", ["a", "travel-policy.md", "Reisekosten (2024) — München", "漢字", " spaced ", "x" * MAX_DOCUMENT_ID_CHARS]
)
def test_a_document_id_may_be_any_visible_name_up_to_the_limit(document_id: str) -> None:
    assert check_document_id(document_id, "id") == document_id


@pytest.mark.parametrize("document_id", ["", "x" * (MAX_DOCUMENT_ID_CHARS + 1), "a\nb", "tab\there", "nul\0", "del\x7f", "c1\x85"])
def test_a_document_id_is_refused_when_empty_too_long_or_holding_control_characters(document_id: str) -> None:
    assert refusal(check_document_id, document_id, "pins[2].document_id") == (
        f"pins[2].document_id: must be 1 to {MAX_DOCUMENT_ID_CHARS} printable characters"
    )


def test_an_optional_document_id_may_be_empty_but_not_otherwise_wrong() -> None:
    assert check_document_id("", "documents[0].id", required=False) == ""
    assert refusal(check_document_id, "a\rb", "documents[0].id", required=False) == (
        f"documents[0].id: must be at most {MAX_DOCUMENT_ID_CHARS} printable characters"
    )


def test_a_title_is_optional_and_bounded_and_a_made_title_is_clipped_not_refused() -> None:
    assert check_title("", "title") == "" and check_title("T" * MAX_TITLE_CHARS, "title") == "T" * MAX_TITLE_CHARS
    assert refusal(check_title, "T" * (MAX_TITLE_CHARS + 1), "header.title") == (
        f"header.title: has {MAX_TITLE_CHARS + 1} characters; the limit is {MAX_TITLE_CHARS}"
    )
    assert clip_title("T" * 5000) == "T" * MAX_TITLE_CHARS and clip_title("Short") == "Short"


def test_a_score_threshold_is_a_cosine_similarity() -> None:
    assert check_score_threshold(-1.0) == -1.0 and check_score_threshold(1.0) == 1.0
    assert refusal(check_score_threshold, 1.5) == "score_threshold: 1.5 is outside [-1, 1]"


def test_a_knowledge_base_name_is_a_label_people_type() -> None:
    for good in ("hr_handbook_2", "hr-policies", "2024", "docs.v2"):
        assert check_knowledge_base_name(good) == good
    for bad in ["", "HR", "-leading", "has space", "a/b", "a" * 64]:
        assert refusal(check_knowledge_base_name, bad, "name").startswith(f"name: {bad!r} is not a valid knowledge base name")


def test_a_collection_key_is_what_milvus_names_may_hold() -> None:
    assert check_collection_key("c0123abcdef") == "c0123abcdef"
    for bad in ["", "hr-policies", "2024", "Bad"]:
        assert refusal(check_collection_key, bad).startswith(f"knowledge_base: {bad!r} is not a collection key")


# -- the retriever refuses what the gateway refuses, with the same words ------------------------------
def upsert_of(**fields: str) -> list[retriever_pb2.VectorChunk]:
    chunk = common_pb2.Chunk(id="c-0", document_id="d", text="some text")
    for name, value in fields.items():
        setattr(chunk, name, value)
    return [retriever_pb2.VectorChunk(chunk=chunk, vector=[1.0, 0.0])]


def test_the_retriever_takes_a_chunk_with_a_full_length_title_and_id() -> None:
    validate_chunks(upsert_of(document_id="é" * MAX_DOCUMENT_ID_CHARS, title="é" * MAX_TITLE_CHARS), max_chunks=10)


def test_the_retriever_refuses_a_document_id_with_a_newline_as_the_gateway_does() -> None:
    assert refusal(validate_chunks, upsert_of(document_id="two\nlines"), max_chunks=10) == (
        f"chunks[0].chunk.document_id: must be 1 to {MAX_DOCUMENT_ID_CHARS} printable characters"
    )


def test_the_retriever_refuses_a_long_title_as_the_gateway_does() -> None:
    assert refusal(validate_chunks, upsert_of(title="T" * (MAX_TITLE_CHARS + 1)), max_chunks=10) == (
        f"chunks[0].chunk.title: has {MAX_TITLE_CHARS + 1} characters; the limit is {MAX_TITLE_CHARS}"
    )


def test_an_error_quotes_a_long_value_cut_short_and_says_how_long_it_was() -> None:
    message = refusal(check_knowledge_base_name, "x" * 100_000 + "\x1b[31m", "name")
    assert message.startswith("name: '" + "x" * 64 + "…' (100005 characters) is not a valid knowledge base name")
    assert len(message) < 300
