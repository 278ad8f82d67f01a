"""The store's ingestion tasks (lease-based claiming) and the bytes of uploads, in SQL shared by
SQLite and PostgreSQL.

Why claiming is safe on both: on SQLite a claim is one BEGIN IMMEDIATE transaction, so claims
run one at a time. On PostgreSQL claimers run side by side: the claim query locks the task it
picks with FOR UPDATE SKIP LOCKED (a task another claimer is taking is skipped, not waited
for), then takes a lock on the task's knowledge base and checks the rules between that
knowledge base's tasks again (a rebuild runs alone), now seeing every claim that committed
before; a claim that lost that race tries the next task.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from typing import Any

from askmesh.runtime.errors import shown
from services.ingestor.sql_base import (
    TASK_UPDATABLE,
    Row,
    SqlBase,
    Tx,
    check_limit,
    marks,
    task_from_row,
    task_to_db,
)
from services.ingestor.store import (
    KIND_REBUILD,
    TASK_CANCELLED,
    TASK_QUEUED,
    TASK_RUNNING,
    TERMINAL_STATES,
    AlreadyExists,
    Conflict,
    NotFoundError,
    TaskRecord,
)

# Documents must not change under a rebuild of their knowledge base, and a rebuild waits until
# no other work on its knowledge base is live. Parameters: _EXCLUSIVE_PARAMS(now).
_EXCLUSIVE = (
    "NOT EXISTS (SELECT 1 FROM tasks r WHERE r.knowledge_base = t.knowledge_base"
    "   AND r.id <> t.id AND r.kind = ? AND r.state = ? AND r.lease_until >= ?)"
    " AND (t.kind <> ? OR NOT EXISTS (SELECT 1 FROM tasks o"
    "   WHERE o.knowledge_base = t.knowledge_base AND o.id <> t.id"
    "   AND o.state = ? AND o.lease_until >= ?))"
)


def _exclusive_params(now: float) -> tuple[Any, ...]:
    return (KIND_REBUILD, TASK_RUNNING, now, KIND_REBUILD, TASK_RUNNING, now)


def _task_row(tx: Tx, task_id: str, *, lock: bool = False) -> Row | None:
    suffix = tx.dialect.lock_rows if lock else ""
    return tx.one(f"SELECT * FROM tasks WHERE id = ?{suffix}", (task_id,))


def cancel_tasks_of(tx: Tx, knowledge_base: str, now: float) -> None:
    """Cancel a knowledge base's queued and running tasks and drop their uploads (no worker
    will read them). Running tasks lose their lease too: their worker's next owner-checked
    update or lease renewal fails, so it stops instead of resurrecting the task."""
    live = (knowledge_base, TASK_QUEUED, TASK_RUNNING)
    tx.execute(
        "DELETE FROM upload_parts WHERE task_id IN (SELECT id FROM tasks WHERE knowledge_base = ? AND state IN (?, ?))",
        live,
    )
    tx.execute(
        "UPDATE tasks SET state = ?, error = 'knowledge base deleted', cancel_requested = 1,"
        " owner = '', lease_until = 0, updated_at = ?"
        " WHERE knowledge_base = ? AND state IN (?, ?)",
        (TASK_CANCELLED, now, *live),
    )


class TaskSql(SqlBase):
    """Tasks and uploads."""

    # -- tasks ------------------------------------------------------------------------------

    def create_task(self, record: TaskRecord) -> TaskRecord:
        now = time.time()
        created = record.created_at or now
        record = replace(
            record, created_at=created, updated_at=record.updated_at or now, available_at=record.available_at or created
        )
        values = {name: task_to_db(name, value) for name, value in asdict(record).items()}
        with self._write() as tx:
            inserted = tx.changed(
                f"INSERT INTO tasks ({', '.join(values)}) VALUES ({marks(len(values))}) ON CONFLICT (id) DO NOTHING",
                list(values.values()),
            )
        if not inserted:
            raise AlreadyExists(f"task {shown(record.id)} already exists")
        return record

    def get_task(self, task_id: str) -> TaskRecord | None:
        row = self._one("SELECT * FROM tasks WHERE id = ?", (task_id,))
        return task_from_row(row) if row else None

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
        check_limit(limit)
        where: list[str] = []
        params: list[Any] = []
        if key_range is not None:
            where.append("knowledge_base >= ? AND knowledge_base < ?")
            params.extend(key_range)
        if bare_keys_only:
            where.append("knowledge_base NOT LIKE '%/%'")
        if knowledge_base:
            where.append("knowledge_base = ?")
            params.append(knowledge_base)
        if states:
            where.append(f"state IN ({marks(len(states))})")
            params.extend(states)
        if before is not None:
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params.extend((before[0], before[0], before[1]))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._all(f"SELECT * FROM tasks {clause} ORDER BY created_at DESC, id DESC LIMIT ?", (*params, limit))
        return [task_from_row(row) for row in rows]

    def update_task(self, task_id: str, /, *, owner: str | None = None, **changes: Any) -> TaskRecord:
        unknown = set(changes) - TASK_UPDATABLE
        if unknown:
            raise ValueError(f"cannot update task field(s): {', '.join(sorted(unknown))}")
        changes.setdefault("updated_at", time.time())
        assignments = ", ".join(f"{column} = ?" for column in changes)
        params = [task_to_db(column, value) for column, value in changes.items()]
        with self._write() as tx:
            row = _task_row(tx, task_id, lock=True)
            if row is None:
                raise NotFoundError(f"task {shown(task_id)} not found")
            if owner is not None and row["owner"] != owner:
                raise Conflict(
                    f"task {shown(task_id)}: {shown(owner)} lost the lease (owner now {shown(row['owner'])}, state {shown(row['state'])})"
                )
            tx.execute(f"UPDATE tasks SET {assignments} WHERE id = ?", (*params, task_id))
            row = _task_row(tx, task_id)
        assert row is not None
        return task_from_row(row)

    def request_cancel(self, task_id: str) -> TaskRecord:
        now = time.time()
        with self._write() as tx:
            row = _task_row(tx, task_id, lock=True)
            if row is None:
                raise NotFoundError(f"task {shown(task_id)} not found")
            if row["state"] in TERMINAL_STATES:
                return task_from_row(row)
            if row["state"] == TASK_QUEUED and not row["owner"] and json.loads(row["checkpoint"]) == {}:
                # Nobody works on it and it stored nothing: cancel now rather than wait for a
                # worker to notice, and drop its upload, which no worker will read.
                tx.execute(
                    "UPDATE tasks SET state = ?, error = 'cancelled', cancel_requested = 1,"
                    " updated_at = ? WHERE id = ?",
                    (TASK_CANCELLED, now, task_id),
                )
                tx.execute("DELETE FROM upload_parts WHERE task_id = ?", (task_id,))
            else:
                # A worker must remove what it stored (a task put back to be retried holds a
                # version): in its original place, not after a retry's delay.
                tx.execute(
                    "UPDATE tasks SET cancel_requested = 1, updated_at = ?,"
                    f" available_at = CASE WHEN state = ? THEN {tx.dialect.least}(available_at, created_at)"
                    " ELSE available_at END WHERE id = ?",
                    (now, TASK_QUEUED, task_id),
                )
            row = _task_row(tx, task_id)
        assert row is not None
        return task_from_row(row)

    def claim_next_task(
        self, owner: str, *, lease_s: float, now: float, kinds: Sequence[str] = ()
    ) -> TaskRecord | None:
        if not owner:
            raise ValueError("owner must not be empty")
        lost: list[str] = []  # tasks this call picked but lost to a concurrent claim
        while True:
            with self._write() as tx:
                found = self._pick_task(tx, now=now, kinds=kinds, skip=lost)
                if found is None:
                    return None
                task_id = found[0]
                if not self._still_exclusive(tx, task_id, found[1], now=now):
                    lost.append(task_id)
                    continue  # ends this transaction (releasing its locks) before the next try
                tx.execute(
                    "UPDATE tasks SET state = ?, owner = ?, lease_until = ?, attempts = attempts + 1,"
                    " updated_at = ? WHERE id = ?",
                    (TASK_RUNNING, owner, now + lease_s, now, task_id),
                )
                row = _task_row(tx, task_id)
            assert row is not None
            return task_from_row(row)

    @staticmethod
    def _pick_task(tx: Tx, *, now: float, kinds: Sequence[str], skip: Sequence[str]) -> Row | None:
        """(id, knowledge base) of the runnable task that became claimable first, locked."""
        kind_clause = f" AND t.kind IN ({marks(len(kinds))})" if kinds else ""
        skip_clause = f" AND t.id NOT IN ({marks(len(skip))})" if skip else ""
        query = (
            "SELECT t.id, t.knowledge_base FROM tasks t"
            " WHERE ((t.state = ? AND t.available_at <= ?) OR (t.state = ? AND t.lease_until < ?))"
            f"{kind_clause}{skip_clause} AND {_EXCLUSIVE}"
            # First come, first served by when each became claimable. A task whose worker died
            # keeps its place: it may hold what others wait for (a version, a rebuild), and its
            # attempts are limited. One put back to wait or to be retried went to the back.
            f" ORDER BY t.available_at, t.{tx.dialect.task_order} LIMIT 1{tx.dialect.claim_lock}"
        )
        params = (TASK_QUEUED, now, TASK_RUNNING, now, *kinds, *skip, *_exclusive_params(now))
        return tx.one(query, params)

    @staticmethod
    def _still_exclusive(tx: Tx, task_id: str, knowledge_base: str, *, now: float) -> bool:
        """Whether the picked task may still run beside its knowledge base's other tasks, once
        the claims of that knowledge base made meanwhile have committed (where claims run side
        by side: elsewhere the pick's own check stands)."""
        if not tx.dialect.claim_knowledge_base_lock:
            return True
        tx.execute(tx.dialect.claim_knowledge_base_lock, (knowledge_base,))
        return (
            tx.one(f"SELECT 1 FROM tasks t WHERE t.id = ? AND {_EXCLUSIVE}", (task_id, *_exclusive_params(now)))
            is not None
        )

    def renew_lease(self, task_id: str, owner: str, *, lease_s: float, now: float) -> bool:
        if not owner:
            return False
        with self._write() as tx:
            return (
                tx.changed(
                    "UPDATE tasks SET lease_until = ? WHERE id = ? AND owner = ? AND state = ?",
                    (now + lease_s, task_id, owner, TASK_RUNNING),
                )
                == 1
            )

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
        with self._write() as tx:
            return (
                tx.changed(
                    "UPDATE tasks SET state = ?, owner = '', lease_until = 0, available_at = COALESCE(?, available_at),"
                    f" attempts = CASE WHEN ? THEN attempts ELSE {tx.dialect.greatest}(attempts - 1, 0) END,"
                    " error = COALESCE(?, error), stage = COALESCE(?, stage), updated_at = ?"
                    " WHERE id = ? AND owner = ? AND state = ?",
                    (TASK_QUEUED, available_at, bool(attempt_failed), error, stage, now, task_id, owner, TASK_RUNNING),
                )
                == 1
            )

    # -- uploaded bytes ---------------------------------------------------------------------

    def save_upload_part(self, task_id: str, part: int, data: bytes, now: float) -> None:
        with self._write() as tx:
            tx.execute(
                "INSERT INTO upload_parts (task_id, part, data, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (task_id, part) DO UPDATE SET data = excluded.data, created_at = excluded.created_at",
                (task_id, part, data, now),
            )

    def upload_parts(self, task_id: str) -> Iterator[bytes]:
        # One part per query, by keyset, and no connection or lock held while the caller works
        # on a part (on SQLite that lock is the whole store's).
        after: int | None = None
        while True:
            if after is None:
                row = self._one(
                    "SELECT part, data FROM upload_parts WHERE task_id = ? ORDER BY part LIMIT 1", (task_id,)
                )
            else:
                row = self._one(
                    "SELECT part, data FROM upload_parts WHERE task_id = ? AND part > ? ORDER BY part LIMIT 1",
                    (task_id, after),
                )
            if row is None:
                return
            after = int(row[0])
            yield bytes(row[1])

    def upload_size(self, task_id: str) -> int:
        row = self._one("SELECT COALESCE(SUM(LENGTH(data)), 0) FROM upload_parts WHERE task_id = ?", (task_id,))
        return int(row[0]) if row else 0

    def delete_upload(self, task_id: str) -> None:
        with self._write() as tx:
            tx.execute("DELETE FROM upload_parts WHERE task_id = ?", (task_id,))

    def uploads_to_sweep(self, now: float, orphan_age_s: float) -> list[str]:
        rows = self._all(
            "SELECT u.task_id FROM upload_parts u LEFT JOIN tasks t ON t.id = u.task_id"
            f" WHERE t.state IN ({marks(len(TERMINAL_STATES))}) OR t.id IS NULL"
            " GROUP BY u.task_id, t.id HAVING t.id IS NOT NULL OR MAX(u.created_at) < ?"
            " ORDER BY u.task_id",
            (*sorted(TERMINAL_STATES), now - orphan_age_s),
        )
        return [row[0] for row in rows]
