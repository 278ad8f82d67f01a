"""Model hot swap: the embedder and the generator switch models while serving (GetModel,
SwapModel), with the real all-MiniLM-L6-v2 and SmolLM2 GGUF.

A "new" model is the same files under another name (a symlink), so the name responses report
changes; a model of another dimension is a tiny randomly initialised BERT built here from the
MiniLM tokenizer (nothing is downloaded). Each test serves its own engines: a swap changes them.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest

from askmesh.runtime.errors import FailedPrecondition
from askmesh.runtime.server import ServiceRunner
from askmesh.v1 import catalog_pb2, catalog_pb2_grpc
from askmesh.v1 import (
    common_pb2,
    embedder_pb2,
    embedder_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    knowledge_pb2,
    knowledge_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
)
from services.embedder.config import EmbedderSettings
from services.embedder.config import bundled_model_path as bundled_embedder
from services.embedder.engine import EmbeddingEngine
from services.embedder.servicer import EmbedderServicer
from services.generator.config import GeneratorSettings
from services.generator.config import bundled_model_path as bundled_gguf
from services.generator.engine import GenerationEngine
from services.generator.servicer import GeneratorServicer
from services.retriever.config import RetrieverSettings
from services.retriever.engine import RetrievalEngine
from services.retriever.servicer import RetrieverServicer
from tests.conftest import collect_generation, start_gateway, start_in_process
from tests.fakes.openai_server import FakeOpenAIServer, OpenAIScript

MINILM = "all-MiniLM-L6-v2"
SMOLLM = "SmolLM2-135M-Instruct.Q4_1"
ASKMESH = Path(sys.executable).parent / "askmesh"


# -- models on disk ------------------------------------------------------------------------------
NOT_ALLOWED = "model_path: not an allowed model; models are loaded from the configured model directory"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    made = {
        "minilm-copy": root / "minilm-copy",
        "smol-copy": root / "smol-copy.gguf",
        "broken-embedder": root / "broken-embedder",
        "broken-gguf": root / "broken.gguf",
        "tiny": build_tiny_embedder(root),
    }
    made["minilm-copy"].symlink_to(bundled_embedder(), target_is_directory=True)
    made["smol-copy"].symlink_to(bundled_gguf())
    # The real model's folder with its weights file replaced by junk: it fails while loading.
    made["broken-embedder"].mkdir()
    for item in bundled_embedder().iterdir():
        if item.name != "model.safetensors":
            (made["broken-embedder"] / item.name).symlink_to(item)
    (made["broken-embedder"] / "model.safetensors").write_bytes(b"not a model" * 100)
    made["broken-gguf"].write_bytes(b"GGUF" + bytes(4096))
    return made


def build_tiny_embedder(root: Path) -> Path:
    """A sentence-transformers model making 32-dimension vectors: a one-layer BERT with random
    weights (seeded) and mean pooling, with the MiniLM tokenizer."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    raw = root / "tiny-raw"
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(raw)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundled_embedder() / name, raw / name)
    transformer = models.Transformer(str(raw), max_seq_length=128)
    pooling = models.Pooling(transformer.get_embedding_dimension(), "mean")
    folder = root / "tiny-bert32"
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(folder))
    return folder


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(60_000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def status_of(error: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> tuple[grpc.StatusCode, str]:
    return error.value.code(), error.value.details() or ""


# -- servers -------------------------------------------------------------------------------------
class Embedder:
    def __init__(self, engine: EmbeddingEngine, runner: ServiceRunner, channel: grpc.aio.Channel) -> None:
        self.engine, self.runner = engine, runner
        self.address = f"127.0.0.1:{runner.port}"
        self.stub = embedder_pb2_grpc.EmbedderStub(channel)

    async def model(self) -> common_pb2.ModelInfo:
        return await self.stub.GetModel(common_pb2.GetModelRequest())

    async def swap(self, path: Path | str, **fields: object) -> common_pb2.ModelInfo:
        return await self.stub.SwapModel(common_pb2.SwapModelRequest(model_path=str(path), **fields))  # type: ignore[arg-type]

    async def embed(self, *texts: str) -> embedder_pb2.EmbedResponse:
        return await self.stub.Embed(embedder_pb2.EmbedRequest(texts=texts))


@pytest.fixture
async def embedder(models: dict[str, Path]) -> AsyncIterator[Embedder]:
    engine = EmbeddingEngine(EmbedderSettings(model_dir=models["tiny"].parent))
    await engine.start()
    servicer = EmbedderServicer(engine)
    runner = await start_in_process(
        "embedder", "askmesh.v1.Embedder", lambda s: embedder_pb2_grpc.add_EmbedderServicer_to_server(servicer, s)
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
        yield Embedder(engine, runner, channel)
    await runner.stop()
    await engine.close()


@pytest.fixture
async def generation(models: dict[str, Path]) -> AsyncIterator[GenerationEngine]:
    engine = GenerationEngine(GeneratorSettings(default_max_new_tokens=8, model_dir=models["tiny"].parent))
    await engine.start()
    yield engine
    await engine.close()


def ask_request(content: str, max_new_tokens: int) -> generator_pb2.GenerateRequest:
    return generator_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=content)],
        parameters=common_pb2.GenerationParameters(max_new_tokens=max_new_tokens, temperature=0),
    )


