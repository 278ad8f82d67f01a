"""Durable state of the gateway tier: knowledge bases, documents (with versions), parsed
document sources and ingestion tasks with lease-based claiming.

Why a store at all: ingestion runs in the background and must survive a crash or a restart of
the gateway, and several gateway replicas must share one view of what exists and who works on
what. `Store` is the contract; `SqliteStore` is the implementation for one machine (several
gateway *processes* may open the same file). A shared PostgreSQL/Redis implementation for
replicas on many machines can be added later behind the same Protocol.

Why document versions: an update writes the chunks of the new version into the vector store
while they are invisible, then ONE commit here flips which version readers see. Until then
`visibility_pins` tells the question path which version of each in-flight document it may
show, so a reader never sees a half-written or a half-deleted document.

The store is synchronous on purpose (sqlite3 is); async callers run it in a thread. Times are
float seconds since the epoch; methods that make time-based decisions take `now` from the
caller so tests control the clock.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

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

SCHEMA_VERSION = 2
BUSY_TIMEOUT_S = 5.0


class StoreError(Exception):
    """Base of every error the store raises on purpose (not for I/O or SQLite failures)."""


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


class Store(Protocol):
    """What the gateway needs from durable state. Every method is one atomic step: a
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
    ) -> list[TaskRecord]:
        """Newest first; `before` = (created_at, id) of the last row of the previous page."""
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


# ---------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS knowledge_bases (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL DEFAULT '',
    metadata_schema TEXT NOT NULL DEFAULT '[]',
    chunk_size INTEGER NOT NULL,
    chunk_overlap INTEGER NOT NULL,
    embedding_model TEXT NOT NULL DEFAULT '',
    dimension INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL DEFAULT 1,
    rebuilding_generation INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'ready',
    lease_until REAL NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS documents (
    knowledge_base TEXT NOT NULL REFERENCES knowledge_bases(name) ON DELETE CASCADE,
    id TEXT NOT NULL,
    title TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '{}',
    version INTEGER NOT NULL DEFAULT 0,
    pending_version INTEGER NOT NULL DEFAULT 0,
    deleting INTEGER NOT NULL DEFAULT 0,
    -- committed, but older versions' chunks may still be stored: readers stay pinned to
    -- `version` until they are removed (finish_settling)
    settling INTEGER NOT NULL DEFAULT 0,
    chunk_count INTEGER NOT NULL DEFAULT 0,
    size_bytes INTEGER NOT NULL DEFAULT 0,
    file_name TEXT NOT NULL DEFAULT '',
    content_type TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL DEFAULT 0,
    -- what becomes visible at commit: readers keep seeing the old values until then
    pending_title TEXT NOT NULL DEFAULT '',
    pending_metadata TEXT NOT NULL DEFAULT '{}',
    pending_file_name TEXT NOT NULL DEFAULT '',
    pending_content_type TEXT NOT NULL DEFAULT '',
    lease_owner TEXT NOT NULL DEFAULT '',
    lease_until REAL NOT NULL DEFAULT 0,
    content_hash TEXT NOT NULL DEFAULT '',
    pending_content_hash TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (knowledge_base, id)
) WITHOUT ROWID;

-- Only in-flight documents are in this index, so visibility_pins costs O(in-flight), not
-- O(documents). It covers _PINS_QUERY (version included) so the planner never prefers the
-- primary key; the WHERE must match _PINS_QUERY's exactly for SQLite to use it.
CREATE INDEX IF NOT EXISTS documents_in_flight
    ON documents (knowledge_base, pending_version, deleting, settling, version)
    WHERE pending_version > 0 OR deleting <> 0 OR settling <> 0;

-- Bumped by every change of what readers may see in a knowledge base. A question reads it
-- with the pins and again after its search: if it moved, the search may have raced a change
-- (a purge of the version it was pinned to) and is made again with fresh pins.
CREATE TABLE IF NOT EXISTS visibility_epochs (
    knowledge_base TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL
) WITHOUT ROWID;

-- Highest version number ever handed out per document. Kept apart from `documents` because
-- it must outlive the document row (delete, abort of a new document, even deletion of the
-- knowledge base): a version number is never reused, so leftover chunks of an old or aborted
-- version can never be mistaken for a new one.
CREATE TABLE IF NOT EXISTS document_versions (
    knowledge_base TEXT NOT NULL,
    document_id TEXT NOT NULL,
    last_version INTEGER NOT NULL,
    PRIMARY KEY (knowledge_base, document_id)
) WITHOUT ROWID;

