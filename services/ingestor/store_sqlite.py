"""`Store` on one SQLite file: its connection and locking (the operations are sql_store.py's)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tenacity import retry, retry_if_exception, stop_after_delay, wait_random_exponential

from services.ingestor.sql_base import Dialect
from services.ingestor.sql_store import SqlStore

BUSY_TIMEOUT_S = 5.0

SQLITE = Dialect(
    name="sqlite",
    placeholder="?",
    ddl={
        "INT": "INTEGER",
        "REAL": "REAL",
        "BLOB": "BLOB",
        "TEXT": "TEXT",
        "WITHOUT_ROWID": " WITHOUT ROWID",
        "TASKS_SEQ": "",
    },
    task_order="rowid",
    # Takes SQLite's single write lock up front: read-check-write steps (claiming a task,
    # reserving a version) cannot interleave across processes, and never hit the lock-upgrade
    # deadlock of deferred transactions. Hence no row locks below.
    begin_write="BEGIN IMMEDIATE",
    begin_read="BEGIN",
    lock_rows="",
    share_rows="",
    claim_lock="",
    claim_knowledge_base_lock="",
    migration_lock="",
    greatest="MAX",
    least="MIN",
    columns_query="SELECT name FROM pragma_table_info(?)",
    legacy_version_query="PRAGMA user_version",
    legacy_version_update="PRAGMA user_version = {version}",
)


def _locked(error: BaseException) -> bool:
    return isinstance(error, sqlite3.OperationalError) and "locked" in str(error)


# Switching a new file to WAL takes an exclusive lock and SQLite answers "database is locked" at
# once, without its busy handler, while another process opens the same file: replicas starting
# together on an empty database would fail. Retried here for as long as the busy timeout.
@retry(
    retry=retry_if_exception(_locked),
    stop=stop_after_delay(BUSY_TIMEOUT_S),
    wait=wait_random_exponential(multiplier=0.01, max=0.25),
    reraise=True,
)
def _enter_wal_mode(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode = WAL")


class SqliteStore(SqlStore):
    """`Store` on one SQLite file (WAL, foreign keys on, 5 s busy timeout).

    Several processes may open the same file: every change runs in one `BEGIN IMMEDIATE`
    transaction. Within a process one connection is shared by all threads behind a lock:
    simple, and SQLite serialises writers anyway.
    """

    dialect = SQLITE

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
            _enter_wal_mode(self._conn)
            self._migrate(str(self.path))
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._conn

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