# -- embedder ------------------------------------------------------------------------------------
async def test_an_embedder_swap_serves_the_new_model(embedder: Embedder, models: dict[str, Path]) -> None:
    started = await embedder.model()
    assert (started.name, started.backend, started.dimension, started.swaps) == (MINILM, "torch", 384, 0)
    assert started.path == str(bundled_embedder()) and started.load_seconds > 0 and started.loaded_at.seconds > 0
    before = await embedder.embed("How much is the hotel allowance in Paris?")
    assert before.model == MINILM

    swapped = await embedder.swap(models["minilm-copy"])
    assert (swapped.name, swapped.replaced, swapped.dimension, swapped.swaps) == ("minilm-copy", MINILM, 384, 1)
    assert swapped.path == str(models["minilm-copy"])
    after = await embedder.embed("How much is the hotel allowance in Paris?")
    assert (after.model, after.dimension) == ("minilm-copy", 384)
    # The same weights under another name: the same vector.
    assert float(np.dot(before.embeddings[0].values, after.embeddings[0].values)) > 0.9999
    shown = await embedder.model()
    assert (shown.name, shown.swaps, shown.replaced) == ("minilm-copy", 1, "")

    # A name given with the swap is what responses report; the configured folder gets its configured name.
    assert (await embedder.swap(bundled_embedder(), model_name="minilm-v2")).name == "minilm-v2"
    assert (await embedder.embed("a question")).model == "minilm-v2"
    assert (await embedder.swap(bundled_embedder())).name == MINILM


async def test_a_batch_started_on_the_old_model_finishes_on_it(
    embedder: Embedder, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = embedder.engine
    held, release = threading.Event(), threading.Event()
    encode = engine._encode

    def holding_encode(texts: Sequence[str], model: object = None) -> np.ndarray:
        if list(texts) == ["the held call"]:
            held.set()
            release.wait(120)
        return encode(texts, model)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "_encode", holding_encode)
    old_model = weakref.ref(engine.model.model)
    first = asyncio.create_task(engine.embed(["the held call"]))
    await until(held.is_set, "the first batch runs on the old model")
    queued = [asyncio.create_task(engine.embed([f"queued call {index}"])) for index in range(6)]

    # The new model loads and warms up in a thread of its own while the old one's batch runs.
    swapped = await engine.swap(models["minilm-copy"])
    assert swapped.name == "minilm-copy" and swapped.retiring_calls == 1
    assert old_model() is not None, "the old model must live while its batch runs"
    release.set()

    assert (await first).model == MINILM
    assert {batch.model for batch in await asyncio.gather(*queued)} == {"minilm-copy"}
    assert engine.model_info().retiring_calls == 0
    del first, queued
    gc.collect()
    assert old_model() is None, "the old model was not freed after its last batch"


async def test_embed_calls_during_a_swap_all_succeed(embedder: Embedder, models: dict[str, Path]) -> None:
    swapped = asyncio.Event()
    answered: list[str] = []

    async def keep_embedding(client: int) -> None:
        call = 0
        while True:  # at least one call each, started before the swap
            reply = await embedder.embed(f"client {client} asks question {call}", "and one more text")
            assert len(reply.embeddings) == 2 and reply.dimension == 384
            answered.append(reply.model)
            call += 1
            if swapped.is_set():
                return

    clients = [asyncio.create_task(keep_embedding(client)) for client in range(4)]
    await asyncio.sleep(0)
    await embedder.swap(models["minilm-copy"])
    swapped.set()
    await asyncio.gather(*clients)  # any failed call fails the test here
    assert set(answered) <= {MINILM, "minilm-copy"}
    assert (await embedder.embed("after the swap")).model == "minilm-copy"


