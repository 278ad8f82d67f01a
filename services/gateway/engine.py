"""The question pipeline, over the other tiers' gRPC APIs; no server here.

Ask, in steps: the knowledge base's search view (from the ingestor) -> a place in a generator's
line -> embed the question (unless keyword search) -> search with the view's pins, in the
question's or the knowledge base's search mode -> (optionally) rerank the chunks with the
embedder tier's reranker -> send the sources -> stream the generator's tokens -> done with
timings. Search is the same retrieval without the line or the answer. Each upstream failure
becomes a status that names the tier (a dead embedder is "UNAVAILABLE: embedder tier
unavailable: ..."), and the caller's deadline is passed on to every hop. The gateway stores
nothing: documents and knowledge bases are the ingestor tier's.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from askmesh.runtime import metrics
from askmesh.runtime.errors import AskmeshError, Unavailable, name_for_key, with_name_for_key
from askmesh.runtime.auth import AuthSettings, Caller
from askmesh.upstream import Deadline, GenerationSession, Upstreams
from askmesh.v1 import catalog_pb2, common_pb2, embedder_pb2, gateway_pb2, generator_pb2, retriever_pb2
from services.gateway.cache import AnswerCache, MemoryAnswerCache, RedisAnswerCache, cache_key
from services.gateway.config import GatewaySettings


# A search that keeps racing document changes is returned as the last one found: by then the
# knowledge base is changing faster than questions are asked, and one more try would not help.
MAX_SEARCH_ATTEMPTS = 3

T = TypeVar("T")
log = logging.getLogger("askmesh.gateway")


# What a question's retrieval reads of an Ask or a Search: the same fields in both.
SourcesQuery = gateway_pb2.AskRequest | gateway_pb2.SearchQuery
Q = TypeVar("Q", gateway_pb2.AskRequest, gateway_pb2.SearchQuery)


@dataclass(frozen=True)
class Retrieved:
    citations: list[gateway_pb2.Citation]
    embedding_model: str
    search_mode: int = common_pb2.SEARCH_MODE_UNSPECIFIED  # the one that ran
    search_notice: str = ""


def search_mode_for(query: SourcesQuery, view: catalog_pb2.SearchView) -> int:
    """The question's own mode; else DENSE where it sets a score threshold (a cosine similarity,
    which only dense search scores: a client that set thresholds before search modes keeps its
    answers); else the knowledge base's default."""
    if query.search_mode:
        return query.search_mode
    if query.HasField("score_threshold"):
        return common_pb2.SEARCH_MODE_DENSE
    return view.search_mode or common_pb2.SEARCH_MODE_DENSE


