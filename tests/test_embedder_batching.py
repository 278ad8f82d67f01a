"""Dynamic batching in the embedder engine, with the real all-MiniLM-L6-v2.

Nothing here asserts a timing: where a test needs calls to be waiting together, a `Plug` holds
the model thread inside one model call until the test releases it, so what the batcher sees is
decided by the test, not by the machine's speed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc
import numpy as np
import pytest
from pydantic import ValidationError

from askmesh.runtime.errors import ResourceExhausted
from askmesh.v1 import embedder_pb2, embedder_pb2_grpc
from services.embedder.config import EmbedderSettings
from services.embedder.engine import BatcherStats, EmbeddingEngine
from services.embedder.servicer import EmbedderServicer
from tests.conftest import start_in_process, until

TEXTS = [
    "How many days can I work from abroad?",
    "Hotel rooms in Paris may cost up to 260 euros a night.",
    "The cat sat on the mat.",
    "Quarterly revenue grew by eleven percent, driven by subscriptions.",
    "Reset your password from the account settings page.",
    "Milvus stores the chunk vectors; SQLite stores the records.",
    "Business class needs the approval of a vice president.",
    "Wie viele Urlaubstage habe ich im Jahr?",
    "ok",
    "A much longer text about the travel policy, which says that economy class is the default for "
    "flights under six hours, that trains are preferred where the journey takes under four hours, "
    "and that every exception must be approved in writing before the booking is made.",
    "Expense reports are due within thirty days of the trip.",
    "Remote work from another country needs a tax check first.",
    "Lunch is served from noon in the canteen on the second floor.",
    "The VPN client must be updated before the end of the month.",
    "Parental leave can be split into up to three periods.",
    "Printers on every floor accept badges since March.",
]


class Plug:
    """Records every model call's texts; `hold()` makes the next model call wait for `release()`."""

    def __init__(self, engine: EmbeddingEngine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[list[str]] = []
        self._armed = False
        self._holding = threading.Event()
        self._released = threading.Event()
        encode = engine._encode

        def recording_encode(texts: Sequence[str], model: Any = None) -> np.ndarray:
            self.calls.append(list(texts))
            if self._armed:
                self._armed = False
                self._holding.set()
                self._released.wait(60)
            return encode(texts, model)

        monkeypatch.setattr(engine, "_encode", recording_encode)

    def hold(self) -> None:
        self._armed, self._released = True, threading.Event()
        self._holding.clear()

    async def holding(self) -> None:
        await until(self._holding.is_set, "the model call is held")

    def release(self) -> None:
        self._released.set()

    @property
    def encoded(self) -> list[str]:
        return [text for call in self.calls for text in call]


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[EmbeddingEngine]:
    engine = EmbeddingEngine(EmbedderSettings(max_wait_ms=5))
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture
def plug(engine: EmbeddingEngine, monkeypatch: pytest.MonkeyPatch) -> Iterator[Plug]:
    plug = Plug(engine, monkeypatch)
    yield plug
    plug.release()  # never leave the model thread held, whatever the test did


@pytest.fixture(scope="module")
async def alone(engine: EmbeddingEngine) -> dict[str, np.ndarray]:
    """Every text of TEXTS embedded on its own, one call after another (batches of one)."""
    return {text: (await engine.embed([text])).vectors[0] for text in TEXTS}


def counters(engine: EmbeddingEngine) -> BatcherStats:
    stats = engine.stats
    return BatcherStats(
        stats.batches, stats.requests_encoded, stats.texts_encoded, stats.tokens_encoded,
        stats.requests_dropped, stats.requests_rejected,
    )


def assert_same(vector: np.ndarray, reference: np.ndarray) -> None:
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    assert float(vector @ reference) >= 1 - 1e-5


async def test_concurrent_calls_are_merged_into_fewer_model_batches(
    engine: EmbeddingEngine, alone: dict[str, np.ndarray]
) -> None:
    before = counters(engine)
    results = await asyncio.gather(*(engine.embed([text]) for text in TEXTS))
    after = counters(engine)
    assert after.requests_encoded - before.requests_encoded == len(TEXTS)
    assert after.texts_encoded - before.texts_encoded == len(TEXTS)
    assert after.batches - before.batches < len(TEXTS)
    for text, result in zip(TEXTS, results, strict=True):
        assert result.vectors.shape == (1, 384)
        assert_same(result.vectors[0], alone[text])
        assert result.batch_texts >= 1 and result.batch_requests >= 1
        assert result.queue_ms >= 0 and result.inference_ms > 0
    assert max(result.batch_requests for result in results) > 1


async def test_calls_waiting_together_ride_in_one_batch(engine: EmbeddingEngine, plug: Plug) -> None:
    plug.hold()
    first = asyncio.create_task(engine.embed(["the call that holds the model"]))
    await plug.holding()
    waiting = [asyncio.create_task(engine.embed([text])) for text in TEXTS[:8]]
    await until(lambda: engine.queued_texts == 8, "eight texts are queued")
    before = counters(engine)
    plug.release()
    await first
    results = await asyncio.gather(*waiting)
    assert counters(engine).batches - before.batches == 2  # the held call's, then all eight's
    assert {(result.batch_requests, result.batch_texts) for result in results} == {(8, 8)}
    assert plug.calls[-1] == TEXTS[:8]  # in arrival order


async def test_the_token_budget_splits_batches(
    engine: EmbeddingEngine, plug: Plug, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [f"a budget test text, number {i}" for i in range(9)]
    counts = {engine.count_tokens([text]) for text in texts}
    assert len(counts) == 1
    budget = 3 * counts.pop()  # three of these texts fill a batch
    monkeypatch.setattr(engine.settings, "max_batch_tokens", budget)
    big = TEXTS[9:12]  # together larger than the budget: taken alone, never split
    assert engine.count_tokens(big) > budget
    plug.hold()
    first = asyncio.create_task(engine.embed(["the call that holds the model"]))
    await plug.holding()
    small = [asyncio.create_task(engine.embed([text])) for text in texts]
    large = asyncio.create_task(engine.embed(big))
    await until(lambda: engine.queued_texts == len(texts) + len(big), "every call is queued")
    before = counters(engine)
    plug.release()
    await first
    results = await asyncio.gather(*small)
    large_result = await large
    batches = counters(engine).batches - before.batches
    assert batches == 1 + 3 + 1  # the held call, nine texts three a batch, then the big call alone
    assert [len(call) for call in plug.calls[-4:]] == [3, 3, 3, 3]
    assert plug.calls[-4:-1] == [texts[0:3], texts[3:6], texts[6:9]]
    assert all((result.batch_requests, result.batch_texts) == (3, 3) for result in results)
    assert (large_result.batch_requests, large_result.batch_texts) == (1, 3)
    assert plug.calls[-1] == big


async def test_the_text_limit_splits_batches(
    engine: EmbeddingEngine, plug: Plug, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine.settings, "max_batch_texts", 4)
    plug.hold()
    first = asyncio.create_task(engine.embed(["the call that holds the model"]))
    await plug.holding()
    calls = [asyncio.create_task(engine.embed([text])) for text in TEXTS[:10]]
    await until(lambda: engine.queued_texts == 10, "ten texts are queued")
    plug.release()
    await first
    results = await asyncio.gather(*calls)
    assert [len(call) for call in plug.calls[-3:]] == [4, 4, 2]
    assert sorted(result.batch_texts for result in results) == [2] * 2 + [4] * 8


async def test_a_cancelled_callers_call_is_dropped_and_never_encoded(engine: EmbeddingEngine, plug: Plug) -> None:
    plug.hold()
    first = asyncio.create_task(engine.embed(["a long batch that is running"]))
    await plug.holding()
    gone = asyncio.create_task(engine.embed(["the caller of this one goes away"]))
    await until(lambda: engine.queued_texts == 1, "the call is queued")
    before = counters(engine)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    after_cancel = asyncio.create_task(engine.embed(["a caller that stays"]))
    plug.release()
    await first
    assert (await after_cancel).vectors.shape == (1, 384)
    after = counters(engine)
    assert after.requests_dropped - before.requests_dropped == 1
    assert after.requests_encoded - before.requests_encoded == 2  # the held call and the one that stayed
    assert "the caller of this one goes away" not in plug.encoded
    assert engine.queued_texts == 0


async def test_a_full_queue_is_resource_exhausted_at_once(
    engine: EmbeddingEngine, plug: Plug, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine.settings, "max_queue_texts", 4)
    plug.hold()
    first = asyncio.create_task(engine.embed(["the call that holds the model"]))
    await plug.holding()
    queued = [asyncio.create_task(engine.embed(TEXTS[i : i + 2])) for i in (0, 2)]
    await until(lambda: engine.queued_texts == 4, "four texts are queued")
    rejected = engine.stats.requests_rejected
    with pytest.raises(ResourceExhausted) as raised:
        await engine.embed(["one too many"])
    assert raised.value.message.startswith("embedder: queue is full")
    assert engine.stats.requests_rejected == rejected + 1
    plug.release()
    await first
    assert [len((await call).vectors) for call in queued] == [2, 2]
    assert "one too many" not in plug.encoded
    # The queue has room again.
    assert (await engine.embed(["one too many"])).vectors.shape == (1, 384)


async def test_batching_off_is_one_model_call_per_request(
    engine: EmbeddingEngine, plug: Plug, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine.settings, "batching", False)
    calls = [TEXTS[i : i + size] for i, size in ((0, 1), (1, 3), (4, 1), (5, 2), (7, 1), (8, 4))]
    before = counters(engine)
    results = await asyncio.gather(*(engine.embed(texts) for texts in calls))
    assert counters(engine).batches - before.batches == len(calls)
    assert plug.calls == calls  # one model call each, in arrival order
    assert [(result.batch_requests, result.batch_texts) for result in results] == [(1, len(c)) for c in calls]


async def test_batched_results_equal_unbatched_results(
    engine: EmbeddingEngine, alone: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = [TEXTS[i : i + size] for i, size in ((0, 2), (2, 1), (3, 4), (7, 3), (10, 1), (11, 5))]
    batched = await asyncio.gather(*(engine.embed(texts) for texts in calls))
    monkeypatch.setattr(engine.settings, "batching", False)
    unbatched = [await engine.embed(texts) for texts in calls]
    for texts, one, other in zip(calls, batched, unbatched, strict=True):
        assert one.vectors.shape == other.vectors.shape == (len(texts), 384)
        for text, vector, reference in zip(texts, one.vectors, other.vectors, strict=True):
            assert_same(vector, reference)
            assert_same(vector, alone[text])


def test_batching_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = EmbedderSettings()
    assert defaults.batching is True and defaults.backend == "torch"
    assert (defaults.max_batch_tokens, defaults.max_batch_texts, defaults.max_queue_texts) == (8192, 128, 1024)
    assert 0 < defaults.max_wait_ms <= 5
    monkeypatch.setenv("ASKMESH_EMBEDDER_BATCHING", "false")
    monkeypatch.setenv("ASKMESH_EMBEDDER_MAX_WAIT_MS", "3.5")
    monkeypatch.setenv("ASKMESH_EMBEDDER_MAX_BATCH_TOKENS", "1000")
    settings = EmbedderSettings()
    assert (settings.batching, settings.max_wait_ms, settings.max_batch_tokens) == (False, 3.5, 1000)
    with pytest.raises(ValidationError, match="max_queue_texts"):
        EmbedderSettings(max_queue_texts=10, max_batch_size=256)


async def test_concurrent_embed_calls_over_grpc_are_merged(
    engine: EmbeddingEngine, alone: dict[str, np.ndarray], plug: Plug
) -> None:
    servicer = EmbedderServicer(engine)
    runner = await start_in_process(
        "embedder", "askmesh.v1.Embedder", lambda s: embedder_pb2_grpc.add_EmbedderServicer_to_server(servicer, s)
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            plug.hold()
            first = asyncio.ensure_future(stub.Embed(embedder_pb2.EmbedRequest(texts=["holds the model"])))
            await plug.holding()
            texts = TEXTS[:12]
            calls = [asyncio.ensure_future(stub.Embed(embedder_pb2.EmbedRequest(texts=[t]))) for t in texts]
            await until(lambda: engine.queued_texts == len(texts), "every call is queued on the server")
            before = counters(engine)
            plug.release()
            await first
            responses = await asyncio.gather(*calls)
    finally:
        await runner.stop()
    after = counters(engine)
    assert after.batches - before.batches < len(texts)
    assert after.requests_encoded - before.requests_encoded == len(texts) + 1
    for text, response in zip(texts, responses, strict=True):
        assert response.dimension == 384 and len(response.embeddings) == 1
        assert response.timings.queue_ms > 0 and response.timings.inference_ms > 0
        assert_same(np.asarray(response.embeddings[0].values, dtype=np.float32), alone[text])


async def test_a_cancelled_grpc_call_is_dropped(engine: EmbeddingEngine, plug: Plug) -> None:
    servicer = EmbedderServicer(engine)
    runner = await start_in_process(
        "embedder", "askmesh.v1.Embedder", lambda s: embedder_pb2_grpc.add_EmbedderServicer_to_server(servicer, s)
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            plug.hold()
            first = stub.Embed(embedder_pb2.EmbedRequest(texts=["holds the model"]))
            await plug.holding()
            dropped = engine.stats.requests_dropped
            gone = stub.Embed(embedder_pb2.EmbedRequest(texts=["a client that gives up"]))
            await until(lambda: engine.queued_texts == 1, "the call is queued on the server")
            gone.cancel()
            # The server sees the client go away and cancels the handler, whose queued call is
            # then dropped by the batcher, never encoded.
            await until(lambda: any(p.future.cancelled() for p in engine._queue), "the server cancels the call")
            stays = stub.Embed(embedder_pb2.EmbedRequest(texts=["a client that waits"]))
            await until(lambda: engine.queued_texts == 2, "the next call is queued")
            plug.release()
            await first
            assert len((await stays).embeddings) == 1
    finally:
        await runner.stop()
    assert engine.stats.requests_dropped == dropped + 1
    assert "a client that gives up" not in plug.encoded
