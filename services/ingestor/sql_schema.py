"""The store's schema and its numbered migrations, applied when a store opens.

Why numbered steps: a database made by any earlier askmesh is brought up to date by running the
steps it lacks, in order, each recorded in `schema_migrations` in the same transaction as its
changes. Replicas starting together are safe: the whole migration runs in one write transaction
that first takes the dialect's migration lock (SQLite's BEGIN IMMEDIATE is that lock already; on
PostgreSQL an advisory lock), so the second replica waits and then finds nothing left to do.

SQLite files made before numbered migrations record their version (1 or 2) in PRAGMA
user_version only; it is still kept up to date, so an older askmesh refuses a newer file.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from string import Template

from services.ingestor.sql_base import Tx
from services.ingestor.store import StoreError

# Types are $-placeholders filled from Dialect.ddl (SQLite: INTEGER, REAL, BLOB, TEXT;
# PostgreSQL: BIGINT, DOUBLE PRECISION, BYTEA, TEXT COLLATE "C" so text sorts by code point as
# in SQLite, and pagination by id means the same on both).
_TABLES = Template("""
CREATE TABLE IF NOT EXISTS knowledge_bases (
    name $TEXT PRIMARY KEY,
    description $TEXT NOT NULL DEFAULT '',
    metadata_schema $TEXT NOT NULL DEFAULT '[]',
    chunk_size $INT NOT NULL,
    chunk_overlap $INT NOT NULL,
    embedding_model $TEXT NOT NULL DEFAULT '',
    dimension $INT NOT NULL DEFAULT 0,
    generation $INT NOT NULL DEFAULT 1,
    rebuilding_generation $INT NOT NULL DEFAULT 0,
    created_at $REAL NOT NULL,
    updated_at $REAL NOT NULL,
    state $TEXT NOT NULL DEFAULT 'ready',
    lease_until $REAL NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS documents (
    knowledge_base $TEXT NOT NULL REFERENCES knowledge_bases(name) ON DELETE CASCADE,
    id $TEXT NOT NULL,
    title $TEXT NOT NULL DEFAULT '',
    metadata $TEXT NOT NULL DEFAULT '{}',
    version $INT NOT NULL DEFAULT 0,
    pending_version $INT NOT NULL DEFAULT 0,
    deleting $INT NOT NULL DEFAULT 0,
    -- committed, but older versions' chunks may still be stored: readers stay pinned to
    -- `version` until they are removed (finish_settling)
    settling $INT NOT NULL DEFAULT 0,
    chunk_count $INT NOT NULL DEFAULT 0,
    size_bytes $INT NOT NULL DEFAULT 0,
    file_name $TEXT NOT NULL DEFAULT '',
    content_type $TEXT NOT NULL DEFAULT '',
    updated_at $REAL NOT NULL DEFAULT 0,
    -- what becomes visible at commit: readers keep seeing the old values until then
    pending_title $TEXT NOT NULL DEFAULT '',
    pending_metadata $TEXT NOT NULL DEFAULT '{}',
    pending_file_name $TEXT NOT NULL DEFAULT '',
    pending_content_type $TEXT NOT NULL DEFAULT '',
    lease_owner $TEXT NOT NULL DEFAULT '',
    lease_until $REAL NOT NULL DEFAULT 0,
    content_hash $TEXT NOT NULL DEFAULT '',
    pending_content_hash $TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (knowledge_base, id)
)$WITHOUT_ROWID;

-- Only in-flight documents are in this index, so visibility_pins costs O(in-flight), not
-- O(documents). It covers PINS_QUERY (version included) so the planner never prefers the
-- primary key; the WHERE must match PINS_QUERY's exactly for SQLite to use it.
CREATE INDEX IF NOT EXISTS documents_in_flight
    ON documents (knowledge_base, pending_version, deleting, settling, version)
    WHERE pending_version > 0 OR deleting <> 0 OR settling <> 0;

-- Bumped by every change of what readers may see in a knowledge base. A question reads it
-- with the pins and again after its search: if it moved, the search may have raced a change
-- (a purge of the version it was pinned to) and is made again with fresh pins.
CREATE TABLE IF NOT EXISTS visibility_epochs (
    knowledge_base $TEXT PRIMARY KEY,
    epoch $INT NOT NULL
)$WITHOUT_ROWID;

-- Highest version number ever handed out per document. Kept apart from `documents` because
-- it must outlive the document row (delete, abort of a new document, even deletion of the
-- knowledge base): a version number is never reused, so leftover chunks of an old or aborted
-- version can never be mistaken for a new one. Its row is also what concurrent writers of one
-- document lock, even before the document has a row.
CREATE TABLE IF NOT EXISTS document_versions (
    knowledge_base $TEXT NOT NULL,
    document_id $TEXT NOT NULL,
    last_version $INT NOT NULL,
    PRIMARY KEY (knowledge_base, document_id)
)$WITHOUT_ROWID;

-- Versions given up (aborted, or superseded after their writer died) whose chunks may still be
-- in the vector store: a durable to-do for the reconciler, so a crash between giving a
-- version up and deleting its chunks cannot leave them behind.
CREATE TABLE IF NOT EXISTS abandoned_versions (
    knowledge_base $TEXT NOT NULL,
    document_id $TEXT NOT NULL,
    version $INT NOT NULL,
    PRIMARY KEY (knowledge_base, document_id, version)
)$WITHOUT_ROWID;

CREATE TABLE IF NOT EXISTS sources (
    knowledge_base $TEXT NOT NULL REFERENCES knowledge_bases(name) ON DELETE CASCADE,
    document_id $TEXT NOT NULL,
    version $INT NOT NULL,
    data $BLOB NOT NULL,  -- zlib(JSON list of sections)
    PRIMARY KEY (knowledge_base, document_id, version)
);

-- No foreign key: tasks outlive their knowledge base as history.
CREATE TABLE IF NOT EXISTS tasks (
    id $TEXT PRIMARY KEY,$TASKS_SEQ
    kind $TEXT NOT NULL,
    knowledge_base $TEXT NOT NULL,
    document_id $TEXT NOT NULL DEFAULT '',
    file_name $TEXT NOT NULL DEFAULT '',
    state $TEXT NOT NULL,
    stage $TEXT NOT NULL,
    bytes $INT NOT NULL DEFAULT 0,
    documents_total $INT NOT NULL DEFAULT 0,
    documents_done $INT NOT NULL DEFAULT 0,
    chunks_total $INT NOT NULL DEFAULT 0,
    chunks_stored $INT NOT NULL DEFAULT 0,
    error $TEXT NOT NULL DEFAULT '',
    cancel_requested $INT NOT NULL DEFAULT 0,
    spec $TEXT NOT NULL DEFAULT '{}',
    checkpoint $TEXT NOT NULL DEFAULT '{}',
    owner $TEXT NOT NULL DEFAULT '',
    lease_until $REAL NOT NULL DEFAULT 0,
    created_at $REAL NOT NULL,
    updated_at $REAL NOT NULL,
    attempts $INT NOT NULL DEFAULT 0,
    -- 0 in rows of older versions: they sort first, in the order they were created.
    available_at $REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state, created_at);
CREATE INDEX IF NOT EXISTS tasks_by_knowledge_base ON tasks (knowledge_base, created_at, id);
""")

# Not WITHOUT ROWID: SQLite keeps large rows better in a rowid table.
_UPLOAD_PARTS = Template("""
-- The bytes of uploaded files, in parts, so that any replica can resume a task another one
-- accepted. No foreign key to tasks: an upload is stored before its task is created.
CREATE TABLE IF NOT EXISTS upload_parts (
    task_id $TEXT NOT NULL,
    part $INT NOT NULL,
    data $BLOB NOT NULL,
    created_at $REAL NOT NULL,
    PRIMARY KEY (task_id, part)
);
""")

_MIGRATIONS_TABLE = Template("""
CREATE TABLE IF NOT EXISTS schema_migrations (
    version $INT PRIMARY KEY,
    description $TEXT NOT NULL,
    applied_at $REAL NOT NULL
)""")

# Columns added during schema 2 without a version of their own: (table, column, declaration).
_ADDED_COLUMNS = (
    ("knowledge_bases", "state", "$TEXT NOT NULL DEFAULT 'ready'"),
    ("knowledge_bases", "lease_until", "$REAL NOT NULL DEFAULT 0"),
    ("documents", "lease_owner", "$TEXT NOT NULL DEFAULT ''"),
    ("documents", "lease_until", "$REAL NOT NULL DEFAULT 0"),
    ("documents", "content_hash", "$TEXT NOT NULL DEFAULT ''"),
    ("documents", "pending_content_hash", "$TEXT NOT NULL DEFAULT ''"),
    ("tasks", "attempts", "$INT NOT NULL DEFAULT 0"),
    ("tasks", "available_at", "$REAL NOT NULL DEFAULT 0"),
)


def _statements(tx: Tx, script: Template) -> Iterator[str]:
    """A script one statement at a time (sqlite3's executescript would commit our transaction);
    sqlite3's statement splitter is only a tokenizer, right for PostgreSQL's DDL here too."""
    pending = ""
    for line in script.substitute(tx.dialect.ddl).splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip():
        raise AssertionError(f"incomplete schema statement: {pending!r}")


def _columns(tx: Tx, table: str) -> set[str]:
    return {row[0] for row in tx.all(tx.dialect.columns_query, (table,))}


def _create_tables(tx: Tx) -> None:
    for statement in _statements(tx, _TABLES):
        tx.execute(statement)


def _add_settling(tx: Tx) -> None:
    if "settling" not in _columns(tx, "documents"):  # a schema-1 file
        tx.execute(
            Template("ALTER TABLE documents ADD COLUMN settling $INT NOT NULL DEFAULT 0").substitute(tx.dialect.ddl)
        )
        tx.execute("DROP INDEX IF EXISTS documents_in_flight")  # it did not cover settling
    _create_tables(tx)  # the epochs and the new index


def _add_missing_columns(tx: Tx) -> None:
    _create_tables(tx)  # a file may lack whole tables too
    for table, column, declaration in _ADDED_COLUMNS:
        if column not in _columns(tx, table):
            tx.execute(f"ALTER TABLE {table} ADD COLUMN {column} {Template(declaration).substitute(tx.dialect.ddl)}")


def _create_upload_parts(tx: Tx) -> None:
    for statement in _statements(tx, _UPLOAD_PARTS):
        tx.execute(statement)


def _add_collection_ids(tx: Tx) -> None:
    if "collection" not in _columns(tx, "knowledge_bases"):
        tx.execute(
            Template("ALTER TABLE knowledge_bases ADD COLUMN collection $TEXT NOT NULL DEFAULT ''").substitute(tx.dialect.ddl)
        )
    # Collections made before ids existed are named by their knowledge base's name.
    tx.execute("UPDATE knowledge_bases SET collection = name WHERE collection = ''")


_API_KEYS = Template("""
-- Keys by the SHA-256 of the key: the key itself is never stored.
CREATE TABLE IF NOT EXISTS api_keys (
    id $TEXT PRIMARY KEY,
    key_hash $TEXT NOT NULL UNIQUE,
    tenant $TEXT NOT NULL,
    role $TEXT NOT NULL,
    description $TEXT NOT NULL DEFAULT '',
    created_at $REAL NOT NULL,
    revoked_at $REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS api_keys_by_tenant ON api_keys (tenant, created_at);
""")


def _create_api_keys(tx: Tx) -> None:
    for statement in _statements(tx, _API_KEYS):
        tx.execute(statement)


def _add_search_modes(tx: Tx) -> None:
    if "search_mode" not in _columns(tx, "knowledge_bases"):
        # '' follows the ingestor's default_search_mode, as every knowledge base made before did.
        tx.execute(
            Template("ALTER TABLE knowledge_bases ADD COLUMN search_mode $TEXT NOT NULL DEFAULT ''").substitute(tx.dialect.ddl)
        )


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Tx], None]


# Append only: a step, once released, never changes (databases have recorded it as done).
MIGRATIONS = (
    Migration(1, "knowledge bases, documents, sources and tasks", _create_tables),
    Migration(2, "documents settle, visibility epochs (a schema-1 SQLite file gains them)", _add_settling),
    Migration(3, "columns added during schema 2 (an older SQLite file gains them)", _add_missing_columns),
    Migration(4, "upload parts", _create_upload_parts),
    Migration(5, "knowledge bases name their collections by an id of their own", _add_collection_ids),
    Migration(6, "API keys", _create_api_keys),
    Migration(7, "knowledge bases keep a default search mode", _add_search_modes),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def migrate(tx: Tx, where: str) -> None:
    """Bring the database up to SCHEMA_VERSION inside `tx`, a write transaction; StoreError if
    it is newer than this askmesh (then nothing is changed)."""
    dialect = tx.dialect
    if dialect.migration_lock:
        tx.execute(dialect.migration_lock)
    tx.execute(_MIGRATIONS_TABLE.substitute(dialect.ddl))
    row = tx.one("SELECT MAX(version) FROM schema_migrations")
    found = int(row[0]) if row is not None and row[0] is not None else 0
    if dialect.legacy_version_query:
        legacy = tx.one(dialect.legacy_version_query)
        found = max(found, int(legacy[0]) if legacy is not None else 0)
    if found > SCHEMA_VERSION:
        raise StoreError(
            f"store {where!r} has schema version {found}, newer than {SCHEMA_VERSION} which this askmesh understands"
        )
    for step in MIGRATIONS:
        if step.version > found:
            step.apply(tx)
            tx.execute(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                (step.version, step.description, time.time()),
            )
    if found < SCHEMA_VERSION and dialect.legacy_version_update:
        tx.execute(dialect.legacy_version_update.format(version=SCHEMA_VERSION))
