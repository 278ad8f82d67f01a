"""OpenAI's Chat Completions and Embeddings, translated to and from askmesh's public API; pure
functions and one small state machine, testable without gRPC or HTTP.

- A chat request becomes an AskRequest: `model` names the knowledge base, the last message (the
  user's) is the question, the user and assistant messages before it are the history (the newest
  that fit the gateway's limits), and max_tokens / temperature / top_p / stop / seed are Ask's
  GenerationParameters. System messages are left out: the gateway's own instructions tell the
  model to answer from the sources only.
- An Ask stream becomes `chat.completion.chunk`s: the first carries the role and, in the
  extension field `sources`, the numbered citations (the same fields as the gRPC API's
  Citation), then one chunk per token delta, then the finish reason, then (with
  stream_options.include_usage) a chunk with the usage, then `data: [DONE]`. While the question
  waits in the generator's line, `: queued {...}` comment lines say where it stands: Server-Sent
  Events clients ignore comments.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

from askmesh.client import TERMINAL_TASK_STATES, enum_word
from askmesh.runtime.errors import AskmeshError, InvalidArgument, NotFound, shown
from askmesh.v1 import common_pb2, embedder_pb2, gateway_pb2, ingestion_pb2, knowledge_pb2
from services.web.errors import error_body, error_field
from services.web.schemas import ChatCompletionRequest, EmbeddingsRequest

DONE_EVENT = b"data: [DONE]\n\n"
_FINISH_REASONS = {
    common_pb2.FINISH_REASON_EOS: "stop",
    common_pb2.FINISH_REASON_STOP_SEQUENCE: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
}
_ROLES = {"user": common_pb2.ROLE_USER, "assistant": common_pb2.ROLE_ASSISTANT}
# Ask's field names in the gateway's messages, and the OpenAI fields they come from.
OPENAI_FIELDS = {
    "knowledge_base": "model",
    "parameters.max_new_tokens": "max_tokens",
    "parameters.temperature": "temperature",
    "parameters.top_p": "top_p",
    "parameters.stop": "stop",
    "parameters.seed": "seed",
    "texts": "input",
}


@dataclass(frozen=True)
class HistoryLimits:
    messages: int
    chars: int


@dataclass
class AskTranslation:
    """An AskRequest, and where each of its fields came from in the chat request."""

    request: gateway_pb2.AskRequest
    fields: dict[str, str] = field(default_factory=dict)


def ask_request(body: ChatCompletionRequest, limits: HistoryLimits) -> AskTranslation:
    """The Ask for a chat request; InvalidArgument naming the OpenAI field when it has none."""
    turns: list[tuple[int, str, str]] = []  # (index in messages, role, text)
    for index, message in enumerate(body.messages):
        if message.role in ("tool", "function"):
            raise InvalidArgument(f"messages[{index}].role", f"{message.role!r} messages are not supported: askmesh calls no tools")
        if message.role in _ROLES:
            turns.append((index, message.role, message.content))
    if not turns or turns[-1][1] != "user" or turns[-1][0] != len(body.messages) - 1:
        last = len(body.messages) - 1
        raise InvalidArgument(f"messages[{last}]", "the last message must be the user's question")
    question_index, _, question = turns[-1]
    history: list[tuple[int, str, str]] = []
    chars = 0
    for turn in reversed(turns[:-1]):  # the newest turns that fit
        if len(history) == limits.messages or chars + len(turn[2]) > limits.chars:
            break
        history.insert(0, turn)
        chars += len(turn[2])
    # The gateway's history starts with a question, as a conversation does.
    while history and history[0][1] != "user":
        history.pop(0)
    parameters = common_pb2.GenerationParameters(stop=body.stop or [])
    if body.answer_tokens is not None:
        parameters.max_new_tokens = body.answer_tokens
    if body.temperature is not None:
        parameters.temperature = body.temperature
    if body.top_p is not None:
        parameters.top_p = body.top_p
    if body.seed is not None:
        parameters.seed = body.seed
    request = gateway_pb2.AskRequest(
        question=question,
        knowledge_base=body.model,
        history=[common_pb2.ChatMessage(role=_ROLES[role], content=text) for _, role, text in history],
        parameters=parameters,
    )
    fields = {"question": f"messages[{question_index}].content", "history": "messages"}
    for position, (index, _, _) in enumerate(history):
        fields[f"history[{position}]"] = f"messages[{index}]"
    return AskTranslation(request, fields)


def for_caller(error: AskmeshError, model: str, fields: dict[str, str] | None = None) -> tuple[AskmeshError, str | None]:
    """The gateway's error with the OpenAI request's field names (and an OpenAI error code): an
    unknown or impossible knowledge base is OpenAI's unknown model, 404 `model_not_found`."""
    renames = {**OPENAI_FIELDS, **(fields or {})}
    named = error_field(error.message)
    if named is None:
        return error, None
    for ask_field in sorted(renames, key=len, reverse=True):
        if named == ask_field or named.startswith((f"{ask_field}.", f"{ask_field}[")):
            named = renames[ask_field] + named[len(ask_field):]
            break
    if named == "model" and error.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
        message = f"model: {shown(model)} does not exist; GET /v1/models lists the knowledge bases this key can ask"
        return NotFound(message), "model_not_found"
    _, _, problem = error.message.partition(": ")
    return AskmeshError(f"{named}: {problem}", code=error.code, retry_after_s=error.retry_after_s), None


