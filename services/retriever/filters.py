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

from askmesh.runtime.errors import InvalidArgument, shown
from askmesh.runtime.validation import MAX_DECLARED_STRING
from askmesh.v1 import common_pb2

FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# Filters on these names use the chunk's own columns rather than its metadata.
COLUMN_FIELDS = frozenset({"document_id", "title"})
# Declared metadata fields live in typed columns named with this prefix.
DECLARED_PREFIX = "m_"
_KINDS_FOR_TYPE: dict[int, tuple[str, ...]] = {
    common_pb2.METADATA_TYPE_STRING: ("string_value",),
    common_pb2.METADATA_TYPE_INT: ("int_value",),
    common_pb2.METADATA_TYPE_FLOAT: ("double_value", "int_value"),
    common_pb2.METADATA_TYPE_BOOL: ("bool_value",),
}


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
    if len(value) > MAX_DECLARED_STRING:  # longer than any metadata string stored: matches nothing
        raise InvalidArgument(where, f"is longer than {MAX_DECLARED_STRING} characters")
    if any(ord(c) < 0x20 for c in value):
        raise InvalidArgument(where, "contains control characters")
    # A double-quoted literal with \ and \" escaped: the value cannot end the string early.
    return json.dumps(value, ensure_ascii=False)


def _value_literal(value: common_pb2.FilterValue, where: str, declared: int | None = None) -> str:
    kind = value.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(where, "has no value set")
    if declared is not None and kind not in _KINDS_FOR_TYPE[declared]:
        expected = common_pb2.MetadataType.Name(declared).removeprefix("METADATA_TYPE_").lower()
        raise InvalidArgument(where, f"is a {kind.removesuffix('_value')}, but the field is declared {expected}")
    return literal(getattr(value, kind), where)


def build_filter(
    filters: Sequence[common_pb2.MetadataFilter],
    *,
    max_filters: int,
    max_values: int,
    schema: dict[str, int] | None = None,
    field_prefix: str = "filters",
) -> str:
    """The Milvus expression for `filters` ANDed together ("" for none).

    Keys the knowledge base declares (`schema`: name -> MetadataType) use their typed column and
    must get values of that type; other keys are looked up in the metadata JSON (slower)."""
    schema = schema or {}
    if len(filters) > max_filters:
        raise InvalidArgument(field_prefix, f"{len(filters)} conditions exceed the limit of {max_filters}")
    clauses: list[str] = []
    for index, condition in enumerate(filters):
        where = f"{field_prefix}[{index}]"
        if not FIELD_NAME.match(condition.field):
            raise InvalidArgument(
                f"{where}.field",
                f"{shown(condition.field)} is not a valid metadata key "
                "(letters, digits and _, not starting with a digit, at most 64)",
            )
        declared = schema.get(condition.field)
        if condition.field in COLUMN_FIELDS:
            target = condition.field
        elif declared is not None:
            target = DECLARED_PREFIX + condition.field
        else:
            target = f'metadata["{condition.field}"]'
        kind = condition.WhichOneof("condition")
        if kind == "equals":
            clauses.append(f"{target} == {_value_literal(condition.equals, f'{where}.equals', declared)}")
        elif kind == "in":
            values = getattr(condition, "in").values  # `in` is a Python keyword
            if not values:
                raise InvalidArgument(f"{where}.in", "must list at least one value")
            if len(values) > max_values:
                raise InvalidArgument(f"{where}.in", f"{len(values)} values exceed the limit of {max_values}")
            literals = [_value_literal(v, f"{where}.in.values[{i}]", declared) for i, v in enumerate(values)]
            if target.startswith("metadata["):
                # Milvus Lite rejects `json_key in [...]`, so a list is a disjunction of equalities.
                clauses.append("(" + " or ".join(f"{target} == {value}" for value in literals) + ")")
            else:
                clauses.append(f"{target} in [{', '.join(literals)}]")
        elif kind == "range":
            bounds = condition.range
            if declared in (common_pb2.METADATA_TYPE_STRING, common_pb2.METADATA_TYPE_BOOL):
                raise InvalidArgument(f"{where}.range", "applies to int and float fields only")
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