async def test_a_swap_that_cannot_load_leaves_the_old_model_serving(
    embedder: Embedder, models: dict[str, Path], tmp_path: Path
) -> None:
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    cases = [
        ({"model_path": ""}, grpc.StatusCode.INVALID_ARGUMENT, "model_path: is empty"),
        # Outside the model directory: one answer, whether the path exists or not.
        ({"model_path": str(tmp_path / "nope")}, grpc.StatusCode.INVALID_ARGUMENT, NOT_ALLOWED),
        ({"model_path": str(a_file)}, grpc.StatusCode.INVALID_ARGUMENT, NOT_ALLOWED),
        ({"model_path": str(models["tiny"].parent / ".." / "elsewhere")}, grpc.StatusCode.INVALID_ARGUMENT, NOT_ALLOWED),
        ({"model_path": str(models["tiny"].parent / "nope")}, grpc.StatusCode.INVALID_ARGUMENT, "does not exist"),
        ({"model_path": str(models["broken-gguf"])}, grpc.StatusCode.INVALID_ARGUMENT, "is not a folder"),
        ({"model_path": str(models["minilm-copy"]), "backend": "tensorflow"}, grpc.StatusCode.INVALID_ARGUMENT, "backend: 'tensorflow'"),
    ]
    for fields, code, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await embedder.stub.SwapModel(common_pb2.SwapModelRequest(**fields))  # type: ignore[arg-type]
        assert status_of(error)[0] == code and message in status_of(error)[1], status_of(error)

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await embedder.swap(models["broken-embedder"])
    code, details = status_of(error)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith(f"model_path: '{models['broken-embedder']}' failed to load (")
    assert details.endswith(f"still serving {MINILM}")

    assert (await embedder.embed("still answering")).model == MINILM
    assert (await embedder.model()).swaps == 0
    # Nothing stuck: a good swap goes through afterwards.
    assert (await embedder.swap(models["minilm-copy"])).name == "minilm-copy"


async def test_one_embedder_swap_at_a_time(embedder: Embedder, models: dict[str, Path]) -> None:
    engine = embedder.engine
    first = asyncio.create_task(engine.swap(models["minilm-copy"]))
    await until(lambda: engine.models.swapping, "the first swap has begun")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await embedder.swap(bundled_embedder())
    assert status_of(error) == (grpc.StatusCode.FAILED_PRECONDITION, "embedder: a model swap is already in progress")
    assert (await first).name == "minilm-copy"
    assert (await embedder.swap(bundled_embedder())).name == MINILM


