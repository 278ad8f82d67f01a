"""Generation with defaults, a waiting line, context passages and timings, over any backend; no
gRPC here.

A generation is admitted first (`admit`: a place in line, or a refusal at once), then run
(`run`): queued messages while it waits, `started` once it has its slot and its prompt, token
deltas, then one done message.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeAlias

from askmesh.runtime import metrics
from askmesh.runtime.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from askmesh.runtime.models import ModelRegistry
from askmesh.v1 import common_pb2, generator_pb2
from services.generator.admission import AdmissionQueue, QueueFull, Standing, Ticket
from services.generator.backends import create_backend
from services.generator.backends.base import FinishEvent, GenerationBackend, GenerationInput, TokenEvent
from services.generator.config import GeneratorSettings
from services.generator.models import ServingModel, close_model, first_model, load_model, settings_for_swap, start_model
from services.generator.prompting import PlacedPassage, fit_passages, with_context

ROLE_NAMES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
}

# What a generation's prompt is: known at once (Generate) or still on its way (AdmitAndGenerate).
Prompt: TypeAlias = generator_pb2.GenerateRequest | Awaitable[generator_pb2.GenerateRequest]


def queued_response(standing: Standing) -> generator_pb2.GenerateResponse:
    return generator_pb2.GenerateResponse(
        queued=common_pb2.QueueStatus(position=standing.position, estimated_wait_ms=standing.estimated_wait_s * 1000)
    )


def refusal(full: QueueFull) -> ResourceExhausted:
    retry = max(round(full.retry_after_s), 1)
    return ResourceExhausted(
        f"generator: {full.ahead} generations are ahead, about {full.estimated_wait_s:.0f} s of waiting, more than "
        f"the {full.limit_s:.0f} s a call may wait; try again in about {retry} s",
        retry_after_s=full.retry_after_s,
    )


class GenerationEngine:
    def __init__(self, settings: GeneratorSettings, backend: GenerationBackend | None = None) -> None:
        self.settings = settings
        # The serving model, those swapped out that still finish generations, and swaps.
        self.models: ModelRegistry[ServingModel] = ModelRegistry(
            "generator", first=first_model(settings, backend or create_backend(settings)), close_model=close_model
        )
        self.slots = settings.resolved_concurrency()
        self.queue = AdmissionQueue(self.slots, settings.max_queue_wait_s)
        self.ready = False

    @property
    def backend(self) -> GenerationBackend:
        return self.models.current.backend

    @property
    def model_name(self) -> str:
        return self.models.current.name

    @property
    def running(self) -> int:
        return len(self.queue.running)

    @property
    def waiting(self) -> int:
        return len(self.queue.waiting)

    @property
    def refused(self) -> int:
        return self.queue.refused

    async def start(self) -> None:
        await start_model(self.models.current, self.settings)
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        await self.models.close()

    async def swap(self, model_path: str, name: str = "") -> common_pb2.ModelInfo:
        """Serves another model from the next generation on (the old one keeps serving until then,
        and for good if the new one fails). One swap at a time; a swap goes on to its end even if
        its caller leaves (GetModel shows the outcome)."""
        self.models.refuse_if_swapping()
        settings = settings_for_swap(self.settings, model_path, name)
        return await self.models.swap(model_path, lambda: load_model(settings))

    # -- admission ---------------------------------------------------------------------------
    def load(self) -> generator_pb2.GeneratorLoad:
        return generator_pb2.GeneratorLoad(
            running=len(self.queue.running), waiting=len(self.queue.waiting), slots=self.slots
        )

    def admit(self, max_wait_s: float | None = None, deadline_s: float | None = None, caller: str = "") -> Ticket:
        """A place in `caller`'s share of the line; ResourceExhausted at once (with a time to
        retry after) when the expected wait is longer than the call may wait."""
        if not self.ready:
            raise Unavailable("generator: model is still loading")
        try:
            ticket = self.queue.admit(max_wait_s, deadline_s, caller)
        except QueueFull as full:
            metrics.GENERATIONS_REJECTED.labels("generator").inc()
            raise refusal(full) from None
        self._count_line()
        return ticket

    def _count_line(self) -> None:
        metrics.GENERATION_QUEUE.labels("generator").set(len(self.queue.waiting))
        metrics.GENERATIONS_RUNNING.labels("generator").set(len(self.queue.running))

    async def generate(self, request: generator_pb2.GenerateRequest) -> AsyncIterator[generator_pb2.GenerateResponse]:
        """Admits and runs one generation with no deadline (what tests and simple callers use)."""
        async with contextlib.aclosing(self.run(self.admit(), request)) as responses:
            async for response in responses:
                yield response

    # -- a generation ------------------------------------------------------------------------
    async def run(self, ticket: Ticket, prompt: Prompt) -> AsyncIterator[generator_pb2.GenerateResponse]:
        """Queued messages until the ticket holds a slot, then started, deltas and done. Raises
        AskmeshError on failure. The ticket's place or slot is given up however this ends."""
        finished = False
        try:
            async for standing in self.queue.wait_turn(ticket):
                yield queued_response(standing)
            self._count_line()
            assert ticket.granted_at is not None
            metrics.GENERATION_QUEUE_WAIT.labels("generator").observe(ticket.granted_at - ticket.arrived_at)
            request = await self._prompt(prompt)
            async for response in self._generate(ticket, request):
                finished = finished or response.HasField("done")
                yield response
        finally:
            self.queue.leave(ticket, finished=finished)
            self._count_line()

    async def _prompt(self, prompt: Prompt) -> generator_pb2.GenerateRequest:
        if isinstance(prompt, generator_pb2.GenerateRequest):
            return prompt
        try:
            return await asyncio.wait_for(prompt, timeout=self.settings.prompt_wait_s)
        except TimeoutError:
            raise FailedPrecondition(
                f"generate: the prompt did not arrive within {self.settings.prompt_wait_s:g} s of the slot being given"
            ) from None

    async def _generate(
        self, ticket: Ticket, request: generator_pb2.GenerateRequest
    ) -> AsyncIterator[generator_pb2.GenerateResponse]:
        model = self.models.acquire()  # this generation's model, even if a swap happens meanwhile
        try:
            placed = self._place_passages(request, model.backend)
            generation_input = self.to_input(request, placed)
            assert ticket.granted_at is not None
            yield generator_pb2.GenerateResponse(
                started=generator_pb2.GenerateStarted(
                    passages_used=[p.index for p in placed], queue_ms=(ticket.granted_at - ticket.arrived_at) * 1000
                )
            )
            first_token_at: float | None = None
            # aclosing: a caller that leaves closes the backend's stream at once (stopping the
            # generation upstream), not whenever the garbage collector gets to it.
            async with contextlib.aclosing(model.backend.generate(generation_input)) as events:
                async for event in events:
                    if isinstance(event, TokenEvent):
                        if first_token_at is None:
                            first_token_at = time.monotonic()
                            metrics.GENERATION_TTFT.labels("generator").observe(first_token_at - ticket.arrived_at)
                        yield generator_pb2.GenerateResponse(delta=common_pb2.TokenDelta(text=event.text))
                    elif isinstance(event, FinishEvent):
                        yield self._done(event, ticket, first_token_at, model.name)
                        return
        finally:
            self.models.release(model)
        raise Unavailable("generator: the backend ended without a finish reason")

    def _place_passages(self, request: generator_pb2.GenerateRequest, backend: GenerationBackend) -> list[PlacedPassage]:
        budget = request.context_token_budget or self.settings.default_context_tokens
        if budget > self.settings.max_context_tokens:
            raise InvalidArgument(
                "context_token_budget", f"{budget} is out of range 1..{self.settings.max_context_tokens}"
            )
        return fit_passages(list(request.passages), budget, backend.count_tokens)

    def to_input(self, request: generator_pb2.GenerateRequest, placed: list[PlacedPassage] | None = None) -> GenerationInput:
        """The backend's input, with the passages placed and the configured defaults for unset
        parameters."""
        parameters = request.parameters
        messages = [{"role": ROLE_NAMES[m.role], "content": m.content} for m in request.messages]
        return GenerationInput(
            messages=with_context(messages, placed or []),
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

    def _done(
        self, event: FinishEvent, ticket: Ticket, first_token_at: float | None, model: str
    ) -> generator_pb2.GenerateResponse:
        finished_at = time.monotonic()
        first = first_token_at or finished_at
        decode_seconds = finished_at - first
        tokens_per_second = (event.completion_tokens - 1) / decode_seconds if decode_seconds > 0 else 0.0
        if tokens_per_second > 0:
            metrics.GENERATION_TOKENS_PER_SECOND.labels("generator").observe(tokens_per_second)
        assert ticket.granted_at is not None
        return generator_pb2.GenerateResponse(
            done=generator_pb2.GenerateDone(
                finish_reason=event.reason,
                usage=common_pb2.Usage(
                    prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                    cached_prompt_tokens=event.cached_prompt_tokens,
                ),
                timings=generator_pb2.GenerateTimings(
                    queue_ms=(ticket.granted_at - ticket.arrived_at) * 1000,
                    time_to_first_token_ms=(first - ticket.arrived_at) * 1000,
                    total_ms=(finished_at - ticket.arrived_at) * 1000,
                    tokens_per_second=max(tokens_per_second, 0.0),
                ),
                model=model,
            )
        )
