"""Durable state of the ingestor tier: knowledge bases, documents (with versions), parsed
document sources, ingestion tasks with lease-based claiming, and the bytes of uploads.

Why a store at all: ingestion runs in the background and must survive a crash or a restart,
and several replicas must share one view of what exists and who works on what. This module is
the contract (records, errors, the `Store` Protocol) and `open_store`, which picks an
implementation from a URL:

- `SqliteStore` (store_sqlite.py): one SQLite file, for one machine (several processes may
  open the same file);
- `PostgresStore` (store_postgres.py): one PostgreSQL database shared by replicas on many
  machines.

Both run the same SQL (sql_*.py) through a small dialect object, so they cannot drift apart.

Why document versions: an update writes the chunks of the new version into the vector store
while they are invisible, then ONE commit here flips which version readers see. Until then
`visibility_pins` tells the question path which version of each in-flight document it may
show, so a reader never sees a half-written or a half-deleted document.

Why uploads are in the store: a task accepted by one replica may be resumed by any other, on
any machine, so the bytes it works on cannot live on the accepting replica's disk.

The store is synchronous on purpose (sqlite3 and psycopg's sync API are); async callers run it
in a thread, so every method is thread-safe. Times are float seconds since the epoch; methods
that make time-based decisions take `now` from the caller so tests control the clock.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # for type checkers: at run time __getattr__ below re-exports them lazily
    from services.ingestor.store_postgres import PostgresStore  # noqa: F401
    from services.ingestor.store_sqlite import SqliteStore  # noqa: F401

TASK_QUEUED = "queued"
TASK_RUNNING = "running"
TASK_SUCCEEDED = "succeeded"
TASK_FAILED = "failed"
TASK_CANCELLED = "cancelled"
TERMINAL_STATES = frozenset({TASK_SUCCEEDED, TASK_FAILED, TASK_CANCELLED})

KIND_INGEST_FILE = "ingest_file"
KIND_REBUILD = "rebuild"

STAGE_RECEIVED = "received"
STAGE_PARSING = "parsing"
STAGE_CHUNKING = "chunking"
STAGE_EMBEDDING = "embedding"
STAGE_FINALIZING = "finalizing"
STAGE_DONE = "done"
STAGES = (STAGE_RECEIVED, STAGE_PARSING, STAGE_CHUNKING, STAGE_EMBEDDING, STAGE_FINALIZING, STAGE_DONE)

# A knowledge base is created and deleted in steps (its record, then its Milvus collection):
# the state records which step it is in, so a crash in between is finished by the reconciler.
KB_CREATING = "creating"
KB_READY = "ready"
KB_DELETING = "deleting"



class StoreError(Exception):
    """Base of every error the store raises on purpose (not for I/O or database driver failures)."""


class AlreadyExists(StoreError):
    """The thing to create exists already."""


class NotFoundError(StoreError):
    """The thing named does not exist (or, for documents, has no visible version)."""


class Conflict(StoreError):
    """A state precondition failed: another write is under way, a lease was lost, ..."""


@dataclass
class KnowledgeBaseRecord:
    name: str
    description: str = ""
    # (field name, askmesh.v1 MetadataType enum int)
    metadata_schema: list[tuple[str, int]] = field(default_factory=list)
    chunk_size: int = 800
    chunk_overlap: int = 100
    embedding_model: str = ""
    dimension: int = 0
    generation: int = 1  # the Milvus collection generation in use
    rebuilding_generation: int = 0  # >0 while a rebuild writes that generation
    created_at: float = 0.0
    updated_at: float = 0.0
    state: str = KB_READY
    # While creating or deleting: until when the request doing it is expected to be alive.
    lease_until: float = 0.0
    # The retriever's key for its collections: an id of the store's own, never the name (a name
    # is only a label, and no name can reach the collections of another knowledge base). Those
    # made before ids existed keep their name here.
    collection: str = ""
    # How its questions search when they do not say: "dense", "keyword" or "hybrid"; "" follows
    # the ingestor's default_search_mode (every knowledge base made before search modes does).
    search_mode: str = ""

    @property
    def ready(self) -> bool:
        return self.state == KB_READY


@dataclass
class DocumentRecord:
    knowledge_base: str
    id: str
    title: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    version: int = 0  # the visible version; 0 = none yet (a new document being written)
    pending_version: int = 0  # a version being written (0 = none)
    deleting: bool = False  # being deleted: nothing of it is visible
    chunk_count: int = 0
    size_bytes: int = 0
    file_name: str = ""
    content_type: str = ""
    updated_at: float = 0.0
    settling: bool = False  # committed, older versions' chunks still being removed
    # Who is writing, deleting or settling the document, and until when it is expected to be
    # alive (it renews as it progresses): an expired lease is an intent the reconciler finishes.
    lease_owner: str = ""
    lease_until: float = 0.0
    # What the visible version was made from (title, metadata, text, chunking): a write of the
    # same content is a no-op.
    content_hash: str = ""

    @property
    def visible(self) -> bool:
        """Whether readers may see this document at all (some version committed, not deleting)."""
        return self.version > 0 and not self.deleting


@dataclass
class TaskRecord:
    id: str
    kind: str
    knowledge_base: str
    document_id: str = ""
    file_name: str = ""
    state: str = TASK_QUEUED
    stage: str = STAGE_RECEIVED
    bytes: int = 0
    documents_total: int = 0
    documents_done: int = 0
    chunks_total: int = 0
    chunks_stored: int = 0
    error: str = ""
    cancel_requested: bool = False
    spec: dict[str, Any] = field(default_factory=dict)  # what the task must do (JSON)
    checkpoint: dict[str, Any] = field(default_factory=dict)  # how far it got, to resume
    owner: str = ""  # worker id holding the lease ("" = none)
    lease_until: float = 0.0
    created_at: float = 0.0
    updated_at: float = 0.0
    # Claims so far: each is one attempt. One handed back unfailed (its worker stopping, a wait
    # for another write of the document) is given back; a worker that died keeps it counted.
    attempts: int = 0
    # Its place in the queue: when it was created, or put back to wait for another write or to
    # be retried (then later than now: the delay). Claims go by it, so a task put back waits
    # behind those that waited before it.
    available_at: float = 0.0


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key as stored: its hash, never the key."""

    id: str
    key_hash: str
    tenant: str
    role: str
    description: str = ""
    created_at: float = 0.0
    revoked_at: float = 0.0  # 0 while valid


