"""Authentication and tenants: the rules on their own, then two tenants and a third caller
trying every public RPC through a real Envoy front door, and the internal RPCs on a tier's own
port, with the ingestor and the gateway in this process and the real models behind them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from askmesh.runtime.auth import (
    DEFAULT_TENANT,
    Authenticator,
    AuthSettings,
    Caller,
    Internal,
    Open,
    RateLimiter,
    Role,
    authorize,
    credential_interceptors,
    key_hash,
    key_id_of,
    new_key,
    new_secret_file,
    required_for,
)
from askmesh.runtime.errors import AskmeshError
from askmesh.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    knowledge_pb2,
    knowledge_pb2_grpc,
)
from services.generator.engine import GenerationEngine
from tests.conftest import FrontDoor, InProcessTiers, start_gateway, until

# -- the rules ---------------------------------------------------------------------------------


def test_every_rpc_needs_what_its_role_allows_and_unlisted_ones_are_internal() -> None:
    assert required_for("/grpc.health.v1.Health/Check") is Open.OPEN
    assert required_for("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is Open.OPEN
    assert required_for("/askmesh.v1.Gateway/Ask") is Role.READER
    assert required_for("/askmesh.v1.Gateway/Search") is Role.READER
    assert required_for("/askmesh.v1.Gateway/AddDocuments") is Role.WRITER
    assert required_for("/askmesh.v1.KnowledgeBases/DeleteKnowledgeBase") is Role.ADMIN
    assert required_for("/askmesh.v1.ApiKeys/CreateKey") is Role.ADMIN
    for internal in ("/askmesh.v1.Embedder/SwapModel", "/askmesh.v1.Reranker/Rerank", "/askmesh.v1.Reranker/GetModel", "/askmesh.v1.Retriever/Upsert", "/askmesh.v1.Catalog/GetSearchView",
                     "/askmesh.v1.MeshControl/RestartTier", "/askmesh.v1.Gateway/SomethingNew"):
        assert required_for(internal) is Internal.INTERNAL, internal


def test_roles_are_ordered_and_the_internal_token_acts_for_no_tenant() -> None:
    reader = Caller(tenant="acme", role=Role.READER, key_id="k")
    authorize(reader, Role.READER)
    with pytest.raises(AskmeshError) as refused:
        authorize(reader, Role.WRITER)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "needs the role writer" in refused.value.message
    with pytest.raises(AskmeshError):
        authorize(Caller(tenant="acme", role=Role.ADMIN, key_id="k"), Internal.INTERNAL)
    internal = Caller(tenant="", role=Role.ADMIN, key_id="internal", internal=True)
    authorize(internal, Internal.INTERNAL)
    with pytest.raises(AskmeshError):
        authorize(internal, Role.READER)


def test_keys_are_random_recognisable_and_stored_only_as_a_hash() -> None:
    key_id, key = new_key()
    assert key.startswith(f"amk_{key_id}_") and key_id_of(key) == key_id
    assert new_key()[1] != key
    assert key not in key_hash(key) and len(key_hash(key)) == 64
    assert key_id_of("amk_not-a-key") is None


def test_secret_files_are_the_owners_alone_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "admin-key"
    new_secret_file(path, "first")
    new_secret_file(path, "second")
    assert path.read_text() == "first\n"
    assert path.stat().st_mode & 0o777 == 0o600


def test_authentication_is_on_by_default_and_needs_the_internal_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASKMESH_AUTH_ENABLED", raising=False)
    settings = AuthSettings()
    assert settings.enabled
    with pytest.raises(SystemExit, match="no internal token is configured"):
        Authenticator(settings)


async def test_the_authenticator_tells_callers_apart(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("internal-secret\n")
    operator_key = new_key()[1]
    (tmp_path / "operator").write_text(operator_key + "\n")
    stored_id, stored_key = new_key()
    stored = {key_hash(stored_key): Caller(tenant="acme", role=Role.WRITER, key_id=stored_id)}

    async def lookup(hashed: str) -> Caller | None:
        return stored.get(hashed)

    settings = AuthSettings(enabled=True, internal_token_file=tmp_path / "token", operator_key_file=tmp_path / "operator")
    authenticator = Authenticator(settings, lookup)

    def bearer(credential: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {credential}")]

    assert (await authenticator.caller(bearer("internal-secret"))).internal
    operator = await authenticator.caller(bearer(operator_key))
    assert operator.operator and operator.tenant == DEFAULT_TENANT and operator.role is Role.ADMIN
    acting = await authenticator.caller([*bearer(operator_key), ("x-askmesh-tenant", "globex")])
    assert acting.operator and acting.tenant == "globex"
    assert await authenticator.caller(bearer(stored_key)) == stored[key_hash(stored_key)]
    for metadata, problem in (
        ([], "missing"),
        (bearer(new_key()[1]), "not a valid API key"),
        (bearer("garbage"), "not a valid API key"),
        ([("authorization", f"Basic {stored_key}")], "missing"),
    ):
        with pytest.raises(AskmeshError) as refused:
            await authenticator.caller(metadata)
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED and problem in refused.value.message
    # Only the operator may pick its tenant: a tenant's own key stays in its tenant.
    assert (await authenticator.caller([*bearer(stored_key), ("x-askmesh-tenant", "globex")])).tenant == "acme"


async def test_an_aio_channel_sends_the_credential_on_every_kind_of_call() -> None:
    seen: list[str | None] = []

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append(dict(context.invocation_metadata()).get("authorization"))
        return request

    async def streaming(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        seen.append(dict(context.invocation_metadata()).get("authorization"))
        yield b"reply"

    async def stream_in(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        seen.append(dict(context.invocation_metadata()).get("authorization"))
        return b"reply"

    handlers = grpc.method_handlers_generic_handler("askmesh.test.Echo", {
        "UnaryUnary": grpc.unary_unary_rpc_method_handler(unary),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(streaming),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_in),
        "StreamStream": grpc.stream_stream_rpc_method_handler(streaming),
    })
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([handlers])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=credential_interceptors("the-token")) as channel:
            await channel.unary_unary("/askmesh.test.Echo/UnaryUnary")(b"x")
            assert [r async for r in channel.unary_stream("/askmesh.test.Echo/UnaryStream")(b"x")] == [b"reply"]
            await channel.stream_unary("/askmesh.test.Echo/StreamUnary")(iter([b"x"]))
            call = channel.stream_stream("/askmesh.test.Echo/StreamStream")()
            await call.write(b"x")
            assert await call.read() == b"reply"
            await call.done_writing()
    finally:
        await server.stop(None)
    assert seen == ["Bearer the-token"] * 4


def test_the_rate_limit_allows_a_burst_then_says_when_to_ask_again() -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=3)
    for _ in range(3):
        limiter.take("a")
    with pytest.raises(AskmeshError) as refused:
        limiter.take("a")
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.retry_after_s is not None and 0 < refused.value.retry_after_s <= 1.0
    limiter.take("b")  # another key has its own bucket


# -- two tenants and a third caller, through the front door ----------------------------------------


@dataclass
class Mesh:
    front: FrontDoor
    channel: grpc.aio.Channel
    operator_key: str
    internal_token: str
    keys: dict[str, str]  # "<tenant>-<role>" -> key
    key_ids: dict[str, str]


def auth(key: str | None) -> list[tuple[str, str]]:
    return [] if key is None else [("authorization", f"Bearer {key}")]


@pytest.fixture(scope="module")
async def mesh(upstreams: InProcessTiers, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    secrets_dir = tmp_path_factory.mktemp("secrets")
    operator_key = new_key()[1]
    new_secret_file(secrets_dir / "admin-key", operator_key)
    new_secret_file(secrets_dir / "internal-token", "the-internal-token-of-this-mesh")
    patch = pytest.MonkeyPatch()
    patch.setenv("ASKMESH_AUTH_ENABLED", "true")
    patch.setenv("ASKMESH_AUTH_OPERATOR_KEY_FILE", str(secrets_dir / "admin-key"))
    patch.setenv("ASKMESH_AUTH_INTERNAL_TOKEN_FILE", str(secrets_dir / "internal-token"))
    patch.setenv("ASKMESH_AUTH_LOOKUP_TTL_S", "0")  # a revoked key stops at once (see the revoke test)
    data = tmp_path_factory.mktemp("auth")
    front, channel = await start_gateway({**upstreams.addresses, "data": str(data)})
    keys_stub = keys_pb2_grpc.ApiKeysStub(channel)
    keys: dict[str, str] = {}
    key_ids: dict[str, str] = {}
    for tenant in ("acme", "globex"):
        for role in ("reader", "writer", "admin"):
            created = await keys_stub.CreateKey(
                keys_pb2.CreateKeyRequest(tenant=tenant, role=role, description=f"{tenant} {role}"), metadata=auth(operator_key)
            )
            keys[f"{tenant}-{role}"] = created.secret
            key_ids[f"{tenant}-{role}"] = created.key.id
    yield Mesh(front, channel, operator_key, "the-internal-token-of-this-mesh", keys, key_ids)
    await channel.close()
    await front.stop()
    patch.undo()


async def code_of(call: object) -> grpc.StatusCode:
    try:
        result = await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code()
    del result
    return grpc.StatusCode.OK


async def stream_code(call: grpc.aio.UnaryStreamCall) -> grpc.StatusCode:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_each_role_may_do_what_it_allows_and_nothing_more(mesh: Mesh) -> None:
    kbs = knowledge_pb2_grpc.KnowledgeBasesStub(mesh.channel)
    gateway = gateway_pb2_grpc.GatewayStub(mesh.channel)
    ingestion = ingestion_pb2_grpc.IngestionStub(mesh.channel)
    keys = keys_pb2_grpc.ApiKeysStub(mesh.channel)
    admin, writer, reader = (mesh.keys[f"acme-{role}"] for role in ("admin", "writer", "reader"))

    assert await code_of(kbs.CreateKnowledgeBase(knowledge_pb2.CreateKnowledgeBaseRequest(name="roles"), metadata=auth(admin))) == grpc.StatusCode.OK
    document = gateway_pb2.AddDocumentsRequest(
        knowledge_base="roles", documents=[gateway_pb2.Document(id="d1", text="Roles decide what a key may do.")]
    )
    checks: list[tuple[str, object, dict[str, grpc.StatusCode]]] = []
    for name, key in (("reader", reader), ("writer", writer), ("admin", admin), ("no key", None), ("bogus", "amk_" + "0" * 16 + "_" + "x" * 43)):
        expected_write = grpc.StatusCode.OK if name in ("writer", "admin") else grpc.StatusCode.PERMISSION_DENIED
        expected_read = grpc.StatusCode.OK
        if name in ("no key", "bogus"):
            expected_write = expected_read = grpc.StatusCode.UNAUTHENTICATED
        expected_admin = grpc.StatusCode.OK if name == "admin" else expected_write if name in ("no key", "bogus") else grpc.StatusCode.PERMISSION_DENIED
        metadata = auth(key)
        assert await code_of(kbs.ListKnowledgeBases(knowledge_pb2.ListKnowledgeBasesRequest(), metadata=metadata)) == expected_read, name
        assert await code_of(kbs.GetKnowledgeBase(knowledge_pb2.GetKnowledgeBaseRequest(name="roles"), metadata=metadata)) == expected_read, name
        assert await code_of(ingestion.ListTasks(ingestion_pb2.ListTasksRequest(), metadata=metadata)) == expected_read, name
        assert await code_of(gateway.AddDocuments(document, metadata=metadata)) == expected_write, name
        assert await code_of(kbs.ListDocuments(knowledge_pb2.ListDocumentsRequest(knowledge_base="roles"), metadata=metadata)) == expected_read, name
        assert await code_of(kbs.DeleteDocument(
            knowledge_pb2.DeleteDocumentRequest(knowledge_base="roles", id="absent", allow_missing=True), metadata=metadata
        )) == expected_write, name
        assert await code_of(kbs.RebuildKnowledgeBase(knowledge_pb2.RebuildKnowledgeBaseRequest(name="nothing-here"), metadata=metadata)) in (
            {grpc.StatusCode.NOT_FOUND} if name == "admin" else {expected_admin}
        ), name
        assert await code_of(kbs.CreateKnowledgeBase(knowledge_pb2.CreateKnowledgeBaseRequest(name=f"by-{name.replace(' ', '-')}"), metadata=metadata)) == expected_admin, name
        assert await code_of(keys.ListKeys(keys_pb2.ListKeysRequest(), metadata=metadata)) == expected_admin, name
        ask = gateway.Ask(
            gateway_pb2.AskRequest(question="What decides what a key may do?", knowledge_base="roles",
                                   parameters=common_pb2.GenerationParameters(max_new_tokens=2)),
            metadata=metadata,
        )
        assert await stream_code(ask) == expected_read, name
        search = gateway.Search(gateway_pb2.SearchQuery(question="What decides what a key may do?", knowledge_base="roles"), metadata=metadata)
        assert await code_of(search) == expected_read, name
    del checks


async def test_tenants_never_see_each_other(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    kbs = knowledge_pb2_grpc.KnowledgeBasesStub(mesh.channel)
    gateway = gateway_pb2_grpc.GatewayStub(mesh.channel)
    ingestion = ingestion_pb2_grpc.IngestionStub(mesh.channel)
    keys = keys_pb2_grpc.ApiKeysStub(mesh.channel)
    acme, globex = mesh.keys["acme-admin"], mesh.keys["globex-admin"]
    # The same name in both tenants: two knowledge bases.
    for key, text in ((acme, "The acme launch code is PELICAN-7."), (globex, "Globex keeps its holidays in August.")):
        await kbs.CreateKnowledgeBase(knowledge_pb2.CreateKnowledgeBaseRequest(name="hr-policies"), metadata=auth(key))
        await gateway.AddDocuments(gateway_pb2.AddDocumentsRequest(
            knowledge_base="hr-policies", documents=[gateway_pb2.Document(id="only", title="only", text=text)]
        ), metadata=auth(key))

    listed = await kbs.ListKnowledgeBases(knowledge_pb2.ListKnowledgeBasesRequest(), metadata=auth(mesh.keys["globex-reader"]))
    assert [kb.name for kb in listed.knowledge_bases] == ["hr-policies"]
    documents = await kbs.ListDocuments(knowledge_pb2.ListDocumentsRequest(knowledge_base="hr-policies"), metadata=auth(globex))
    assert [d.id for d in documents.documents] == ["only"]

    sources: list[str] = []
    async for message in gateway.Ask(gateway_pb2.AskRequest(
        question="What is the acme launch code?", knowledge_base="hr-policies", top_k=5,
        parameters=common_pb2.GenerationParameters(max_new_tokens=2),
    ), metadata=auth(mesh.keys["globex-reader"])):
        if message.WhichOneof("event") == "sources":
            sources = [c.text for c in message.sources.citations]
    assert sources and all("PELICAN" not in text for text in sources)
    for mode in (common_pb2.SEARCH_MODE_KEYWORD, common_pb2.SEARCH_MODE_HYBRID, common_pb2.SEARCH_MODE_DENSE):
        found = await gateway.Search(gateway_pb2.SearchQuery(
            question="What is the acme launch code PELICAN-7?", knowledge_base="hr-policies", top_k=5, search_mode=mode,
        ), metadata=auth(mesh.keys["globex-reader"]))
        assert all("PELICAN" not in c.text for c in found.citations), mode

    # A knowledge base only acme has is NOT_FOUND for globex, with no hint that it exists.
    await kbs.CreateKnowledgeBase(knowledge_pb2.CreateKnowledgeBaseRequest(name="acme-only"), metadata=auth(acme))
    for call in (
        kbs.GetKnowledgeBase(knowledge_pb2.GetKnowledgeBaseRequest(name="acme-only"), metadata=auth(globex)),
        kbs.ListDocuments(knowledge_pb2.ListDocumentsRequest(knowledge_base="acme-only"), metadata=auth(globex)),
        kbs.DeleteKnowledgeBase(knowledge_pb2.DeleteKnowledgeBaseRequest(name="acme-only"), metadata=auth(globex)),
        kbs.RebuildKnowledgeBase(knowledge_pb2.RebuildKnowledgeBaseRequest(name="acme-only"), metadata=auth(globex)),
    ):
        assert await code_of(call) == grpc.StatusCode.NOT_FOUND
    missing = await code_of(kbs.GetKnowledgeBase(knowledge_pb2.GetKnowledgeBaseRequest(name="never-made"), metadata=auth(globex)))
    assert missing == grpc.StatusCode.NOT_FOUND
    ask = gateway.Ask(gateway_pb2.AskRequest(question="anything?", knowledge_base="acme-only"), metadata=auth(globex))
    assert await stream_code(ask) == grpc.StatusCode.NOT_FOUND
    search = gateway.Search(gateway_pb2.SearchQuery(question="anything?", knowledge_base="acme-only"), metadata=auth(globex))
    assert await code_of(search) == grpc.StatusCode.NOT_FOUND

    # Tasks: acme's are not globex's to see, list or cancel.
    rebuild = await kbs.RebuildKnowledgeBase(knowledge_pb2.RebuildKnowledgeBaseRequest(name="hr-policies"), metadata=auth(acme))
    assert rebuild.knowledge_base == "hr-policies"  # a name, never the store's key
    assert await code_of(ingestion.GetTask(ingestion_pb2.GetTaskRequest(id=rebuild.id), metadata=auth(globex))) == grpc.StatusCode.NOT_FOUND
    assert await code_of(ingestion.CancelTask(ingestion_pb2.CancelTaskRequest(id=rebuild.id), metadata=auth(globex))) == grpc.StatusCode.NOT_FOUND
    globex_tasks = await ingestion.ListTasks(ingestion_pb2.ListTasksRequest(), metadata=auth(globex))
    assert rebuild.id not in {t.id for t in globex_tasks.tasks}
    acme_tasks = await ingestion.ListTasks(ingestion_pb2.ListTasksRequest(), metadata=auth(acme))
    assert rebuild.id in {t.id for t in acme_tasks.tasks}
    assert (await ingestion.GetTask(ingestion_pb2.GetTaskRequest(id=rebuild.id), metadata=auth(acme))).id == rebuild.id

    # Keys: a tenant's admin manages its own tenant's only.
    other = await code_of(keys.CreateKey(keys_pb2.CreateKeyRequest(tenant="acme", role="admin"), metadata=auth(globex)))
    assert other == grpc.StatusCode.PERMISSION_DENIED
    revoke = await code_of(keys.RevokeKey(keys_pb2.RevokeKeyRequest(id=mesh.key_ids["acme-reader"]), metadata=auth(globex)))
    assert revoke == grpc.StatusCode.NOT_FOUND
    listed_keys = await keys.ListKeys(keys_pb2.ListKeysRequest(), metadata=auth(globex))
    assert {k.tenant for k in listed_keys.keys} == {"globex"}
    assert all(not k.HasField("revoked_at") for k in listed_keys.keys)

    # The operator acts in the tenant it names.
    as_acme = [*auth(mesh.operator_key), ("x-askmesh-tenant", "acme")]
    names = {kb.name for kb in (await kbs.ListKnowledgeBases(knowledge_pb2.ListKnowledgeBasesRequest(), metadata=as_acme)).knowledge_bases}
    assert {"hr-policies", "acme-only", "roles"} <= names

    # Nothing logged any key.
    for secret in [mesh.operator_key, mesh.internal_token, *mesh.keys.values()]:
        assert secret not in caplog.text


async def test_a_revoked_key_stops_working(mesh: Mesh) -> None:
    keys = keys_pb2_grpc.ApiKeysStub(mesh.channel)
    kbs = knowledge_pb2_grpc.KnowledgeBasesStub(mesh.channel)
    gateway = gateway_pb2_grpc.GatewayStub(mesh.channel)
    created = await keys.CreateKey(keys_pb2.CreateKeyRequest(role="reader", description="short-lived"), metadata=auth(mesh.keys["acme-admin"]))
    assert created.key.tenant == "acme"
    assert await code_of(kbs.ListKnowledgeBases(knowledge_pb2.ListKnowledgeBasesRequest(), metadata=auth(created.secret))) == grpc.StatusCode.OK
    revoked = await keys.RevokeKey(keys_pb2.RevokeKeyRequest(id=created.key.id), metadata=auth(mesh.keys["acme-admin"]))
    assert revoked.HasField("revoked_at")
    assert await code_of(kbs.ListKnowledgeBases(knowledge_pb2.ListKnowledgeBasesRequest(), metadata=auth(created.secret))) == grpc.StatusCode.UNAUTHENTICATED
    ask = gateway.Ask(gateway_pb2.AskRequest(question="still?"), metadata=auth(created.secret))
    assert await stream_code(ask) == grpc.StatusCode.UNAUTHENTICATED


async def test_one_key_fills_only_its_own_share_of_the_generators_line(mesh: Mesh, generation_engine: GenerationEngine) -> None:
    """acme's reader asks more long questions at once than the generator has slots; globex's
    question then waits behind one of acme's waiting questions, not behind all of them."""
    kbs = knowledge_pb2_grpc.KnowledgeBasesStub(mesh.channel)
    gateway = gateway_pb2_grpc.GatewayStub(mesh.channel)
    for tenant in ("acme", "globex"):
        await kbs.CreateKnowledgeBase(knowledge_pb2.CreateKnowledgeBaseRequest(name="fair-share"), metadata=auth(mesh.keys[f"{tenant}-admin"]))
    long_answer = common_pb2.GenerationParameters(max_new_tokens=400, temperature=0)
    flood = [
        gateway.Ask(gateway_pb2.AskRequest(question=f"Tell me a long story ({n}).", knowledge_base="fair-share", parameters=long_answer),
                    metadata=auth(mesh.keys["acme-reader"]))
        for n in range(generation_engine.slots + 4)
    ]
    try:
        await until(lambda: generation_engine.waiting >= 4, "acme's questions beyond the slots wait")
        acme_id = mesh.key_ids["acme-reader"]
        assert {ticket.caller for ticket in generation_engine.queue.waiting} == {acme_id}
        other = gateway.Ask(
            gateway_pb2.AskRequest(question="When are the holidays?", knowledge_base="fair-share",
                                   parameters=common_pb2.GenerationParameters(max_new_tokens=4, temperature=0)),
            metadata=auth(mesh.keys["globex-reader"]),
        )
        first = await asyncio.wait_for(other.read(), 30)
        assert first.WhichOneof("event") == "queued" and first.queued.position == 2, first
        for call in flood:
            call.cancel()
        events = [first]
        while (message := await asyncio.wait_for(other.read(), 120)) is not grpc.aio.EOF:
            events.append(message)
        assert events[-1].WhichOneof("event") == "done"
    finally:
        for call in flood:
            call.cancel()
    await until(lambda: generation_engine.running + generation_engine.waiting == 0, "every place is given up")


