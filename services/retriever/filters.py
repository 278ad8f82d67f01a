"""Structured metadata filters to Milvus boolean expressions.

Clients never send an expression. Field names are checked against a strict pattern, and every
value is rendered here as a typed literal (strings quoted and escaped, numbers checked finite),
so nothing a client sends can change the expression's structure. Milvus Lite does not accept
expression templates (`filter_params`), which would otherwise be the tool for this.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

from askmesh.runtime.errors import InvalidArgument
from askmesh.v1 import common_pb2

FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# Filters on these names use the chunk's own columns rather than its metadata.
COLUMN_FIELDS = frozenset({"document_id", "title"})


MAX_STRING_VALUE = 1024


def literal(value: str | int | float | bool, where: str) -> str:
    """`value` as a Milvus expression literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgument(where, "must be a finite number")
        return repr(value)
    if len(value) > MAX_STRING_VALUE:
        raise InvalidArgument(where, f"is longer than {MAX_STRING_VALUE} characters")
    if any(ord(c) < 0x20 for c in value):
        raise InvalidArgument(where, "contains control characters")
    # A double-quoted literal with \ and \" escaped: the value cannot end the string early.
    return json.dumps(value, ensure_ascii=False)


def _value_literal(value: common_pb2.FilterValue, where: str) -> str:
    kind = value.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(where, "has no value set")
    return literal(getattr(value, kind), where)


def build_filter(
    filters: Sequence[common_pb2.MetadataFilter],
    *,
    max_filters: int,
    max_values: int,
    field_prefix: str = "filters",
) -> str:
    """The Milvus expression for `filters` ANDed together ("" for none)."""
    if len(filters) > max_filters:
        raise InvalidArgument(field_prefix, f"{len(filters)} conditions exceed the limit of {max_filters}")
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
            clauses.append(f"{target} == {_value_literal(condition.equals, f'{where}.equals')}")
        elif kind == "in":
            values = getattr(condition, "in").values  # `in` is a Python keyword
            if not values:
                raise InvalidArgument(f"{where}.in", "must list at least one value")
            if len(values) > max_values:
                raise InvalidArgument(f"{where}.in", f"{len(values)} values exceed the limit of {max_values}")
            # Milvus Lite rejects `json_key in [...]`, so a list is a disjunction of equalities.
            options = [
                f"{target} == {_value_literal(v, f'{where}.in.values[{i}]')}"
                for i, v in enumerate(values)
            ]
            clauses.append("(" + " or ".join(options) + ")")
        elif kind == "range":
            bounds = condition.range
            parts = [
                f"{target} {operator} {literal(getattr(bounds, name), f'{where}.range.{name}')}"
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
    return " and ".join(clauses)
