"""What the SQL implementation of the store stands on: the dialect object (the few places where
SQLite and PostgreSQL differ), a transaction handle that speaks it, and the mapping between rows
and records.

Why one implementation for both backends: the store's guarantees live in its SQL (which rows a
step reads, checks and changes together); two copies would drift apart. A backend only says
how to get a connection and how to begin a transaction (store_sqlite.py, store_postgres.py).
"""

from __future__ import annotations

import functools
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields
from typing import Any, Protocol

from services.ingestor.store import DocumentRecord, KnowledgeBaseRecord, TaskRecord


@dataclass(frozen=True)
class Dialect:
    """Everything the shared SQL needs to know about its database. SQL is written with `?`
    placeholders and SQLite's spelling; the fields below are spliced in where they differ."""

    name: str
    placeholder: str  # "?" (sqlite3) or "%s" (psycopg)
    # Column types of the schema (sql_schema.py): INT, REAL, BLOB, TEXT, and the table suffix
    # WITHOUT_ROWID; TASKS_SEQ declares the column that orders tasks created at the same time.
    ddl: dict[str, str]
    task_order: str  # the column that column is: SQLite's implicit rowid, or PostgreSQL's identity
    begin_write: str  # the statement that begins a read-check-write transaction
    begin_read: str  # ... and a read-only one that sees one snapshot
    # Row locks taken by reads that a write depends on (SQLite has one writer: none needed).
    lock_rows: str  # " FOR UPDATE"
    share_rows: str  # " FOR SHARE"
    # Suffix of the claim query: claimers skip a task another one is taking instead of queueing
    # behind it.
    claim_lock: str
    # Serialises the claims within one knowledge base (parameter: its name), so the rules
    # between its tasks (a rebuild runs alone) can be checked again once earlier claims have
    # committed; "" where every write is serialised anyway.
    claim_knowledge_base_lock: str
    migration_lock: str  # held while migrations run, so replicas starting together apply each once
    greatest: str  # two-argument MAX/GREATEST and MIN/LEAST
    least: str
    columns_query: str  # the column names of a table (parameter: its name)
    # SQLite files record their schema version in PRAGMA user_version too (askmesh did before
    # numbered migrations, and an older askmesh reads only that); "" where there is none.
    legacy_version_query: str
    legacy_version_update: str  # with {version}

    def sql(self, query: str) -> str:
        return _translate(query, self.placeholder)


@functools.lru_cache(maxsize=1024)
def _translate(query: str, placeholder: str) -> str:
    if placeholder == "?":
        return query
    # psycopg reads % as the start of a placeholder: a literal one is doubled.
    return query.replace("%", "%%").replace("?", placeholder)


class Row(Protocol):
    """A result row by column name or position (sqlite3.Row, and the PostgreSQL row)."""

    def __getitem__(self, key: int | str, /) -> Any: ...


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx:
    """A connection inside one transaction (or running one statement on its own), taking SQL
    in the shared spelling."""

    __slots__ = ("conn", "dialect")

    def __init__(self, conn: Any, dialect: Dialect) -> None:
        self.conn = conn
        self.dialect = dialect

    def execute(self, query: str, params: Sequence[Any] = ()) -> Cursor:
        return self.conn.execute(self.dialect.sql(query), params)

    def one(self, query: str, params: Sequence[Any] = ()) -> Row | None:
        return self.execute(query, params).fetchone()

    def all(self, query: str, params: Sequence[Any] = ()) -> list[Row]:
        return self.execute(query, params).fetchall()

    def changed(self, query: str, params: Sequence[Any] = ()) -> int:
        """Run a write; the number of rows it changed."""
        return self.execute(query, params).rowcount


class SqlBase(ABC):
    """Transactions over a backend's connections; the operations are in sql_documents.py and
    sql_tasks.py."""

    dialect: Dialect

    @abstractmethod
    def close(self) -> None:
        """Release the connection(s); the store must not be used afterwards."""

    @abstractmethod
    def _connection(self) -> AbstractContextManager[Any]:
        """A connection for this thread's use until the block ends (autocommit: transactions
        are begun explicitly)."""

    @abstractmethod
    def _rollback(self, conn: Any) -> None:
        """End a failed transaction, if one is still open on `conn`."""

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[Tx]:
        with self._connection() as conn:
            conn.execute(begin)
            try:
                yield Tx(conn, self.dialect)
                conn.execute("COMMIT")
            except BaseException:
                self._rollback(conn)
                raise

    def _write(self) -> AbstractContextManager[Tx]:
        """One write transaction: everything inside commits together or not at all."""
        return self._transaction(self.dialect.begin_write)

    def _read(self) -> AbstractContextManager[Tx]:
        """A read-only transaction: several SELECTs see one consistent snapshot."""
        return self._transaction(self.dialect.begin_read)

    def _one(self, query: str, params: Sequence[Any] = ()) -> Row | None:
        """One statement on its own (its own snapshot)."""
        with self._connection() as conn:
            return Tx(conn, self.dialect).one(query, params)

    def _all(self, query: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._connection() as conn:
            return Tx(conn, self.dialect).all(query, params)


# -- rows and records ----------------------------------------------------------------------------

KB_FIELDS = tuple(f.name for f in fields(KnowledgeBaseRecord))
DOC_FIELDS = tuple(f.name for f in fields(DocumentRecord))
TASK_FIELDS = tuple(f.name for f in fields(TaskRecord))
_TASK_JSON = frozenset({"spec", "checkpoint"})
_TASK_BOOL = frozenset({"cancel_requested"})
# update_knowledge_base: renaming would orphan Milvus collections and task history.
KB_UPDATABLE = frozenset(KB_FIELDS) - {"name"}
# update_task: `owner` is the lease precondition (claim/release change it), `id` is identity.
TASK_UPDATABLE = frozenset(TASK_FIELDS) - {"id", "owner"}


def kb_from_row(row: Row) -> KnowledgeBaseRecord:
    values = {name: row[name] for name in KB_FIELDS}
    values["metadata_schema"] = [(str(n), int(t)) for n, t in json.loads(row["metadata_schema"])]
    return KnowledgeBaseRecord(**values)


def kb_to_db(name: str, value: Any) -> Any:
    if name == "metadata_schema":
        return json.dumps([[str(n), int(t)] for n, t in value])
    return value


def doc_from_row(row: Row) -> DocumentRecord:
    values = {name: row[name] for name in DOC_FIELDS}
    values["metadata"] = json.loads(row["metadata"])
    values["deleting"] = bool(row["deleting"])
    values["settling"] = bool(row["settling"])
    return DocumentRecord(**values)


def task_from_row(row: Row) -> TaskRecord:
    values = {name: row[name] for name in TASK_FIELDS}
    for name in _TASK_JSON:
        values[name] = json.loads(row[name])
    values["cancel_requested"] = bool(row["cancel_requested"])
    return TaskRecord(**values)


def task_to_db(name: str, value: Any) -> Any:
    if name in _TASK_JSON:
        return json.dumps(value)
    if name in _TASK_BOOL:
        return int(bool(value))
    return value


def check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")


def marks(count: int) -> str:
    """`?, ?, ...` for an IN list or a VALUES row."""
    return ", ".join("?" for _ in range(count))
