"""The question pipeline and document loading, over the other tiers' gRPC APIs; no server here.

Ask: embed the question -> search the knowledge base -> send the sources -> stream the
generator's tokens -> done with timings. Each upstream failure becomes a status that names the
tier (a dead embedder is "UNAVAILABLE: embedder tier unavailable: ..."), and the caller's
deadline is passed on to every hop.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf import json_format

from askmesh.runtime import metrics
from askmesh.runtime.errors import Unavailable
from askmesh.v1 import common_pb2, gateway_pb2, generator_pb2, retriever_pb2
from askmesh.runtime.inflight import InFlight
from services.gateway.cache import AnswerCache, MemoryAnswerCache, RedisAnswerCache, cache_key
from services.gateway.config import GatewaySettings
from services.ingestor.knowledge import AsyncStore, DocumentWrite, KnowledgeEngine, resolve_chunking
from services.ingestor.parsing import Section
from services.ingestor.store import SqliteStore
from services.ingestor.ingestion import Ingestion
from services.ingestor.reconciler import Reconciler
from services.gateway.upstreams import Deadline, Upstreams


# A search that keeps racing document changes is returned as the last one found: by then the
# knowledge base is changing faster than questions are asked, and one more try would not help.
MAX_SEARCH_ATTEMPTS = 3

T = TypeVar("T")


@dataclass(frozen=True)
class Retrieved:
    citations: list[gateway_pb2.Citation]
    embedding_model: str


@dataclass
class AskClock:
    """When each step of one Ask ended, and how long it waited on other tiers."""

    started: float
    upstream_wait_s: float = 0.0
    embed_started: float | None = None
    embedded_at: float | None = None
    searched_at: float | None = None
    first_token_at: float | None = None
    queue_s: float = 0.0

    async def waiting(self, work: Awaitable[T]) -> T:
        """`work`'s result, its time counted as waiting on a tier."""
        waiting_since = time.perf_counter()
        try:
            return await work
        finally:
            self.upstream_wait_s += time.perf_counter() - waiting_since

    def done(self, generated: generator_pb2.GenerateDone, embedding_model: str) -> gateway_pb2.AskDone:
        finished = time.perf_counter()
        embed_started = self.embed_started or finished
        embedded_at = self.embedded_at or finished
        searched_at = self.searched_at or finished
        total = finished - self.started
        return gateway_pb2.AskDone(
            finish_reason=generated.finish_reason,
            usage=generated.usage,
            model=generated.model,
            embedding_model=embedding_model,
            timings=gateway_pb2.AskTimings(
                embed_ms=(embedded_at - embed_started) * 1000,
                search_ms=(searched_at - embedded_at) * 1000,
                time_to_first_token_ms=((self.first_token_at or finished) - self.started) * 1000,
                generate_ms=(finished - searched_at) * 1000,
                total_ms=total * 1000,
                gateway_overhead_ms=max(total - self.upstream_wait_s, 0.0) * 1000,
                queue_ms=self.queue_s * 1000,
            ),
        )


def make_answer_cache(settings: GatewaySettings) -> AnswerCache | None:
    if settings.answer_cache == "memory":
        return MemoryAnswerCache(settings.answer_cache_entries, settings.answer_cache_ttl_s)
    if settings.answer_cache == "redis":
        return RedisAnswerCache(settings.redis_url, settings.answer_cache_ttl_s)
    return None


def document_id_for(document: gateway_pb2.Document) -> str:
    return document.id or "sha256-" + hashlib.sha256(document.text.encode()).hexdigest()[:32]