class Store(Protocol):
    """What the ingestor needs from durable state. Every method is one atomic step: a
    multi-row change either happens entirely or not at all, also with several processes or
    replicas working on the same data."""

    def close(self) -> None:
        """Release the connection(s); the store must not be used afterwards."""
        ...

    # -- knowledge bases ------------------------------------------------------------------

    def create_knowledge_base(self, record: KnowledgeBaseRecord) -> KnowledgeBaseRecord:
        """Store a new knowledge base (AlreadyExists if the name is taken); returns it with
        created_at/updated_at filled in when they were 0."""
        ...

    def get_knowledge_base(self, name: str) -> KnowledgeBaseRecord | None: ...

    def list_knowledge_bases(self) -> list[KnowledgeBaseRecord]:
        """All knowledge bases, by name."""
        ...

    def update_knowledge_base(self, name: str, /, **changes: Any) -> KnowledgeBaseRecord:
        """Change fields of a knowledge base (KnowledgeBaseRecord field names other than
        `name`, else ValueError); bumps updated_at unless given; NotFoundError if missing."""
        ...

    def delete_knowledge_base(self, name: str) -> int:
        """Delete a knowledge base with its documents and sources in one transaction and
        cancel its queued/running tasks; returns the number of (visible) documents deleted."""
        ...

    def lease_knowledge_base(self, name: str, *, state: str, lease_s: float, now: float) -> bool:
        """Take over an unfinished create or delete (`state`) whose lease expired: True if taken."""
        ...

    def begin_knowledge_base_delete(self, name: str, *, lease_s: float, now: float) -> int:
        """Hide the knowledge base (state deleting) and cancel its tasks before its collections
        are dropped (idempotent); returns its visible documents; NotFoundError if missing."""
        ...

    def finish_knowledge_base_delete(self, name: str) -> None:
        """Remove a deleted knowledge base's records (idempotent)."""
        ...

    def stale_knowledge_bases(self, now: float) -> list[KnowledgeBaseRecord]:
        """Knowledge bases left creating or deleting, their lease expired."""
        ...

    def knowledge_base_stats(self, name: str) -> tuple[int, int, int]:
        """(visible documents, sum of their chunks, sum of their bytes); NotFoundError if
        the knowledge base is missing."""
        ...

    # -- documents -------------------------------------------------------------------------

    def begin_document_version(
        self,
        knowledge_base: str,
        document_id: str,
        *,
        title: str,
        metadata: dict[str, Any],
        file_name: str,
        content_type: str,
        now: float,
        owner: str = "",
        lease_s: float = 0.0,
        content_hash: str = "",
    ) -> int:
        """Reserve a new, never used version number for a document about to be (re)written by
        `owner` for `lease_s` (renewed as it goes); Conflict if a delete of it, or another write
        whose lease holds, is under way (a write whose lease ran out is superseded: its version
        is recorded as abandoned). NotFoundError unless the knowledge base is ready."""
        ...

    def renew_document_lease(
        self, knowledge_base: str, document_id: str, version: int, *, owner: str, lease_s: float, now: float
    ) -> bool:
        """Keep, or take back (own owner, or lease expired), the write of `version`; False when
        it is no longer the version being written."""
        ...

    def stale_documents(self, now: float, limit: int = 100) -> list[DocumentRecord]:
        """Documents with a write, delete or settling whose lease expired (writes of live
        ingestion tasks excepted)."""
        ...

    def abandoned_versions(self, limit: int = 100) -> list[tuple[str, str, int]]:
        """Given-up versions whose chunks may remain in the vector store."""
        ...

    def forget_abandoned_version(self, knowledge_base: str, document_id: str, version: int) -> None: ...

    def forget_abandoned_versions_below(self, knowledge_base: str, document_id: str, version: int) -> None:
        """The chunks of every version of the document below `version` are gone (it settled)."""
        ...

    def commit_document_version(
        self,
        knowledge_base: str,
        document_id: str,
        version: int,
        *,
        chunk_count: int,
        size_bytes: int,
        now: float,
        lease_s: float = 0.0,
    ) -> DocumentRecord:
        """Make `version` the visible one (Conflict if it is not the pending version); the
        document settles (older versions' chunks being removed) under a lease of `lease_s`."""
        ...

    def abort_document_version(self, knowledge_base: str, document_id: str, version: int) -> None:
        """Give up a pending version (idempotent); a document that never had a visible
        version disappears."""
        ...

    def begin_document_delete(
        self, knowledge_base: str, document_id: str, *, owner: str = "", lease_s: float = 0.0, now: float = 0.0
    ) -> DocumentRecord:
        """Hide a document while its chunks are deleted (NotFoundError if it has no visible
        version and no delete under way; Conflict if a write whose lease holds is under way).
        A delete already under way is taken up again."""
        ...

    def finish_document_delete(self, knowledge_base: str, document_id: str) -> None:
        """Remove the document row and its sources (idempotent)."""
        ...

    def get_document(self, knowledge_base: str, document_id: str) -> DocumentRecord | None:
        """The row whatever its state (check `.visible`): workers need pending ones too."""
        ...

    def list_documents(
        self, knowledge_base: str, *, after_id: str = "", limit: int = 100
    ) -> list[DocumentRecord]:
        """Visible documents ordered by id, starting after `after_id` (keyset pagination)."""
        ...

    def visibility_pins(self, knowledge_base: str) -> list[tuple[str, int]]:
        """(document id, version readers may see; 0 = none) for every document with a write,
        a delete or the removal of old versions under way. Cheap: it runs on every question."""
        ...

    def visibility(self, knowledge_base: str) -> tuple[int, list[tuple[str, int]]]:
        """The visibility epoch and the pins, read together."""
        ...

    def visibility_epoch(self, knowledge_base: str) -> int:
        """Bumped by every change of what readers may see in the knowledge base."""
        ...

    def finish_settling(self, knowledge_base: str, document_id: str) -> None:
        """The document's older versions are gone: readers need no pin for it any more."""
        ...

    def all_documents_for_rebuild(self, knowledge_base: str) -> list[DocumentRecord]:
        """Every visible document, by id."""
        ...

    # -- parsed sources -------------------------------------------------------------------

    def save_source(
        self, knowledge_base: str, document_id: str, version: int, sections: list[dict[str, Any]]
    ) -> None: ...

    def load_source(
        self, knowledge_base: str, document_id: str, version: int
    ) -> list[dict[str, Any]] | None: ...

    def delete_sources(
        self, knowledge_base: str, document_id: str, *, except_version: int | None = None
    ) -> None: ...

    # -- tasks ------------------------------------------------------------------------------

    def create_task(self, record: TaskRecord) -> TaskRecord: ...

    def get_task(self, task_id: str) -> TaskRecord | None: ...

    def list_tasks(
        self,
        *,
        knowledge_base: str = "",
        states: Sequence[str] = (),
        limit: int = 100,
        before: tuple[float, str] | None = None,
        key_range: tuple[str, str] | None = None,
        bare_keys_only: bool = False,
    ) -> list[TaskRecord]:
        """Newest first; `before` = (created_at, id) of the last row of the previous page.
        `key_range` [low, high) bounds the knowledge-base keys, `bare_keys_only` keeps those
        without a '/' (a tenant's tasks; see tenancy.py)."""
        ...

    def update_task(self, task_id: str, /, *, owner: str | None = None, **changes: Any) -> TaskRecord:
        """Change task fields; with `owner`, only while that worker still holds the task
        (Conflict otherwise), so a worker that lost its lease cannot overwrite progress."""
        ...

    def request_cancel(self, task_id: str) -> TaskRecord: ...

    def claim_next_task(
        self, owner: str, *, lease_s: float, now: float, kinds: Sequence[str] = ()
    ) -> TaskRecord | None:
        """Atomically take, for `owner`, the runnable task that became claimable first (queued
        and available, or running with an expired lease: its worker died, and it resumes from
        its checkpoint); each claim counts one attempt."""
        ...

    def renew_lease(self, task_id: str, owner: str, *, lease_s: float, now: float) -> bool: ...

    def requeue_task(
        self,
        task_id: str,
        owner: str,
        *,
        now: float,
        delay_s: float | None = None,
        attempt_failed: bool = False,
        error: str | None = None,
        stage: str | None = None,
    ) -> bool:
        """Hand a task `owner` holds back to the queue: with `delay_s`, behind the tasks
        already waiting, claimable `delay_s` from `now` (a wait for another write, a retry);
        without, in its place (its worker stopping). Unless `attempt_failed`, the attempt is
        given back. False if `owner` no longer held it."""
        ...

    # -- uploaded bytes ---------------------------------------------------------------------

    # -- API keys ----------------------------------------------------------------------------

    def create_api_key(self, record: ApiKeyRecord) -> ApiKeyRecord:
        """Store a new key (created_at filled in when 0)."""
        ...

    def find_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        """The valid (unrevoked) key with this hash."""
        ...

    def list_api_keys(self, tenant: str | None, include_revoked: bool = False) -> list[ApiKeyRecord]:
        """The keys of `tenant` (None: of every tenant), oldest first."""
        ...

    def revoke_api_key(self, key_id: str, tenant: str | None) -> ApiKeyRecord:
        """Revoke the key (of `tenant`, unless None); NotFoundError where there is none;
        revoking a revoked key keeps its first revocation time."""
        ...

    def save_upload_part(self, task_id: str, part: int, data: bytes, now: float) -> None:
        """Store part number `part` of the file a task ingests (saving a part again replaces
        it). Parts are numbered by the caller; they are read back in that order."""
        ...

    def upload_parts(self, task_id: str) -> Iterator[bytes]:
        """The task's parts in order, read a part at a time as the caller goes (a file never
        has to fit in memory). Nothing is held between parts: parts deleted meanwhile end the
        iteration early, parts added after the current one are still read."""
        ...

    def upload_size(self, task_id: str) -> int:
        """Total bytes stored for the task (0 if none)."""
        ...

    def delete_upload(self, task_id: str) -> None:
        """Remove every part of the task's upload (idempotent)."""
        ...

    def uploads_to_sweep(self, now: float, orphan_age_s: float) -> list[str]:
        """Task ids, by id, whose stored upload nobody needs any more: their task ended
        (TERMINAL_STATES), or there is no such task and the newest part is older than
        `orphan_age_s` (an upload whose task was never created)."""
        ...


def open_store(url: str) -> Store:
    """The store a URL names: `postgresql://...` (or `postgres://`) is a PostgresStore,
    `sqlite:///relative/path` or `sqlite:////absolute/path` (SQLAlchemy's spelling) or a plain
    file path is a SqliteStore."""
    # Imported here: the implementations import this module, and psycopg is only needed for
    # PostgreSQL.
    if url.startswith(("postgresql://", "postgres://")):
        from services.ingestor.store_postgres import PostgresStore

        return PostgresStore(url)
    from services.ingestor.store_sqlite import SqliteStore

    if url.startswith("sqlite:///"):
        return SqliteStore(Path(url.removeprefix("sqlite:///")))
    if "://" in url:
        raise ValueError(f"unsupported store URL {url!r}: use postgresql://..., sqlite:///path or a file path")
    return SqliteStore(Path(url))


def __getattr__(name: str) -> Any:
    # `from services.ingestor.store import SqliteStore` keeps working (callers constructed it
    # from here before the implementations moved out); resolved lazily because those modules
    # import this one.
    if name == "SqliteStore":
        from services.ingestor.store_sqlite import SqliteStore

        return SqliteStore
    if name == "PostgresStore":
        from services.ingestor.store_postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
