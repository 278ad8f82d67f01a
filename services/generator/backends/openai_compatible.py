"""Any OpenAI-compatible `/v1/chat/completions` server (vLLM, llama.cpp server, TGI's Messages API).

The server applies the model's chat template and trims stop sequences itself, so messages go
as they are and deltas come back ready to show. Each content goes as a message's `content`,
never spliced into a template string here: vLLM and llama.cpp's server render the template from
the structured messages (and tokenize the contents as text, not special tokens, by default).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import openai
from openai.types.chat import ChatCompletionChunk

from askmesh.runtime.errors import AskmeshError, InvalidArgument, ResourceExhausted, Unavailable
from askmesh.v1 import common_pb2
from services.generator.backends.base import (
    BackendEvent,
    FinishEvent,
    GenerationInput,
    TokenEvent,
    estimated_tokens,
    warm_up,
)
from services.generator.config import GeneratorSettings

log = logging.getLogger(__name__)


class OpenAICompatibleBackend:
    def __init__(self, settings: GeneratorSettings) -> None:
        self.settings = settings
        self._client = openai.AsyncOpenAI(
            base_url=settings.url.rstrip("/") + "/v1",
            api_key=settings.api_key or "not-needed",  # the client insists on one; local servers ignore it
            timeout=settings.request_timeout_s,
            max_retries=0,  # the caller (and Envoy) decide about retries, not a hidden loop here
        )

    async def start(self) -> None:
        await warm_up(self)

    async def close(self) -> None:
        await self._client.close()

    def count_tokens(self, text: str) -> int:
        return estimated_tokens(text, self.settings.chars_per_token)

    async def generate(self, request: GenerationInput) -> AsyncIterator[BackendEvent]:
        deltas, reason, usage = 0, None, None
        async with contextlib.aclosing(self._chunks(request)) as chunks:
            async for chunk in chunks:
                usage = chunk.usage or usage
                if not chunk.choices:  # the usage chunk of stream_options.include_usage
                    continue
                choice = chunk.choices[0]
                if choice.delta and choice.delta.content:
                    deltas += 1
                    yield TokenEvent(choice.delta.content)
                if choice.finish_reason is not None:
                    reason = self._finish_reason(choice)
        if reason is None:
            raise Unavailable("generator: the OpenAI-compatible server ended the stream without a finish reason")
        yield FinishEvent(
            reason=reason,
            # Without usage (a server that ignores include_usage) deltas are the best estimate.
            completion_tokens=usage.completion_tokens if usage else deltas,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            # vLLM (with prefix caching) and others report the prompt tokens served from cache.
            cached_prompt_tokens=_cached_tokens(usage),
        )

    def _finish_reason(self, choice: Any) -> common_pb2.FinishReason.ValueType:
        if choice.finish_reason == "length":
            return common_pb2.FINISH_REASON_LENGTH
        if choice.finish_reason == "abort":  # vLLM gave up on the request (e.g. it is shutting down)
            raise Unavailable("generator: the OpenAI-compatible server aborted the generation")
        # vLLM says which stop ended it: a string is one of our stop sequences, a token id (or
        # nothing) is the model's end of turn. Servers without stop_reason report EOS.
        if isinstance(getattr(choice, "stop_reason", None), str):
            return common_pb2.FINISH_REASON_STOP_SEQUENCE
        return common_pb2.FINISH_REASON_EOS

    def _arguments(self, request: GenerationInput) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "model": self.settings.remote_model or "default",
            "messages": request.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": request.max_new_tokens,
            "temperature": request.temperature,  # 0 is greedy on vLLM and llama.cpp
            "top_p": request.top_p,
        }
        if request.stop:
            arguments["stop"] = request.stop
        if request.seed is not None:
            arguments["seed"] = request.seed
        return arguments

    async def _chunks(self, request: GenerationInput) -> AsyncIterator[ChatCompletionChunk]:
        """The stream's chunks, with openai's errors turned into ours.

        Leaving early closes the stream, which closes the connection: the server notices and
        stops generating.
        """
        try:
            stream = await self._client.chat.completions.create(**self._arguments(request))
            async with stream:
                async for chunk in stream:
                    yield chunk
        except openai.APIError as error:
            raise self._error(error) from error

    def _error(self, error: openai.APIError) -> AskmeshError:
        """The failure in the generator's words. The server's address stays in the log: callers
        of the mesh learn what failed, not where the backend lives."""
        log.warning("[BACKEND] %s: %s", self.settings.url, error)
        server = "the OpenAI-compatible server"
        detail = _detail(error)
        if isinstance(error, openai.RateLimitError):
            return ResourceExhausted(f"generator: {server} is overloaded: {detail}")
        if isinstance(error, (openai.BadRequestError, openai.UnprocessableEntityError)):
            return InvalidArgument("parameters", f"{server} rejected the request: {detail}")
        if isinstance(error, openai.APITimeoutError):
            return Unavailable(f"generator: {server} timed out")
        if isinstance(error, openai.APIConnectionError):
            cause = error.__cause__  # the httpx error says what actually failed
            return Unavailable(f"generator: {server} is unreachable ({type(cause).__name__ if cause else 'no connection'})")
        if isinstance(error, openai.APIStatusError):
            return Unavailable(f"generator: {server} answered HTTP {error.status_code}: {detail}")
        return Unavailable(f"generator: {server} failed during generation: {detail}")


def _cached_tokens(usage: Any) -> int:
    details = getattr(usage, "prompt_tokens_details", None)
    return int(getattr(details, "cached_tokens", None) or 0)


def _detail(error: openai.APIError) -> str:
    """The server's own message (openai's str() wraps it in "Error code: ... - {body}")."""
    body = error.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return error.message