@dataclass
class AskClock:
    """When each step of one Ask ended, and how long it waited on other tiers."""

    started: float
    upstream_wait_s: float = 0.0
    embed_started: float | None = None
    embedded_at: float | None = None
    searched_at: float | None = None
    reranked_at: float | None = None  # None: not reranked
    first_token_at: float | None = None
    queue_s: float = 0.0

    async def waiting(self, work: Awaitable[T]) -> T:
        """`work`'s result, its time counted as waiting on a tier."""
        waiting_since = time.perf_counter()
        try:
            return await work
        finally:
            self.upstream_wait_s += time.perf_counter() - waiting_since

    def retrieved_at(self, finished: float) -> float:
        return self.reranked_at or self.searched_at or finished

    def retrieval_ms(self, finished: float) -> dict[str, float]:
        """embed_ms, search_ms and rerank_ms (a step not taken: 0), as AskTimings and
        SearchResultsTimings both report them."""
        embed_started = self.embed_started or finished
        embedded_at = self.embedded_at or finished
        searched_at = self.searched_at or finished
        return {
            "embed_ms": (embedded_at - embed_started) * 1000,
            "search_ms": (searched_at - embedded_at) * 1000,
            "rerank_ms": (self.retrieved_at(finished) - searched_at) * 1000,
        }

    def done(self, generated: generator_pb2.GenerateDone, embedding_model: str) -> gateway_pb2.AskDone:
        finished = time.perf_counter()
        total = finished - self.started
        return gateway_pb2.AskDone(
            finish_reason=generated.finish_reason,
            usage=generated.usage,
            model=generated.model,
            embedding_model=embedding_model,
            timings=gateway_pb2.AskTimings(
                **self.retrieval_ms(finished),
                time_to_first_token_ms=((self.first_token_at or finished) - self.started) * 1000,
                generate_ms=(finished - self.retrieved_at(finished)) * 1000,
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


class GatewayEngine:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.upstreams = Upstreams(
            {
                "embedder": settings.embedder_address,
                "retriever": settings.retriever_address,
                "generator": settings.generator_address,
                "ingestor": settings.ingestor_address,
            },
            AuthSettings().internal_token(),
        )
        self.cache = make_answer_cache(settings)
        # Whether questions that do not say are reranked (settings.rerank; "auto" is settled at start).
        self.rerank_by_default = settings.rerank == "on"

    async def start(self) -> None:
        """The gateway holds no model: it is ready (SERVING) once every tier it calls has
        answered SERVING once, so that an Ask could be answered. With rerank = "auto" it then
        asks the embedder tier whether it serves a reranker."""
        await self.upstreams.wait_until_serving()
        if self.settings.rerank == "auto":
            try:
                reranker = await self.upstreams.reranker_model(self.deadline(None))
            except AskmeshError as error:
                log.warning(
                    "[RERANK] could not ask the embedder tier for its reranker (%s): questions are not reranked unless they ask",
                    error.message,
                )
                reranker = None
            self.rerank_by_default = reranker is not None
            if reranker is not None:
                log.info("[RERANK] the embedder tier serves the reranker %s: questions are reranked unless they say not", reranker.name)

    async def close(self) -> None:
        if self.cache is not None:
            await self.cache.close()
        await self.upstreams.close()

    def deadline(self, remaining_s: float | None) -> Deadline:
        return Deadline(remaining_s=remaining_s, default_s=self.settings.upstream_timeout_s)

    async def embed(
        self, request: gateway_pb2.EmbedTextsRequest, caller: Caller, deadline: Deadline
    ) -> embedder_pb2.EmbedResponse:
        """The texts embedded as the knowledge base's questions are; NOT_FOUND for a knowledge
        base the caller's tenant does not have (the embedder validates the texts)."""
        await self.upstreams.search_view(request.knowledge_base or self.settings.default_knowledge_base, caller.tenant, deadline)
        return await self.upstreams.embed(list(request.texts), deadline)

    async def ask(
        self, request: gateway_pb2.AskRequest, caller: Caller, deadline: Deadline
    ) -> AsyncIterator[gateway_pb2.AskResponse]:
        """Sources, token deltas, then done, from the caller's tenant's knowledge base only;
        replayed from the answer cache where one is kept. Raises AskmeshError (after validation
        by the servicer)."""
        started = time.perf_counter()
        name = request.knowledge_base or self.settings.default_knowledge_base
        view = await self.upstreams.search_view(name, caller.tenant, deadline)
        request = self.decided(request)
        if self.cache is None:
            async with contextlib.aclosing(self._answer(request, view, caller, deadline, started)) as responses:
                async for response in responses:
                    yield response
            return
        # By collection key, which no two knowledge bases share, in any tenant; the request
        # says whether it is reranked (decided above), so a changed default keys apart.
        key = cache_key(view.collection, view.generation, view.epoch, request)
        cached = await self.cache.get(key)
        if cached is not None:
            for message in self._replay(cached, started):
                yield message
            return
        answer: list[gateway_pb2.AskResponse] = []
        async with contextlib.aclosing(self._answer(request, view, caller, deadline, started)) as responses:
            async for response in responses:
                if not response.HasField("queued"):  # a replay need not wait
                    answer.append(response)
                yield response
        await self.cache.put(key, answer)  # only a complete answer gets here

    def decided(self, query: Q) -> Q:
        """The question with whether it is reranked settled: its own choice, else this gateway's
        default (from here on, and in the answer cache's key)."""
        if query.HasField("rerank"):
            return query
        decided = type(query)()
        decided.CopyFrom(query)
        decided.rerank = self.rerank_by_default
        return decided

    def fetch_count(self, top_k: int, rerank: bool) -> int:
        """Chunks to search for: top_k, or for a reranked question the candidates the reranker
        chooses top_k from."""
        if not rerank:
            return top_k
        return max(top_k, min(top_k * self.settings.rerank_fetch_factor, self.settings.rerank_max_candidates))

    @staticmethod
    def _replay(cached: list[gateway_pb2.AskResponse], started: float) -> list[gateway_pb2.AskResponse]:
        done = cached[-1]
        done.done.cached = True
        elapsed = (time.perf_counter() - started) * 1000
        done.done.timings.CopyFrom(gateway_pb2.AskTimings(total_ms=elapsed, gateway_overhead_ms=elapsed))
        return [*cached[:-1], done]

    async def _answer(
        self,
        request: gateway_pb2.AskRequest,
        view: catalog_pb2.SearchView,
        caller: Caller,
        deadline: Deadline,
        started: float,
    ) -> AsyncIterator[gateway_pb2.AskResponse]:
        """A place in a generator's line first (a question that would wait too long is refused
        here, before it costs an embedding or a search); then, while it waits, the sources;
        once it has its slot, the sources that fit the prompt, the tokens and done. Every wait on
        a tier is timed: the rest of the total is the gateway's own overhead."""
        clock = AskClock(started)
        session = await clock.waiting(self.upstreams.admit_generation(deadline, caller.key_id))
        try:
            if session.standing.position:
                yield gateway_pb2.AskResponse(queued=session.standing)
            retrieved = await self._retrieve(request, view, caller.tenant, deadline, clock)
            await session.send_prompt(self._generate_request(request, retrieved))
            async for response in self._stream(session, retrieved, clock):
                yield response
        finally:
            session.close()  # the caller went away or we failed: give the place or generation up

    async def _stream(
        self, session: GenerationSession, retrieved: Retrieved, clock: AskClock
    ) -> AsyncIterator[gateway_pb2.AskResponse]:
        """The generator's messages as the caller's: places in line, the sources once it starts,
        the tokens, and done with the timings."""
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
                    metrics.ASK_TTFT.labels("gateway").observe(clock.first_token_at - clock.started)
                yield gateway_pb2.AskResponse(delta=message.delta)
            elif event == "done":
                yield gateway_pb2.AskResponse(done=clock.done(message.done, retrieved.embedding_model))
                await session.finish()
                return
        raise Unavailable("generator tier unavailable: the stream ended without a final message")

    async def search(self, query: gateway_pb2.SearchQuery, caller: Caller, deadline: Deadline) -> gateway_pb2.SearchResults:
        """The sources an Ask of the same question would get, without the answer."""
        started = time.perf_counter()
        name = query.knowledge_base or self.settings.default_knowledge_base
        clock = AskClock(started)
        view = await clock.waiting(self.upstreams.search_view(name, caller.tenant, deadline))
        retrieved = await self._retrieve(self.decided(query), view, caller.tenant, deadline, clock)
        finished = time.perf_counter()
        return gateway_pb2.SearchResults(
            citations=retrieved.citations,
            search_mode=retrieved.search_mode,  # type: ignore[arg-type]
            search_notice=retrieved.search_notice,
            embedding_model=retrieved.embedding_model,
            timings=gateway_pb2.SearchResultsTimings(**clock.retrieval_ms(finished), total_ms=(finished - started) * 1000),
        )

    async def _retrieve(
        self, query: SourcesQuery, view: catalog_pb2.SearchView, tenant: str, deadline: Deadline, clock: AskClock
    ) -> Retrieved:
        """The question's embedding (none for keyword search, which needs only its words), then
        the knowledge base's best chunks as citations; reranked (`query.rerank`, decided by
        `decided`), the reranker's best top_k of more candidates, numbered in its order."""
        top_k = query.top_k or self.settings.default_top_k
        mode = search_mode_for(query, view)
        search = retriever_pb2.SearchRequest(
            knowledge_base=view.collection,
            top_k=self.fetch_count(top_k, query.rerank),
            filters=query.filters,
            search_mode=mode,  # type: ignore[arg-type]
            query_text=query.question if mode != common_pb2.SEARCH_MODE_DENSE else "",
        )
        clock.embed_started = time.perf_counter()
        embedding_model = ""
        if mode != common_pb2.SEARCH_MODE_KEYWORD:
            embedded = await clock.waiting(self.upstreams.embed([query.question], deadline))
            search.vector.extend(embedded.embeddings[0].values)
            embedding_model = embedded.model
        clock.embedded_at = time.perf_counter()
        if query.HasField("score_threshold"):
            search.score_threshold = query.score_threshold
        found = await clock.waiting(self.search_consistently(search, view, tenant, deadline))
        clock.searched_at = time.perf_counter()
        citations = [self._citation(number, result) for number, result in enumerate(found.results, start=1)]
        if query.rerank and citations:
            citations = await clock.waiting(self._rerank(query.question, citations, top_k, deadline))
            clock.reranked_at = time.perf_counter()
        return Retrieved(citations, embedding_model, search_mode=found.search_mode, search_notice=found.notice)

    async def _rerank(
        self, question: str, candidates: list[gateway_pb2.Citation], top_k: int, deadline: Deadline
    ) -> list[gateway_pb2.Citation]:
        """The reranker's best `top_k` candidates, renumbered best first, each with its
        rerank_score (its score stays the retrieval score)."""
        ranked = await self.upstreams.rerank(question, [c.text for c in candidates], top_k, deadline)
        kept: list[gateway_pb2.Citation] = []
        for number, rank in enumerate(ranked.ranks[:top_k], start=1):
            if rank.index >= len(candidates):
                raise Unavailable("embedder tier unavailable while reranking: the reranker ranked a passage it was not given")
            citation = gateway_pb2.Citation()
            citation.CopyFrom(candidates[rank.index])
            citation.number = number
            citation.rerank_score = rank.score
            kept.append(citation)
        return kept

    @staticmethod
    def _citation(number: int, result: retriever_pb2.ScoredChunk) -> gateway_pb2.Citation:
        return gateway_pb2.Citation(
            number=number,
            document_id=result.chunk.document_id,
            title=result.chunk.title,
            text=result.chunk.text,
            score=result.score,
            metadata=result.chunk.metadata,
            chunk_id=result.chunk.id,
            chunk_index=result.chunk.chunk_index,
        )

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
        return gateway_pb2.Sources(
            citations=citations,
            search_mode=retrieved.search_mode,  # type: ignore[arg-type]
            search_notice=retrieved.search_notice,
        )

    async def search_consistently(
        self, search: retriever_pb2.SearchRequest, view: catalog_pb2.SearchView, tenant: str, deadline: Deadline
    ) -> retriever_pb2.SearchResponse:
        """Searches with the view's pins; if a document changed while the search ran (the
        view's epoch moved), searches again with the fresh view, so no answer mixes versions.
        Its errors and notice name the knowledge base, not its collection key."""
        for _ in range(MAX_SEARCH_ATTEMPTS):
            del search.pins[:]
            search.pins.extend(view.pins)
            try:
                found = await self.upstreams.search(search, deadline)
            except AskmeshError as error:
                renamed = with_name_for_key(error, view.collection, view.knowledge_base)
                if renamed is error:
                    raise
                raise renamed from error
            latest = await self.upstreams.search_view(view.knowledge_base, tenant, deadline)
            if latest.epoch == view.epoch:
                break
            view = latest
        found.notice = name_for_key(found.notice, view.collection, view.knowledge_base)
        return found