# -- a knowledge base built with the old dimension ----------------------------------------------------
async def test_a_dimension_change_needs_the_flag_and_then_a_rebuild(
    embedder: Embedder, generation_engine: GenerationEngine, models: dict[str, Path], tmp_path: Path
) -> None:
    retrieval = RetrievalEngine(RetrieverSettings(milvus_uri=str(tmp_path / "milvus.db")))
    await retrieval.start()
    retriever_servicer, generator_servicer = RetrieverServicer(retrieval), GeneratorServicer(generation_engine)
    tiers = [
        await start_in_process(
            "retriever", "askmesh.v1.Retriever", lambda s: retriever_pb2_grpc.add_RetrieverServicer_to_server(retriever_servicer, s)
        ),
        await start_in_process(
            "generator", "askmesh.v1.Generator", lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(generator_servicer, s)
        ),
    ]
    addresses = {
        "embedder": embedder.address,
        "retriever": f"127.0.0.1:{tiers[0].port}",
        "generator": f"127.0.0.1:{tiers[1].port}",
        "data": str(tmp_path),
    }
    gateway, channel = await start_gateway(addresses)
    retriever_channel = grpc.aio.insecure_channel(addresses["retriever"])
    retriever = retriever_pb2_grpc.RetrieverStub(retriever_channel)
    ask_api, kb_api = gateway_pb2_grpc.GatewayStub(channel), knowledge_pb2_grpc.KnowledgeBasesStub(channel)
    tasks = ingestion_pb2_grpc.IngestionStub(channel)

    async def ask() -> tuple[list[gateway_pb2.Citation], gateway_pb2.AskDone]:
        request = gateway_pb2.AskRequest(
            question="How much is the hotel allowance?", knowledge_base="handbook",
            parameters=common_pb2.GenerationParameters(max_new_tokens=2, temperature=0),
        )
        messages = [message async for message in ask_api.Ask(request)]
        assert messages[-1].HasField("done"), messages[-1]
        return list(messages[0].sources.citations), messages[-1].done

    async def collection_key() -> str:
        """The retriever's key for the handbook's collections (the ingestor's id for it)."""
        assert gateway.ingestor is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.ingestor.port}") as inside:
            catalog = catalog_pb2_grpc.CatalogStub(inside)
            view = await catalog.GetSearchView(catalog_pb2.GetSearchViewRequest(knowledge_base="handbook"))
        return view.collection

    async def chunks_stored() -> int:
        described = await retriever.DescribeCollection(retriever_pb2.DescribeCollectionRequest(knowledge_base=await collection_key()))
        return described.chunk_count

    async def document_ids() -> set[str]:
        listed = await kb_api.ListDocuments(knowledge_pb2.ListDocumentsRequest(knowledge_base="handbook"))
        return {document.id for document in listed.documents}

    try:
        documents = [
            gateway_pb2.Document(id="travel", title="Travel", text="The hotel allowance is 180 euros a night in Paris."),
            gateway_pb2.Document(id="leave", title="Leave", text="Everyone gets 25 days of paid leave a year."),
        ]
        await ask_api.AddDocuments(gateway_pb2.AddDocumentsRequest(knowledge_base="handbook", documents=documents))
        citations, done = await ask()
        assert done.embedding_model == MINILM and citations[0].document_id == "travel"
        stored = await chunks_stored()

        # Refused without the flag: the old model keeps serving.
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await embedder.swap(models["tiny"])
        code, details = status_of(error)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"makes 32-dimension vectors but the serving model {MINILM} makes 384" in details
        assert "allow_dimension_change" in details
        assert ((await embedder.model()).name, (await embedder.model()).dimension) == (MINILM, 384)

        swapped = await embedder.swap(models["tiny"], allow_dimension_change=True)
        assert (swapped.name, swapped.dimension) == ("tiny-bert32", 32)
        assert (await embedder.embed("hello")).dimension == 32

        # The knowledge base built with the old model refuses questions and writes until rebuilt.
        refusal = "knowledge base 'handbook' holds 384-dimension vectors but got 32: it was built with another embedding model; rebuild it"
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await ask()
        assert status_of(error) == (grpc.StatusCode.FAILED_PRECONDITION, refusal)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await ask_api.AddDocuments(
                gateway_pb2.AddDocumentsRequest(
                    knowledge_base="handbook",
                    documents=[gateway_pb2.Document(id="parking", text="Parking badges come from facilities.")],
                )
            )
        assert status_of(error) == (grpc.StatusCode.FAILED_PRECONDITION, refusal)
        chunk = common_pb2.Chunk(id="handbook-x", document_id="x", text="x")
        key = await collection_key()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await retriever.Upsert(
                retriever_pb2.UpsertRequest(
                    knowledge_base=key,
                    chunks=[retriever_pb2.VectorChunk(chunk=chunk, vector=[0.1] * 32)],
                    embedding_model="tiny-bert32",
                )
            )
        # The retriever speaks of collection keys; the tiers in front of it, of names.
        assert status_of(error) == (grpc.StatusCode.FAILED_PRECONDITION, refusal.replace("'handbook'", repr(key)))
        assert await chunks_stored() == stored and await document_ids() == {"travel", "leave"}

        # A rebuild makes the next generation with the dimension the embedder makes now.
        rebuild = await kb_api.RebuildKnowledgeBase(knowledge_pb2.RebuildKnowledgeBaseRequest(name="handbook"))
        states = [task async for task in tasks.WatchTask(ingestion_pb2.WatchTaskRequest(id=rebuild.id), timeout=240)]
        assert states[-1].state == ingestion_pb2.TASK_STATE_SUCCEEDED, states[-1].error
        rebuilt = await kb_api.GetKnowledgeBase(knowledge_pb2.GetKnowledgeBaseRequest(name="handbook"))
        assert (rebuilt.dimension, rebuilt.embedding_model, rebuilt.generation) == (32, "tiny-bert32", 2)
        citations, done = await ask()
        assert done.embedding_model == "tiny-bert32" and {c.document_id for c in citations} == {"travel", "leave"}
    finally:
        await retriever_channel.close()
        await channel.close()
        await gateway.stop()
        for runner in tiers:
            await runner.stop()
        await retrieval.close()


