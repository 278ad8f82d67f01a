"""The store's knowledge bases, documents (with versions and visibility) and parsed sources, in
SQL shared by SQLite and PostgreSQL.

Why the row locks: on SQLite every write transaction holds the one write lock, so a read, a
check and a write cannot interleave with another store's. PostgreSQL runs transactions side by
side (READ COMMITTED), so a step locks the rows its check reads before writing (the dialect's
lock_rows / share_rows, empty on SQLite). Locks are taken in one order — knowledge base,
document (its document_versions row, then its documents row), visibility epoch — so steps
cannot deadlock one another.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import replace
from typing import Any

from services.ingestor.sql_base import (
    KB_FIELDS,
    KB_UPDATABLE,
    Row,
    SqlBase,
    Tx,
    check_limit,
    doc_from_row,
    kb_from_row,
    kb_to_db,
    marks,
)
from services.ingestor.sql_tasks import cancel_tasks_of
from services.ingestor.store import (
    KB_DELETING,
    KB_READY,
    TASK_QUEUED,
    TASK_RUNNING,
    AlreadyExists,
    Conflict,
    DocumentRecord,
    KnowledgeBaseRecord,
    NotFoundError,
)

PINS_QUERY = (
    "SELECT id, CASE WHEN deleting <> 0 THEN 0 ELSE version END FROM documents"
    " WHERE knowledge_base = ? AND (pending_version > 0 OR deleting <> 0 OR settling <> 0)"
)
EPOCH_QUERY = "SELECT epoch FROM visibility_epochs WHERE knowledge_base = ?"


def _bump_epoch(tx: Tx, knowledge_base: str) -> None:
    tx.execute(
        "INSERT INTO visibility_epochs (knowledge_base, epoch) VALUES (?, 1)"
        " ON CONFLICT (knowledge_base) DO UPDATE SET epoch = visibility_epochs.epoch + 1",
        (knowledge_base,),
    )


def _lock_knowledge_base(tx: Tx, name: str, *, state: str = "") -> bool:
    """Whether the knowledge base exists (in `state`, if given), locking its row against a
    concurrent delete until the transaction ends."""
    state_clause = " AND state = ?" if state else ""
    params = (name, state) if state else (name,)
    return (
        tx.one(f"SELECT 1 FROM knowledge_bases WHERE name = ?{state_clause}{tx.dialect.lock_rows}", params) is not None
    )


def _doc_row(tx: Tx, knowledge_base: str, document_id: str, *, lock: bool = True) -> Row | None:
    suffix = tx.dialect.lock_rows if lock else ""
    return tx.one(f"SELECT * FROM documents WHERE knowledge_base = ? AND id = ?{suffix}", (knowledge_base, document_id))


def _remove_knowledge_base_rows(tx: Tx, name: str) -> None:
    tx.execute("DELETE FROM sources WHERE knowledge_base = ?", (name,))
    tx.execute("DELETE FROM documents WHERE knowledge_base = ?", (name,))
    tx.execute("DELETE FROM abandoned_versions WHERE knowledge_base = ?", (name,))
    tx.execute("DELETE FROM knowledge_bases WHERE name = ?", (name,))


def _write_held(tx: Tx, row: Row, now: float) -> bool:
    """Whether the document's pending write is still someone's: its lease holds, or it
    belongs to an ingestion task that is queued or running (the task resumes it)."""
    if row["lease_until"] >= now:
        return True
    return (
        tx.one("SELECT 1 FROM tasks WHERE id = ? AND state IN (?, ?)", (row["lease_owner"], TASK_QUEUED, TASK_RUNNING))
        is not None
    )


def _abandon(tx: Tx, knowledge_base: str, document_id: str, version: int) -> None:
    """Records a given-up version for the reconciler (its chunks may be stored) and drops
    its parsed source (numbers are never reused, so it can never be used again)."""
    tx.execute(
        "INSERT INTO abandoned_versions (knowledge_base, document_id, version) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
        (knowledge_base, document_id, version),
    )
    tx.execute(
        "DELETE FROM sources WHERE knowledge_base = ? AND document_id = ? AND version = ?",
        (knowledge_base, document_id, version),
    )


def _not_found(knowledge_base: str, document_id: str) -> NotFoundError:
    return NotFoundError(f"document {document_id!r} in knowledge base {knowledge_base!r} not found")


def _being_written(knowledge_base: str, document_id: str) -> Conflict:
    return Conflict(
        f"document {document_id!r} in knowledge base {knowledge_base!r} is being written by "
        "another request; try again when it has finished"
    )


class DocumentSql(SqlBase):
    """Knowledge bases, documents and sources."""

    # -- knowledge bases ------------------------------------------------------------------

    def create_knowledge_base(self, record: KnowledgeBaseRecord) -> KnowledgeBaseRecord:
        now = time.time()
        record = replace(
            record,
            # A record made without a collection id (a test's, an old caller's) keys its
            # collections by its name, as every knowledge base did before ids.
            collection=record.collection or record.name,
            metadata_schema=[(str(n), int(t)) for n, t in record.metadata_schema],
            created_at=record.created_at or now,
            updated_at=record.updated_at or now,
        )
        values = [kb_to_db(name, getattr(record, name)) for name in KB_FIELDS]
        with self._write() as tx:
            # ON CONFLICT rather than a check first: two replicas creating one name at once.
            created = tx.changed(
                f"INSERT INTO knowledge_bases ({', '.join(KB_FIELDS)}) VALUES ({marks(len(KB_FIELDS))})"
                " ON CONFLICT (name) DO NOTHING",
                values,
            )
        if not created:
            raise AlreadyExists(f"knowledge base {record.name!r} already exists")
        return record

    def get_knowledge_base(self, name: str) -> KnowledgeBaseRecord | None:
        row = self._one("SELECT * FROM knowledge_bases WHERE name = ?", (name,))
        return kb_from_row(row) if row else None

    def list_knowledge_bases(self) -> list[KnowledgeBaseRecord]:
        return [kb_from_row(row) for row in self._all("SELECT * FROM knowledge_bases ORDER BY name")]

    def update_knowledge_base(self, name: str, /, **changes: Any) -> KnowledgeBaseRecord:
        unknown = set(changes) - KB_UPDATABLE
        if unknown:
            raise ValueError(f"cannot update knowledge base field(s): {', '.join(sorted(unknown))}")
        changes.setdefault("updated_at", time.time())
        assignments = ", ".join(f"{column} = ?" for column in changes)
        params = [kb_to_db(column, value) for column, value in changes.items()]
        with self._write() as tx:
            if not tx.changed(f"UPDATE knowledge_bases SET {assignments} WHERE name = ?", (*params, name)):
                raise NotFoundError(f"knowledge base {name!r} not found")
            row = tx.one("SELECT * FROM knowledge_bases WHERE name = ?", (name,))
        assert row is not None
        return kb_from_row(row)

    def delete_knowledge_base(self, name: str) -> int:
        now = time.time()
        with self._write() as tx:
            if not _lock_knowledge_base(tx, name):
                raise NotFoundError(f"knowledge base {name!r} not found")
            cancel_tasks_of(tx, name, now)
            row = tx.one("SELECT COUNT(*) FROM documents WHERE knowledge_base = ? AND version > 0", (name,))
            _remove_knowledge_base_rows(tx, name)
        return int(row[0]) if row else 0

    def lease_knowledge_base(self, name: str, *, state: str, lease_s: float, now: float) -> bool:
        """Takes over a knowledge base's unfinished create or delete: True (and a fresh lease)
        when it is in `state` and its lease has expired, else False."""
        with self._write() as tx:
            changed = tx.changed(
                "UPDATE knowledge_bases SET lease_until = ? WHERE name = ? AND state = ? AND lease_until < ?",
                (now + lease_s, name, state, now),
            )
        return bool(changed)

    def begin_knowledge_base_delete(self, name: str, *, lease_s: float, now: float) -> int:
        """Hides the knowledge base (a tombstone: readers get not-found from here on) and
        cancels its tasks, before its collections are dropped; returns its visible documents.
        Idempotent: a delete that was interrupted is taken up again."""
        with self._write() as tx:
            if not _lock_knowledge_base(tx, name):
                raise NotFoundError(f"knowledge base {name!r} not found")
            cancel_tasks_of(tx, name, now)
            tx.execute(
                "UPDATE knowledge_bases SET state = ?, lease_until = ?, updated_at = ? WHERE name = ?",
                (KB_DELETING, now + lease_s, now, name),
            )
            _bump_epoch(tx, name)
            row = tx.one(
                "SELECT COUNT(*) FROM documents WHERE knowledge_base = ? AND version > 0 AND deleting = 0", (name,)
            )
        return int(row[0]) if row else 0

    def finish_knowledge_base_delete(self, name: str) -> None:
        """Removes a deleted knowledge base's records, once its collections are gone (idempotent)."""
        with self._write() as tx:
            _lock_knowledge_base(tx, name)  # the knowledge base before its documents, as everywhere
            _remove_knowledge_base_rows(tx, name)

    def stale_knowledge_bases(self, now: float) -> list[KnowledgeBaseRecord]:
        """Knowledge bases left creating or deleting by a request that is gone (lease expired)."""
        rows = self._all(
            "SELECT * FROM knowledge_bases WHERE state <> ? AND lease_until < ? ORDER BY name", (KB_READY, now)
        )
        return [kb_from_row(row) for row in rows]

    def knowledge_base_stats(self, name: str) -> tuple[int, int, int]:
        with self._read() as tx:
            if not tx.one("SELECT 1 FROM knowledge_bases WHERE name = ?", (name,)):
                raise NotFoundError(f"knowledge base {name!r} not found")
            row = tx.one(
                "SELECT COUNT(*), COALESCE(SUM(chunk_count), 0), COALESCE(SUM(size_bytes), 0)"
                " FROM documents WHERE knowledge_base = ? AND version > 0 AND deleting = 0",
                (name,),
            )
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

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
        pending = (title, json.dumps(metadata), file_name, content_type, content_hash, owner, now + lease_s)
        with self._write() as tx:
            # Shared: writes of several documents go on side by side; a delete waits for them.
            found = tx.one(
                f"SELECT 1 FROM knowledge_bases WHERE name = ? AND state = ?{tx.dialect.share_rows}",
                (knowledge_base, KB_READY),
            )
            if found is None:
                raise NotFoundError(f"knowledge base {knowledge_base!r} not found")
            # The version counter's row is the document's lock, even before the document has a
            # row: two first writes of one document cannot both see "no document".
            tx.execute(
                "INSERT INTO document_versions (knowledge_base, document_id, last_version) VALUES (?, ?, 0)"
                " ON CONFLICT DO NOTHING",
                (knowledge_base, document_id),
            )
            last = tx.one(
                "SELECT last_version FROM document_versions WHERE knowledge_base = ? AND document_id = ?"
                + tx.dialect.lock_rows,
                (knowledge_base, document_id),
            )
            row = _doc_row(tx, knowledge_base, document_id)
            if row is not None and row["deleting"]:
                raise Conflict(
                    f"document {document_id!r} in knowledge base {knowledge_base!r} is being deleted; "
                    "try again when the delete has finished"
                )
            if row is not None and row["pending_version"]:
                # The same owner beginning again (a task resumed before it recorded its version)
                # takes its own write over.
                own = bool(owner) and row["lease_owner"] == owner
                if not own and _write_held(tx, row, now):
                    raise _being_written(knowledge_base, document_id)
                # Its writer is gone (the lease ran out): the new write takes over, and the old
                # version's chunks are left to the reconciler.
                _abandon(tx, knowledge_base, document_id, row["pending_version"])
            version = max(row["version"] if row else 0, last[0] if last else 0) + 1
            tx.execute(
                "UPDATE document_versions SET last_version = ? WHERE knowledge_base = ? AND document_id = ?",
                (version, knowledge_base, document_id),
            )
            if row is None:
                tx.execute(
                    "INSERT INTO documents (knowledge_base, id, pending_version, updated_at,"
                    " pending_title, pending_metadata, pending_file_name, pending_content_type,"
                    " pending_content_hash, lease_owner, lease_until)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (knowledge_base, document_id, version, now, *pending),
                )
            else:
                # updated_at stays: it describes the visible version until commit.
                tx.execute(
                    "UPDATE documents SET pending_version = ?, pending_title = ?,"
                    " pending_metadata = ?, pending_file_name = ?, pending_content_type = ?,"
                    " pending_content_hash = ?, lease_owner = ?, lease_until = ?"
                    " WHERE knowledge_base = ? AND id = ?",
                    (version, *pending, knowledge_base, document_id),
                )
            _bump_epoch(tx, knowledge_base)
        return version

    def renew_document_lease(
        self, knowledge_base: str, document_id: str, version: int, *, owner: str, lease_s: float, now: float
    ) -> bool:
        """Keeps (or, for its own owner or when the lease ran out, takes back) the write of
        `version`: False when that version is no longer the one being written."""
        with self._write() as tx:
            changed = tx.changed(
                "UPDATE documents SET lease_owner = ?, lease_until = ?"
                " WHERE knowledge_base = ? AND id = ? AND pending_version = ? AND pending_version > 0"
                " AND deleting = 0 AND (lease_owner = ? OR lease_until < ?)",
                (owner, now + lease_s, knowledge_base, document_id, version, owner, now),
            )
        return bool(changed)

    def stale_documents(self, now: float, limit: int = 100) -> list[DocumentRecord]:
        """Documents whose write, delete or settling stopped (the lease ran out), but for writes
        owned by an ingestion task that is still queued or running: the task resumes those."""
        check_limit(limit)
        rows = self._all(
            "SELECT * FROM documents WHERE (pending_version > 0 OR deleting <> 0 OR settling <> 0)"
            " AND lease_until < ? AND NOT (pending_version > 0 AND deleting = 0 AND lease_owner IN"
            " (SELECT id FROM tasks WHERE state IN (?, ?)))"
            " ORDER BY knowledge_base, id LIMIT ?",
            (now, TASK_QUEUED, TASK_RUNNING, limit),
        )
        return [doc_from_row(row) for row in rows]

    def abandoned_versions(self, limit: int = 100) -> list[tuple[str, str, int]]:
        """(knowledge base, document id, version) of given-up versions whose chunks may remain."""
        check_limit(limit)
        rows = self._all(
            "SELECT knowledge_base, document_id, version FROM abandoned_versions"
            " ORDER BY knowledge_base, document_id, version LIMIT ?",
            (limit,),
        )
        return [(row[0], row[1], int(row[2])) for row in rows]

    def forget_abandoned_version(self, knowledge_base: str, document_id: str, version: int) -> None:
        """Its chunks are gone."""
        with self._write() as tx:
            tx.execute(
                "DELETE FROM abandoned_versions WHERE knowledge_base = ? AND document_id = ? AND version = ?",
                (knowledge_base, document_id, version),
            )

    def forget_abandoned_versions_below(self, knowledge_base: str, document_id: str, version: int) -> None:
        with self._write() as tx:
            tx.execute(
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
        with self._write() as tx:
            row = _doc_row(tx, knowledge_base, document_id)
            if row is None:
                raise _not_found(knowledge_base, document_id)
            if row["pending_version"] != version or version <= 0:
                raise Conflict(
                    f"document {document_id!r} in knowledge base {knowledge_base!r}: version "
                    f"{version} is not pending (pending: {row['pending_version']})"
                )
            _bump_epoch(tx, knowledge_base)
            # Settling is leased too: if the writer dies before the older versions are
            # removed, the reconciler removes them.
            tx.execute(
                "UPDATE documents SET version = pending_version, pending_version = 0, settling = 1,"
                " title = pending_title, metadata = pending_metadata, file_name = pending_file_name,"
                " content_type = pending_content_type, content_hash = pending_content_hash,"
                " chunk_count = ?, size_bytes = ?, lease_until = ?,"
                " updated_at = ?, pending_title = '', pending_metadata = '{}',"
                " pending_file_name = '', pending_content_type = '', pending_content_hash = ''"
                " WHERE knowledge_base = ? AND id = ?",
                (chunk_count, size_bytes, now + lease_s, now, knowledge_base, document_id),
            )
            row = _doc_row(tx, knowledge_base, document_id, lock=False)
        assert row is not None
        return doc_from_row(row)

    def abort_document_version(self, knowledge_base: str, document_id: str, version: int) -> None:
        with self._write() as tx:
            row = _doc_row(tx, knowledge_base, document_id)
            if row is None or version <= 0 or row["pending_version"] != version:
                return  # already committed, aborted or superseded: nothing to undo
            _abandon(tx, knowledge_base, document_id, version)
            _bump_epoch(tx, knowledge_base)
            if row["version"] == 0:
                tx.execute("DELETE FROM documents WHERE knowledge_base = ? AND id = ?", (knowledge_base, document_id))
            else:
                tx.execute(
                    "UPDATE documents SET pending_version = 0, pending_title = '',"
                    " pending_metadata = '{}', pending_file_name = '', pending_content_type = '',"
                    " pending_content_hash = '', lease_owner = '', lease_until = 0"
                    " WHERE knowledge_base = ? AND id = ?",
                    (knowledge_base, document_id),
                )

    def begin_document_delete(
        self, knowledge_base: str, document_id: str, *, owner: str = "", lease_s: float = 0.0, now: float = 0.0
    ) -> DocumentRecord:
        with self._write() as tx:
            row = _doc_row(tx, knowledge_base, document_id)
            if row is None or (row["version"] == 0 and not row["deleting"]):
                raise _not_found(knowledge_base, document_id)
            # A delete already under way (or interrupted) is simply taken up again: every step
            # of a delete is idempotent.
            if row["pending_version"] and not row["deleting"]:
                if _write_held(tx, row, now):
                    raise _being_written(knowledge_base, document_id)
                _abandon(tx, knowledge_base, document_id, row["pending_version"])
            tx.execute(
                "UPDATE documents SET deleting = 1, pending_version = 0, lease_owner = ?, lease_until = ?"
                " WHERE knowledge_base = ? AND id = ?",
                (owner, now + lease_s, knowledge_base, document_id),
            )
            _bump_epoch(tx, knowledge_base)
            row = _doc_row(tx, knowledge_base, document_id, lock=False)
        assert row is not None
        return doc_from_row(row)

    def finish_document_delete(self, knowledge_base: str, document_id: str) -> None:
        with self._write() as tx:
            tx.execute(
                "DELETE FROM sources WHERE knowledge_base = ? AND document_id = ?", (knowledge_base, document_id)
            )
            tx.execute("DELETE FROM documents WHERE knowledge_base = ? AND id = ?", (knowledge_base, document_id))
            _bump_epoch(tx, knowledge_base)

    def finish_settling(self, knowledge_base: str, document_id: str) -> None:
        with self._write() as tx:
            changed = tx.changed(
                "UPDATE documents SET settling = 0, lease_until = CASE WHEN pending_version > 0 THEN lease_until"
                " ELSE 0 END WHERE knowledge_base = ? AND id = ? AND settling <> 0",
                (knowledge_base, document_id),
            )
            if changed:
                _bump_epoch(tx, knowledge_base)

    def get_document(self, knowledge_base: str, document_id: str) -> DocumentRecord | None:
        row = self._one("SELECT * FROM documents WHERE knowledge_base = ? AND id = ?", (knowledge_base, document_id))
        return doc_from_row(row) if row else None

    def list_documents(self, knowledge_base: str, *, after_id: str = "", limit: int = 100) -> list[DocumentRecord]:
        check_limit(limit)
        rows = self._all(
            "SELECT * FROM documents WHERE knowledge_base = ? AND id > ?"
            " AND version > 0 AND deleting = 0 ORDER BY id LIMIT ?",
            (knowledge_base, after_id, limit),
        )
        return [doc_from_row(row) for row in rows]

    def visibility_pins(self, knowledge_base: str) -> list[tuple[str, int]]:
        return [(row[0], int(row[1])) for row in self._all(PINS_QUERY, (knowledge_base,))]

    def visibility(self, knowledge_base: str) -> tuple[int, list[tuple[str, int]]]:
        with self._read() as tx:
            row = tx.one(EPOCH_QUERY, (knowledge_base,))
            pins = tx.all(PINS_QUERY, (knowledge_base,))
        return (int(row[0]) if row else 0), [(p[0], int(p[1])) for p in pins]

    def visibility_epoch(self, knowledge_base: str) -> int:
        row = self._one(EPOCH_QUERY, (knowledge_base,))
        return int(row[0]) if row else 0

    def all_documents_for_rebuild(self, knowledge_base: str) -> list[DocumentRecord]:
        rows = self._all(
            "SELECT * FROM documents WHERE knowledge_base = ? AND version > 0 AND deleting = 0 ORDER BY id",
            (knowledge_base,),
        )
        return [doc_from_row(row) for row in rows]

    # -- parsed sources -------------------------------------------------------------------

    def save_source(self, knowledge_base: str, document_id: str, version: int, sections: list[dict[str, Any]]) -> None:
        data = zlib.compress(json.dumps(sections).encode("utf-8"))
        with self._write() as tx:
            found = tx.one(f"SELECT 1 FROM knowledge_bases WHERE name = ?{tx.dialect.share_rows}", (knowledge_base,))
            if found is None:
                raise NotFoundError(f"knowledge base {knowledge_base!r} not found")
            tx.execute(
                "INSERT INTO sources (knowledge_base, document_id, version, data) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (knowledge_base, document_id, version) DO UPDATE SET data = excluded.data",
                (knowledge_base, document_id, version, data),
            )

    def load_source(self, knowledge_base: str, document_id: str, version: int) -> list[dict[str, Any]] | None:
        row = self._one(
            "SELECT data FROM sources WHERE knowledge_base = ? AND document_id = ? AND version = ?",
            (knowledge_base, document_id, version),
        )
        if row is None:
            return None
        return json.loads(zlib.decompress(row[0]).decode("utf-8"))

    def delete_sources(self, knowledge_base: str, document_id: str, *, except_version: int | None = None) -> None:
        with self._write() as tx:
            if except_version is None:
                tx.execute(
                    "DELETE FROM sources WHERE knowledge_base = ? AND document_id = ?", (knowledge_base, document_id)
                )
            else:
                tx.execute(
                    "DELETE FROM sources WHERE knowledge_base = ? AND document_id = ? AND version <> ?",
                    (knowledge_base, document_id, except_version),
                )
