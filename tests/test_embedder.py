"""The embedder: its engine with the real all-MiniLM-L6-v2, and its gRPC contract on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from askmesh.v1 import embedder_pb2, embedder_pb2_grpc
from services.embedder import onnx_backend
from services.embedder.config import EmbedderSettings
from services.embedder.engine import EmbeddingEngine
from services.embedder.servicer import EmbedderServicer, embedding_wire_form
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


async def test_embed_says_how_many_tokens_the_model_read(
    embedder: embedder_pb2_grpc.EmbedderStub, embedding_engine: EmbeddingEngine
) -> None:
    texts = ["one", "How much is the hotel allowance in Paris?"]
    response = await embedder.Embed(embedder_pb2.EmbedRequest(texts=texts))
    # Special tokens included: more than the words, and what the engine counts.
    assert response.token_count == embedding_engine.count_tokens(texts) > len(" ".join(texts).split())


async def test_embed_over_grpc_returns_the_engines_vectors_exactly(
    embedder: embedder_pb2_grpc.EmbedderStub, embedding_engine: EmbeddingEngine
) -> None:
    texts = ["How much is the hotel allowance in Paris?", "The cat sat."]
    response = await embedder.Embed(embedder_pb2.EmbedRequest(texts=texts))
    received = np.array([list(e.values) for e in response.embeddings], dtype=np.float32)
    assert np.array_equal(received, (await embedding_engine.embed(texts)).vectors)


@pytest.mark.parametrize("dimension", [1, 31, 384, 40_000])
def test_embedding_wire_form_is_the_serialized_message(dimension: int) -> None:
    vector = np.random.default_rng(dimension).standard_normal(dimension).astype(np.float32)
    expected = embedder_pb2.Embedding(values=vector.tolist())
    assert embedding_wire_form(vector) == expected.SerializeToString()
    assert embedder_pb2.Embedding.FromString(embedding_wire_form(vector)) == expected


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


# --- The ONNX Runtime backend ------------------------------------------------------------------

VARIED_TEXTS = [
    "How many days can I work from abroad?",
    "Hotel rooms in Paris may cost up to 260 euros a night.",
    "The cat sat.",
    "Quarterly revenue grew by 11% (driven by subscriptions) while costs stayed flat.",
    "def embed(texts): return model.encode(texts, normalize_embeddings=True)",
    "Wie viele Urlaubstage habe ich im Jahr?",
    "ok",
    "Business class needs the written approval of a vice president before booking; economy is the "
    "default for every flight under six hours, and trains are preferred for journeys under four hours.",
    "Reset your password from the account settings page, then sign in again on every device.",
    "🚆 Zürich → Genève, 2nd class, €72.50",
]


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
async def torch_engine() -> AsyncIterator[EmbeddingEngine]:
    engine = EmbeddingEngine(EmbedderSettings(backend="torch"))
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture(scope="module")
async def onnx_engine(onnx_cache: Path) -> AsyncIterator[EmbeddingEngine]:
    engine = EmbeddingEngine(EmbedderSettings(backend="onnx", onnx_cache_dir=onnx_cache))
    await engine.start()
    yield engine
    await engine.close()


async def test_the_default_backend_matches_torch(embedding_engine: EmbeddingEngine, torch_engine: EmbeddingEngine) -> None:
    defaults = EmbedderSettings()
    assert embedding_engine.backend == defaults.backend and torch_engine.backend == "torch"
    texts = [text for text in VARIED_TEXTS if len(text.split()) >= 3]
    default_vectors = (await embedding_engine.embed(texts)).vectors
    torch_vectors = (await torch_engine.embed(texts)).vectors
    assert default_vectors.shape == torch_vectors.shape == (len(texts), 384)
    cosines = np.sum(default_vectors * torch_vectors, axis=1)
    assert cosines.min() >= 0.98, cosines


async def test_onnx_backend_matches_torch(torch_engine: EmbeddingEngine, onnx_engine: EmbeddingEngine) -> None:
    assert onnx_engine.backend == "onnx" and torch_engine.backend == "torch"
    torch_vectors = (await torch_engine.embed(VARIED_TEXTS)).vectors
    batch = await onnx_engine.embed(VARIED_TEXTS)
    assert batch.vectors.shape == (len(VARIED_TEXTS), 384) and batch.dimension == 384
    assert np.allclose(np.linalg.norm(batch.vectors, axis=1), 1.0, atol=1e-5)
    cosines = np.sum(batch.vectors * torch_vectors, axis=1)
    assert cosines.min() >= 0.98, cosines
    # One text alone and within a batch give the same vector here too.
    alone = (await onnx_engine.embed([VARIED_TEXTS[3]])).vectors[0]
    assert float(alone @ batch.vectors[3]) >= 1 - 1e-5


async def test_onnx_int8_backend_matches_torch_and_reuses_the_export(
    torch_engine: EmbeddingEngine, onnx_engine: EmbeddingEngine, onnx_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (folder,) = [path for path in onnx_cache.iterdir() if not path.name.startswith(".")]
    assert (folder / onnx_backend.MODEL_FILE).is_file()

    def no_second_export(*args: object) -> None:
        raise AssertionError("the cached export should have been reused")

    monkeypatch.setattr(onnx_backend, "_export", no_second_export)
    engine = EmbeddingEngine(EmbedderSettings(backend="onnx", onnx_quantize=True, onnx_cache_dir=onnx_cache))
    await engine.start()
    try:
        assert engine.model.onnx is not None and engine.model.onnx.onnx_file == folder / onnx_backend.QUANTIZED_FILE
        vectors = (await engine.embed(VARIED_TEXTS)).vectors
        # int8 quantizes activations with one scale per model batch, so a text's vector moves a
        # little with the company it keeps (torch and ONNX fp32: not at all).
        alone = (await engine.embed([VARIED_TEXTS[1]])).vectors[0]
    finally:
        await engine.close()
    torch_vectors = (await torch_engine.embed(VARIED_TEXTS)).vectors
    cosines = np.sum(vectors * torch_vectors, axis=1)
    # int8 stays close on sentences; on texts of one to three tokens ("ok") it drifts a little
    # more (0.97 here, with every variant of dynamic quantization tried), hence the looser bound.
    sentences = [index for index, text in enumerate(VARIED_TEXTS) if len(text.split()) >= 3]
    assert len(sentences) >= 8
    assert cosines[sentences].min() >= 0.98, cosines
    assert cosines.min() >= 0.95, cosines
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert 0.99 <= float(alone @ vectors[1]) < 1 - 1e-5
    # Nothing was left behind but the export itself.
    assert sorted(path.name for path in onnx_cache.iterdir()) == [folder.name]
    assert not [path for path in folder.iterdir() if path.name.startswith(".")]