async def test_the_inside_stays_inside(mesh: Mesh) -> None:
    assert mesh.front.ingestor is not None
    own_port = grpc.aio.insecure_channel(f"127.0.0.1:{mesh.front.ingestor.port}")
    catalog = catalog_pb2_grpc.CatalogStub(own_port)
    request = catalog_pb2.GetSearchViewRequest(knowledge_base="hr-policies", tenant="acme")
    try:
        assert await code_of(catalog.GetSearchView(request)) == grpc.StatusCode.UNAUTHENTICATED
        assert await code_of(catalog.GetSearchView(request, metadata=auth(mesh.keys["acme-admin"]))) == grpc.StatusCode.PERMISSION_DENIED
        assert await code_of(catalog.GetSearchView(request, metadata=auth(mesh.operator_key))) == grpc.StatusCode.PERMISSION_DENIED
        assert await code_of(catalog.GetSearchView(request, metadata=auth(mesh.internal_token))) in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND)
        # The internal token is no tenant's key: public RPCs refuse it.
        kbs = knowledge_pb2_grpc.KnowledgeBasesStub(own_port)
        assert await code_of(kbs.ListKnowledgeBases(knowledge_pb2.ListKnowledgeBasesRequest(), metadata=auth(mesh.internal_token))) == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await own_port.close()
    # The front door does not route the internal services at all.
    through_front = catalog_pb2_grpc.CatalogStub(mesh.channel)
    assert await code_of(through_front.GetSearchView(request, metadata=auth(mesh.internal_token))) == grpc.StatusCode.UNIMPLEMENTED
