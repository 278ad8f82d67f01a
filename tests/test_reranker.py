"""The reranker of the embedder tier: the local cross-encoder on a tiny model the test builds,
the TEI client against a loopback server speaking TEI's /rerank, and the Reranker service over
real gRPC (the tier's health waits for the reranker)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from askmesh.runtime.errors import InvalidArgument, ResourceExhausted, Unavailable
from askmesh.runtime.server import ServiceDefinition, ServiceRunner
from askmesh.runtime.config import ServiceSettings
from askmesh.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc, reranker_pb2, reranker_pb2_grpc
from services.embedder.config import EmbedderSettings
from services.embedder.main import build
from services.embedder.rerankers import tei
from services.embedder.rerankers.cross_encoder import CrossEncoderReranker
from services.embedder.rerankers.tei import TeiReranker, _scores_in_order
from services.embedder.reranking import RerankingEngine, best_first
from services.embedder.servicer import NO_RERANKER, RerankerServicer
from tests.conftest import start_in_process, until
from tests.fakes.tei_server import AXUM_LENGTH_LIMIT, FakeTeiServer, word_overlap
from tests.rerank_models import build_tiny_cross_encoder

QUERY = "How much may a hotel room in Paris cost?"
PASSAGES = [
    "Hotel rooms in Paris may cost up to 260 euros per night.",
    "The cat sat on the mat.",
    "Travel must be booked two weeks ahead through the portal.",
    "Expense reports are due on the fifth of each month.",
    "Remote work is allowed two days a week.",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("reranker") / "tiny-cross-encoder")


def settings(**values: object) -> EmbedderSettings:
    return EmbedderSettings(**values)  # type: ignore[arg-type]


# -- the local cross-encoder -------------------------------------------------------------------


async def test_the_local_cross_encoder_scores_as_crossencoder_predict_does(tiny_model: Path) -> None:
    from sentence_transformers import CrossEncoder

    # Two pairs per forward pass: five passages take three.
    backend = CrossEncoderReranker(settings(reranker_model_path=tiny_model, reranker_batch_size=2))
    engine = RerankingEngine(backend.settings, backend)
    await engine.start()
    try:
        scores = await backend.score(QUERY, PASSAGES)
        reference = CrossEncoder(str(tiny_model), local_files_only=True, device="cpu")
        pairs = [(QUERY, passage) for passage in PASSAGES]
        assert scores.values == [float(s) for s in reference.predict(pairs, batch_size=2, show_progress_bar=False)]
        # Slicing into batches changes the padding only, not the scores.
        assert np.allclose(scores.values, reference.predict(pairs, batch_size=32, show_progress_bar=False), atol=1e-6)
        assert len(set(scores.values)) == len(PASSAGES)  # distinct: the order below means something
        assert scores.inference_ms > 0

        ranking = await engine.rerank(QUERY, PASSAGES, top_n=3)
        expected = sorted(range(len(PASSAGES)), key=lambda i: -scores.values[i])[:3]
        assert [index for index, _ in ranking.ranks] == expected
        assert [score for _, score in ranking.ranks] == [scores.values[i] for i in expected]
        assert ranking.model == "tiny-cross-encoder"
        info = engine.model_info()
        assert (info.name, info.backend, info.path) == ("tiny-cross-encoder", "cross-encoder", str(tiny_model))
        assert info.load_seconds > 0
    finally:
        await engine.close()


async def test_a_missing_folder_or_a_classifier_is_not_loaded_as_a_reranker(tmp_path: Path) -> None:
    missing = CrossEncoderReranker(settings(reranker_model_path=tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        await missing.start()
    await missing.close()
    classifier = CrossEncoderReranker(settings(reranker_model_path=build_tiny_cross_encoder(tmp_path / "three", num_labels=3)))
    with pytest.raises(ValueError, match="classifier with 3 labels; a reranker has one"):
        await classifier.start()
    await classifier.close()


def test_the_settings_take_one_reranker_and_a_url_with_a_scheme(tmp_path: Path) -> None:
    assert settings().reranker == "off"
    assert settings(reranker_model_path=tmp_path).reranker == "cross-encoder"
    assert settings(reranker_url="http://tei:8080").reranker == "tei"
    with pytest.raises(ValueError, match="both set"):
        settings(reranker_model_path=tmp_path, reranker_url="http://tei:8080")
    with pytest.raises(ValueError, match="must start with http"):
        settings(reranker_url="tei:8080")


def test_best_first_keeps_the_texts_order_for_ties_and_puts_nan_last() -> None:
    assert best_first([0.1, 0.9, 0.5, 0.9]) == [(1, 0.9), (3, 0.9), (2, 0.5), (0, 0.1)]
    ranked = best_first([math.nan, 0.2, 0.3], top_n=2)
    assert ranked == [(2, 0.3), (1, 0.2)]


# -- TEI's /rerank -----------------------------------------------------------------------------


@pytest.fixture
def tei_server() -> Iterator[FakeTeiServer]:
    with FakeTeiServer() as server:
        yield server


@pytest.fixture
async def tei_backend(tei_server: FakeTeiServer) -> AsyncIterator[TeiReranker]:
    backend = TeiReranker(settings(reranker_url=tei_server.url, reranker_timeout_s=10, reranker_start_timeout_s=0))
    yield backend
    await backend.close()


def sigmoid(value: float) -> float:
    return 1 / (1 + math.exp(-value))


async def test_tei_is_asked_in_its_own_format_and_its_ranking_read_back_in_text_order(
    tei_server: FakeTeiServer, tei_backend: TeiReranker
) -> None:
    await tei_backend.start()
    assert tei_backend.name == "fake/bge-reranker-base"  # from /info
    assert [(r.method, r.path) for r in tei_server.requests] == [("GET", "/info"), ("POST", "/rerank")]
    tei_server.requests.clear()

    scores = await tei_backend.score(QUERY, PASSAGES)

    (request,) = tei_server.requests
    assert (request.method, request.path) == ("POST", "/rerank")
    assert request.body == {"query": QUERY, "texts": PASSAGES, "truncate": True, "raw_scores": False, "return_text": False}
    assert "authorization" not in request.headers
    assert scores.values == pytest.approx([sigmoid(word_overlap(QUERY, p)) for p in PASSAGES])
    assert best_first(scores.values)[0][0] == 0  # the hotel passage shares most words
    info = tei_backend.info()
    assert (info.name, info.backend) == ("fake/bge-reranker-base", "tei")


async def test_a_call_larger_than_teis_client_batch_goes_as_several_requests(tei_server: FakeTeiServer) -> None:
    texts = [f"passage {i} about hotels" if i % 7 == 0 else f"passage {i}" for i in range(70)]
    backend = TeiReranker(settings(reranker_url=tei_server.url, reranker_batch_size=32))
    try:
        scores = await backend.score("hotels", texts)
    finally:
        await backend.close()
    assert sorted(len(r.body["texts"]) for r in tei_server.requests if r.body) == [6, 32, 32]
    assert scores.values == pytest.approx([sigmoid(word_overlap("hotels", t)) for t in texts])


async def test_teis_errors_become_statuses_that_never_name_its_address(tei_server: FakeTeiServer) -> None:
    async def failure(**values: object) -> Exception:
        backend = TeiReranker(settings(reranker_url=tei_server.url, **values))
        try:
            await backend.score(QUERY, PASSAGES)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            return error
        finally:
            await backend.close()
        raise AssertionError("TEI's failure was not raised")

    tei_server.script.fail_status, tei_server.script.fail_times = 429, 1
    overloaded = await failure()
    assert isinstance(overloaded, ResourceExhausted)
    assert overloaded.message == "embedder: the reranker (TEI) is overloaded (Model is overloaded); retry later"

    tei_server.script.fail_status, tei_server.script.fail_times = 424, 1
    failed = await failure()
    assert isinstance(failed, Unavailable)
    assert failed.message == "embedder: the reranker (TEI) failed: Backend error: Inference failed"

    tei_server.script.fail_status, tei_server.script.fail_times = 503, 1
    assert isinstance(await failure(), Unavailable)

    # Our batches larger than the server's --max-client-batch-size: TEI's 422.
    tei_server.script.max_client_batch_size = 2
    too_many = await failure()
    assert isinstance(too_many, InvalidArgument)
    assert too_many.message == "texts: the reranker (TEI) refused them: batch size 5 > maximum allowed batch size 2"
    tei_server.script.max_client_batch_size = 32

    # A body above --payload-limit: axum answers 413 in plain text.
    tei_server.script.payload_limit = 100
    too_large = await failure()
    assert isinstance(too_large, InvalidArgument)
    assert AXUM_LENGTH_LIMIT.decode() in too_large.message and too_large.message.startswith("texts: ")
    tei_server.script.payload_limit = 2_000_000

    tei_server.script.api_key = "right-key"
    refused = await failure(reranker_api_key="wrong-key")
    assert isinstance(refused, Unavailable) and "HTTP 401" in refused.message
    backend = TeiReranker(settings(reranker_url=tei_server.url, reranker_api_key="right-key"))
    try:
        assert len((await backend.score(QUERY, PASSAGES)).values) == len(PASSAGES)
        assert tei_server.requests[-1].headers["authorization"] == "Bearer right-key"
    finally:
        await backend.close()

    errors = [overloaded, failed, too_many, too_large, refused]
    port = tei_server.url.rsplit(":", 1)[1]
    assert not [str(e) for e in errors if "127.0.0.1" in str(e) or port in str(e)]


async def test_an_unreachable_tei_is_unavailable_without_its_address(caplog: pytest.LogCaptureFixture) -> None:
    with FakeTeiServer() as server:
        url = server.url
    backend = TeiReranker(settings(reranker_url=url, reranker_timeout_s=5))
    try:
        with pytest.raises(Unavailable) as raised:
            await backend.score(QUERY, PASSAGES)
    finally:
        await backend.close()
    assert raised.value.message == "embedder: the reranker (TEI) is unreachable"
    assert url in caplog.text  # the operator's log has it


def test_a_ranking_must_give_each_text_exactly_one_number() -> None:
    assert _scores_in_order([{"index": 1, "score": 0.9}, {"index": 0, "score": 0.1}], 2) == [0.1, 0.9]
    for bad in ([{"index": 0, "score": 0.9}], [{"index": 0, "score": 1}, {"index": 0, "score": 2}],
                [{"index": 2, "score": 1}, {"index": 0, "score": 2}], [{"index": 0, "score": "high"}, {"index": 1, "score": 1}],
                {"index": 0}):
        with pytest.raises((ValueError, TypeError, KeyError)):
            _scores_in_order(bad, 2)


async def test_tei_start_waits_for_a_server_still_loading(
    tei_server: FakeTeiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tei, "_START_RETRY_INTERVAL_S", 0.01)
    tei_server.script.fail_status, tei_server.script.fail_times = 503, 3
    backend = TeiReranker(settings(reranker_url=tei_server.url, reranker_start_timeout_s=60))
    try:
        await backend.start()
    finally:
        await backend.close()
    reranks = [r for r in tei_server.requests if r.path == "/rerank"]
    assert len(reranks) == 4 and tei_server.script.fail_times == 0


async def test_tei_start_refuses_a_server_that_serves_no_reranker(tei_server: FakeTeiServer) -> None:
    tei_server.script.model_type = "embedding"
    backend = TeiReranker(settings(reranker_url=tei_server.url))
    try:
        with pytest.raises(RuntimeError, match="as a embedding model, not a reranker"):
            await backend.start()
    finally:
        await backend.close()


# -- the Reranker service over gRPC -----------------------------------------------------------


async def health_of(channel: grpc.aio.Channel, service: str) -> str:
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def test_the_embedder_tier_turns_serving_only_once_its_reranker_answers(tei_server: FakeTeiServer) -> None:
    # The TEI server is still loading: /info and /rerank answer 503.
    tei_server.script.fail_status, tei_server.script.fail_times = 503, 1_000_000
    definition = build(settings(reranker_url=tei_server.url, reranker_start_timeout_s=300))
    runner = ServiceRunner(definition, ServiceSettings(port=1, grace_period_s=1))
    runner.settings.port = 0
    await runner.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}")
    try:
        embedding = definition.servicers[0].engine  # type: ignore[attr-defined]
        await until(lambda: embedding.ready, "the embedding model is loaded", timeout_s=120)
        await until(lambda: len([r for r in tei_server.requests if r.path == "/rerank"]) >= 2, "the reranker is tried again")
        for service in ("", "askmesh.v1.Embedder", "askmesh.v1.Reranker"):
            assert await health_of(channel, service) == "NOT_SERVING", service

        tei_server.script.fail_times = 0  # TEI is ready
        assert runner.warm_up is not None
        await asyncio.wait_for(runner.warm_up, 60)
        for service in ("", "askmesh.v1.Embedder", "askmesh.v1.Reranker"):
            assert await health_of(channel, service) == "SERVING", service

        reranker = reranker_pb2_grpc.RerankerStub(channel)
        response = await reranker.Rerank(reranker_pb2.RerankRequest(query=QUERY, texts=PASSAGES, top_n=2))
        expected = best_first([sigmoid(word_overlap(QUERY, p)) for p in PASSAGES], 2)
        assert [(r.index, r.score) for r in response.ranks] == [(i, pytest.approx(s)) for i, s in expected]
        assert response.model == "fake/bge-reranker-base"
        assert response.timings.total_ms >= response.timings.inference_ms > 0
        every = await reranker.Rerank(reranker_pb2.RerankRequest(query=QUERY, texts=PASSAGES))
        assert sorted(r.index for r in every.ranks) == list(range(len(PASSAGES)))
        model = await reranker.GetModel(common_pb2.GetModelRequest())
        assert (model.name, model.backend) == ("fake/bge-reranker-base", "tei")
        # The embedder still embeds.
        embedded = await embedder_pb2_grpc.EmbedderStub(channel).Embed(embedder_pb2.EmbedRequest(texts=["one"]))
        assert embedded.dimension == 384
    finally:
        await channel.close()
        await runner.stop()


@pytest.fixture(scope="module")
async def local_reranker(tiny_model: Path) -> AsyncIterator[tuple[reranker_pb2_grpc.RerankerStub, RerankingEngine]]:
    """The Reranker service over gRPC on the tiny local cross-encoder."""
    engine = RerankingEngine.configured(settings(reranker_model_path=tiny_model, reranker_max_texts=8))
    assert engine is not None
    servicer = RerankerServicer(engine)
    runner = await start_in_process(
        "embedder", "askmesh.v1.Reranker", lambda s: reranker_pb2_grpc.add_RerankerServicer_to_server(servicer, s), start=engine.start
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
        yield reranker_pb2_grpc.RerankerStub(channel), engine
    await runner.stop()
    await engine.close()


async def test_rerank_over_grpc_orders_by_the_local_models_scores(
    local_reranker: tuple[reranker_pb2_grpc.RerankerStub, RerankingEngine], tiny_model: Path
) -> None:
    from sentence_transformers import CrossEncoder

    stub, _ = local_reranker
    response = await stub.Rerank(reranker_pb2.RerankRequest(query=QUERY, texts=PASSAGES))
    predicted = CrossEncoder(str(tiny_model), local_files_only=True, device="cpu").predict(
        [(QUERY, p) for p in PASSAGES], show_progress_bar=False
    )
    assert [r.index for r in response.ranks] == list(np.argsort(-predicted, kind="stable"))
    assert [r.score for r in response.ranks] == pytest.approx(sorted(predicted, reverse=True), abs=1e-6)
    assert response.model == "tiny-cross-encoder"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"query": "", "texts": ["a"]}, "query: is empty"),
        ({"query": "q", "texts": []}, "texts: must contain at least one text"),
        ({"query": "q", "texts": ["a", " "]}, "texts[1]: is empty"),
        ({"query": "q", "texts": ["a"] * 9}, "texts: 9 texts exceed the limit of 8 per call"),
        ({"query": "q", "texts": ["x" * 8193]}, "texts[0]: has 8193 characters; the limit is 8192"),
        ({"query": "q", "texts": ["a"], "top_n": 0}, "top_n: must be at least 1 when set"),
    ],
)
async def test_bad_rerank_requests_are_invalid_argument_naming_the_field(
    local_reranker: tuple[reranker_pb2_grpc.RerankerStub, RerankingEngine], fields: dict[str, object], message: str
) -> None:
    stub, _ = local_reranker
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Rerank(reranker_pb2.RerankRequest(**fields))  # type: ignore[arg-type]
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == message


async def test_a_replica_without_a_reranker_says_so_in_one_sentence() -> None:
    servicer = RerankerServicer(None)
    runner = await start_in_process(
        "embedder", "askmesh.v1.Embedder", lambda s: reranker_pb2_grpc.add_RerankerServicer_to_server(servicer, s)
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = reranker_pb2_grpc.RerankerStub(channel)
            for call in (stub.Rerank(reranker_pb2.RerankRequest(query="q", texts=["a"])), stub.GetModel(common_pb2.GetModelRequest())):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await call
                assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert raised.value.details() == NO_RERANKER
            assert await health_of(channel, "askmesh.v1.Reranker") == "NOT_FOUND"
    finally:
        await runner.stop()


async def test_a_busy_reranker_refuses_one_call_more_with_resource_exhausted(tei_server: FakeTeiServer) -> None:
    tei_server.script.delay_s = 0.5
    engine = RerankingEngine.configured(settings(reranker_url=tei_server.url, reranker_max_calls=1, reranker_start_timeout_s=0))
    assert engine is not None
    await engine.start()
    try:
        first = asyncio.ensure_future(engine.rerank(QUERY, PASSAGES))
        await until(lambda: tei_server.in_flight == 1, "the first call reaches TEI")
        with pytest.raises(ResourceExhausted, match=r"the reranker is busy \(1 calls running or waiting, limit 1\)"):
            await engine.rerank(QUERY, PASSAGES)
        assert len((await first).ranks) == len(PASSAGES)
    finally:
        await engine.close()
