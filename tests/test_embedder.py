"""The embedder: its engine with the real all-MiniLM-L6-v2, and its gRPC contract on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from askmesh.v1 import embedder_pb2, embedder_pb2_grpc
from services.embedder.engine import EmbeddingEngine
from services.embedder.servicer import EmbedderServicer
from tests.conftest import start_in_process


async def test_vectors_are_normalized_and_meaningful(embedding_engine: EmbeddingEngine) -> None:
    batch = await embedding_engine.embed(
        ["How much is the hotel allowance in Paris?", "Hotel rooms in Paris may cost up to 260 euros.", "The cat sat."]
    )
    assert batch.vectors.shape == (3, 384)
    assert batch.dimension == 384 and batch.model == "all-MiniLM-L6-v2"
    assert np.allclose(np.linalg.norm(batch.vectors, axis=1), 1.0, atol=1e-5)
    related, unrelated = batch.vectors[0] @ batch.vectors[1], batch.vectors[0] @ batch.vectors[2]
    assert related > unrelated + 0.2


async def test_the_same_text_gives_the_same_vector_in_any_batch(embedding_engine: EmbeddingEngine) -> None:
    alone = (await embedding_engine.embed(["a question about travel"])).vectors[0]
    together = (await embedding_engine.embed(["something else", "a question about travel"])).vectors[1]
    assert float(alone @ together) > 0.999


@pytest.fixture(scope="module")
async def embedder(embedding_engine: EmbeddingEngine) -> AsyncIterator[embedder_pb2_grpc.EmbedderStub]:
    servicer = EmbedderServicer(embedding_engine)
    runner = await start_in_process(
        "embedder", "askmesh.v1.Embedder", lambda s: embedder_pb2_grpc.add_EmbedderServicer_to_server(servicer, s)
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
        yield embedder_pb2_grpc.EmbedderStub(channel)
    await runner.stop()


async def test_embed_over_grpc(embedder: embedder_pb2_grpc.EmbedderStub) -> None:
    response = await embedder.Embed(embedder_pb2.EmbedRequest(texts=["one", "two"]))
    assert len(response.embeddings) == 2
    assert response.dimension == 384 and len(response.embeddings[0].values) == 384
    assert response.model == "all-MiniLM-L6-v2"
    assert response.timings.inference_ms > 0
    assert response.timings.total_ms >= response.timings.inference_ms


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        ([], "texts: must contain at least one text"),
        (["ok", "  "], "texts[1]: is empty"),
        (["x" * 8193], "texts[0]: has 8193 characters; the limit is 8192"),
        (["t"] * 257, "texts: 257 texts exceed the limit of 256 per call"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    embedder: embedder_pb2_grpc.EmbedderStub, texts: list[str], message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await embedder.Embed(embedder_pb2.EmbedRequest(texts=texts))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == message
    # ... and the service keeps serving.
    assert len((await embedder.Embed(embedder_pb2.EmbedRequest(texts=["still fine"]))).embeddings) == 1
