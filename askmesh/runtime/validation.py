"""Request checks that more than one service applies, with messages that name the field."""

from __future__ import annotations

import re

from askmesh.runtime.errors import InvalidArgument

KNOWLEDGE_BASE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def check_knowledge_base_name(name: str, field: str = "knowledge_base") -> str:
    if not KNOWLEDGE_BASE_NAME.match(name):
        raise InvalidArgument(
            field,
            f"{name!r} is not a valid knowledge base name "
            "(lowercase letters, digits and _, starting with a letter, at most 63)",
        )
    return name


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
