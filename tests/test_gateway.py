"""The gateway over real gRPC, in front of real embedder, retriever and generator servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.protobuf import struct_pb2

from askmesh.runtime.errors import Unavailable, streaming_rpc
from askmesh.runtime.server import ServiceRunner
from askmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, generator_pb2, generator_pb2_grpc
from services.ingestor.knowledge import chunk_id_for
from tests.conftest import REPO_ROOT, InProcessTiers, start_gateway, start_in_process
from tests.fakes.generators import ScriptedGenerator

SHORT = common_pb2.GenerationParameters(max_new_tokens=8, temperature=0)


def document(doc_id: str, text: str, **metadata: object) -> gateway_pb2.Document:
    meta = struct_pb2.Struct()
    meta.update(metadata)
    return gateway_pb2.Document(id=doc_id, title=f"{doc_id} title", text=text, metadata=meta)


TRAVEL = (REPO_ROOT / "samples" / "travel-policy.md").read_text()
REMOTE = (REPO_ROOT / "samples" / "remote-work-policy.md").read_text()


async def start_gateway_stub(addresses: dict[str, str]) -> tuple[ServiceRunner, gateway_pb2_grpc.GatewayStub, grpc.aio.Channel]:
    runner, channel = await start_gateway(addresses)
    return runner, gateway_pb2_grpc.GatewayStub(channel), channel


@contextlib.asynccontextmanager
async def gateway_behind(
    upstreams: InProcessTiers, generator: generator_pb2_grpc.GeneratorServicer
) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    """A gateway of its own whose generator tier is `generator` (the other tiers are the real ones)."""
    server = await start_in_process(
        "generator", "askmesh.v1.Generator", lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(generator, s)
    )
    runner, stub, channel = await start_gateway_stub({**upstreams.addresses, "generator": f"127.0.0.1:{server.port}"})
    try:
        yield stub
    finally:
        await channel.close()
        await runner.stop()
        await server.stop()


@pytest.fixture(scope="module")
async def gateway(upstreams: InProcessTiers) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    runner, stub, channel = await start_gateway_stub(upstreams.addresses)
    added = await stub.AddDocuments(
        gateway_pb2.AddDocumentsRequest(
            knowledge_base="policies",
            documents=[document("travel", TRAVEL, dept="finance"), document("remote", REMOTE, dept="people")],
        )
    )
    assert [d.id for d in added.documents] == ["travel", "remote"]
    assert added.chunk_count == sum(d.chunk_count for d in added.documents) >= 4
    yield stub
    await channel.close()
    await runner.stop()


async def ask(stub: gateway_pb2_grpc.GatewayStub, **fields: object) -> list[gateway_pb2.AskResponse]:
    fields.setdefault("parameters", SHORT)
    return [message async for message in stub.Ask(gateway_pb2.AskRequest(**fields))]  # type: ignore[arg-type]


async def test_ask_streams_sources_then_tokens_then_done(gateway: gateway_pb2_grpc.GatewayStub) -> None:
    messages = await ask(gateway, question="How much may a hotel room in Paris cost per night?", knowledge_base="policies")
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds[0] == "sources" and kinds[-1] == "done"
    assert set(kinds[1:-1]) == {"delta"}
    citations = messages[0].sources.citations
    assert citations[0].document_id == "travel" and "260 euros" in citations[0].text
    assert [c.number for c in citations] == list(range(1, len(citations) + 1))
    assert citations[0].metadata["dept"] == "finance"
    assert citations[0].chunk_id == chunk_id_for("policies", "travel", 1, citations[0].chunk_index)
    done = messages[-1].done
    assert done.usage.completion_tokens >= len(kinds) - 2  # a delta carries one token or more
    timings = done.timings
    assert min(timings.embed_ms, timings.search_ms, timings.time_to_first_token_ms) > 0
    assert timings.total_ms >= timings.embed_ms + timings.search_ms


async def test_filters_and_history_reach_the_right_tiers(gateway: gateway_pb2_grpc.GatewayStub) -> None:
    only_people = common_pb2.MetadataFilter(field="dept", equals=common_pb2.FilterValue(string_value="people"))
    messages = await ask(
        gateway,
        question="How much is the hotel allowance?",
        knowledge_base="policies",
        filters=[only_people],
        history=[
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Hi"),
            common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content="Hello! Ask me about our policies."),
        ],
    )
    assert {c.document_id for c in messages[0].sources.citations} == {"remote"}
    assert messages[-1].HasField("done")


async def test_adding_a_document_twice_stores_it_once_and_a_shorter_version_trims_it(
    gateway: gateway_pb2_grpc.GatewayStub,
) -> None:
    long_text = " ".join(f"Rule {i}: keep the office tidy on day {i}." for i in range(60))
    request = gateway_pb2.AddDocumentsRequest(
        knowledge_base="scratch", documents=[document("rules", long_text)], chunking=common_pb2.ChunkingOptions(chunk_size=200, chunk_overlap=0)
    )
    first = await gateway.AddDocuments(request)
    again = await gateway.AddDocuments(request)
    assert first.chunk_count == again.chunk_count > 5

    async def stored() -> int:
        messages = await ask(gateway, question="office rules", knowledge_base="scratch", top_k=20, parameters=common_pb2.GenerationParameters(max_new_tokens=1))
        return len(messages[0].sources.citations)

    assert await stored() == min(first.chunk_count, 20)
    shorter = gateway_pb2.AddDocumentsRequest(
        knowledge_base="scratch", documents=[document("rules", "Rule 1: keep the office tidy.")]
    )
    assert (await gateway.AddDocuments(shorter)).chunk_count == 1
    assert await stored() == 1


BAD_ASKS = [
    ({"question": ""}, grpc.StatusCode.INVALID_ARGUMENT, "question: is empty"),
    ({"question": "q" * 4001}, grpc.StatusCode.INVALID_ARGUMENT, "question: has 4001 characters; the limit is 4000"),
    ({"question": "q", "knowledge_base": "No Such!"}, grpc.StatusCode.INVALID_ARGUMENT, "knowledge_base: 'No Such!' is not a valid"),
    ({"question": "q", "knowledge_base": "missing"}, grpc.StatusCode.NOT_FOUND, "knowledge_base: 'missing' does not exist"),
    ({"question": "q", "knowledge_base": "policies", "top_k": 21}, grpc.StatusCode.INVALID_ARGUMENT, "top_k: 21 is out of range 1..20"),
    (
        {"question": "q", "knowledge_base": "policies", "filters": [common_pb2.MetadataFilter(field="dept")]},
        grpc.StatusCode.INVALID_ARGUMENT,
        "filters[0]: must set one condition",
    ),
    (
        {"question": "q", "knowledge_base": "policies", "history": [common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="x")]},
        grpc.StatusCode.INVALID_ARGUMENT,
        "history[0].role: must be ROLE_USER or ROLE_ASSISTANT",
    ),
    (
        {"question": "q", "knowledge_base": "policies", "parameters": common_pb2.GenerationParameters(temperature=9)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "parameters.temperature: 9 is out of range",
    ),
]


@pytest.mark.parametrize(("fields", "code", "message"), BAD_ASKS)
async def test_bad_questions_answer_the_right_status(
    gateway: gateway_pb2_grpc.GatewayStub, fields: dict[str, object], code: grpc.StatusCode, message: str
) -> None:
    fields.setdefault("parameters", SHORT)
    received: list[gateway_pb2.AskResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for response in gateway.Ask(gateway_pb2.AskRequest(**fields)):  # type: ignore[arg-type]
            received.append(response)
    assert received == []  # refused before any work: not after the sources went out
    assert raised.value.code() == code
    assert raised.value.details().startswith(message), raised.value.details()


BAD_ADDS = [
    (gateway_pb2.AddDocumentsRequest(), "documents: must contain at least 1"),
    (gateway_pb2.AddDocumentsRequest(documents=[gateway_pb2.Document(id="x", text=" ")]), "documents[0].text: is empty"),
    (gateway_pb2.AddDocumentsRequest(knowledge_base="-", documents=[document("x", "t")]), "knowledge_base: '-' is not a valid"),
    (gateway_pb2.AddDocumentsRequest(documents=[document("x", "t"), document("x", "u")]), "documents[1].id: 'x' appears twice"),
    (
        gateway_pb2.AddDocumentsRequest(documents=[document("x", "t")], chunking=common_pb2.ChunkingOptions(chunk_size=100, chunk_overlap=100)),
        "chunking.chunk_overlap: 100 must be smaller than chunk_size 100",
    ),
    (
        gateway_pb2.AddDocumentsRequest(documents=[document("x", "t")], chunking=common_pb2.ChunkingOptions(chunk_size=9000)),
        "chunking.chunk_size: 9000 is out of range 50..8000",
    ),
]


@pytest.mark.parametrize(("request_message", "message"), BAD_ADDS)
async def test_bad_documents_are_refused_and_nothing_is_stored(
    gateway: gateway_pb2_grpc.GatewayStub, request_message: gateway_pb2.AddDocumentsRequest, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await gateway.AddDocuments(request_message)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(message), raised.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await ask(gateway, question="anything", knowledge_base="default")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # no "default" knowledge base was created


async def test_a_dead_embedder_is_unavailable_naming_the_tier(
    upstreams: InProcessTiers, gateway: gateway_pb2_grpc.GatewayStub  # `gateway` fills 'policies'
) -> None:
    from askmesh.v1 import embedder_pb2_grpc

    # A gateway becomes ready only once every tier has answered: the embedder answers, then dies.
    embedder = await start_in_process(
        "embedder", "askmesh.v1.Embedder",
        lambda s: embedder_pb2_grpc.add_EmbedderServicer_to_server(embedder_pb2_grpc.EmbedderServicer(), s),
    )
    runner, stub, channel = await start_gateway_stub({**upstreams.addresses, "embedder": f"127.0.0.1:{embedder.port}"})
    await embedder.stop()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await ask(stub, question="Hello?", knowledge_base="policies")
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert raised.value.details().startswith("embedder tier unavailable")
    finally:
        await channel.close()
        await runner.stop()


class SlowGenerator(ScriptedGenerator):
    """Streams a token every 50 ms until cancelled; records the deadline it was given."""

    def __init__(self) -> None:
        self.time_remaining: float | None = None
        self.cancelled = asyncio.Event()

    async def answer(self, request: generator_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[generator_pb2.GenerateResponse]:
        self.time_remaining = context.time_remaining()
        try:
            for _ in range(10_000):
                yield generator_pb2.GenerateResponse(delta=common_pb2.TokenDelta(text="la "))
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def test_the_callers_deadline_reaches_the_generator_and_stops_it(upstreams: InProcessTiers) -> None:
    slow = SlowGenerator()
    async with gateway_behind(upstreams, slow) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in stub.Ask(gateway_pb2.AskRequest(question="Sing", knowledge_base="policies"), timeout=3):
                pass
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert slow.time_remaining is not None and slow.time_remaining < 3
        await asyncio.wait_for(slow.cancelled.wait(), timeout=10)


class FailingGenerator(ScriptedGenerator):
    """A generator whose model fails after two tokens (as a backend that loses its server)."""

    @streaming_rpc(lambda error: generator_pb2.GenerateResponse(error=error))
    async def AdmitAndGenerate(self, request_iterator: AsyncIterator[generator_pb2.AdmitAndGenerateRequest], context: grpc.aio.ServicerContext) -> AsyncIterator[generator_pb2.GenerateResponse]:
        async for response in super().AdmitAndGenerate(request_iterator, context):
            yield response

    async def answer(self, request: generator_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[generator_pb2.GenerateResponse]:
        for text in ("Hotels ", "cost "):
            yield generator_pb2.GenerateResponse(delta=common_pb2.TokenDelta(text=text))
        raise Unavailable("generator: TGI connection lost")


async def test_a_generator_failing_mid_stream_ends_the_answer_with_an_error_message(upstreams: InProcessTiers) -> None:
    received: list[gateway_pb2.AskResponse] = []
    async with gateway_behind(upstreams, FailingGenerator()) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for message in stub.Ask(gateway_pb2.AskRequest(question="Hotel cost?", knowledge_base="policies")):
                received.append(message)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert [m.WhichOneof("event") for m in received] == ["sources", "delta", "delta", "error"]
        assert received[-1].error.code == "UNAVAILABLE"
        # The caller learns the tier and the status; the backend's own words stay in the log.
        assert received[-1].error.message.startswith("generator failed mid-stream (UNAVAILABLE); ")
        assert "TGI" not in received[-1].error.message


class VanishingGenerator(ScriptedGenerator):
    """Admits a call and then ends it, before the prompt can arrive (as a replica killed while
    the gateway embeds and searches)."""

    async def AdmitAndGenerate(self, request_iterator: AsyncIterator[generator_pb2.AdmitAndGenerateRequest], context: grpc.aio.ServicerContext) -> AsyncIterator[generator_pb2.GenerateResponse]:
        await anext(request_iterator.__aiter__())
        yield generator_pb2.GenerateResponse(queued=common_pb2.QueueStatus(position=0))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "generator: going away")


async def test_a_generator_gone_before_the_prompt_is_sent_is_unavailable_naming_the_tier(
    upstreams: InProcessTiers, gateway: gateway_pb2_grpc.GatewayStub  # the module gateway made "policies"
) -> None:
    async with gateway_behind(upstreams, VanishingGenerator()) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in stub.Ask(gateway_pb2.AskRequest(question="Hotel cost?", knowledge_base="policies"), timeout=30):
                pass
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        # The tier and the status, and the trace to find the details by in the gateway's log.
        assert re.fullmatch(
            r"generator tier unavailable \(UNAVAILABLE\); (trace [0-9a-f]{32}|request [0-9a-f]{16})", raised.value.details()
        )


# -- answer cache and the gateway's own overhead -----------------------------------------------


async def ask_all(stub: gateway_pb2_grpc.GatewayStub, question: str) -> list[gateway_pb2.AskResponse]:
    request = gateway_pb2.AskRequest(question=question, knowledge_base="policies", parameters=SHORT)
    return [m async for m in stub.Ask(request)]


def text_of(messages: list[gateway_pb2.AskResponse]) -> str:
    return "".join(m.delta.text for m in messages if m.HasField("delta"))


async def test_the_done_message_reports_the_gateways_own_overhead(gateway: gateway_pb2_grpc.GatewayStub) -> None:
    timings = (await ask_all(gateway, "What is the meal allowance?"))[-1].done.timings
    assert 0 < timings.gateway_overhead_ms < timings.total_ms
    assert timings.gateway_overhead_ms < timings.total_ms - timings.embed_ms - timings.search_ms


async def test_a_repeated_question_is_answered_from_the_memory_cache_until_the_knowledge_base_changes(
    upstreams: InProcessTiers, gateway: gateway_pb2_grpc.GatewayStub
) -> None:
    runner, channel = await start_gateway(upstreams.addresses, answer_cache="memory", ingest_workers=0)
    stub = gateway_pb2_grpc.GatewayStub(channel)
    try:
        first = await ask_all(stub, "How are expense reports filed?")
        second = await ask_all(stub, "How are expense reports filed?")
        assert not first[-1].done.cached and second[-1].done.cached
        assert [m.WhichOneof("event") for m in second][0] == "sources" and second[-1].HasField("done")
        assert second[0].sources == first[0].sources and text_of(second) == text_of(first)
        other = await ask_all(stub, "How are expense reports filed? Be brief.")
        assert not other[-1].done.cached  # another question is another answer
        await stub.AddDocuments(
            gateway_pb2.AddDocumentsRequest(knowledge_base="policies", documents=[document("extra", "Expense reports go to finance.")])
        )
        third = await ask_all(stub, "How are expense reports filed?")
        assert not third[-1].done.cached  # the knowledge base changed
    finally:
        await channel.close()
        await runner.stop()


@pytest.fixture
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (.ci/run installs it from Debian's packages)")
    from askmesh.mesh import free_port

    port = free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path_factory.mktemp("redis"))],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait()


async def test_the_redis_cache_is_shared_by_gateway_replicas(
    upstreams: InProcessTiers, gateway: gateway_pb2_grpc.GatewayStub, redis_url: str
) -> None:
    replicas = [await start_gateway(upstreams.addresses, answer_cache="redis", redis_url=redis_url, ingest_workers=0) for _ in range(2)]
    try:
        first = await ask_all(gateway_pb2_grpc.GatewayStub(replicas[0][1]), "Who owns the travel policy?")
        second = await ask_all(gateway_pb2_grpc.GatewayStub(replicas[1][1]), "Who owns the travel policy?")
        assert not first[-1].done.cached and second[-1].done.cached
        assert text_of(second) == text_of(first)
    finally:
        for runner, channel in replicas:
            await channel.close()
            await runner.stop()


def test_a_kept_upstream_status_names_its_tier_once() -> None:
    from askmesh.upstream import _mapped

    busy = _mapped("generator", grpc.StatusCode.RESOURCE_EXHAUSTED, "generator: 1 generations running", "-")
    assert busy.code == grpc.StatusCode.RESOURCE_EXHAUSTED and busy.message == "generator: 1 generations running"
    late = _mapped("embedder", grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", "-")
    assert late.message == "embedder: Deadline Exceeded"


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN])
def test_an_upstream_failure_tells_the_caller_the_tier_and_status_and_logs_the_details(
    code: grpc.StatusCode, caplog: pytest.LogCaptureFixture
) -> None:
    from opentelemetry import trace

    from askmesh.upstream import _mapped

    details = "retriever: Milvus error: <MilvusException: (code=2, message=fail connecting to 10.0.4.7:19530)>"
    span = trace.NonRecordingSpan(
        trace.SpanContext(trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736, span_id=0x00F067AA0BA902B7, is_remote=False)
    )
    with caplog.at_level(logging.WARNING, logger="askmesh.upstream"), trace.use_span(span):
        mapped = _mapped("retriever", code, details, "tier unavailable")
    assert mapped.code == grpc.StatusCode.UNAVAILABLE
    assert mapped.message == f"retriever tier unavailable ({code.name}); trace 4bf92f3577b34da6a3ce929d0e0e4736"
    logged = [record.getMessage() for record in caplog.records]
    assert any(details in line and "trace 4bf92f3577b34da6a3ce929d0e0e4736" in line for line in logged)


def test_an_upstream_failure_outside_a_trace_gets_a_request_id_in_both_places(caplog: pytest.LogCaptureFixture) -> None:
    from askmesh.upstream import _mapped

    with caplog.at_level(logging.WARNING, logger="askmesh.upstream"):
        mapped = _mapped("embedder", grpc.StatusCode.UNAVAILABLE, "connect to 10.0.0.3:50052 refused", "failed mid-stream")
    reference = re.fullmatch(r"embedder failed mid-stream \(UNAVAILABLE\); (request [0-9a-f]{16})", mapped.message)
    assert reference is not None
    assert any(reference[1] in record.getMessage() and "10.0.0.3" in record.getMessage() for record in caplog.records)


def test_a_caller_status_keeps_its_message() -> None:
    from askmesh.upstream import _mapped

    mapped = _mapped("retriever", grpc.StatusCode.NOT_FOUND, "knowledge base 'x' does not exist", "tier unavailable")
    assert (mapped.code, mapped.message) == (grpc.StatusCode.NOT_FOUND, "knowledge base 'x' does not exist")