# -- generator -----------------------------------------------------------------------------------
async def test_a_generation_in_flight_during_a_swap_finishes_on_the_old_model(
    generation: GenerationEngine, models: dict[str, Path]
) -> None:
    old_backend = generation.backend
    first = generation.generate(ask_request("Count from one to thirty.", max_new_tokens=32))
    opening = [(await anext(first)).WhichOneof("event") for _ in range(3)]
    assert opening == ["queued", "started", "delta"]  # running on the old model, in the replica's only slot

    swapped = await generation.swap(str(models["smol-copy"]))
    assert (swapped.name, swapped.replaced, swapped.backend, swapped.swaps) == ("smol-copy", SMOLLM, "local", 1)
    assert swapped.retiring_calls == 1 and swapped.path == str(models["smol-copy"])
    # Queued behind the first for the slot: it starts after the swap, so on the new model.
    second = asyncio.create_task(collect_generation(generation.generate(ask_request("Say hello.", max_new_tokens=4))))

    first_done = [message async for message in first][-1].done
    assert first_done.model == SMOLLM
    second_text, second_done = await second
    assert second_done.model == "smol-copy" and second_text.strip()

    await generation.models.released()
    assert generation.models.info().retiring_calls == 0
    assert old_backend.closed, "the old llama.cpp model was not freed"  # type: ignore[attr-defined]


