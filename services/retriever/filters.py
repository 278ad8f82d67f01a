"""Structured metadata filters to Milvus boolean expressions.

Clients never send an expression. Field names are checked against a strict pattern and every
value travels as a template parameter (`filter_params`), so nothing a client sends is ever
spliced into the expression text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from askmesh.runtime.errors import InvalidArgument
from askmesh.v1 import common_pb2

FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# Filters on these names use the chunk's own columns rather than its metadata.
COLUMN_FIELDS = frozenset({"document_id", "title"})


@dataclass
class MilvusFilter:
    expression: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def add_param(self, value: Any) -> str:
        name = f"p{len(self.params)}"
        self.params[name] = value
        return "{" + name + "}"


def _python_value(value: common_pb2.FilterValue, where: str) -> str | int | float | bool:
    kind = value.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(where, "has no value set")
    result: str | int | float | bool = getattr(value, kind)
    return result


def build_filter(
    filters: Sequence[common_pb2.MetadataFilter],
    *,
    max_filters: int,
    max_values: int,
    field_prefix: str = "filters",
) -> MilvusFilter:
    if len(filters) > max_filters:
        raise InvalidArgument(field_prefix, f"{len(filters)} conditions exceed the limit of {max_filters}")
    result = MilvusFilter()
    clauses: list[str] = []
    for index, condition in enumerate(filters):
        where = f"{field_prefix}[{index}]"
        if not FIELD_NAME.match(condition.field):
            raise InvalidArgument(
                f"{where}.field",
                f"{condition.field!r} is not a valid metadata key "
                "(letters, digits and _, not starting with a digit, at most 64)",
            )
        target = condition.field if condition.field in COLUMN_FIELDS else f'metadata["{condition.field}"]'
        kind = condition.WhichOneof("condition")
        if kind == "equals":
            value = _python_value(condition.equals, f"{where}.equals")
            clauses.append(f"{target} == {result.add_param(value)}")
        elif kind == "in":
            values = getattr(condition, "in").values  # `in` is a Python keyword
            if not values:
                raise InvalidArgument(f"{where}.in", "must list at least one value")
            if len(values) > max_values:
                raise InvalidArgument(f"{where}.in", f"{len(values)} values exceed the limit of {max_values}")
            # Milvus Lite rejects `json_key in [...]`, so a list is a disjunction of equalities.
            options = [
                f"{target} == {result.add_param(_python_value(v, f'{where}.in.values[{i}]'))}"
                for i, v in enumerate(values)
            ]
            clauses.append("(" + " or ".join(options) + ")")
        elif kind == "range":
            bounds = condition.range
            parts = [
                f"{target} {operator} {result.add_param(getattr(bounds, name))}"
                for name, operator in (("gt", ">"), ("gte", ">="), ("lt", "<"), ("lte", "<="))
                if bounds.HasField(name)
            ]
            if not parts:
                raise InvalidArgument(f"{where}.range", "must set at least one of gt, gte, lt, lte")
            clauses.append("(" + " and ".join(parts) + ")")
        elif kind == "exists":
            if condition.field in COLUMN_FIELDS:
                raise InvalidArgument(f"{where}.exists", f"{condition.field} always exists")
            clauses.append(f"{target} is not null" if condition.exists else f"{target} is null")
        else:
            raise InvalidArgument(where, "must set one condition: equals, in, range or exists")
    result.expression = " and ".join(clauses)
    return result
