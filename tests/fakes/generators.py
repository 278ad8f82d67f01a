"""Stand-ins for the generator tier in the gateway's and the generator's own tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from askmesh.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from services.generator.backends.base import FinishEvent, GenerationInput, TokenEvent


class GatedBackend:
    """A generation backend whose generations wait for the test to let them finish, so a test
    can hold the generator's only slot as long as it needs (admission logic only, no model)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0
        self.prompts: list[list[dict[str, str]]] = []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def generate(self, request: GenerationInput) -> AsyncIterator[object]:
        self.started += 1
        self.prompts.append(request.messages)
        yield TokenEvent("x")
        await self.release.wait()
        yield FinishEvent(reason=common_pb2.FINISH_REASON_EOS, completion_tokens=1)


class ScriptedGenerator(generator_pb2_grpc.GeneratorServicer):
    """A generator servicer that admits every call at once and answers with `answer()`: for
    testing how the gateway handles what a generator sends."""

    async def answer(
        self, request: generator_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generator_pb2.GenerateResponse]:
        raise NotImplementedError
        yield  # an async generator

    async def AdmitAndGenerate(
        self, request_iterator: AsyncIterator[generator_pb2.AdmitAndGenerateRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generator_pb2.GenerateResponse]:
        requests = request_iterator.__aiter__()
        await anext(requests)  # the admission
        yield generator_pb2.GenerateResponse(queued=common_pb2.QueueStatus(position=0))
        prompt = (await anext(requests)).generate
        used = list(range(len(prompt.passages)))
        yield generator_pb2.GenerateResponse(started=generator_pb2.GenerateStarted(passages_used=used))
        async for response in self.answer(prompt, context):
            yield response
