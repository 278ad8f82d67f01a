"""Who is calling, and what they may do: API keys, the operator's key, the mesh's internal
token and (optionally) JWT bearer tokens, checked by one server interceptor in every tier.

- Every call but health and reflection carries `authorization: Bearer <credential>`.
- Public RPCs need a caller with a tenant and a role (reader < writer < admin); the operator's
  key is an admin of every tenant, acting in the one named by the `x-askmesh-tenant` header.
- Internal RPCs (the tiers' own APIs) need the mesh's internal token; nothing else opens them.
- A method this module does not list is internal: new RPCs are closed until someone opens them.
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from askmesh.runtime.config import AskmeshSettings
from askmesh.runtime.errors import (
    AskmeshError,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    shown,
)
from askmesh.runtime.handlers import Streaming, Unary, refusing, wrapped

log = logging.getLogger("askmesh.auth")

AUTHORIZATION_HEADER = "authorization"
TENANT_HEADER = "x-askmesh-tenant"
# Set by the gateway on its calls to the generator: whose question it is, so that one caller
# cannot fill the generator's queue (the value is a key id, never the key).
CALLER_HEADER = "x-askmesh-caller"
DEFAULT_TENANT = "default"
_TENANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# `amk_` lets secret scanners (and people) recognise a leaked key; the id is what logs and
# listings show, the secret part never leaves the caller.
KEY_PREFIX = "amk_"
_KEY = re.compile(r"^amk_(?P<id>[0-9a-f]{16})_(?P<secret>[A-Za-z0-9_-]{43})$")


class Role(enum.IntEnum):
    READER = 1
    WRITER = 2
    ADMIN = 3

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"{shown(text)} is not a role (reader, writer or admin)") from None

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Caller:
    """An authenticated caller. `internal`: the mesh itself (no tenant, no role); `operator`: the
    key of whoever runs the mesh (admin of every tenant, and of keys)."""

    tenant: str
    role: Role
    key_id: str
    operator: bool = False
    internal: bool = False


INTERNAL_CALLER = Caller(tenant="", role=Role.ADMIN, key_id="internal", internal=True)
# Where authentication is switched off: everyone is the operator in the default tenant.
UNAUTHENTICATED_OPERATOR = Caller(tenant=DEFAULT_TENANT, role=Role.ADMIN, key_id="anonymous", operator=True)


def check_tenant(tenant: str, field: str = "tenant") -> str:
    if not _TENANT.match(tenant):
        raise InvalidArgument(field, "must be 1-63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit")
    return tenant


# --- keys ---------------------------------------------------------------------------------------


def new_key() -> tuple[str, str]:
    """A fresh API key and its id."""
    key_id = secrets.token_hex(8)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def key_hash(key: str) -> str:
    """What the store keeps of a key. A fast hash is right here, unlike for passwords: a key has
    256 random bits, so there is nothing to guess a dictionary against, and every call checks one."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    match = _KEY.match(key)
    return match["id"] if match else None