def _plain(value: Any) -> Any:
    """A Struct value for JSON: whole numbers as integers (a page is 3, not 3.0)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def citation_json(citation: gateway_pb2.Citation) -> dict[str, Any]:
    """One source, with the gRPC API's Citation fields: `number` is what `[n]` in the text cites."""
    return {
        "number": citation.number,
        "document_id": citation.document_id,
        "title": citation.title,
        "text": citation.text,
        "score": round(citation.score, 6),
        "chunk_id": citation.chunk_id,
        "chunk_index": citation.chunk_index,
        "in_prompt": citation.in_prompt,
        "metadata": _plain(json_format.MessageToDict(citation.metadata)),
    }


def usage_json(usage: common_pb2.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def sse_comment(text: str) -> bytes:
    """A comment line: Server-Sent Events clients ignore it (askmesh's page reads it)."""
    return b": " + text.replace("\n", " ").encode() + b"\n\n"


class Answer:
    """One answer as OpenAI's completion: fed the Ask stream's messages in order, it renders
    each as Server-Sent Events (`events`) or, at the end, the whole completion (`completion`)."""

    def __init__(self, model: str, include_usage: bool = False) -> None:
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.sources: list[dict[str, Any]] = []
        self.text: list[str] = []
        self.done: gateway_pb2.AskDone | None = None
        self._opened = False

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            **extra,
        }
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI: every chunk but the last has usage null
        return chunk

    def _opening(self) -> list[bytes]:
        """The first chunk, once: the role and the sources (before any token)."""
        if self._opened:
            return []
        self._opened = True
        return [sse(self._chunk({"role": "assistant", "content": ""}, sources=self.sources))]

    def events(self, message: gateway_pb2.AskResponse) -> list[bytes]:
        kind = message.WhichOneof("event")
        if kind == "queued":
            where = {"position": message.queued.position, "estimated_wait_ms": round(message.queued.estimated_wait_ms)}
            return [sse_comment(f"queued {json.dumps(where)}")]
        if kind == "sources":
            self.sources = [citation_json(c) for c in message.sources.citations]
            return self._opening()
        if kind == "delta":
            self.text.append(message.delta.text)
            return [*self._opening(), sse(self._chunk({"content": message.delta.text}))]
        if kind == "done":
            self.done = message.done
            events = [*self._opening(), sse(self._chunk({}, self.finish_reason))]
            if self.include_usage:
                events.append(sse({**self._chunk({}), "choices": [], "usage": usage_json(self.done.usage)}))
            return [*events, DONE_EVENT]
        return []

    @property
    def finish_reason(self) -> str:
        assert self.done is not None
        return _FINISH_REASONS.get(self.done.finish_reason, "stop")

    def completion(self) -> dict[str, Any]:
        """The whole answer as a `chat.completion` (after every message was fed to `events`)."""
        assert self.done is not None, "the answer is not done"
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(self.text), "refusal": None},
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": usage_json(self.done.usage),
            "sources": self.sources,
        }


def error_event(error: AskmeshError, code: str | None = None) -> bytes:
    """A failure after the stream began: OpenAI's error object as an event (the SDK raises it);
    no `[DONE]` follows, so a client can tell a cut answer from a finished one."""
    return sse(error_body(error, code))


# -- embeddings and models -----------------------------------------------------------------------


def embed_request(body: EmbeddingsRequest) -> gateway_pb2.EmbedTextsRequest:
    return gateway_pb2.EmbedTextsRequest(knowledge_base=body.model, texts=body.input)


def embeddings_json(body: EmbeddingsRequest, response: embedder_pb2.EmbedResponse) -> dict[str, Any]:
    """OpenAI's embeddings list; with `encoding_format: base64`, each vector's little-endian
    float32 bytes in base64 (what the `openai` SDK asks for by default, and decodes)."""
    if body.dimensions is not None and body.dimensions != response.dimension:
        raise InvalidArgument(
            "dimensions", f"{body.dimensions} cannot be given: this knowledge base's model makes vectors of {response.dimension}"
        )
    data = []
    for index, embedding in enumerate(response.embeddings):
        vector: Any = list(embedding.values)
        if body.encoding_format == "base64":
            vector = base64.b64encode(np.asarray(embedding.values, dtype="<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": response.token_count, "total_tokens": response.token_count},
    }


def model_json(knowledge_base: knowledge_pb2.KnowledgeBase) -> dict[str, Any]:
    return {"id": knowledge_base.name, "object": "model", "created": knowledge_base.created_at.seconds, "owned_by": "askmesh"}


def models_json(knowledge_bases: list[knowledge_pb2.KnowledgeBase]) -> dict[str, Any]:
    return {"object": "list", "data": [model_json(kb) for kb in knowledge_bases]}


# -- the page's own JSON -------------------------------------------------------------------------

def task_json(task: ingestion_pb2.Task) -> dict[str, Any]:
    """An ingestion task for the page: its state and stage as words, its progress, and whether
    it has ended."""
    progress = task.progress
    return {
        "id": task.id,
        "knowledge_base": task.knowledge_base,
        "document_id": task.document_id,
        "file_name": task.file_name,
        "state": enum_word(ingestion_pb2.TaskState, task.state, "TASK_STATE_"),
        "stage": enum_word(ingestion_pb2.TaskStage, task.stage, "TASK_STAGE_"),
        "progress": {
            "bytes": progress.bytes,
            "documents_total": progress.documents_total,
            "documents_done": progress.documents_done,
            "chunks_total": progress.chunks_total,
            "chunks_stored": progress.chunks_stored,
        },
        "error": task.error,
        "attempts": task.attempts,
        "max_attempts": task.max_attempts,
        "ended": task.state in TERMINAL_TASK_STATES,
    }