@pytest.fixture
async def generator(generation: GenerationEngine) -> AsyncIterator[generator_pb2_grpc.GeneratorStub]:
    servicer = GeneratorServicer(generation)
    runner = await start_in_process(
        "generator", "askmesh.v1.Generator", lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(servicer, s)
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
        yield generator_pb2_grpc.GeneratorStub(channel)
    await runner.stop()


async def test_a_generator_swap_over_grpc_and_what_it_refuses(
    generator: generator_pb2_grpc.GeneratorStub, generation: GenerationEngine, models: dict[str, Path], tmp_path: Path
) -> None:
    started = await generator.GetModel(common_pb2.GetModelRequest())
    assert (started.name, started.backend, started.path, started.swaps) == (SMOLLM, "local", str(bundled_gguf()), 0)
    assert started.dimension == 0 and started.load_seconds > 0

    cases = [
        ({"model_path": " "}, grpc.StatusCode.INVALID_ARGUMENT, "model_path: is empty"),
        ({"model_path": str(tmp_path / "nope.gguf")}, grpc.StatusCode.INVALID_ARGUMENT, NOT_ALLOWED),
        ({"model_path": "/etc/passwd"}, grpc.StatusCode.INVALID_ARGUMENT, NOT_ALLOWED),
        ({"model_path": str(models["tiny"].parent / "nope.gguf")}, grpc.StatusCode.INVALID_ARGUMENT, "does not exist on this replica"),
        ({"model_path": str(models["tiny"])}, grpc.StatusCode.INVALID_ARGUMENT, "is not a file"),
        ({"model_path": str(models["smol-copy"]), "backend": "onnx"}, grpc.StatusCode.INVALID_ARGUMENT, "backend:"),
        ({"model_path": str(models["broken-gguf"])}, grpc.StatusCode.FAILED_PRECONDITION, "failed to load"),
    ]
    for fields, code, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await generator.SwapModel(common_pb2.SwapModelRequest(**fields))  # type: ignore[arg-type]
        assert status_of(error)[0] == code and message in status_of(error)[1], status_of(error)
    assert status_of(error)[1].endswith(f"still serving {SMOLLM}")
    _, done = await collect_generation(generator.Generate(ask_request("Say hello.", max_new_tokens=2)))
    assert done.model == SMOLLM

    # One swap at a time.
    first = asyncio.create_task(generation.swap(str(models["smol-copy"])))
    await until(lambda: generation.models.swapping, "the first swap has begun")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await generator.SwapModel(common_pb2.SwapModelRequest(model_path=str(bundled_gguf())))
    assert status_of(error) == (grpc.StatusCode.FAILED_PRECONDITION, "generator: a model swap is already in progress")
    assert (await first).name == "smol-copy"

    swapped = await generator.SwapModel(common_pb2.SwapModelRequest(model_path=str(bundled_gguf()), model_name="smollm2"))
    assert (swapped.name, swapped.replaced, swapped.swaps) == ("smollm2", "smol-copy", 2)
    _, done = await collect_generation(generator.Generate(ask_request("Say hello.", max_new_tokens=2)))
    assert done.model == "smollm2"


async def test_a_generator_on_tgi_refuses_to_swap() -> None:
    engine = GenerationEngine(GeneratorSettings(backend="tgi", url="http://127.0.0.1:9", port=1))
    with pytest.raises(FailedPrecondition, match="the tgi backend serves the model the TGI server at http://127.0.0.1:9 was started with"):
        await engine.swap("HuggingFaceTB/SmolLM2-1.7B-Instruct")
    await engine.close()


async def test_a_generator_on_an_openai_compatible_server_swaps_the_model_it_asks_for() -> None:
    with FakeOpenAIServer() as server:
        engine = GenerationEngine(
            GeneratorSettings(backend="openai", url=server.url, port=1, remote_model="small", request_timeout_s=10)
        )
        await engine.start()
        try:
            server.script = OpenAIScript(http_status=404, error_message="The model `missing` does not exist.")
            with pytest.raises(FailedPrecondition, match=r"model_path: 'missing' failed to load \(.*does not exist.*\); still serving small"):
                await engine.swap("missing")
            server.script = OpenAIScript(tokens=["Hi", "!"])
            swapped = await engine.swap("large")
            assert (swapped.name, swapped.replaced, swapped.backend) == ("large", "small", "openai")
            _, done = await collect_generation(engine.generate(ask_request("Say hello.", max_new_tokens=4)))
            assert done.model == "large"
            assert [request.body["model"] for request in server.requests] == ["small", "missing", "large", "large"]
        finally:
            await engine.close()


# -- CLI -----------------------------------------------------------------------------------------
async def askmesh(*args: str) -> tuple[int, str, str]:
    """The real `askmesh` command in a subprocess (the servers it calls run in this event loop)."""
    process = await asyncio.create_subprocess_exec(
        str(ASKMESH), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "250"},
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_shows_and_swaps_each_replica_in_turn(embedder: Embedder, models: dict[str, Path]) -> None:
    code, out, err = await askmesh("model", "show", "embedder", "--address", embedder.address)
    assert code == 0, err
    assert out.startswith(f"{embedder.address}: {MINILM} (torch, 384 dimensions) from {bundled_embedder()}, loaded ")

    dead = "127.0.0.1:1"
    code, out, err = await askmesh("model", "swap", "embedder", str(models["minilm-copy"]), "--address", dead, "--address", embedder.address)
    assert code == 1
    assert f"{dead}: error: UNAVAILABLE" in err and f"{embedder.address}: not swapped (stopped after {dead} failed)" in err
    assert (await embedder.model()).name == MINILM

    code, out, err = await askmesh("model", "swap", "embedder", str(models["minilm-copy"]), "--address", embedder.address)
    assert code == 0, err
    assert out.startswith(f"{embedder.address}: now serves minilm-copy (replaced {MINILM}; loaded and warmed up in ")
    code, out, err = await askmesh("model", "swap", "embedder", str(models["tiny"]), "--address", embedder.address)
    assert code == 1 and "FAILED_PRECONDITION" in err and "allow_dimension_change" in err
    code, out, err = await askmesh(
        "model", "swap", "embedder", str(models["tiny"]), "--address", embedder.address, "--allow-dimension-change", "--name", "tiny"
    )
    assert code == 0, err
    code, out, err = await askmesh("model", "show", "embedder", "--address", embedder.address)
    assert code == 0 and f"{embedder.address}: tiny (torch, 32 dimensions)" in out and "2 swaps" in out
