"""Shared fixtures: real models and a real Milvus Lite, loaded once per test session, and
in-process gRPC servers on loopback ports for the contract tests."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from askmesh.runtime.server import ServiceDefinition, ServiceRunner  # noqa: E402
from askmesh.runtime.config import ServiceSettings  # noqa: E402
from services.embedder.config import EmbedderSettings  # noqa: E402
from services.embedder.engine import EmbeddingEngine  # noqa: E402
from services.generator.config import GeneratorSettings  # noqa: E402
from services.generator.engine import GenerationEngine  # noqa: E402
from services.retriever.config import RetrieverSettings  # noqa: E402
from services.retriever.engine import RetrievalEngine  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


async def _nothing() -> None:
    return None


async def start_in_process(
    name: str,
    grpc_service: str,
    add_to_server: Callable[[grpc.aio.Server], None],
    start: Callable[[], Awaitable[None]] = _nothing,
) -> ServiceRunner:
    """A real grpc.aio server on a free loopback port, with health and reflection, SERVING."""
    definition = ServiceDefinition(name, [grpc_service], add_to_server, start=start, close=_nothing)
    runner = ServiceRunner(definition, ServiceSettings(port=1, host="127.0.0.1", grace_period_s=1))
    runner.settings.port = 0  # bind any free port (validated settings need 1..65535)
    await runner.start()
    assert runner.warm_up is not None
    await runner.warm_up
    return runner


@pytest.fixture(scope="session")
async def embedding_engine() -> AsyncIterator[EmbeddingEngine]:
    engine = EmbeddingEngine(EmbedderSettings())
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture(scope="session")
async def generation_engine() -> AsyncIterator[GenerationEngine]:
    engine = GenerationEngine(GeneratorSettings(default_max_new_tokens=24))
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture
async def retrieval_engine(tmp_path: Path) -> AsyncIterator[RetrievalEngine]:
    engine = RetrievalEngine(RetrieverSettings(milvus_uri=str(tmp_path / "milvus.db")))
    await engine.start()
    yield engine
    await engine.close()