class GatewayEngine:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.upstreams = Upstreams(settings)
        settings.store_path.parent.mkdir(parents=True, exist_ok=True)
        self.store = AsyncStore(SqliteStore(settings.store_path), hot=SqliteStore(settings.store_path))
        self.knowledge = KnowledgeEngine(settings, self.store, self.upstreams)
        self.questions = InFlight()
        self.cache = make_answer_cache(settings)
        self.ingestion = Ingestion(settings, self.store, self.knowledge, self.questions)
        self.reconciler = Reconciler(settings, self.store, self.knowledge)

    async def start(self) -> None:
        """The gateway holds no model: it is ready (SERVING) once every upstream tier has
        answered SERVING once, so that an Ask could be answered, and its workers run. The
        workers start last: each of their tasks needs the tiers too."""
        await self.upstreams.wait_until_serving()
        # What a crash left half done is finished or undone before the first call is taken.
        await self.reconciler.run_once_logged()
        self.reconciler.start()
        self.ingestion.start()

    async def close(self) -> None:
        await self.reconciler.stop()
        await self.ingestion.stop()
        if self.cache is not None:
            await self.cache.close()
        await self.upstreams.close()
        self.store.close()

    # -- Ask ---------------------------------------------------------------------------------
    async def ask(self, request: gateway_pb2.AskRequest, deadline: Deadline) -> AsyncIterator[gateway_pb2.AskResponse]:
        """Sources, token deltas, then done. Raises AskmeshError (after validation by the servicer)."""
        with self.questions.track():
            async with contextlib.aclosing(self._ask(request, deadline)) as responses:
                async for response in responses:
                    yield response

    async def _ask(self, request: gateway_pb2.AskRequest, deadline: Deadline) -> AsyncIterator[gateway_pb2.AskResponse]:
        started = time.perf_counter()
        knowledge_base = request.knowledge_base or self.settings.default_knowledge_base
        record = await self.knowledge.require(knowledge_base)
        if self.cache is None:
            async with contextlib.aclosing(self._answer(request, knowledge_base, deadline, started)) as responses:
                async for response in responses:
                    yield response
            return
        key = cache_key(knowledge_base, record.generation, await self.knowledge.visibility_epoch(knowledge_base), request)
        cached = await self.cache.get(key)
        if cached is not None:
            for message in cached[:-1]:
                yield message
            done = cached[-1]
            done.done.cached = True
            elapsed = (time.perf_counter() - started) * 1000
            done.done.timings.CopyFrom(gateway_pb2.AskTimings(total_ms=elapsed, gateway_overhead_ms=elapsed))
            yield done
            return
        answer: list[gateway_pb2.AskResponse] = []
        async with contextlib.aclosing(self._answer(request, knowledge_base, deadline, started)) as responses:
            async for response in responses:
                if not response.HasField("queued"):  # a replay need not wait
                    answer.append(response)
                yield response
        await self.cache.put(key, answer)  # only a complete answer gets here

    async def _answer(
        self, request: gateway_pb2.AskRequest, knowledge_base: str, deadline: Deadline, started: float
    ) -> AsyncIterator[gateway_pb2.AskResponse]:
        """A place in a generator's line first (a question that would wait too long is refused
        here, before it costs an embedding or a search); then, while it waits, the sources;
        once it has its slot, the sources that fit the prompt, the tokens and done. Every wait on
        a tier is timed: the rest of the total is the gateway's own overhead."""
        clock = AskClock(started)
        session = await clock.waiting(self.upstreams.admit_generation(deadline))
        try:
            if session.standing.position:
                yield gateway_pb2.AskResponse(queued=session.standing)
            retrieved = await self._retrieve(request, knowledge_base, deadline, clock)
            await session.send_prompt(self._generate_request(request, retrieved))
            while (message := await clock.waiting(session.read())) is not None:
                event = message.WhichOneof("event")
                if event == "queued" and message.queued.position:
                    yield gateway_pb2.AskResponse(queued=message.queued)
                elif event == "started":
                    clock.queue_s = message.started.queue_ms / 1000
                    yield gateway_pb2.AskResponse(sources=self._sources(retrieved, message.started))
                elif event == "delta":
                    if clock.first_token_at is None:
                        clock.first_token_at = time.perf_counter()
                        metrics.ASK_TTFT.labels("gateway").observe(clock.first_token_at - started)
                    yield gateway_pb2.AskResponse(delta=message.delta)
                elif event == "done":
                    yield gateway_pb2.AskResponse(done=clock.done(message.done, retrieved.embedding_model))
                    await session.finish()
                    return
        finally:
            session.close()  # the caller went away or we failed: give the place or generation up
        raise Unavailable("generator tier unavailable: the stream ended without a final message")

    async def _retrieve(
        self, request: gateway_pb2.AskRequest, knowledge_base: str, deadline: Deadline, clock: AskClock
    ) -> Retrieved:
        """The question's embedding, then the knowledge base's best chunks as citations."""
        clock.embed_started = time.perf_counter()
        embedded = await clock.waiting(self.upstreams.embed([request.question], deadline))
        clock.embedded_at = time.perf_counter()
        search = retriever_pb2.SearchRequest(
            knowledge_base=knowledge_base,
            vector=embedded.embeddings[0].values,
            top_k=request.top_k or self.settings.default_top_k,
            filters=request.filters,
        )
        if request.HasField("score_threshold"):
            search.score_threshold = request.score_threshold
        found = await clock.waiting(self.search_consistently(search, deadline))
        clock.searched_at = time.perf_counter()
        citations = [
            gateway_pb2.Citation(
                number=number,
                document_id=result.chunk.document_id,
                title=result.chunk.title,
                text=result.chunk.text,
                score=result.score,
                metadata=result.chunk.metadata,
                chunk_id=result.chunk.id,
                chunk_index=result.chunk.chunk_index,
            )
            for number, result in enumerate(found.results, start=1)
        ]
        return Retrieved(citations, embedded.model)

    def _generate_request(self, request: gateway_pb2.AskRequest, retrieved: Retrieved) -> generator_pb2.GenerateRequest:
        """The instructions, the conversation so far and the question; the citations go as
        passages, which the generator fits to the context budget after the instructions."""
        return generator_pb2.GenerateRequest(
            messages=[
                common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=self.settings.system_prompt),
                *request.history,
                common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=request.question),
            ],
            parameters=request.parameters,
            passages=[
                generator_pb2.ContextPassage(number=c.number, title=c.title or c.document_id, text=c.text)
                for c in retrieved.citations
            ],
            context_token_budget=request.context_token_budget,
        )

    @staticmethod
    def _sources(retrieved: Retrieved, started: generator_pb2.GenerateStarted) -> gateway_pb2.Sources:
        used = set(started.passages_used)
        citations = []
        for index, citation in enumerate(retrieved.citations):
            copy = gateway_pb2.Citation()
            copy.CopyFrom(citation)
            copy.in_prompt = index in used
            citations.append(copy)
        return gateway_pb2.Sources(citations=citations)

    async def search_consistently(
        self, search: retriever_pb2.SearchRequest, deadline: Deadline
    ) -> retriever_pb2.SearchResponse:
        """Searches with the store's pins; if a document changed while the search ran (the
        visibility epoch moved), searches again with fresh pins, so no answer mixes versions."""
        for _ in range(MAX_SEARCH_ATTEMPTS):
            epoch, pins = await self.knowledge.visibility(search.knowledge_base)
            del search.pins[:]
            search.pins.extend(pins)
            found = await self.upstreams.search(search, deadline)
            if await self.knowledge.visibility_epoch(search.knowledge_base) == epoch:
                break
        return found

    # -- AddDocuments ------------------------------------------------------------------------
    async def add_documents(
        self, request: gateway_pb2.AddDocumentsRequest, deadline: Deadline
    ) -> gateway_pb2.AddDocumentsResponse:
        """Stores text documents inline; each replaces its earlier version atomically. A missing
        knowledge base is created (with the server's defaults) once the request is known good."""
        name = request.knowledge_base or self.settings.default_knowledge_base
        record = await self.store(self.store.store.get_knowledge_base, name)
        if record is not None and not record.ready:
            record = None  # being created (perhaps by a request that crashed): create takes it over
        if record is None:
            chunk_size, chunk_overlap = resolve_chunking(
                request.chunking,
                default_size=self.settings.chunk_size,
                default_overlap=self.settings.chunk_overlap,
                max_size=self.settings.max_chunk_size,
            )
        else:
            chunk_size, chunk_overlap = self.knowledge.chunking_for(record, request.chunking)
        if record is None:
            record = await self.knowledge.create(name, deadline)
        writes = []
        for index, document in enumerate(request.documents):
            metadata: dict[str, Any] = json_format.MessageToDict(document.metadata)
            self.knowledge.check_metadata(record, metadata, f"documents[{index}].metadata")
            writes.append(
                DocumentWrite(
                    knowledge_base=record,
                    document_id=document_id_for(document),
                    title=document.title,
                    metadata=metadata,
                    sections=[Section(text=document.text)],
                    chunk_size=chunk_size,
                    chunk_overlap=chunk_overlap,
                )
            )
        results = []
        embed_s = upsert_s = 0.0
        for write in writes:
            stored, timings = await self.knowledge.write_document(write, deadline)
            results.append(gateway_pb2.DocumentResult(id=stored.id, chunk_count=stored.chunk_count))
            embed_s += timings.embed_s
            upsert_s += timings.upsert_s
        return gateway_pb2.AddDocumentsResponse(
            documents=results,
            chunk_count=sum(r.chunk_count for r in results),
            embed_ms=embed_s * 1000,
            upsert_ms=upsert_s * 1000,
        )
