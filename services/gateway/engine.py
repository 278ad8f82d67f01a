"""The question pipeline and document loading, over the other tiers' gRPC APIs; no server here.

Ask: embed the question -> search the knowledge base -> send the sources -> stream the
generator's tokens -> done with timings. Each upstream failure becomes a status that names the
tier (a dead embedder is "UNAVAILABLE: embedder tier unavailable: ..."), and the caller's
deadline is passed on to every hop.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from askmesh.runtime.channels import open_channel
from askmesh.runtime.errors import AskmeshError, Unavailable
from askmesh.v1 import (
    common_pb2,
    embedder_pb2,
    embedder_pb2_grpc,
    gateway_pb2,
    generator_pb2,
    generator_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
)
from services.gateway.chunking import chunk_text
from services.gateway.config import GatewaySettings

T = TypeVar("T")

# Statuses that describe the request itself: passed on as they are (their messages name the
# request field, and the field has the same name in the gateway's API).
_CALLER_STATUSES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}
# Statuses about capacity or time: kept, with the tier named.
_KEPT_STATUSES = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


def upstream_error(tier: str, error: grpc.aio.AioRpcError) -> AskmeshError:
    code, details = error.code(), error.details() or ""
    if code in _CALLER_STATUSES:
        return AskmeshError(details, code=code)
    if code in _KEPT_STATUSES:
        return AskmeshError(f"{tier}: {details}", code=code)
    return Unavailable(f"{tier} tier unavailable: {code.name}: {details}")


def stream_error(tier: str, error: common_pb2.StreamError) -> AskmeshError:
    code = grpc.StatusCode[error.code] if error.code in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN
    if code in _CALLER_STATUSES:
        return AskmeshError(error.message, code=code)
    if code in _KEPT_STATUSES:
        return AskmeshError(f"{tier}: {error.message}", code=code)
    return Unavailable(f"{tier} failed mid-stream: {error.code}: {error.message}")


def document_id_for(document: gateway_pb2.Document) -> str:
    return document.id or "sha256-" + hashlib.sha256(document.text.encode()).hexdigest()[:32]


def chunk_id_for(knowledge_base: str, document_id: str, index: int) -> str:
    """Deterministic: re-adding a document overwrites its chunks instead of duplicating them."""
    return hashlib.sha256(f"{knowledge_base}\0{document_id}\0{index}".encode()).hexdigest()[:40]


@dataclass
class Deadline:
    """The caller's remaining time (None: no deadline) and the per-call default."""

    remaining_s: float | None
    default_s: float

    def __post_init__(self) -> None:
        self._set_at = time.monotonic()

    def unary_timeout(self) -> float:
        if self.remaining_s is None:
            return self.default_s
        return max(self.remaining_s - (time.monotonic() - self._set_at), 0.001)

    def stream_timeout(self) -> float | None:
        return None if self.remaining_s is None else self.unary_timeout()