def new_secret_file(path: Path, secret: str) -> None:
    """Writes `secret` alone on one line to `path`, readable by its owner only, unless it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = path.open("x", encoding="utf-8")
    except FileExistsError:
        return
    with descriptor:
        path.chmod(0o600)
        descriptor.write(secret + "\n")


def read_secret_file(path: Path) -> str:
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise SystemExit(f"cannot read the secret in {path}: {error.strerror}") from None
    if not secret:
        raise SystemExit(f"{path} is empty; it must hold the secret alone on one line")
    return secret


# --- settings -----------------------------------------------------------------------------------


class AuthSettings(AskmeshSettings):
    section = "auth"
    model_config = SettingsConfigDict(env_prefix="ASKMESH_AUTH_", extra="ignore")

    # Off only by an explicit choice, which every log line then says.
    enabled: bool = True
    # The operator's key (admin of every tenant and of keys), from a file holding it alone.
    operator_key_file: Path | None = None
    # The mesh's own credential for calls between tiers (a Kubernetes Secret in Helm).
    internal_token_file: Path | None = None
    # JWT bearer tokens, checked against the keys of a JWKS file; off while it is unset.
    jwks_file: Path | None = None
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_tenant_claim: str = "tenant"
    jwt_role_claim: str = "role"
    # Calls per second each key may make on the public API (a token bucket per key and
    # replica), and how many it may make at once above that rate.
    rate_per_s: float = Field(default=20.0, gt=0)
    rate_burst: int = Field(default=40, ge=1)
    # How long a replica that does not own the keys (the gateway) trusts an answer about one.
    lookup_ttl_s: float = Field(default=10.0, ge=0)

    def internal_token(self) -> str | None:
        if not self.enabled:
            return None
        if self.internal_token_file is None:
            raise SystemExit(
                "authentication is on but no internal token is configured: set "
                "ASKMESH_AUTH_INTERNAL_TOKEN_FILE, or ASKMESH_AUTH_ENABLED=false to run without authentication"
            )
        return read_secret_file(self.internal_token_file)

    def operator_key_hash(self) -> str | None:
        if not self.enabled or self.operator_key_file is None:
            return None
        return key_hash(read_secret_file(self.operator_key_file))


AUTH_OFF_WARNING = "AUTHENTICATION OFF: anyone who reaches this port is an admin of every tenant"


# --- what each RPC needs -------------------------------------------------------------------------


class Open(enum.Enum):
    OPEN = "open"


class Internal(enum.Enum):
    INTERNAL = "internal"


Required = Role | Open | Internal

_PUBLIC: dict[str, Required] = {
    "/askmesh.v1.Gateway/Ask": Role.READER,
    "/askmesh.v1.Gateway/Search": Role.READER,
    "/askmesh.v1.Gateway/AddDocuments": Role.WRITER,
    "/askmesh.v1.Gateway/Embed": Role.READER,
    "/askmesh.v1.KnowledgeBases/CreateKnowledgeBase": Role.ADMIN,
    "/askmesh.v1.KnowledgeBases/ListKnowledgeBases": Role.READER,
    "/askmesh.v1.KnowledgeBases/GetKnowledgeBase": Role.READER,
    "/askmesh.v1.KnowledgeBases/DeleteKnowledgeBase": Role.ADMIN,
    "/askmesh.v1.KnowledgeBases/RebuildKnowledgeBase": Role.ADMIN,
    "/askmesh.v1.KnowledgeBases/ListDocuments": Role.READER,
    "/askmesh.v1.KnowledgeBases/GetDocument": Role.READER,
    "/askmesh.v1.KnowledgeBases/DeleteDocument": Role.WRITER,
    "/askmesh.v1.Ingestion/UploadFile": Role.WRITER,
    "/askmesh.v1.Ingestion/GetTask": Role.READER,
    "/askmesh.v1.Ingestion/WatchTask": Role.READER,
    "/askmesh.v1.Ingestion/ListTasks": Role.READER,
    "/askmesh.v1.Ingestion/CancelTask": Role.WRITER,
    "/askmesh.v1.ApiKeys/CreateKey": Role.ADMIN,
    "/askmesh.v1.ApiKeys/ListKeys": Role.ADMIN,
    "/askmesh.v1.ApiKeys/RevokeKey": Role.ADMIN,
}
_OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")


def required_for(method: str) -> Required:
    if method.startswith(_OPEN_SERVICES):
        return Open.OPEN
    return _PUBLIC.get(method, Internal.INTERNAL)


# --- who is calling ------------------------------------------------------------------------------

# The stored keys, looked up by hash: the ingestor asks its store, other tiers ask the ingestor.
KeyLookup = Callable[[str], Awaitable[Caller | None]]
JwtCheck = Callable[[str], Caller]


def header(metadata: Sequence[tuple[str, str | bytes]] | None, name: str) -> str | None:
    for key, value in metadata or ():
        if key == name and isinstance(value, str):
            return value
    return None


def bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    scheme, _, credential = (header(metadata, AUTHORIZATION_HEADER) or "").partition(" ")
    return credential.strip() if scheme.lower() == "bearer" and credential.strip() else None


def _same_secret(given: str, expected: str) -> bool:
    """Compared in constant time: how long a refusal takes tells nothing of the secret."""
    return hmac.compare_digest(given.encode(), expected.encode())


class Authenticator:
    """Tells who a call's credential belongs to, or raises UNAUTHENTICATED."""

    def __init__(
        self,
        settings: AuthSettings,
        lookup: KeyLookup | None = None,
        jwt_check: JwtCheck | None = None,
    ) -> None:
        self.enabled = settings.enabled
        self._internal = settings.internal_token()
        self._operator_hash = settings.operator_key_hash()
        self._lookup = lookup
        self._jwt_check = jwt_check

    async def caller(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Caller:
        if not self.enabled:
            return _acting_in(UNAUTHENTICATED_OPERATOR, metadata)
        credential = bearer(metadata)
        if credential is None:
            raise Unauthenticated("authorization: missing; send the header 'authorization: Bearer <api key>'")
        if self._internal is not None and _same_secret(credential, self._internal):
            return INTERNAL_CALLER
        hashed = key_hash(credential)
        if self._operator_hash is not None and _same_secret(hashed, self._operator_hash):
            return _acting_in(Caller(tenant=DEFAULT_TENANT, role=Role.ADMIN, key_id="operator", operator=True), metadata)
        if credential.count(".") == 2 and self._jwt_check is not None:
            return self._jwt_check(credential)
        found = await self._lookup(hashed) if self._lookup is not None and key_id_of(credential) else None
        if found is None:
            raise Unauthenticated("authorization: not a valid API key (unknown, revoked or malformed)")
        return found


def _acting_in(caller: Caller, metadata: Sequence[tuple[str, str | bytes]] | None) -> Caller:
    tenant = header(metadata, TENANT_HEADER)
    if tenant is None:
        return caller
    return Caller(tenant=check_tenant(tenant, TENANT_HEADER), role=caller.role, key_id=caller.key_id, operator=True)


class CachedLookup:
    """A KeyLookup kept for `ttl_s` per key hash, so that a replica asking another for keys asks
    once per key and period, not once per call; a revoked key stops working within `ttl_s`."""

    def __init__(self, lookup: KeyLookup, ttl_s: float, max_entries: int = 10_000) -> None:
        self._lookup = lookup
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._entries: dict[str, tuple[float, Caller | None]] = {}

    async def __call__(self, hashed: str) -> Caller | None:
        now = time.monotonic()
        entry = self._entries.get(hashed)
        if entry is not None and entry[0] > now:
            return entry[1]
        found = await self._lookup(hashed)
        if len(self._entries) >= self._max_entries:
            self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
        self._entries[hashed] = (now + self._ttl_s, found)
        return found


def authorize(caller: Caller, required: Role | Internal) -> None:
    if isinstance(required, Internal):
        if not caller.internal:
            raise PermissionDenied("this RPC is internal to the mesh; it needs the mesh's own credentials")
        return
    if caller.internal:
        raise PermissionDenied("the mesh's internal token does not act for a tenant; use an API key")
    if caller.role < required:
        raise PermissionDenied(f"this RPC needs the role {required.label}; the key has the role {caller.role.label}")


class RateLimiter:
    """A token bucket per key; refusals carry when a token will be there again."""

    def __init__(self, rate_per_s: float, burst: int, max_keys: int = 100_000) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key_id: str) -> None:
        now = time.monotonic()
        tokens, at = self._buckets.get(key_id, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        if tokens < 1:
            wait_s = (1 - tokens) / self._rate
            self._buckets[key_id] = (tokens, now)
            raise ResourceExhausted(
                f"rate limit: this key may make {self._rate:g} calls per second; ask again in {wait_s:.2f} s",
                retry_after_s=wait_s,
            )
        if len(self._buckets) >= self._max_keys and key_id not in self._buckets:
            self._buckets.clear()
        self._buckets[key_id] = (tokens - 1, now)


_CURRENT: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("askmesh_caller", default=None)


def current_caller() -> Caller:
    """The caller of the RPC being served (set by AuthInterceptor)."""
    caller = _CURRENT.get()
    if caller is None:
        raise AssertionError("no caller: the server runs without AuthInterceptor")
    return caller


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call against `required_for(method)` before its handler runs, and makes its
    caller `current_caller()` inside the handler."""

    def __init__(self, authenticator: Authenticator, limiter: RateLimiter | None) -> None:
        self._authenticator = authenticator
        self._limiter = limiter

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method: str = details.method  # type: ignore[attr-defined]
        required = required_for(method)
        if isinstance(required, Open):
            return handler
        try:
            caller = await self._authenticator.caller(details.invocation_metadata)  # type: ignore[attr-defined]
            # Without authentication there are no keys to limit: everyone would share one bucket.
            if self._authenticator.enabled:
                authorize(caller, required)
                if self._limiter is not None and not caller.internal:
                    self._limiter.take(caller.key_id)
        except AskmeshError as error:
            if error.code == grpc.StatusCode.UNAUTHENTICATED:
                log.info("[AUTH] refused %s: %s", method, error.message)
            return refusing(handler, error)
        except Exception:  # a key store that cannot answer: the caller learns only that
            log.exception("[AUTH] could not check the credentials of a call to %s", method)
            return refusing(handler, AskmeshError("authentication is unavailable; ask again", code=grpc.StatusCode.UNAVAILABLE))
        return _as(handler, caller)


def _as(handler: grpc.RpcMethodHandler, caller: Caller) -> grpc.RpcMethodHandler:
    def unary(behaviour: Unary) -> Unary:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            _CURRENT.set(caller)
            return await behaviour(request, context)

        return run

    def streaming(behaviour: Streaming) -> Streaming:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            _CURRENT.set(caller)
            async for message in behaviour(request, context):
                yield message

        return run

    return wrapped(handler, unary, streaming)


# --- the client side -----------------------------------------------------------------------------


class _Credential:
    """Adds `authorization: Bearer <credential>` to a call's metadata."""

    def __init__(self, credential: str) -> None:
        self._entry = (AUTHORIZATION_HEADER, f"Bearer {credential}")

    def _with_credential(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = list(details.metadata or ())
        if not any(key == AUTHORIZATION_HEADER for key, _ in metadata):
            metadata.append(self._entry)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, grpc.aio.Metadata(*metadata), details.credentials, details.wait_for_ready
        )


# One class per kind of call: grpc.aio files an interceptor under the first kind it implements
# only (an if/elif chain), so one class implementing all four would see unary-unary calls alone.
class _UnaryUnaryCredential(_Credential, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_credential(details), request)


class _UnaryStreamCredential(_Credential, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_credential(details), request)


class _StreamUnaryCredential(_Credential, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._with_credential(details), request_iterator)


class _StreamStreamCredential(_Credential, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._with_credential(details), request_iterator)


def credential_interceptors(credential: str | None) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that send `credential` on every call of an aio channel, of every kind."""
    if credential is None:
        return []
    kinds = (_UnaryUnaryCredential, _UnaryStreamCredential, _StreamUnaryCredential, _StreamStreamCredential)
    return [kind(credential) for kind in kinds]



class _SyncCredential(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """The same for blocking channels (the CLI's): `authorization`, and the operator's tenant."""

    def __init__(self, entries: list[tuple[str, str]]) -> None:
        self._entries = entries

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), *self._entries]
        return _SyncCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


@dataclass(frozen=True)
class _SyncCallDetails(grpc.ClientCallDetails):  # type: ignore[misc]
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


def with_credential(channel: grpc.Channel, credential: str | None, tenant: str | None = None) -> grpc.Channel:
    """`channel` with `authorization: Bearer <credential>` (and the tenant an operator acts
    in) on every call; the channel itself where there is neither."""
    entries = []
    if credential:
        entries.append((AUTHORIZATION_HEADER, f"Bearer {credential}"))
    if tenant:
        entries.append((TENANT_HEADER, tenant))
    return grpc.intercept_channel(channel, _SyncCredential(entries)) if entries else channel


class InternalOnly(grpc.ServerInterceptor):
    """For blocking servers of the mesh's own (MeshControl): every RPC but health and reflection
    needs the internal token."""

    def __init__(self, token: str | None) -> None:
        self._token = token

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if self._token is None or isinstance(required_for(details.method), Open):  # type: ignore[attr-defined]
            return continuation(details)
        credential = bearer(details.invocation_metadata)  # type: ignore[attr-defined]
        if credential is not None and _same_secret(credential, self._token):
            return continuation(details)
        code = grpc.StatusCode.UNAUTHENTICATED if credential is None else grpc.StatusCode.PERMISSION_DENIED
        message = "this RPC is internal to the mesh; it needs the mesh's own credentials"

        def refuse(_: Any, context: grpc.ServicerContext) -> None:
            context.abort(code, message)

        handler = continuation(details)
        if handler is None:
            return None
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return factory(refuse)