-- Versions given up (aborted, or superseded after their writer died) whose chunks may still be
-- in the vector store: a durable to-do for the reconciler, so a crash between giving a
-- version up and deleting its chunks cannot leave them behind.
CREATE TABLE IF NOT EXISTS abandoned_versions (
    knowledge_base TEXT NOT NULL,
    document_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (knowledge_base, document_id, version)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS sources (
    knowledge_base TEXT NOT NULL REFERENCES knowledge_bases(name) ON DELETE CASCADE,
    document_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    data BLOB NOT NULL,  -- zlib(JSON list of sections)
    PRIMARY KEY (knowledge_base, document_id, version)
);

-- No foreign key: tasks outlive their knowledge base as history.
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    knowledge_base TEXT NOT NULL,
    document_id TEXT NOT NULL DEFAULT '',
    file_name TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    stage TEXT NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0,
    documents_total INTEGER NOT NULL DEFAULT 0,
    documents_done INTEGER NOT NULL DEFAULT 0,
    chunks_total INTEGER NOT NULL DEFAULT 0,
    chunks_stored INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    spec TEXT NOT NULL DEFAULT '{}',
    checkpoint TEXT NOT NULL DEFAULT '{}',
    owner TEXT NOT NULL DEFAULT '',
    lease_until REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    -- 0 in rows of older versions: they sort first, in the order they were created.
    available_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state, created_at);
