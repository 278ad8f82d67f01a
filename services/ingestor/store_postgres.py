"""`Store` on a PostgreSQL database: its connection pool and locking (the operations are
sql_store.py's).

Why these choices: replicas on many machines share the database, and one store is used by
many threads at once, so connections come from a psycopg_pool pool (each operation holds one
connection only while it runs). Transactions are READ COMMITTED, the operations lock the rows
their checks read (FOR UPDATE / FOR SHARE), claims skip tasks other claimers are taking (FOR
UPDATE SKIP LOCKED), and multi-statement reads run in one REPEATABLE READ snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool

from services.ingestor.sql_base import Dialect
from services.ingestor.sql_store import SqlStore

POOL_SIZE = 8  # connections per store at most: one per thread working in it at once
CONNECT_TIMEOUT_S = 10.0

POSTGRES = Dialect(
    name="postgresql",
    placeholder="%s",
    ddl={
        "INT": "BIGINT",
        "REAL": "DOUBLE PRECISION",
        "BLOB": "BYTEA",
        # Text compares by code point, as in SQLite, whatever the database's locale: keyset
        # pagination and every ORDER BY give the same order on both backends.
        "TEXT": 'TEXT COLLATE "C"',
        "WITHOUT_ROWID": "",
        # Orders tasks created at the same time, as SQLite's rowid does.
        "TASKS_SEQ": " seq BIGINT GENERATED ALWAYS AS IDENTITY,",
    },
    task_order="seq",
    begin_write="BEGIN ISOLATION LEVEL READ COMMITTED",
    begin_read="BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    lock_rows=" FOR UPDATE",
    share_rows=" FOR SHARE",
    claim_lock=" FOR UPDATE OF t SKIP LOCKED",
    # Transaction-scoped, so it cannot outlive a claim; hashtext collisions only serialise more.
    claim_knowledge_base_lock="SELECT pg_advisory_xact_lock(hashtext('askmesh.claim'), hashtext(?))",
    migration_lock="SELECT pg_advisory_xact_lock(hashtext('askmesh.migrations'))",
    greatest="GREATEST",
    least="LEAST",
    columns_query=(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = ?"
    ),
    legacy_version_query="",
    legacy_version_update="",
)


class PgRow:
    """A row by column name or position, as sqlite3.Row (what the shared SQL code reads)."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence[Any], index: dict[str, int]) -> None:
        self._values = values
        self._index = index

    def __getitem__(self, key: int | str) -> Any:
        return self._values[self._index[key]] if isinstance(key, str) else self._values[key]


def _pg_row(cursor: psycopg.Cursor[Any]) -> Any:
    """psycopg row factory making PgRows."""
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: PgRow(values, index)


class PostgresStore(SqlStore):
    """`Store` on the PostgreSQL database `url` names (postgresql://user:password@host:port/db).
    Many threads, processes and machines may use one database at once."""

    dialect = POSTGRES

    def __init__(self, url: str, *, pool_size: int = POOL_SIZE) -> None:
        self.url = url
        # Autocommit: transactions are begun explicitly, at the isolation level each needs.
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True, "row_factory": _pg_row},
            open=False,
            name="askmesh-store",
        )
        try:
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
            self._migrate(_describe(url))
        except BaseException:
            self._pool.close()
            raise

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self._pool.connection() as conn:
            yield conn

    def _rollback(self, conn: psycopg.Connection[Any]) -> None:
        # A broken connection has no transaction to end: the pool discards it.
        if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
            conn.execute("ROLLBACK")


def _describe(url: str) -> str:
    """The database a URL names, for messages (never its password)."""
    parts = conninfo_to_dict(url)
    return f"postgresql://{parts.get('host', '')}:{parts.get('port', '')}/{parts.get('dbname', '')}"
