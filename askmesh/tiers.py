"""The mesh's tiers, defined once: what each serves, where it listens by default, and which of
its calls are public. The local mesh, Envoy's configuration, the CLI and the tiers' clients of
one another all read this table."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TierSpec:
    name: str
    # The gRPC services it serves; the first is the one its health is reported under.
    grpc_services: tuple[str, ...]
    default_port: int
    # What Envoy's front door sends to this tier: whole services ("askmesh.v1.KnowledgeBases")
    # or single methods ("askmesh.v1.Gateway/AddDocuments"). Empty: internal only.
    public_routes: tuple[str, ...] = ()
    # Unary calls safe to retry on another replica ("package.Service/Method").
    idempotent_methods: tuple[str, ...] = ()
    # Streams without side effects (an answer), sent again if a replica reset them before answering.
    resendable_streams: tuple[str, ...] = ()
    # Whether a replica's RESOURCE_EXHAUSTED is about that replica alone (another may take the
    # call); the gateway's and the ingestor's come from the tiers behind them, already all tried.
    capacity_per_replica: bool = True
    # Tiers whose replicas must be SERVING before this one can serve.
    needs: tuple[str, ...] = field(default=())
    # Tiers it also calls, without waiting for them to serve.
    also_calls: tuple[str, ...] = field(default=())

    @property
    def calls(self) -> tuple[str, ...]:
        return self.needs + self.also_calls

    @property
    def health_service(self) -> str:
        return self.grpc_services[0]


# The Reranker service is the embedder tier's too (a model server, as TEI serves /embed and
# /rerank); it answers only where a reranker is configured.
EMBEDDER = TierSpec(
    "embedder",
    ("askmesh.v1.Embedder", "askmesh.v1.Reranker"),
    50061,
    idempotent_methods=("askmesh.v1.Embedder/Embed", "askmesh.v1.Reranker/Rerank"),
)
RETRIEVER = TierSpec("retriever", ("askmesh.v1.Retriever",), 50062, idempotent_methods=("askmesh.v1.Retriever/Search",))
GENERATOR = TierSpec(
    "generator",
    ("askmesh.v1.Generator",),
    50063,
    idempotent_methods=("askmesh.v1.Generator/GetLoad",),
    resendable_streams=("askmesh.v1.Generator/Generate", "askmesh.v1.Generator/AdmitAndGenerate"),
)
# AddDocuments is a method of the public Gateway service, served by the ingestor: the front door
# routes that one path here, so a client's address and API stay as they were while the gateway
# replicas never chunk or embed a document.
INGESTOR = TierSpec(
    "ingestor",
    ("askmesh.v1.KnowledgeBases", "askmesh.v1.Ingestion", "askmesh.v1.Catalog", "askmesh.v1.Gateway", "askmesh.v1.ApiKeys"),
    50065,
    public_routes=("askmesh.v1.KnowledgeBases", "askmesh.v1.Ingestion", "askmesh.v1.Gateway/AddDocuments", "askmesh.v1.ApiKeys"),
    idempotent_methods=("askmesh.v1.Catalog/GetSearchView", "askmesh.v1.Catalog/Authenticate"),
    capacity_per_replica=False,  # its RESOURCE_EXHAUSTED is the embedder's, behind every replica
    needs=("embedder", "retriever"),
    also_calls=("generator",),  # how busy it is, to let questions go first (ingest_yield_to_questions_s)
)
GATEWAY = TierSpec(
    "gateway",
    ("askmesh.v1.Gateway",),
    50064,
    public_routes=("askmesh.v1.Gateway",),
    idempotent_methods=("askmesh.v1.Gateway/Embed", "askmesh.v1.Gateway/Search"),
    resendable_streams=("askmesh.v1.Gateway/Ask",),
    capacity_per_replica=False,
    needs=("embedder", "retriever", "generator", "ingestor"),
)

# In start-up order: each tier after the tiers it needs.
TIERS: tuple[TierSpec, ...] = (EMBEDDER, RETRIEVER, GENERATOR, INGESTOR, GATEWAY)
BY_NAME: dict[str, TierSpec] = {tier.name: tier for tier in TIERS}
NAMES: tuple[str, ...] = tuple(BY_NAME)
# The tiers behind the front door, the gateway first: it answers the front door's health checks.
FRONT: tuple[str, ...] = ("gateway", "ingestor")


@dataclass(frozen=True)
class HttpTierSpec:
    """A tier that serves HTTP rather than gRPC: Envoy's HTTP listener routes to it, checks its
    health on `health_path`, and it reaches the tiers it calls through Envoy's internal listener."""

    name: str
    default_port: int
    health_path: str
    # Tiers it calls, with each caller's own credentials (never the mesh's internal token).
    calls: tuple[str, ...]


# The OpenAI-compatible API and the chat page (services/web): a client of the public API, whose
# Ask and Embed are the gateway's and whose knowledge bases and uploads are the ingestor's.
WEB = HttpTierSpec("web", 50066, "/healthz", calls=("gateway", "ingestor"))
# Every tier a mesh runs, gRPC tiers first (in start-up order), then the HTTP tier.
ALL_NAMES: tuple[str, ...] = (*NAMES, WEB.name)


def default_port(name: str) -> int:
    return WEB.default_port if name == WEB.name else BY_NAME[name].default_port


def calls_of(name: str) -> tuple[str, ...]:
    """The tiers `name` calls (whose addresses it is given)."""
    return WEB.calls if name == WEB.name else BY_NAME[name].calls


def internal_routes(spec: TierSpec) -> tuple[str, ...]:
    """What Envoy's internal listener sends to the tier: its own services and the public methods
    it serves of another's service (the ingestor's Gateway/AddDocuments); the Gateway service
    itself only to the gateway tier, which the web tier calls there with each caller's key."""
    own = tuple(s for s in spec.grpc_services if s != GATEWAY.health_service or spec is GATEWAY)
    return own + tuple(route for route in spec.public_routes if route not in own)
