"""Structured filters become Milvus expressions with every value as an escaped literal."""

from __future__ import annotations

import pytest

from askmesh.runtime.errors import InvalidArgument
from askmesh.v1 import common_pb2
from services.retriever.filters import build_filter

V = common_pb2.FilterValue


def build(*filters: common_pb2.MetadataFilter) -> str:
    return build_filter(filters, max_filters=4, max_values=3)


def test_each_condition_kind() -> None:
    expression = build(
        common_pb2.MetadataFilter(field="dept", equals=V(string_value="eng")),
        common_pb2.MetadataFilter(field="year", **{"in": common_pb2.FilterValueList(values=[V(int_value=1), V(int_value=2)])}),
        common_pb2.MetadataFilter(field="score", range=common_pb2.FilterRange(gte=0.5, lt=2)),
        common_pb2.MetadataFilter(field="tag", exists=False),
    )
    assert expression == (
        'metadata["dept"] == "eng" and (metadata["year"] == 1 or metadata["year"] == 2) and '
        '(metadata["score"] >= 0.5 and metadata["score"] < 2.0) and metadata["tag"] is null'
    )


def test_document_columns_are_filtered_directly() -> None:
    assert build(common_pb2.MetadataFilter(field="document_id", equals=V(string_value="a"))) == 'document_id == "a"'


def test_quotes_in_values_cannot_escape_the_literal() -> None:
    expression = build(common_pb2.MetadataFilter(field="dept", equals=V(string_value='x" or 1 == 1 or "')))
    assert expression == 'metadata["dept"] == "x\\" or 1 == 1 or \\""'


@pytest.mark.parametrize(
    ("condition", "field"),
    [
        (common_pb2.MetadataFilter(field='a"]) or (1', equals=V(int_value=1)), "filters[0].field"),
        (common_pb2.MetadataFilter(field="1abc", equals=V(int_value=1)), "filters[0].field"),
        (common_pb2.MetadataFilter(field="a"), "filters[0]"),
        (common_pb2.MetadataFilter(field="a", equals=V()), "filters[0].equals"),
        (common_pb2.MetadataFilter(field="a", **{"in": common_pb2.FilterValueList()}), "filters[0].in"),
        (
            common_pb2.MetadataFilter(field="a", **{"in": common_pb2.FilterValueList(values=[V(int_value=i) for i in range(4)])}),
            "filters[0].in",
        ),
        (common_pb2.MetadataFilter(field="a", range=common_pb2.FilterRange()), "filters[0].range"),
        (common_pb2.MetadataFilter(field="a", equals=V(double_value=float("nan"))), "filters[0].equals"),
        (common_pb2.MetadataFilter(field="a", equals=V(string_value="line\nbreak")), "filters[0].equals"),
        (common_pb2.MetadataFilter(field="title", exists=True), "filters[0].exists"),
    ],
)
def test_malformed_filters_name_the_field(condition: common_pb2.MetadataFilter, field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        build(condition)
    assert raised.value.field == field


def test_too_many_conditions() -> None:
    conditions = [common_pb2.MetadataFilter(field="a", exists=True)] * 5
    with pytest.raises(InvalidArgument, match="^filters: 5 conditions exceed the limit of 4"):
        build(*conditions)