CREATE INDEX IF NOT EXISTS tasks_by_knowledge_base ON tasks (knowledge_base, created_at, id);
"""

_PINS_QUERY = (
    "SELECT id, CASE WHEN deleting <> 0 THEN 0 ELSE version END FROM documents"
    " WHERE knowledge_base = ? AND (pending_version > 0 OR deleting <> 0 OR settling <> 0)"
)
_EPOCH_QUERY = "SELECT epoch FROM visibility_epochs WHERE knowledge_base = ?"


def _bump_epoch(conn: sqlite3.Connection, knowledge_base: str) -> None:
    conn.execute(
        "INSERT INTO visibility_epochs (knowledge_base, epoch) VALUES (?, 1)"
        " ON CONFLICT (knowledge_base) DO UPDATE SET epoch = epoch + 1",
        (knowledge_base,),
    )



# Columns added after a store was first created: (table, column, declaration). Added to an
# older file at start-up when missing (idempotent, so it needs no version number of its own).
_ADDED_COLUMNS = (
    ("knowledge_bases", "state", "TEXT NOT NULL DEFAULT 'ready'"),
    ("knowledge_bases", "lease_until", "REAL NOT NULL DEFAULT 0"),
    ("documents", "lease_owner", "TEXT NOT NULL DEFAULT ''"),
    ("documents", "lease_until", "REAL NOT NULL DEFAULT 0"),
    ("documents", "content_hash", "TEXT NOT NULL DEFAULT ''"),
    ("documents", "pending_content_hash", "TEXT NOT NULL DEFAULT ''"),
    ("tasks", "attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("tasks", "available_at", "REAL NOT NULL DEFAULT 0"),
)


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    for table, column, declaration in _ADDED_COLUMNS:
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


def _schema_statements() -> Iterator[str]:
    """_SCHEMA one statement at a time (executescript would commit our transaction)."""
    pending = ""
    for line in _SCHEMA.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip():
        raise AssertionError(f"incomplete schema statement: {pending!r}")


_KB_FIELDS = tuple(f.name for f in fields(KnowledgeBaseRecord))
_DOC_FIELDS = tuple(f.name for f in fields(DocumentRecord))
_TASK_FIELDS = tuple(f.name for f in fields(TaskRecord))
_KB_JSON = frozenset({"metadata_schema"})
_TASK_JSON = frozenset({"spec", "checkpoint"})
_TASK_BOOL = frozenset({"cancel_requested"})
# update_knowledge_base: renaming would orphan Milvus collections and task history.
_KB_UPDATABLE = frozenset(_KB_FIELDS) - {"name"}
# update_task: `owner` is the lease precondition (claim/release change it), `id` is identity.
_TASK_UPDATABLE = frozenset(_TASK_FIELDS) - {"id", "owner"}


def _kb_from_row(row: sqlite3.Row) -> KnowledgeBaseRecord:
    values = {name: row[name] for name in _KB_FIELDS}
    values["metadata_schema"] = [(str(n), int(t)) for n, t in json.loads(row["metadata_schema"])]
    return KnowledgeBaseRecord(**values)


def _kb_to_db(name: str, value: Any) -> Any:
    if name in _KB_JSON:
        return json.dumps([[str(n), int(t)] for n, t in value])
    return value


def _doc_from_row(row: sqlite3.Row) -> DocumentRecord:
    values = {name: row[name] for name in _DOC_FIELDS}
    values["metadata"] = json.loads(row["metadata"])
    values["deleting"] = bool(row["deleting"])
    values["settling"] = bool(row["settling"])
    return DocumentRecord(**values)


def _task_from_row(row: sqlite3.Row) -> TaskRecord:
    values = {name: row[name] for name in _TASK_FIELDS}
    for name in _TASK_JSON:
        values[name] = json.loads(row[name])
    values["cancel_requested"] = bool(row["cancel_requested"])
    return TaskRecord(**values)


def _task_to_db(name: str, value: Any) -> Any:
    if name in _TASK_JSON:
        return json.dumps(value)
    if name in _TASK_BOOL:
        return int(bool(value))
    return value


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")


class SqliteStore:
    """`Store` on one SQLite file (WAL, foreign keys on, 5 s busy timeout).

    Several processes may open the same file: every change runs in one `BEGIN IMMEDIATE`
    transaction, which takes SQLite's single write lock up front, so read-check-write steps
    (claiming a task, reserving a version) cannot interleave across processes and never hit
    the lock-upgrade deadlock of deferred transactions. Within a process one connection is
    shared by all threads behind a lock: simple, and SQLite serialises writers anyway.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (Python's implicit
        # transactions would start deferred ones).
        self._conn = sqlite3.connect(
            str(self.path),
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,
        )
        self._conn.row_factory = sqlite3.Row
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def _migrate(self) -> None:
        with self._write() as conn:
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found > SCHEMA_VERSION:
                raise StoreError(
                    f"store {str(self.path)!r} has schema version {found}, newer than "
                    f"{SCHEMA_VERSION} which this askmesh understands"
                )
            if found == 1:  # version 2 added `settling` and the epochs (the index covers it)
                conn.execute("ALTER TABLE documents ADD COLUMN settling INTEGER NOT NULL DEFAULT 0")
                conn.execute("DROP INDEX IF EXISTS documents_in_flight")
            for statement in _schema_statements():
                conn.execute(statement)
            _add_missing_columns(conn)
            if found < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: everything inside commits together or not at all."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read-only transaction: several SELECTs see one consistent snapshot."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    # -- knowledge bases ------------------------------------------------------------------

    def create_knowledge_base(self, record: KnowledgeBaseRecord) -> KnowledgeBaseRecord:
        now = time.time()
        record = replace(
            record,
            metadata_schema=[(str(n), int(t)) for n, t in record.metadata_schema],
            created_at=record.created_at or now,
            updated_at=record.updated_at or now,
        )
        values = {name: _kb_to_db(name, getattr(record, name)) for name in _KB_FIELDS}
        columns = ", ".join(values)
        marks = ", ".join(f":{name}" for name in values)
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM knowledge_bases WHERE name = ?", (record.name,)).fetchone():
                raise AlreadyExists(f"knowledge base {record.name!r} already exists")
            conn.execute(f"INSERT INTO knowledge_bases ({columns}) VALUES ({marks})", values)
        return record

    def get_knowledge_base(self, name: str) -> KnowledgeBaseRecord | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM knowledge_bases WHERE name = ?", (name,)).fetchone()
        return _kb_from_row(row) if row else None

    def list_knowledge_bases(self) -> list[KnowledgeBaseRecord]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM knowledge_bases ORDER BY name").fetchall()
        return [_kb_from_row(row) for row in rows]

    def update_knowledge_base(self, name: str, /, **changes: Any) -> KnowledgeBaseRecord:
        unknown = set(changes) - _KB_UPDATABLE
        if unknown:
            raise ValueError(f"cannot update knowledge base field(s): {', '.join(sorted(unknown))}")
        changes.setdefault("updated_at", time.time())
        assignments = ", ".join(f"{column} = ?" for column in changes)
        params = [_kb_to_db(column, value) for column, value in changes.items()]
        with self._write() as conn:
            cursor = conn.execute(
                f"UPDATE knowledge_bases SET {assignments} WHERE name = ?", (*params, name)
            )
            if cursor.rowcount == 0:
                raise NotFoundError(f"knowledge base {name!r} not found")
            row = conn.execute("SELECT * FROM knowledge_bases WHERE name = ?", (name,)).fetchone()
        return _kb_from_row(row)

    def delete_knowledge_base(self, name: str) -> int:
        now = time.time()
        with self._write() as conn:
            if not conn.execute("SELECT 1 FROM knowledge_bases WHERE name = ?", (name,)).fetchone():
                raise NotFoundError(f"knowledge base {name!r} not found")
            self._cancel_tasks_of(conn, name, now)
            deleted = conn.execute(
                "SELECT COUNT(*) FROM documents WHERE knowledge_base = ? AND version > 0", (name,)
            ).fetchone()[0]
            conn.execute("DELETE FROM sources WHERE knowledge_base = ?", (name,))
            conn.execute("DELETE FROM documents WHERE knowledge_base = ?", (name,))
            conn.execute("DELETE FROM abandoned_versions WHERE knowledge_base = ?", (name,))
            conn.execute("DELETE FROM knowledge_bases WHERE name = ?", (name,))
        return int(deleted)

    def lease_knowledge_base(self, name: str, *, state: str, lease_s: float, now: float) -> bool:
        """Takes over a knowledge base's unfinished create or delete: True (and a fresh lease)
        when it is in `state` and its lease has expired, else False."""
        with self._write() as conn:
            changed = conn.execute(
                "UPDATE knowledge_bases SET lease_until = ? WHERE name = ? AND state = ? AND lease_until < ?",
                (now + lease_s, name, state, now),
            ).rowcount
        return bool(changed)

    def begin_knowledge_base_delete(self, name: str, *, lease_s: float, now: float) -> int:
        """Hides the knowledge base (a tombstone: readers get not-found from here on) and
        cancels its tasks, before its collections are dropped; returns its visible documents.
        Idempotent: a delete that was interrupted is taken up again."""
        with self._write() as conn:
            if not conn.execute("SELECT 1 FROM knowledge_bases WHERE name = ?", (name,)).fetchone():
                raise NotFoundError(f"knowledge base {name!r} not found")
            self._cancel_tasks_of(conn, name, now)
            conn.execute(
                "UPDATE knowledge_bases SET state = ?, lease_until = ?, updated_at = ? WHERE name = ?",
                (KB_DELETING, now + lease_s, now, name),
            )
            _bump_epoch(conn, name)
            deleted = conn.execute(
                "SELECT COUNT(*) FROM documents WHERE knowledge_base = ? AND version > 0 AND deleting = 0", (name,)
            ).fetchone()[0]
        return int(deleted)

    def finish_knowledge_base_delete(self, name: str) -> None:
        """Removes a deleted knowledge base's records, once its collections are gone (idempotent)."""
        with self._write() as conn:
            conn.execute("DELETE FROM sources WHERE knowledge_base = ?", (name,))
            conn.execute("DELETE FROM documents WHERE knowledge_base = ?", (name,))
            conn.execute("DELETE FROM abandoned_versions WHERE knowledge_base = ?", (name,))
            conn.execute("DELETE FROM knowledge_bases WHERE name = ?", (name,))

    def stale_knowledge_bases(self, now: float) -> list[KnowledgeBaseRecord]:
        """Knowledge bases left creating or deleting by a request that is gone (lease expired)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM knowledge_bases WHERE state <> ? AND lease_until < ? ORDER BY name", (KB_READY, now)
            ).fetchall()
        return [_kb_from_row(row) for row in rows]

    @staticmethod
    def _cancel_tasks_of(conn: sqlite3.Connection, name: str, now: float) -> None:
        # Running tasks lose their lease too: their worker's next owner-checked update or lease
        # renewal fails, so it stops instead of resurrecting the task.
        conn.execute(
            "UPDATE tasks SET state = ?, error = 'knowledge base deleted', cancel_requested = 1,"
            " owner = '', lease_until = 0, updated_at = ?"
            " WHERE knowledge_base = ? AND state IN (?, ?)",
            (TASK_CANCELLED, now, name, TASK_QUEUED, TASK_RUNNING),
        )

    def knowledge_base_stats(self, name: str) -> tuple[int, int, int]:
        with self._read() as conn:
            if not conn.execute("SELECT 1 FROM knowledge_bases WHERE name = ?", (name,)).fetchone():
                raise NotFoundError(f"knowledge base {name!r} not found")
            row = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(chunk_count), 0), COALESCE(SUM(size_bytes), 0)"
                " FROM documents WHERE knowledge_base = ? AND version > 0 AND deleting = 0",
                (name,),
            ).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    # -- documents -------------------------------------------------------------------------

    @staticmethod
    def _doc_row(conn: sqlite3.Connection, knowledge_base: str, document_id: str) -> sqlite3.Row | None:
        return conn.execute(
            "SELECT * FROM documents WHERE knowledge_base = ? AND id = ?", (knowledge_base, document_id)
        ).fetchone()

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
        pending = (title, json.dumps(metadata), file_name, content_type, content_hash, owner, now + lease_s)
        with self._write() as conn:
            if not conn.execute(
                "SELECT 1 FROM knowledge_bases WHERE name = ? AND state = ?", (knowledge_base, KB_READY)
            ).fetchone():
                raise NotFoundError(f"knowledge base {knowledge_base!r} not found")
            row = self._doc_row(conn, knowledge_base, document_id)
            if row is not None and row["deleting"]:
                raise Conflict(
                    f"document {document_id!r} in knowledge base {knowledge_base!r} is being deleted; "
                    "try again when the delete has finished"
                )
            if row is not None and row["pending_version"]:
                # The same owner beginning again (a task resumed before it recorded its version)
                # takes its own write over.
                own = bool(owner) and row["lease_owner"] == owner
                if not own and self._write_held(conn, row, now):
                    raise Conflict(
                        f"document {document_id!r} in knowledge base {knowledge_base!r} is being written by "
                        "another request; try again when it has finished"
                    )
                # Its writer is gone (the lease ran out): the new write takes over, and the old
                # version's chunks are left to the reconciler.
                self._abandon(conn, knowledge_base, document_id, row["pending_version"])
            last = conn.execute(
                "SELECT last_version FROM document_versions WHERE knowledge_base = ? AND document_id = ?",
                (knowledge_base, document_id),
            ).fetchone()
            version = max(row["version"] if row else 0, last[0] if last else 0) + 1
            conn.execute(
                "INSERT INTO document_versions (knowledge_base, document_id, last_version)"
                " VALUES (?, ?, ?) ON CONFLICT (knowledge_base, document_id)"
                " DO UPDATE SET last_version = excluded.last_version",
                (knowledge_base, document_id, version),
            )
            if row is None:
                conn.execute(
                    "INSERT INTO documents (knowledge_base, id, pending_version, updated_at,"
                    " pending_title, pending_metadata, pending_file_name, pending_content_type,"
                    " pending_content_hash, lease_owner, lease_until)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (knowledge_base, document_id, version, now, *pending),
                )
            else:
                # updated_at stays: it describes the visible version until commit.
                conn.execute(
                    "UPDATE documents SET pending_version = ?, pending_title = ?,"
                    " pending_metadata = ?, pending_file_name = ?, pending_content_type = ?,"
                    " pending_content_hash = ?, lease_owner = ?, lease_until = ?"
                    " WHERE knowledge_base = ? AND id = ?",
                    (version, *pending, knowledge_base, document_id),
                )
            _bump_epoch(conn, knowledge_base)
        return version

    @staticmethod
    def _write_held(conn: sqlite3.Connection, row: sqlite3.Row, now: float) -> bool:
        """Whether the document's pending write is still someone's: its lease holds, or it
        belongs to an ingestion task that is queued or running (the task resumes it)."""
        if row["lease_until"] >= now:
            return True
        return conn.execute(
            "SELECT 1 FROM tasks WHERE id = ? AND state IN (?, ?)", (row["lease_owner"], TASK_QUEUED, TASK_RUNNING)
        ).fetchone() is not None

    @staticmethod
    def _abandon(conn: sqlite3.Connection, knowledge_base: str, document_id: str, version: int) -> None:
        """Records a given-up version for the reconciler (its chunks may be stored) and drops
        its parsed source (numbers are never reused, so it can never be used again)."""
        conn.execute(
            "INSERT OR IGNORE INTO abandoned_versions (knowledge_base, document_id, version) VALUES (?, ?, ?)",
            (knowledge_base, document_id, version),
        )
        conn.execute(
            "DELETE FROM sources WHERE knowledge_base = ? AND document_id = ? AND version = ?",
            (knowledge_base, document_id, version),
        )

    def renew_document_lease(
        self, knowledge_base: str, document_id: str, version: int, *, owner: str, lease_s: float, now: float
    ) -> bool:
        """Keeps (or, for its own owner or when the lease ran out, takes back) the write of
        `version`: False when that version is no longer the one being written."""
        with self._write() as conn:
            changed = conn.execute(
                "UPDATE documents SET lease_owner = ?, lease_until = ?"
                " WHERE knowledge_base = ? AND id = ? AND pending_version = ? AND pending_version > 0"
                " AND deleting = 0 AND (lease_owner = ? OR lease_until < ?)",
                (owner, now + lease_s, knowledge_base, document_id, version, owner, now),
            ).rowcount
        return bool(changed)

    def stale_documents(self, now: float, limit: int = 100) -> list[DocumentRecord]:
        """Documents whose write, delete or settling stopped (the lease ran out), but for writes
        owned by an ingestion task that is still queued or running: the task resumes those."""
        _check_limit(limit)
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM documents WHERE (pending_version > 0 OR deleting <> 0 OR settling <> 0)"
                " AND lease_until < ? AND NOT (pending_version > 0 AND deleting = 0 AND lease_owner IN"
                " (SELECT id FROM tasks WHERE state IN (?, ?)))"
                " ORDER BY knowledge_base, id LIMIT ?",
                (now, TASK_QUEUED, TASK_RUNNING, limit),
            ).fetchall()
        return [_doc_from_row(row) for row in rows]

    def abandoned_versions(self, limit: int = 100) -> list[tuple[str, str, int]]:
        """(knowledge base, document id, version) of given-up versions whose chunks may remain."""
        _check_limit(limit)
        with self._lock:
            rows = self._conn.execute(
                "SELECT knowledge_base, document_id, version FROM abandoned_versions"
                " ORDER BY knowledge_base, document_id, version LIMIT ?",
                (limit,),
            ).fetchall()
        return [(row[0], row[1], int(row[2])) for row in rows]

    def forget_abandoned_version(self, knowledge_base: str, document_id: str, version: int) -> None:
        """Its chunks are gone."""
        with self._write() as conn:
            conn.execute(
                "DELETE FROM abandoned_versions WHERE knowledge_base = ? AND document_id = ? AND version = ?",
                (knowledge_base, document_id, version),
            )

    def forget_abandoned_versions_below(self, knowledge_base: str, document_id: str, version: int) -> None:
        with self._write() as conn:
            conn.execute(
                "DELETE FROM abandoned_versions WHERE knowledge_base = ? AND document_id = ? AND version < ?",
                (knowledge_base, document_id, version),
            )

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
        with self._write() as conn:
            row = self._doc_row(conn, knowledge_base, document_id)
            if row is None:
                raise NotFoundError(
                    f"document {document_id!r} in knowledge base {knowledge_base!r} not found"
                )
            if row["pending_version"] != version or version <= 0:
                raise Conflict(
                    f"document {document_id!r} in knowledge base {knowledge_base!r}: version "
                    f"{version} is not pending (pending: {row['pending_version']})"
                )
            _bump_epoch(conn, knowledge_base)
            # Settling is leased too: if the writer dies before the older versions are
            # removed, the reconciler removes them.
            conn.execute(
                "UPDATE documents SET version = pending_version, pending_version = 0, settling = 1,"
                " title = pending_title, metadata = pending_metadata, file_name = pending_file_name,"
                " content_type = pending_content_type, content_hash = pending_content_hash,"
                " chunk_count = ?, size_bytes = ?, lease_until = ?,"
                " updated_at = ?, pending_title = '', pending_metadata = '{}',"
                " pending_file_name = '', pending_content_type = '', pending_content_hash = ''"
                " WHERE knowledge_base = ? AND id = ?",
                (chunk_count, size_bytes, now + lease_s, now, knowledge_base, document_id),
            )
            row = self._doc_row(conn, knowledge_base, document_id)
        return _doc_from_row(row)

    def abort_document_version(self, knowledge_base: str, document_id: str, version: int) -> None:
        with self._write() as conn:
            row = self._doc_row(conn, knowledge_base, document_id)
            if row is None or version <= 0 or row["pending_version"] != version:
                return  # already committed, aborted or superseded: nothing to undo
            self._abandon(conn, knowledge_base, document_id, version)
            _bump_epoch(conn, knowledge_base)
            if row["version"] == 0:
                conn.execute(
                    "DELETE FROM documents WHERE knowledge_base = ? AND id = ?",
                    (knowledge_base, document_id),
                )
            else:
                conn.execute(
                    "UPDATE documents SET pending_version = 0, pending_title = '',"
                    " pending_metadata = '{}', pending_file_name = '', pending_content_type = '',"
                    " pending_content_hash = '', lease_owner = '', lease_until = 0"
                    " WHERE knowledge_base = ? AND id = ?",
                    (knowledge_base, document_id),
                )

    def begin_document_delete(
        self, knowledge_base: str, document_id: str, *, owner: str = "", lease_s: float = 0.0, now: float = 0.0
    ) -> DocumentRecord:
        with self._write() as conn:
            row = self._doc_row(conn, knowledge_base, document_id)
            if row is None or (row["version"] == 0 and not row["deleting"]):
                raise NotFoundError(
                    f"document {document_id!r} in knowledge base {knowledge_base!r} not found"
                )
            # A delete already under way (or interrupted) is simply taken up again: every step
            # of a delete is idempotent.
            if row["pending_version"] and not row["deleting"]:
                if self._write_held(conn, row, now):
                    raise Conflict(
                        f"document {document_id!r} in knowledge base {knowledge_base!r} is being written by "
                        "another request; try again when it has finished"
                    )
                self._abandon(conn, knowledge_base, document_id, row["pending_version"])
            conn.execute(
                "UPDATE documents SET deleting = 1, pending_version = 0, lease_owner = ?, lease_until = ?"
                " WHERE knowledge_base = ? AND id = ?",
                (owner, now + lease_s, knowledge_base, document_id),
            )
            _bump_epoch(conn, knowledge_base)
            row = self._doc_row(conn, knowledge_base, document_id)
        return _doc_from_row(row)

    def finish_document_delete(self, knowledge_base: str, document_id: str) -> None:
        with self._write() as conn:
            conn.execute(
                "DELETE FROM sources WHERE knowledge_base = ? AND document_id = ?",
                (knowledge_base, document_id),
            )
            conn.execute(
                "DELETE FROM documents WHERE knowledge_base = ? AND id = ?", (knowledge_base, document_id)
            )
            _bump_epoch(conn, knowledge_base)

    def finish_settling(self, knowledge_base: str, document_id: str) -> None:
        with self._write() as conn:
            changed = conn.execute(
                "UPDATE documents SET settling = 0, lease_until = CASE WHEN pending_version > 0 THEN lease_until"
                " ELSE 0 END WHERE knowledge_base = ? AND id = ? AND settling <> 0",
                (knowledge_base, document_id),
            ).rowcount
            if changed:
                _bump_epoch(conn, knowledge_base)

    def get_document(self, knowledge_base: str, document_id: str) -> DocumentRecord | None:
        with self._lock:
            row = self._doc_row(self._conn, knowledge_base, document_id)
        return _doc_from_row(row) if row else None

    def list_documents(
        self, knowledge_base: str, *, after_id: str = "", limit: int = 100
    ) -> list[DocumentRecord]:
        _check_limit(limit)
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM documents WHERE knowledge_base = ? AND id > ?"
                " AND version > 0 AND deleting = 0 ORDER BY id LIMIT ?",
                (knowledge_base, after_id, limit),
            ).fetchall()
        return [_doc_from_row(row) for row in rows]

    def visibility_pins(self, knowledge_base: str) -> list[tuple[str, int]]:
        with self._lock:
            rows = self._conn.execute(_PINS_QUERY, (knowledge_base,)).fetchall()
        return [(row[0], int(row[1])) for row in rows]

    def visibility(self, knowledge_base: str) -> tuple[int, list[tuple[str, int]]]:
        with self._read() as conn:
            row = conn.execute(_EPOCH_QUERY, (knowledge_base,)).fetchone()
            pins = conn.execute(_PINS_QUERY, (knowledge_base,)).fetchall()
        return (int(row[0]) if row else 0), [(p[0], int(p[1])) for p in pins]

    def visibility_epoch(self, knowledge_base: str) -> int:
        with self._lock:
            row = self._conn.execute(_EPOCH_QUERY, (knowledge_base,)).fetchone()
        return int(row[0]) if row else 0

    def all_documents_for_rebuild(self, knowledge_base: str) -> list[DocumentRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM documents WHERE knowledge_base = ? AND version > 0 AND deleting = 0"
                " ORDER BY id",
                (knowledge_base,),
            ).fetchall()
        return [_doc_from_row(row) for row in rows]

    # -- parsed sources -------------------------------------------------------------------

    def save_source(
        self, knowledge_base: str, document_id: str, version: int, sections: list[dict[str, Any]]
    ) -> None:
        data = zlib.compress(json.dumps(sections).encode("utf-8"))
        with self._write() as conn:
            if not conn.execute(
                "SELECT 1 FROM knowledge_bases WHERE name = ?", (knowledge_base,)
            ).fetchone():
                raise NotFoundError(f"knowledge base {knowledge_base!r} not found")
            conn.execute(
                "INSERT INTO sources (knowledge_base, document_id, version, data) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (knowledge_base, document_id, version) DO UPDATE SET data = excluded.data",
                (knowledge_base, document_id, version, data),
            )

    def load_source(
        self, knowledge_base: str, document_id: str, version: int
    ) -> list[dict[str, Any]] | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT data FROM sources WHERE knowledge_base = ? AND document_id = ? AND version = ?",
                (knowledge_base, document_id, version),
            ).fetchone()
        if row is None:
            return None
        return json.loads(zlib.decompress(row[0]).decode("utf-8"))

    def delete_sources(
        self, knowledge_base: str, document_id: str, *, except_version: int | None = None
    ) -> None:
        with self._write() as conn:
            if except_version is None:
                conn.execute(
                    "DELETE FROM sources WHERE knowledge_base = ? AND document_id = ?",
                    (knowledge_base, document_id),
                )
            else:
                conn.execute(
                    "DELETE FROM sources WHERE knowledge_base = ? AND document_id = ? AND version <> ?",
                    (knowledge_base, document_id, except_version),
                )

    # -- tasks ------------------------------------------------------------------------------

    @staticmethod
    def _task_row(conn: sqlite3.Connection, task_id: str) -> sqlite3.Row | None:
        return conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()

    def create_task(self, record: TaskRecord) -> TaskRecord:
        now = time.time()
        created = record.created_at or now
        record = replace(
            record, created_at=created, updated_at=record.updated_at or now, available_at=record.available_at or created
        )
        values = {name: _task_to_db(name, value) for name, value in asdict(record).items()}
        columns = ", ".join(values)
        marks = ", ".join(f":{name}" for name in values)
        with self._write() as conn:
            if self._task_row(conn, record.id):
                raise AlreadyExists(f"task {record.id!r} already exists")
            conn.execute(f"INSERT INTO tasks ({columns}) VALUES ({marks})", values)
        return record

    def get_task(self, task_id: str) -> TaskRecord | None:
        with self._lock:
            row = self._task_row(self._conn, task_id)
        return _task_from_row(row) if row else None

    def list_tasks(
        self,
        *,
        knowledge_base: str = "",
        states: Sequence[str] = (),
        limit: int = 100,
        before: tuple[float, str] | None = None,
    ) -> list[TaskRecord]:
        _check_limit(limit)
        where: list[str] = []
        params: list[Any] = []
        if knowledge_base:
            where.append("knowledge_base = ?")
            params.append(knowledge_base)
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            params.extend(states)
        if before is not None:
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params.extend((before[0], before[0], before[1]))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT * FROM tasks {clause} ORDER BY created_at DESC, id DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
        return [_task_from_row(row) for row in rows]

    def update_task(self, task_id: str, /, *, owner: str | None = None, **changes: Any) -> TaskRecord:
        unknown = set(changes) - _TASK_UPDATABLE
        if unknown:
            raise ValueError(f"cannot update task field(s): {', '.join(sorted(unknown))}")
        changes.setdefault("updated_at", time.time())
        assignments = ", ".join(f"{column} = ?" for column in changes)
        params = [_task_to_db(column, value) for column, value in changes.items()]
        with self._write() as conn:
            row = self._task_row(conn, task_id)
            if row is None:
                raise NotFoundError(f"task {task_id!r} not found")
            if owner is not None and row["owner"] != owner:
                raise Conflict(
                    f"task {task_id!r}: {owner!r} lost the lease"
                    f" (owner now {row['owner']!r}, state {row['state']!r})"
                )
            conn.execute(f"UPDATE tasks SET {assignments} WHERE id = ?", (*params, task_id))
            row = self._task_row(conn, task_id)
        return _task_from_row(row)

    def request_cancel(self, task_id: str) -> TaskRecord:
        now = time.time()
        with self._write() as conn:
            row = self._task_row(conn, task_id)
            if row is None:
                raise NotFoundError(f"task {task_id!r} not found")
            if row["state"] in TERMINAL_STATES:
                return _task_from_row(row)
            if row["state"] == TASK_QUEUED and not row["owner"] and json.loads(row["checkpoint"]) == {}:
                # Nobody works on it and it stored nothing: cancel now rather than wait for a
                # worker to notice.
                conn.execute(
                    "UPDATE tasks SET state = ?, error = 'cancelled', cancel_requested = 1,"
                    " updated_at = ? WHERE id = ?",
                    (TASK_CANCELLED, now, task_id),
                )
            else:
                # A worker must remove what it stored (a task put back to be retried holds a
                # version): in its original place, not after a retry's delay.
                conn.execute(
                    "UPDATE tasks SET cancel_requested = 1, updated_at = ?,"
                    " available_at = CASE WHEN state = ? THEN MIN(available_at, created_at) ELSE available_at END"
                    " WHERE id = ?",
                    (now, TASK_QUEUED, task_id),
                )
            row = self._task_row(conn, task_id)
        return _task_from_row(row)

    def claim_next_task(
        self, owner: str, *, lease_s: float, now: float, kinds: Sequence[str] = ()
    ) -> TaskRecord | None:
        if not owner:
            raise ValueError("owner must not be empty")
        kind_clause = f" AND t.kind IN ({', '.join('?' for _ in kinds)})" if kinds else ""
        query = (
            "SELECT t.id FROM tasks t"
            " WHERE ((t.state = ? AND t.available_at <= ?) OR (t.state = ? AND t.lease_until < ?))" + kind_clause +
            # documents must not change under a rebuild of their knowledge base ...
            " AND NOT EXISTS (SELECT 1 FROM tasks r WHERE r.knowledge_base = t.knowledge_base"
            "   AND r.id <> t.id AND r.kind = ? AND r.state = ? AND r.lease_until >= ?)"
            # ... and a rebuild waits until no other work on its knowledge base is live.
            " AND (t.kind <> ? OR NOT EXISTS (SELECT 1 FROM tasks o"
            "   WHERE o.knowledge_base = t.knowledge_base AND o.id <> t.id"
            "   AND o.state = ? AND o.lease_until >= ?))"
            # First come, first served by when each became claimable. A task whose worker died
            # keeps its place: it may hold what others wait for (a version, a rebuild), and its
            # attempts are limited. One put back to wait or to be retried went to the back.
            " ORDER BY t.available_at, t.rowid LIMIT 1"
        )
        params = (
            TASK_QUEUED, now, TASK_RUNNING, now, *kinds,
            KIND_REBUILD, TASK_RUNNING, now,
            KIND_REBUILD, TASK_RUNNING, now,
        )  # fmt: skip
        with self._write() as conn:
            found = conn.execute(query, params).fetchone()
            if found is None:
                return None
            conn.execute(
                "UPDATE tasks SET state = ?, owner = ?, lease_until = ?, attempts = attempts + 1,"
                " updated_at = ? WHERE id = ?",
                (TASK_RUNNING, owner, now + lease_s, now, found[0]),
            )
            row = self._task_row(conn, found[0])
        return _task_from_row(row)

    def renew_lease(self, task_id: str, owner: str, *, lease_s: float, now: float) -> bool:
        if not owner:
            return False
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE tasks SET lease_until = ? WHERE id = ? AND owner = ? AND state = ?",
                (now + lease_s, task_id, owner, TASK_RUNNING),
            )
            return cursor.rowcount == 1

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
        if not owner:
            return False
        available_at = None if delay_s is None else now + delay_s
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE tasks SET state = ?, owner = '', lease_until = 0, available_at = COALESCE(?, available_at),"
                " attempts = CASE WHEN ? THEN attempts ELSE MAX(attempts - 1, 0) END,"
                " error = COALESCE(?, error), stage = COALESCE(?, stage), updated_at = ?"
                " WHERE id = ? AND owner = ? AND state = ?",
                (TASK_QUEUED, available_at, int(attempt_failed), error, stage, now, task_id, owner, TASK_RUNNING),
            )
            return cursor.rowcount == 1


def open_store(url: str) -> Store:
    """The store at `url`: a SQLite file's path (or sqlite:///path)."""
    return SqliteStore(Path(url.removeprefix("sqlite://")))
