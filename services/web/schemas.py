"""The request bodies of the OpenAI-compatible API, as OpenAI's clients send them.

Fields askmesh does not use are ignored (clients send many: `user`, `presence_penalty`, ...), so
any OpenAI client works; a field whose value askmesh cannot honour (n > 1, tools, image parts,
token arrays) is refused with a message that names it. Value ranges (temperature, top_p,
max_tokens, stop sequences) are the gateway's to check: its messages come back with the OpenAI
field's name (see engine.OPENAI_FIELDS).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


def _text_of(content: Any) -> str:
    """A message's content as text: a string, or a list of text parts (newer clients)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError("must be a string or a list of text parts")
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            shown = kind if isinstance(kind, str) else "not a text part"
            raise ValueError(f"part {index} is {shown!r}: askmesh reads text parts only")
        texts.append(part["text"])
    return "\n".join(texts)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str = ""

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> str:
        return _text_of(value)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # A knowledge base of the caller's tenant (GET /v1/models lists them).
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    # OpenAI's newer name for max_tokens; either may be sent.
    max_completion_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=UINT64_MAX)
    n: int | None = None
    tools: list[Any] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if value is None or (isinstance(value, list) and all(isinstance(item, str) for item in value)):
            return value
        raise ValueError("must be a string or a list of strings")

    @field_validator("n")
    @classmethod
    def _one_answer(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("must be 1: askmesh writes one answer per request")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("askmesh answers from its knowledge base and calls no tools")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def answer_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # A knowledge base: the texts are embedded as its chunks and questions are.
    model: str = Field(min_length=1)
    input: list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value and all(isinstance(item, (int, list)) for item in value):
            raise ValueError("token arrays are not supported; send the text")
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        raise ValueError("must be a string or a list of strings")


def problem(error: ValidationError) -> tuple[str, str]:
    """The first thing wrong with a body, as (field, one sentence naming it): `messages[0].role:
    Input should be 'system', ...`."""
    first = error.errors(include_url=False)[0]
    field = ""
    for part in first["loc"]:
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "missing":
        message = "is required"
    return field or "body", f"{field or 'body'}: {message}"
