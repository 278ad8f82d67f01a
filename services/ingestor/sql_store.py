"""Every operation of the `Store` contract, written once in SQL for both backends.

The operations are split by what they manage (sql_documents.py: knowledge bases, documents,
sources; sql_tasks.py: tasks, uploads; sql_keys.py: API keys) over sql_base.py's transactions; the schema and its
migrations are in sql_schema.py. A backend (store_sqlite.py, store_postgres.py) subclasses
SqlStore with its dialect and its connections.
"""

from __future__ import annotations

from services.ingestor.sql_documents import DocumentSql
from services.ingestor.sql_keys import KeySql
from services.ingestor.sql_schema import migrate
from services.ingestor.sql_tasks import TaskSql


class SqlStore(DocumentSql, TaskSql, KeySql):
    """`Store` over a SQL database; a subclass provides the dialect and the connections."""

    def _migrate(self, where: str) -> None:
        """Apply the migrations the database lacks (`where` names it in errors)."""
        with self._write() as tx:
            migrate(tx, where)
