"""gRPC edge of the generator: validation and status codes."""

from __future__ import annotations

import contextlib
import asyncio
from collections.abc import AsyncIterator

import grpc

from askmesh.runtime.auth import CALLER_HEADER, header
from askmesh.runtime.errors import InvalidArgument, Unavailable, streaming_rpc, unary_rpc
from askmesh.runtime.validation import check_count, check_generation_parameters, check_text, check_title
from askmesh.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from services.generator.config import GeneratorSettings
from services.generator.engine import GenerationEngine



def validate_messages(messages: list[common_pb2.ChatMessage], settings: GeneratorSettings, field: str = "messages") -> None:
    check_count(field, len(messages), settings.max_messages, minimum=1)
    total = 0
    for index, message in enumerate(messages):
        if message.role == common_pb2.ROLE_UNSPECIFIED or message.role not in common_pb2.Role.values():
            raise InvalidArgument(f"{field}[{index}].role", "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
        if not message.content.strip():
            raise InvalidArgument(f"{field}[{index}].content", "is empty")
        total += len(message.content)
    if total > settings.max_prompt_chars:
        raise InvalidArgument(field, f"{total} characters in all exceed the limit of {settings.max_prompt_chars}")


def validate_parameters(
    parameters: common_pb2.GenerationParameters, settings: GeneratorSettings, field: str = "parameters"
) -> None:
    check_generation_parameters(
        parameters,
        max_new_tokens=settings.max_new_tokens_limit,
        max_stop_sequences=settings.max_stop_sequences,
        field=field,
    )


MAX_PASSAGES = 64


def validate_request(request: generator_pb2.GenerateRequest, settings: GeneratorSettings, field: str = "") -> None:
    """The whole prompt: messages, parameters, passages and their budget (`field` prefixes the
    names in messages). AdmitAndGenerate's prompt is checked with Generate's names, which are
    the names the gateway's callers know too."""
    validate_messages(list(request.messages), settings, f"{field}messages")
    validate_parameters(request.parameters, settings, f"{field}parameters")
    check_count(f"{field}passages", len(request.passages), MAX_PASSAGES)
    total = sum(len(m.content) for m in request.messages)
    for index, passage in enumerate(request.passages):
        check_text(f"{field}passages[{index}].text", passage.text, settings.max_prompt_chars)
        check_title(passage.title, f"{field}passages[{index}].title")
        total += len(passage.text)
    if total > settings.max_prompt_chars:
        raise InvalidArgument(f"{field}passages", f"{total} characters in all exceed the limit of {settings.max_prompt_chars}")
    if request.context_token_budget > settings.max_context_tokens:
        raise InvalidArgument(
            f"{field}context_token_budget",
            f"{request.context_token_budget} is out of range 1..{settings.max_context_tokens}",
        )


def call_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds left before the caller's deadline; None when it set none."""
    remaining = context.time_remaining()
    # grpc reports "no deadline" as a very large number of seconds.
    return remaining if remaining is not None and remaining < 10**8 else None


# Key ids are short; a longer header is cut so that no caller can make the line hold big strings.
MAX_CALLER_ID_CHARS = 64


def caller_of(context: grpc.aio.ServicerContext) -> str:
    """Whose question the call carries (the gateway names the key it came with; only the mesh's
    own callers reach the generator), so that the line is shared fairly between keys."""
    return (header(context.invocation_metadata(), CALLER_HEADER) or "")[:MAX_CALLER_ID_CHARS]


class GeneratorServicer(generator_pb2_grpc.GeneratorServicer):
    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine

    @streaming_rpc(lambda error: generator_pb2.GenerateResponse(error=error))
    async def Generate(
        self, request: generator_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generator_pb2.GenerateResponse]:
        validate_request(request, self.engine.settings)
        ticket = self.engine.admit(deadline_s=call_deadline(context), caller=caller_of(context))
        async with contextlib.aclosing(self.engine.run(ticket, request)) as responses:
            async for response in responses:
                yield response

    @streaming_rpc(lambda error: generator_pb2.GenerateResponse(error=error))
    async def AdmitAndGenerate(
        self,
        request_iterator: AsyncIterator[generator_pb2.AdmitAndGenerateRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[generator_pb2.GenerateResponse]:
        requests = request_iterator.__aiter__()
        first = await anext(requests, None)
        if first is None or first.WhichOneof("step") != "admission":
            raise InvalidArgument("admission", "the first message must be the admission")
        max_wait_s = first.admission.max_wait_s
        if not 0 <= max_wait_s < 10**6:
            raise InvalidArgument("admission.max_wait_s", f"{max_wait_s:g} is out of range 0..1000000")
        ticket = self.engine.admit(max_wait_s or None, call_deadline(context), caller_of(context))
        prompt = asyncio.ensure_future(self._prompt(requests))
        try:
            async with contextlib.aclosing(self.engine.run(ticket, prompt)) as responses:
                async for response in responses:
                    yield response
        finally:
            prompt.cancel()

    async def _prompt(self, requests: AsyncIterator[generator_pb2.AdmitAndGenerateRequest]) -> generator_pb2.GenerateRequest:
        second = await anext(requests, None)
        if second is None or second.WhichOneof("step") != "generate":
            raise InvalidArgument("generate", "the second message must be the prompt")
        validate_request(second.generate, self.engine.settings)
        return second.generate

    @unary_rpc
    async def GetModel(self, request: common_pb2.GetModelRequest, context: grpc.aio.ServicerContext) -> common_pb2.ModelInfo:
        return self.engine.models.info()

    @unary_rpc
    async def GetLoad(self, request: generator_pb2.GetLoadRequest, context: grpc.aio.ServicerContext) -> generator_pb2.GeneratorLoad:
        return self.engine.load()

    @unary_rpc
    async def SwapModel(
        self, request: common_pb2.SwapModelRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        if not request.model_path.strip():
            raise InvalidArgument("model_path", "is empty")
        if request.backend:
            raise InvalidArgument("backend", "is for embedders; a generator's backend is fixed by its settings")
        if request.allow_dimension_change:
            raise InvalidArgument("allow_dimension_change", "is for embedders")
        if not self.engine.ready:
            raise Unavailable("generator: model is still loading")
        return await self.engine.swap(request.model_path, request.model_name.strip())
