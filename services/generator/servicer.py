"""gRPC edge of the generator: validation and status codes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from askmesh.runtime.errors import InvalidArgument, Unavailable, streaming_rpc, unary_rpc
from askmesh.runtime.validation import check_count, check_generation_parameters
from askmesh.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from services.generator.config import GeneratorSettings
from services.generator.engine import GenerationEngine



def validate_messages(messages: list[common_pb2.ChatMessage], settings: GeneratorSettings) -> None:
    check_count("messages", len(messages), settings.max_messages, minimum=1)
    total = 0
    for index, message in enumerate(messages):
        if message.role == common_pb2.ROLE_UNSPECIFIED or message.role not in common_pb2.Role.values():
            raise InvalidArgument(f"messages[{index}].role", "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
        if not message.content.strip():
            raise InvalidArgument(f"messages[{index}].content", "is empty")
        total += len(message.content)
    if total > settings.max_prompt_chars:
        raise InvalidArgument("messages", f"{total} characters in all exceed the limit of {settings.max_prompt_chars}")


def validate_parameters(
    parameters: common_pb2.GenerationParameters, settings: GeneratorSettings, field: str = "parameters"
) -> None:
    check_generation_parameters(
        parameters,
        max_new_tokens=settings.max_new_tokens_limit,
        max_stop_sequences=settings.max_stop_sequences,
        field=field,
    )


class GeneratorServicer(generator_pb2_grpc.GeneratorServicer):
    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine

    @streaming_rpc(lambda error: generator_pb2.GenerateResponse(error=error))
    async def Generate(
        self, request: generator_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generator_pb2.GenerateResponse]:
        validate_messages(list(request.messages), self.engine.settings)
        validate_parameters(request.parameters, self.engine.settings)
        async for response in self.engine.generate(request):
            yield response

    @unary_rpc
    async def GetModel(self, request: common_pb2.GetModelRequest, context: grpc.aio.ServicerContext) -> common_pb2.ModelInfo:
        return self.engine.models.info()

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
        return await self.engine.models.swap(request.model_path, request.model_name.strip())