class GatewayEngine:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._channels = [
            open_channel(settings.embedder_address),
            open_channel(settings.retriever_address),
            open_channel(settings.generator_address),
        ]
        self.embedder = embedder_pb2_grpc.EmbedderStub(self._channels[0])
        self.retriever = retriever_pb2_grpc.RetrieverStub(self._channels[1])
        self.generator = generator_pb2_grpc.GeneratorStub(self._channels[2])

    async def start(self) -> None:
        """The gateway holds no model: it is ready once its channels exist."""

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def _call(self, tier: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            raise upstream_error(tier, error) from error

    # -- Ask ---------------------------------------------------------------------------------
    async def ask(self, request: gateway_pb2.AskRequest, deadline: Deadline) -> AsyncIterator[gateway_pb2.AskResponse]:
        """Sources, token deltas, then done. Raises AskmeshError (after validation by the servicer)."""
        started = time.perf_counter()
        knowledge_base = request.knowledge_base or self.settings.default_knowledge_base

        embedded = await self._call(
            "embedder",
            self.embedder.Embed(embedder_pb2.EmbedRequest(texts=[request.question]), timeout=deadline.unary_timeout()),
        )
        embedded_at = time.perf_counter()
        search = retriever_pb2.SearchRequest(
            knowledge_base=knowledge_base,
            vector=embedded.embeddings[0].values,
            top_k=request.top_k or self.settings.default_top_k,
            filters=request.filters,
        )
        if request.HasField("score_threshold"):
            search.score_threshold = request.score_threshold
        found = await self._call("retriever", self.retriever.Search(search, timeout=deadline.unary_timeout()))
        searched_at = time.perf_counter()

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
        yield gateway_pb2.AskResponse(sources=gateway_pb2.Sources(citations=citations))

        generate = generator_pb2.GenerateRequest(
            messages=self.build_messages(request, citations), parameters=request.parameters
        )
        call = self.generator.Generate(generate, timeout=deadline.stream_timeout())
        first_token_at: float | None = None
        try:
            async for message in call:
                event = message.WhichOneof("event")
                if event == "delta":
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    yield gateway_pb2.AskResponse(delta=message.delta)
                elif event == "done":
                    finished = time.perf_counter()
                    yield gateway_pb2.AskResponse(
                        done=gateway_pb2.AskDone(
                            finish_reason=message.done.finish_reason,
                            usage=message.done.usage,
                            model=message.done.model,
                            timings=gateway_pb2.AskTimings(
                                embed_ms=(embedded_at - started) * 1000,
                                search_ms=(searched_at - embedded_at) * 1000,
                                time_to_first_token_ms=((first_token_at or finished) - started) * 1000,
                                generate_ms=(finished - searched_at) * 1000,
                                total_ms=(finished - started) * 1000,
                            ),
                        )
                    )
                    # Let the call end with the generator's own OK status: cancelling it now
                    # would reset a stream that finished well.
                    await call.code()
                    return
                elif event == "error":
                    raise stream_error("generator", message.error)
        except grpc.aio.AioRpcError as error:
            raise upstream_error("generator", error) from error
        finally:
            if not call.done():
                # The caller went away or we failed: stop the generation upstream too.
                call.cancel()
        raise Unavailable("generator tier unavailable: the stream ended without a final message")

    def build_messages(
        self, request: gateway_pb2.AskRequest, citations: list[gateway_pb2.Citation]
    ) -> list[common_pb2.ChatMessage]:
        """System prompt with the numbered sources, the conversation so far, then the question."""
        budget = self.settings.max_context_chars // max(len(citations), 1)
        sources = "\n\n".join(
            f"[{c.number}] {c.title or c.document_id}\n{c.text[:budget]}" for c in citations
        )
        system = f"{self.settings.system_prompt}\n\nSources:\n{sources or '(no sources found)'}"
        return [
            common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=system),
            *request.history,
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=request.question),
        ]

    # -- AddDocuments ------------------------------------------------------------------------
    async def add_documents(
        self, request: gateway_pb2.AddDocumentsRequest, chunk_size: int, chunk_overlap: int, deadline: Deadline
    ) -> gateway_pb2.AddDocumentsResponse:
        knowledge_base = request.knowledge_base or self.settings.default_knowledge_base
        planned: list[tuple[str, list[common_pb2.Chunk]]] = []
        for document in request.documents:
            document_id = document_id_for(document)
            pieces = chunk_text(document.text, chunk_size, chunk_overlap)
            chunks = [
                common_pb2.Chunk(
                    id=chunk_id_for(knowledge_base, document_id, index),
                    document_id=document_id,
                    chunk_index=index,
                    title=document.title,
                    text=text,
                    metadata=document.metadata,
                )
                for index, text in enumerate(pieces)
            ]
            planned.append((document_id, chunks))
        all_chunks = [chunk for _, chunks in planned for chunk in chunks]
        if len(all_chunks) > self.settings.max_chunks_per_request:
            raise AskmeshError(
                f"documents: {len(all_chunks)} chunks exceed the limit of "
                f"{self.settings.max_chunks_per_request} per request; send fewer documents per call",
                code=grpc.StatusCode.INVALID_ARGUMENT,
            )

        embed_ms = upsert_ms = 0.0
        for start in range(0, len(all_chunks), self.settings.upsert_batch_size):
            batch = all_chunks[start : start + self.settings.upsert_batch_size]
            vectors: list[embedder_pb2.Embedding] = []
            model = ""
            began = time.perf_counter()
            for offset in range(0, len(batch), self.settings.embed_batch_size):
                texts = [c.text for c in batch[offset : offset + self.settings.embed_batch_size]]
                embedded = await self._call(
                    "embedder",
                    self.embedder.Embed(embedder_pb2.EmbedRequest(texts=texts), timeout=deadline.unary_timeout()),
                )
                vectors.extend(embedded.embeddings)
                model = embedded.model
            embedded_at = time.perf_counter()
            upsert = retriever_pb2.UpsertRequest(
                knowledge_base=knowledge_base,
                chunks=[retriever_pb2.VectorChunk(chunk=c, vector=v.values) for c, v in zip(batch, vectors)],
                create_if_missing=True,
                embedding_model=model,
            )
            await self._call("retriever", self.retriever.Upsert(upsert, timeout=deadline.unary_timeout()))
            embed_ms += (embedded_at - began) * 1000
            upsert_ms += (time.perf_counter() - embedded_at) * 1000

        # A document that got shorter keeps stale chunks past its new end: remove them.
        for document_id, chunks in planned:
            await self._call(
                "retriever",
                self.retriever.Delete(
                    retriever_pb2.DeleteRequest(
                        knowledge_base=knowledge_base, document_ids=[document_id], from_chunk_index=len(chunks)
                    ),
                    timeout=deadline.unary_timeout(),
                ),
            )
        return gateway_pb2.AddDocumentsResponse(
            documents=[gateway_pb2.DocumentResult(id=d, chunk_count=len(c)) for d, c in planned],
            chunk_count=len(all_chunks),
            embed_ms=embed_ms,
            upsert_ms=upsert_ms,
        )
