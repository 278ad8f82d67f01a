"""A text-generation-inference (TGI) server's `/generate_stream`, through huggingface_hub.

Two things in huggingface_hub's AsyncInferenceClient get in the way of a self-hosted TGI:

- its HTTP client refuses every request when HF_HUB_OFFLINE is set, our own TGI included, and
  the mesh sets it for every service so that nothing downloads from the Hub at run time;
- it parks each streamed response on the client's exit stack and closes it only with the
  client, so a long-lived client would leave a generation the caller abandoned running on TGI.

So every generation gets its own AsyncInferenceClient, closed (with its response: TGI sees the
socket go and stops) when the generation ends, and all of them share one plain httpx client,
which keeps connections alive and costs ~20 ms of TLS setup to make.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx2  # huggingface_hub's HTTP stack; its transport errors reach us unwrapped
from huggingface_hub import AsyncInferenceClient, TextGenerationStreamOutput
from huggingface_hub.errors import (
    HfHubHTTPError,
    InferenceTimeoutError,
    OverloadedError,
    TextGenerationError,
)
from huggingface_hub.errors import ValidationError as TgiValidationError

from askmesh.runtime.errors import AskmeshError, InvalidArgument, ResourceExhausted, Unavailable
from askmesh.v1 import common_pb2
from services.generator.backends.base import (
    warm_up,
    CHATML_STOP,
    BackendEvent,
    FinishEvent,
    GenerationInput,
    StopSequenceMatcher,
    TokenEvent,
    chatml_prompt,
    estimated_tokens,
)
from services.generator.config import GeneratorSettings

log = logging.getLogger(__name__)

_FINISH_REASONS = {
    "length": common_pb2.FINISH_REASON_LENGTH,
    "eos_token": common_pb2.FINISH_REASON_EOS,
    "stop_sequence": common_pb2.FINISH_REASON_STOP_SEQUENCE,
}


class _OneGenerationClient(AsyncInferenceClient):
    """An AsyncInferenceClient on a shared httpx client that it uses but does not own or close."""

    def __init__(self, http: httpx2.AsyncClient, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._shared_http = http

    async def _get_async_client(self) -> httpx2.AsyncClient:
        return self._shared_http


async def _read_error_body(response: httpx2.Response) -> None:
    # huggingface_hub builds its errors from the body, which a streamed response has not read yet.
    if response.status_code >= 400:
        await response.aread()


class TgiBackend:
    def __init__(self, settings: GeneratorSettings) -> None:
        self.settings = settings
        self._endpoint = settings.url.rstrip("/") + "/generate_stream"
        self._http = httpx2.AsyncClient(
            timeout=settings.request_timeout_s, event_hooks={"response": [_read_error_body]}
        )

    async def start(self) -> None:
        await warm_up(self)

    async def close(self) -> None:
        await self._http.aclose()

    def count_tokens(self, text: str) -> int:
        return estimated_tokens(text, self.settings.chars_per_token)

    async def generate(self, request: GenerationInput) -> AsyncIterator[BackendEvent]:
        stops = list(dict.fromkeys([*request.stop, CHATML_STOP]))
        # TGI streams the tokens that make up a stop sequence; the caller must not see them.
        matcher = StopSequenceMatcher(stops)
        seen, visible, stopped, details = 0, "", False, None
        async with contextlib.aclosing(self._stream(request, stops)) as outputs:
            async for output in outputs:
                seen += 1
                if not output.token.special:  # e.g. the end-of-sequence token's "<|im_end|>"
                    visible += output.token.text
                    text, stopped = matcher.feed(output.token.text)
                    if text:
                        yield TokenEvent(text)
                details = output.details or details
                if stopped or details is not None:
                    break
        if stopped:
            reason = _stop_reason(visible, request.stop)
        elif details is not None:
            reason = _FINISH_REASONS.get(details.finish_reason, common_pb2.FINISH_REASON_LENGTH)
            if rest := matcher.flush():
                yield TokenEvent(rest)
        else:
            raise Unavailable("generator: TGI ended the stream without a finish reason")
        yield FinishEvent(
            reason=reason,
            completion_tokens=(details.generated_tokens if details else 0) or seen,
            # input_length: TGI >= 2.1 reports the prompt's token count on the last event.
            prompt_tokens=(details.input_length if details else 0) or 0,
        )

    def _parameters(self, request: GenerationInput, stops: list[str]) -> dict[str, Any]:
        parameters: dict[str, Any] = {"max_new_tokens": request.max_new_tokens, "stop": stops, "seed": request.seed}
        if request.temperature <= 0:
            # Greedy. TGI rejects temperature 0, and any sampling parameter (top_p included)
            # would switch it to sampling.
            parameters["do_sample"] = False
        else:
            parameters.update(do_sample=True, temperature=request.temperature)
            if request.top_p < 1.0:  # TGI rejects top_p == 1.0, which means no nucleus cut anyway
                parameters["top_p"] = request.top_p
        return parameters

    async def _stream(self, request: GenerationInput, stops: list[str]) -> AsyncIterator[TextGenerationStreamOutput]:
        """TGI's stream events, with huggingface_hub's and httpx's errors turned into ours."""
        try:
            async with _OneGenerationClient(
                self._http,
                model=self._endpoint,
                token=self.settings.api_key or None,
                timeout=self.settings.request_timeout_s,
            ) as client:
                outputs = await client.text_generation(
                    chatml_prompt(request.messages), stream=True, details=True, **self._parameters(request, stops)
                )
                async with contextlib.aclosing(outputs) as events:
                    async for event in events:
                        yield event
        except (httpx2.HTTPError, json.JSONDecodeError) as error:
            raise self._error(error) from error

    def _error(self, error: Exception) -> AskmeshError:
        """The failure in the generator's words. TGI's address (which httpx's and the hub's
        messages carry) stays in the log: callers learn what failed, not where TGI lives."""
        log.warning("[BACKEND] TGI at %s: %s: %s", self.settings.url, type(error).__name__, error)
        if isinstance(error, OverloadedError):
            return ResourceExhausted(f"generator: TGI is overloaded: {error}")
        if isinstance(error, TgiValidationError):
            return InvalidArgument("parameters", f"TGI rejected the request: {error}")
        if isinstance(error, TextGenerationError):  # generation, incomplete_generation, unknown
            return Unavailable(f"generator: TGI failed during generation: {error}")
        if isinstance(error, HfHubHTTPError):
            status, detail = error.response.status_code, error.server_message or error.response.reason_phrase
            if status == 429:
                return ResourceExhausted(f"generator: TGI is overloaded: {detail}")
            if status in (400, 422):
                return InvalidArgument("parameters", f"TGI rejected the request: {detail}")
            return Unavailable(f"generator: TGI answered HTTP {status}: {detail}")
        if isinstance(error, (InferenceTimeoutError, httpx2.TimeoutException)):
            return Unavailable("generator: TGI timed out")
        if isinstance(error, json.JSONDecodeError):
            return Unavailable(f"generator: TGI sent an unreadable event: {error}")
        return Unavailable(f"generator: TGI is unreachable ({type(error).__name__})")


def _stop_reason(visible: str, requested: list[str]) -> common_pb2.FinishReason.ValueType:
    """The ChatML end-of-turn marker we add ourselves means the model finished: EOS, not a stop sequence."""
    positions = {stop: visible.find(stop) for stop in {*requested, CHATML_STOP} if stop and stop in visible}
    first = min(positions, key=lambda stop: positions[stop])
    if first == CHATML_STOP and CHATML_STOP not in requested:
        return common_pb2.FINISH_REASON_EOS
    return common_pb2.FINISH_REASON_STOP_SEQUENCE
