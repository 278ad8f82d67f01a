"""Generation with defaults, concurrency slots and timings, over any backend; no gRPC here."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from askmesh.runtime import metrics
from askmesh.runtime.errors import ResourceExhausted, Unavailable
from askmesh.v1 import common_pb2, generator_pb2
from services.generator.backends import create_backend
from services.generator.backends.base import FinishEvent, GenerationBackend, GenerationInput, TokenEvent
from services.generator.config import GeneratorSettings
from services.generator.models import ServingModels

ROLE_NAMES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
}


class GenerationEngine:
    def __init__(self, settings: GeneratorSettings, backend: GenerationBackend | None = None) -> None:
        self.settings = settings
        # The serving model, those swapped out that still finish generations, and swaps.
        self.models = ServingModels(settings, backend or create_backend(settings))
        self.slots = settings.resolved_concurrency()
        self._slots = asyncio.Semaphore(self.slots)
        self.running = 0
        self.waiting = 0
        self.refused = 0
        self.ready = False

    @property
    def backend(self) -> GenerationBackend:
        return self.models.current.backend

    @property
    def model_name(self) -> str:
        return self.models.current.name

    async def start(self) -> None:
        await self.models.start()
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        await self.models.close()

    def to_input(self, request: generator_pb2.GenerateRequest) -> GenerationInput:
        """The backend's input, with the configured defaults for unset parameters."""
        parameters = request.parameters
        return GenerationInput(
            messages=[{"role": ROLE_NAMES[m.role], "content": m.content} for m in request.messages],
            max_new_tokens=(
                parameters.max_new_tokens
                if parameters.HasField("max_new_tokens")
                else self.settings.default_max_new_tokens
            ),
            temperature=(
                parameters.temperature if parameters.HasField("temperature") else self.settings.default_temperature
            ),
            top_p=parameters.top_p if parameters.HasField("top_p") else self.settings.default_top_p,
            stop=list(parameters.stop),
            seed=parameters.seed if parameters.HasField("seed") else None,
        )

    async def generate(self, request: generator_pb2.GenerateRequest) -> AsyncIterator[generator_pb2.GenerateResponse]:
        """Token deltas, then one done message. Raises AskmeshError on failure."""
        if not self.ready:
            raise Unavailable("generator: model is still loading")
        generation_input = self.to_input(request)
        queued_at = time.perf_counter()
        if self.running + self.waiting >= self.slots + self.settings.max_queued_generations:
            self.refused += 1
            metrics.GENERATIONS_REJECTED.labels("generator").inc()
            raise ResourceExhausted(
                f"generator: {self.running} generations running and {self.waiting} waiting, the most this replica "
                "takes; try another replica or later"
            )
        self.waiting += 1
        metrics.GENERATION_QUEUE.labels("generator").inc()
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
            metrics.GENERATION_QUEUE.labels("generator").dec()
        self.running += 1
        metrics.GENERATIONS_RUNNING.labels("generator").inc()
        model = self.models.acquire()  # this generation's model, even if a swap happens meanwhile
        try:
            started_at = time.perf_counter()
            first_token_at: float | None = None
            # aclosing: a caller that leaves closes the backend's stream at once (stopping the
            # generation upstream), not whenever the garbage collector gets to it.
            async with contextlib.aclosing(model.backend.generate(generation_input)) as events:
                async for event in events:
                    if isinstance(event, TokenEvent):
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                            metrics.GENERATION_TTFT.labels("generator").observe(first_token_at - queued_at)
                        yield generator_pb2.GenerateResponse(delta=common_pb2.TokenDelta(text=event.text))
                    elif isinstance(event, FinishEvent):
                        yield self._done(event, queued_at, started_at, first_token_at, model.name)
                        return
        finally:
            self.models.release(model)
            self.running -= 1
            metrics.GENERATIONS_RUNNING.labels("generator").dec()
            self._slots.release()
        raise Unavailable("generator: the backend ended without a finish reason")

    def _done(
        self, event: FinishEvent, queued_at: float, started_at: float, first_token_at: float | None, model: str
    ) -> generator_pb2.GenerateResponse:
        finished_at = time.perf_counter()
        first = first_token_at or finished_at
        decode_seconds = finished_at - first
        tokens_per_second = (event.completion_tokens - 1) / decode_seconds if decode_seconds > 0 else 0.0
        if tokens_per_second > 0:
            metrics.GENERATION_TOKENS_PER_SECOND.labels("generator").observe(tokens_per_second)
        return generator_pb2.GenerateResponse(
            done=generator_pb2.GenerateDone(
                finish_reason=event.reason,
                usage=common_pb2.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens),
                timings=generator_pb2.GenerateTimings(
                    queue_ms=(started_at - queued_at) * 1000,
                    time_to_first_token_ms=(first - queued_at) * 1000,
                    total_ms=(finished_at - queued_at) * 1000,
                    tokens_per_second=max(tokens_per_second, 0.0),
                ),
                model=model,
            )
        )
