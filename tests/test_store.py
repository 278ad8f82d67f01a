"""The ingestor's durable store, as a contract: every behavioural test runs against both
backends (SQLite on a file in tmp_path; PostgreSQL on a fresh database of the session's local
server, see conftest.py). Tests about SQLite's file itself (its pragmas, its lock across
processes, files of older askmesh versions) are in the SQLite-only section at the end."""

from __future__ import annotations

import inspect
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from services.ingestor.sql_schema import SCHEMA_VERSION
from services.ingestor.store import (
    KIND_INGEST_FILE,
    KIND_REBUILD,
    TASK_CANCELLED,
    TASK_FAILED,
    TASK_QUEUED,
    TASK_RUNNING,
    TASK_SUCCEEDED,
    AlreadyExists,
    Conflict,
    DocumentRecord,
    KnowledgeBaseRecord,
    NotFoundError,
    Store,
    StoreError,
    TaskRecord,
    open_store,
)
from services.ingestor.store_postgres import PostgresStore
from services.ingestor.store_sqlite import SqliteStore

REPO_ROOT = Path(__file__).resolve().parent.parent


class Backend:
    """One empty database of one backend: opens stores on it, and runs SQL on it directly (as
    another client would, outside the store). Stores it opened are closed at the end."""

    name: str

    def __init__(self) -> None:
        self.opened: list[Store] = []

    def open(self) -> Store:
        store = self._open()
        self.opened.append(store)
        return store

    def _open(self) -> Store:
        raise NotImplementedError

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def forbid_deletes(self, table: str) -> None:
        """Make every DELETE on `table` fail with 'boom' (a fault in the middle of a step)."""
        raise NotImplementedError

    def allow_deletes(self, table: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        for store in self.opened:
            store.close()


class SqliteBackend(Backend):
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def _open(self) -> Store:
        return SqliteStore(self.path)

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            return [tuple(row) for row in conn.execute(statement, params).fetchall()]
        finally:
            conn.close()

    def forbid_deletes(self, table: str) -> None:
        self.sql(f"CREATE TRIGGER no_delete_{table} BEFORE DELETE ON {table} BEGIN SELECT RAISE(ABORT, 'boom'); END")

    def allow_deletes(self, table: str) -> None:
        self.sql(f"DROP TRIGGER no_delete_{table}")


class PostgresBackend(Backend):
    name = "postgres"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    def _open(self) -> Store:
        return PostgresStore(self.url)

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cursor = conn.execute(statement.replace("?", "%s"), params)
            return [tuple(row) for row in cursor.fetchall()] if cursor.description else []

    def forbid_deletes(self, table: str) -> None:
        self.sql("CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'boom'; END $$")
        self.sql(f"CREATE TRIGGER no_delete_{table} BEFORE DELETE ON {table} FOR EACH ROW EXECUTE FUNCTION boom()")

    def allow_deletes(self, table: str) -> None:
        self.sql(f"DROP TRIGGER no_delete_{table} ON {table}")
        self.sql("DROP FUNCTION boom()")


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    chosen: Backend
    if request.param == "sqlite":
        chosen = SqliteBackend(tmp_path / "state" / "gateway.db")
    else:
        chosen = PostgresBackend(request.getfixturevalue("postgres_database"))
    yield chosen
    chosen.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.open()


def _kb(store: Store, name: str = "kb", **kw) -> KnowledgeBaseRecord:
    return store.create_knowledge_base(KnowledgeBaseRecord(name=name, **kw))


def _begin(store: Store, doc: str, kb: str = "kb", *, title: str = "", now: float = 1.0, **meta) -> int:
    return store.begin_document_version(
        kb, doc, title=title or doc, metadata=meta, file_name=f"{doc}.md",
        content_type="text/markdown", now=now,
    )  # fmt: skip


def _add_doc(store: Store, doc: str, kb: str = "kb", *, chunks: int = 3, size: int = 100, **kw) -> DocumentRecord:
    """A document written as a writer does: begin, commit, then (old chunks removed) settled."""
    version = _begin(store, doc, kb, **kw)
    committed = store.commit_document_version(kb, doc, version, chunk_count=chunks, size_bytes=size, now=2.0)
    store.finish_settling(kb, doc)
    return committed


def _task(store: Store, task_id: str, *, kb: str = "kb", kind: str = KIND_INGEST_FILE, created: float = 1.0, **kw) -> TaskRecord:
    # Created on the tests' clock (claims happen at now=100.0 and so on): a task is claimable
    # from its creation on.
    return store.create_task(TaskRecord(id=task_id, kind=kind, knowledge_base=kb, created_at=created, **kw))


def _in_threads(count: int, work: Callable[[int], None], timeout: float = 60) -> list[BaseException]:
    """Run work(0..count-1) in threads released together; the errors they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def run(index: int) -> None:
        try:
            start.wait()
            work(index)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    return errors


# -- opening ---------------------------------------------------------------------------------


def test_open_creates_the_schema_and_records_each_migration(backend: Backend) -> None:
    backend.open()
    versions = [row[0] for row in backend.sql("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    for table in ("knowledge_bases", "documents", "document_versions", "sources", "tasks", "upload_parts"):
        assert backend.sql(f"SELECT COUNT(*) FROM {table}") == [(0,)]


def test_data_survives_reopen(backend: Backend) -> None:
    s = backend.open()
    _kb(s, description="d")
    _add_doc(s, "a")
    _task(s, "t1")
    s.save_upload_part("t1", 0, b"bytes", now=1.0)
    s.close()
    s = backend.open()  # reopening must not recreate or wipe anything, nor migrate again
    assert s.get_knowledge_base("kb").description == "d"
    assert s.get_document("kb", "a").version == 1
    assert s.get_task("t1") is not None
    assert list(s.upload_parts("t1")) == [b"bytes"]
    assert len(backend.sql("SELECT version FROM schema_migrations")) == SCHEMA_VERSION


def test_refuses_a_newer_schema(backend: Backend) -> None:
    backend.open().close()
    backend.sql("INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, 'future', 0)", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer than {SCHEMA_VERSION}"):
        backend.open()


def test_concurrent_first_opens_apply_each_migration_once(backend: Backend) -> None:
    # Replicas starting together on an empty database: all open, none migrates twice (a
    # second run of a step would fail on the recorded version or on the tables it creates).
    errors = _in_threads(6, lambda _: backend.open())
    assert errors == []
    assert [row[0] for row in backend.sql("SELECT version FROM schema_migrations ORDER BY version")] == list(
        range(1, SCHEMA_VERSION + 1)
    )
    assert len(backend.opened) == 6


def test_open_store_picks_the_backend_from_the_url(tmp_path: Path, postgres_database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    opened = [open_store(str(tmp_path / "plain.db")), open_store(f"sqlite:///{tmp_path}/url.db")]
    monkeypatch.chdir(tmp_path)
    opened.append(open_store("sqlite:///relative.db"))
    opened.append(open_store(postgres_database))
    try:
        assert [type(s) for s in opened] == [SqliteStore, SqliteStore, SqliteStore, PostgresStore]
        assert [s.path for s in opened[:3]] == [tmp_path / "plain.db", tmp_path / "url.db", Path("relative.db")]
        assert (tmp_path / "relative.db").exists()
    finally:
        for s in opened:
            s.close()
    with pytest.raises(ValueError, match="unsupported store URL"):
        open_store("mysql://localhost/db")


@pytest.mark.parametrize("implementation", [SqliteStore, PostgresStore])
def test_every_store_implements_every_protocol_method(implementation: type) -> None:
    members = [n for n, v in vars(Store).items() if callable(v) and not n.startswith("_")]
    assert len(members) >= 30
    for name in members:
        impl = getattr(implementation, name, None)
        assert impl is not None, name
        assert inspect.signature(impl) == inspect.signature(getattr(Store, name)), name


# -- knowledge bases ---------------------------------------------------------------------------


def test_create_and_get_knowledge_base(store: Store) -> None:
    before = time.time()
    created = _kb(store, description="team notes", metadata_schema=[("source", 1), ("year", 2)],
                  chunk_size=500, chunk_overlap=50, embedding_model="m", dimension=384)  # fmt: skip
    assert before <= created.created_at <= time.time()
    assert created.updated_at == created.created_at
    got = store.get_knowledge_base("kb")
    assert got == created
    assert got.metadata_schema == [("source", 1), ("year", 2)]
    assert isinstance(got.metadata_schema[0], tuple)
    assert (got.generation, got.rebuilding_generation) == (1, 0)
    assert store.get_knowledge_base("other") is None


def test_create_keeps_given_timestamps(store: Store) -> None:
    created = store.create_knowledge_base(KnowledgeBaseRecord(name="kb", created_at=10.0, updated_at=11.0))
    assert (created.created_at, created.updated_at) == (10.0, 11.0)
    assert store.get_knowledge_base("kb").created_at == 10.0


def test_create_duplicate_knowledge_base_fails(store: Store) -> None:
    _kb(store, description="first")
    with pytest.raises(AlreadyExists, match="knowledge base 'kb' already exists"):
        _kb(store, description="second")
    assert store.get_knowledge_base("kb").description == "first"


def test_list_knowledge_bases_by_name(store: Store) -> None:
    assert store.list_knowledge_bases() == []
    for name in ("zeta", "alpha", "mid"):
        _kb(store, name)
    assert [kb.name for kb in store.list_knowledge_bases()] == ["alpha", "mid", "zeta"]


def test_update_knowledge_base(store: Store) -> None:
    _kb(store, created_at=5.0, updated_at=5.0)
    updated = store.update_knowledge_base("kb", generation=2, rebuilding_generation=0,
                                          metadata_schema=[("lang", 3)], description="x")  # fmt: skip
    assert (updated.generation, updated.description, updated.metadata_schema) == (2, "x", [("lang", 3)])
    assert updated.updated_at > 5.0 and updated.created_at == 5.0
    assert store.get_knowledge_base("kb") == updated
    assert store.update_knowledge_base("kb", updated_at=42.0).updated_at == 42.0


def test_a_knowledge_base_keeps_its_search_mode(store: Store) -> None:
    assert _kb(store, "plain").search_mode == ""  # follows the ingestor's default
    assert _kb(store, "exact", search_mode="keyword").search_mode == "keyword"
    assert store.get_knowledge_base("exact").search_mode == "keyword"
    assert store.update_knowledge_base("plain", search_mode="hybrid").search_mode == "hybrid"
    assert store.get_knowledge_base("plain").search_mode == "hybrid"


def test_a_store_made_before_search_modes_gains_them_and_its_knowledge_bases_follow_the_default(backend: Backend) -> None:
    store = backend.open()
    _kb(store, description="from before")
    store.close()
    backend.opened.remove(store)
    # The database as the previous schema version left it: no column, no migration 7.
    backend.sql("ALTER TABLE knowledge_bases DROP COLUMN search_mode")
    backend.sql("DELETE FROM schema_migrations WHERE version >= 7")
    if backend.name == "sqlite":
        backend.sql("PRAGMA user_version = 6")
    reopened = backend.open()
    record = reopened.get_knowledge_base("kb")
    assert record is not None and (record.description, record.search_mode) == ("from before", "")
    assert [row[0] for row in backend.sql("SELECT version FROM schema_migrations ORDER BY version")] == list(range(1, SCHEMA_VERSION + 1))
    assert reopened.update_knowledge_base("kb", search_mode="dense").search_mode == "dense"


def test_update_knowledge_base_rejects_bad_fields_and_missing(store: Store) -> None:
    _kb(store)
    with pytest.raises(ValueError, match="bogus"):
        store.update_knowledge_base("kb", bogus=1)
    with pytest.raises(ValueError, match="name"):
        store.update_knowledge_base("kb", name="renamed")
    with pytest.raises(NotFoundError, match="knowledge base 'nope'"):
        store.update_knowledge_base("nope", description="x")


def test_delete_knowledge_base_removes_documents_and_sources_and_cancels_tasks(store: Store) -> None:
    _kb(store)
    _kb(store, "other")
    _add_doc(store, "a")
    _add_doc(store, "b")
    _begin(store, "new")  # being written, no visible version: not counted
    store.save_source("kb", "a", 1, [{"text": "a"}])
    _add_doc(store, "keep", "other")
    store.save_source("other", "keep", 1, [{"text": "k"}])
    _task(store, "queued", created=1.0)
    _task(store, "running", created=2.0)
    _task(store, "done", created=3.0, state=TASK_SUCCEEDED)
    _task(store, "other-task", kb="other", created=4.0)
    assert store.claim_next_task("w1", lease_s=30, now=100.0).id == "queued"
    assert store.claim_next_task("w1", lease_s=30, now=100.0).id == "running"

    assert store.delete_knowledge_base("kb") == 2

    assert store.get_knowledge_base("kb") is None
    assert store.get_document("kb", "a") is None and store.get_document("kb", "new") is None
    assert store.load_source("kb", "a", 1) is None
    for task_id in ("queued", "running"):
        task = store.get_task(task_id)
        assert (task.state, task.error) == (TASK_CANCELLED, "knowledge base deleted")
    assert store.get_task("done").state == TASK_SUCCEEDED
    # The worker of the running task lost it: it cannot write progress or renew.
    with pytest.raises(Conflict, match="lost the lease"):
        store.update_task("queued", owner="w1", state=TASK_SUCCEEDED)
    assert not store.renew_lease("running", "w1", lease_s=30, now=101.0)
    # The other knowledge base is untouched.
    assert store.get_document("other", "keep").version == 1
    assert store.load_source("other", "keep", 1) == [{"text": "k"}]
    assert store.get_task("other-task").state == TASK_QUEUED
    with pytest.raises(NotFoundError, match="knowledge base 'kb'"):
        store.delete_knowledge_base("kb")


def test_delete_knowledge_base_is_one_transaction(backend: Backend) -> None:
    store = backend.open()
    _kb(store)
    _add_doc(store, "a")
    store.save_source("kb", "a", 1, [{"text": "a"}])
    _task(store, "t")
    store.save_upload_part("t", 0, b"bytes", now=1.0)
    # Make the last step of the delete fail: nothing of the earlier steps may remain.
    backend.forbid_deletes("knowledge_bases")
    with pytest.raises((sqlite3.DatabaseError, psycopg.Error), match="boom"):
        store.delete_knowledge_base("kb")
    # No transaction was left open: another store writes at once (SQLite's lock is free).
    backend.open().update_knowledge_base("kb", description="still here")
    assert store.get_knowledge_base("kb").description == "still here"
    assert store.get_document("kb", "a").version == 1
    assert store.load_source("kb", "a", 1) == [{"text": "a"}]
    assert store.get_task("t").state == TASK_QUEUED
    assert store.upload_size("t") == 5
    backend.allow_deletes("knowledge_bases")
    assert store.delete_knowledge_base("kb") == 1


def test_knowledge_base_stats_counts_visible_documents_only(store: Store) -> None:
    _kb(store)
    assert store.knowledge_base_stats("kb") == (0, 0, 0)
    _add_doc(store, "a", chunks=3, size=100)
    _add_doc(store, "b", chunks=5, size=40)
    _add_doc(store, "c", chunks=7, size=1)
    _begin(store, "new")  # invisible: not counted
    store.begin_document_delete("kb", "c")  # deleting: not counted
    _begin(store, "a")  # pending update: the visible version still counts
    assert store.knowledge_base_stats("kb") == (2, 8, 140)
    with pytest.raises(NotFoundError, match="knowledge base 'nope'"):
        store.knowledge_base_stats("nope")


# -- documents -------------------------------------------------------------------------------


def test_new_document_is_invisible_until_commit(store: Store) -> None:
    _kb(store)
    version = _begin(store, "doc", title="Title", now=5.0, lang="en")
    assert version == 1
    doc = store.get_document("kb", "doc")
    assert (doc.version, doc.pending_version, doc.title, doc.metadata) == (0, 1, "", {})
    assert not doc.visible
    assert store.list_documents("kb") == []
    assert store.all_documents_for_rebuild("kb") == []

    committed = store.commit_document_version("kb", "doc", 1, chunk_count=4, size_bytes=99, now=7.0)
    assert committed == DocumentRecord(
        knowledge_base="kb", id="doc", title="Title", metadata={"lang": "en"}, version=1,
        pending_version=0, deleting=False, chunk_count=4, size_bytes=99, file_name="doc.md",
        content_type="text/markdown", updated_at=7.0, settling=True, lease_until=7.0,
    )  # fmt: skip
    assert store.get_document("kb", "doc") == committed
    assert store.list_documents("kb") == [committed]


def test_update_shows_old_version_until_commit(store: Store) -> None:
    _kb(store)
    _add_doc(store, "doc", title="Old", chunks=2, lang="en")
    version = store.begin_document_version(
        "kb", "doc", title="New", metadata={"lang": "de"}, file_name="new.txt",
        content_type="text/plain", now=9.0,
    )  # fmt: skip
    assert version == 2
    doc = store.get_document("kb", "doc")
    assert (doc.title, doc.metadata, doc.file_name, doc.version, doc.pending_version) == (
        "Old", {"lang": "en"}, "doc.md", 1, 2)  # fmt: skip
    assert doc.visible and store.list_documents("kb")[0].title == "Old"

    committed = store.commit_document_version("kb", "doc", 2, chunk_count=9, size_bytes=10, now=11.0)
    assert (committed.title, committed.metadata, committed.file_name, committed.content_type) == (
        "New", {"lang": "de"}, "new.txt", "text/plain")  # fmt: skip
    assert (committed.version, committed.pending_version, committed.chunk_count) == (2, 0, 9)


def test_begin_refuses_concurrent_write_or_delete(store: Store) -> None:
    _kb(store)
    _begin(store, "doc")
    with pytest.raises(Conflict, match="document 'doc'"):
        _begin(store, "doc")
    store.commit_document_version("kb", "doc", 1, chunk_count=1, size_bytes=1, now=2.0)
    store.begin_document_delete("kb", "doc")
    with pytest.raises(Conflict, match="document 'doc'.*deleted"):
        _begin(store, "doc")


def test_refused_begin_changes_nothing(store: Store) -> None:
    _kb(store)
    assert _begin(store, "doc") == 1
    with pytest.raises(Conflict):
        _begin(store, "doc", title="other")
    doc = store.get_document("kb", "doc")
    assert doc.pending_version == 1
    store.commit_document_version("kb", "doc", 1, chunk_count=1, size_bytes=1, now=2.0)
    assert store.get_document("kb", "doc").title == "doc"  # not the refused "other"
    assert _begin(store, "doc") == 2  # the refused attempt consumed no number


def test_begin_needs_the_knowledge_base(store: Store) -> None:
    with pytest.raises(NotFoundError, match="knowledge base 'nope'"):
        _begin(store, "doc", "nope")


def test_commit_requires_the_pending_version(store: Store) -> None:
    _kb(store)
    with pytest.raises(NotFoundError, match="document 'doc'"):
        store.commit_document_version("kb", "doc", 1, chunk_count=1, size_bytes=1, now=1.0)
    version = _begin(store, "doc")
    with pytest.raises(Conflict, match="document 'doc'"):
        store.commit_document_version("kb", "doc", version + 1, chunk_count=1, size_bytes=1, now=1.0)
    store.commit_document_version("kb", "doc", version, chunk_count=1, size_bytes=1, now=1.0)
    with pytest.raises(Conflict):  # committing twice
        store.commit_document_version("kb", "doc", version, chunk_count=1, size_bytes=1, now=1.0)


def test_abort_of_a_new_document_removes_it(store: Store) -> None:
    _kb(store)
    version = _begin(store, "doc")
    store.save_source("kb", "doc", version, [{"text": "x"}])
    store.abort_document_version("kb", "doc", version)
    assert store.get_document("kb", "doc") is None
    assert store.load_source("kb", "doc", version) is None
    store.abort_document_version("kb", "doc", version)  # again: no error
    assert _begin(store, "doc") == 2  # the aborted number is not reused


def test_abort_of_an_update_keeps_the_visible_version(store: Store) -> None:
    _kb(store)
    _add_doc(store, "doc", title="Old")
    store.save_source("kb", "doc", 1, [{"text": "v1"}])
    version = _begin(store, "doc", title="New")
    store.save_source("kb", "doc", version, [{"text": "v2"}])
    store.abort_document_version("kb", "doc", version - 1)  # not the pending one: ignored
    assert store.get_document("kb", "doc").pending_version == version
    store.abort_document_version("kb", "doc", version)
    doc = store.get_document("kb", "doc")
    assert (doc.version, doc.pending_version, doc.title) == (1, 0, "Old")
    assert store.load_source("kb", "doc", 1) == [{"text": "v1"}]
    assert store.load_source("kb", "doc", version) is None
    assert store.visibility_pins("kb") == []
    assert _begin(store, "doc") == 3


def test_version_numbers_are_never_reused_after_delete(store: Store) -> None:
    _kb(store)
    _add_doc(store, "doc")
    v2 = _begin(store, "doc")
    store.commit_document_version("kb", "doc", v2, chunk_count=1, size_bytes=1, now=3.0)
    store.begin_document_delete("kb", "doc")
    store.finish_document_delete("kb", "doc")
    assert store.get_document("kb", "doc") is None
    assert _begin(store, "doc") == 3
    # Even a re-created knowledge base continues the numbering.
    store.delete_knowledge_base("kb")
    _kb(store)
    assert _begin(store, "doc") == 4
    # Numbering is per document and per knowledge base.
    assert _begin(store, "other") == 1
    _kb(store, "kb2")
    assert _begin(store, "doc", "kb2") == 1


def test_document_delete(store: Store) -> None:
    _kb(store)
    with pytest.raises(NotFoundError, match="document 'doc'"):
        store.begin_document_delete("kb", "doc")
    _begin(store, "doc")
    with pytest.raises(NotFoundError, match="document 'doc'"):  # no visible version yet
        store.begin_document_delete("kb", "doc")
    store.commit_document_version("kb", "doc", 1, chunk_count=1, size_bytes=1, now=2.0)
    _begin(store, "doc")
    with pytest.raises(Conflict, match="document 'doc'"):  # an update is under way
        store.begin_document_delete("kb", "doc")
    store.abort_document_version("kb", "doc", 2)
    store.save_source("kb", "doc", 1, [{"text": "x"}])

    doc = store.begin_document_delete("kb", "doc")
    assert doc.deleting and doc.version == 1 and not doc.visible
    assert store.get_document("kb", "doc").deleting
    again = store.begin_document_delete("kb", "doc")  # an interrupted delete is taken up again
    assert again.deleting and again.version == 1
    with pytest.raises(Conflict, match="is being deleted"):
        _begin(store, "doc")
    assert store.list_documents("kb") == []
    assert store.all_documents_for_rebuild("kb") == []

    store.finish_document_delete("kb", "doc")
    assert store.get_document("kb", "doc") is None
    assert store.load_source("kb", "doc", 1) is None
    store.finish_document_delete("kb", "doc")  # idempotent


def test_visibility_pins(store: Store) -> None:
    _kb(store)
    _kb(store, "other")
    _add_doc(store, "stable")
    _add_doc(store, "updating")
    _add_doc(store, "going")
    _begin(store, "updating")  # readers keep seeing version 1
    _begin(store, "brand-new")  # readers see nothing
    store.begin_document_delete("kb", "going")  # readers see nothing
    _begin(store, "elsewhere", "other")
    assert sorted(store.visibility_pins("kb")) == [("brand-new", 0), ("going", 0), ("updating", 1)]
    assert store.visibility_pins("other") == [("elsewhere", 0)]
    store.commit_document_version("kb", "updating", 2, chunk_count=1, size_bytes=1, now=3.0)
    store.commit_document_version("kb", "brand-new", 1, chunk_count=1, size_bytes=1, now=3.0)
    store.finish_document_delete("kb", "going")
    # Committed, old chunks not yet removed: pinned to the new version.
    assert sorted(store.visibility_pins("kb")) == [("brand-new", 1), ("updating", 2)]
    store.finish_settling("kb", "updating")
    store.finish_settling("kb", "brand-new")
    assert store.visibility_pins("kb") == []


def test_list_documents_paginates_by_id(store: Store) -> None:
    _kb(store)
    ids = [f"doc-{i:02d}" for i in range(7)]
    for doc_id in reversed(ids):
        _add_doc(store, doc_id)
    _begin(store, "doc-00a")  # invisible: never listed
    page1 = store.list_documents("kb", limit=3)
    assert [d.id for d in page1] == ids[:3]
    page2 = store.list_documents("kb", after_id=page1[-1].id, limit=3)
    assert [d.id for d in page2] == ids[3:6]
    page3 = store.list_documents("kb", after_id=page2[-1].id, limit=3)
    assert [d.id for d in page3] == ids[6:]
    assert store.list_documents("kb", after_id=ids[-1]) == []
    assert store.list_documents("other") == []
    with pytest.raises(ValueError):
        store.list_documents("kb", limit=0)


def test_arbitrary_ids_and_names(store: Store) -> None:
    kb = "team's \"kb\"; DROP TABLE documents; --"
    doc_id = "../a/b/'q\"uote'/" + "x" * 230 + " ünï"
    _kb(store, kb)
    _add_doc(store, doc_id, kb)
    store.save_source(kb, doc_id, 1, [{"text": "ok"}])
    assert store.get_document(kb, doc_id).id == doc_id
    assert [d.id for d in store.list_documents(kb)] == [doc_id]
    assert store.load_source(kb, doc_id, 1) == [{"text": "ok"}]
    assert store.get_knowledge_base(kb).name == kb
    assert store.delete_knowledge_base(kb) == 1


def test_all_documents_for_rebuild(store: Store) -> None:
    _kb(store)
    _add_doc(store, "b")
    _add_doc(store, "a")
    _add_doc(store, "updating")
    _add_doc(store, "gone")
    _begin(store, "updating", title="newer")
    _begin(store, "new")
    store.begin_document_delete("kb", "gone")
    docs = store.all_documents_for_rebuild("kb")
    assert [(d.id, d.version, d.title) for d in docs] == [("a", 1, "a"), ("b", 1, "b"), ("updating", 1, "updating")]


# -- sources ---------------------------------------------------------------------------------


def test_sources_round_trip_compressed_and_replace(backend: Backend) -> None:
    store = backend.open()
    _kb(store)
    sections = [{"heading": "Intro", "text": "hello " * 500, "page": 1}, {"text": "ünïcödé"}]
    store.save_source("kb", "doc", 1, sections)
    assert store.load_source("kb", "doc", 1) == sections
    blob = bytes(backend.sql("SELECT data FROM sources")[0][0])
    assert json.loads(zlib.decompress(blob)) == sections
    assert len(blob) < len(json.dumps(sections)) / 5
    store.save_source("kb", "doc", 1, [{"text": "replaced"}])
    assert store.load_source("kb", "doc", 1) == [{"text": "replaced"}]
    assert store.load_source("kb", "doc", 2) is None
    assert store.load_source("kb", "other", 1) is None
    with pytest.raises(NotFoundError, match="knowledge base 'nope'"):
        store.save_source("nope", "doc", 1, [])


def test_delete_sources(store: Store) -> None:
    _kb(store)
    for version in (1, 2, 3):
        store.save_source("kb", "doc", version, [{"v": version}])
    store.save_source("kb", "other", 1, [{"v": 1}])
    store.delete_sources("kb", "doc", except_version=3)
    assert [store.load_source("kb", "doc", v) for v in (1, 2, 3)] == [None, None, [{"v": 3}]]
    store.delete_sources("kb", "doc")
    assert store.load_source("kb", "doc", 3) is None
    assert store.load_source("kb", "other", 1) == [{"v": 1}]


# -- tasks -----------------------------------------------------------------------------------


def test_create_and_get_task(store: Store) -> None:
    before = time.time()
    created = store.create_task(TaskRecord(
        id="t1", kind=KIND_INGEST_FILE, knowledge_base="kb", document_id="d", file_name="f.md",
        bytes=12, spec={"upload": "blob-1", "metadata": {"a": [1, 2]}}, checkpoint={"step": 0},
    ))  # fmt: skip
    assert before <= created.created_at == created.updated_at <= time.time()
    got = store.get_task("t1")
    assert got == created
    assert (got.state, got.stage, got.cancel_requested) == (TASK_QUEUED, "received", False)
    assert got.spec == {"upload": "blob-1", "metadata": {"a": [1, 2]}}
    assert store.get_task("missing") is None
    with pytest.raises(AlreadyExists, match="task 't1'"):
        _task(store, "t1")


def test_list_tasks_newest_first_with_filters_and_cursor(store: Store) -> None:
    _task(store, "a", created=1.0)
    _task(store, "b", created=2.0, kb="other")
    _task(store, "c", created=2.0, state=TASK_FAILED)  # same time as b: id breaks the tie
    _task(store, "d", created=3.0, state=TASK_SUCCEEDED)
    _task(store, "e", created=4.0)
    assert [t.id for t in store.list_tasks()] == ["e", "d", "c", "b", "a"]
    assert [t.id for t in store.list_tasks(knowledge_base="kb")] == ["e", "d", "c", "a"]
    assert [t.id for t in store.list_tasks(states=[TASK_FAILED, TASK_SUCCEEDED])] == ["d", "c"]
    assert [t.id for t in store.list_tasks(knowledge_base="kb", states=[TASK_QUEUED])] == ["e", "a"]

    pages, before = [], None
    while True:
        page = store.list_tasks(limit=2, before=before)
        if not page:
            break
        pages.append([t.id for t in page])
        before = (page[-1].created_at, page[-1].id)
    assert pages == [["e", "d"], ["c", "b"], ["a"]]
    with pytest.raises(ValueError):
        store.list_tasks(limit=0)


def test_update_task(store: Store) -> None:
    _task(store, "t", created=1.0, updated_at=1.0)
    updated = store.update_task("t", stage="embedding", chunks_total=10, chunks_stored=4,
                                checkpoint={"batch": 2}, cancel_requested=True)  # fmt: skip
    assert (updated.stage, updated.chunks_total, updated.chunks_stored) == ("embedding", 10, 4)
    assert updated.checkpoint == {"batch": 2} and updated.cancel_requested is True
    assert updated.updated_at > 1.0
    assert store.get_task("t") == updated
    with pytest.raises(ValueError, match="bogus"):
        store.update_task("t", bogus=1)
    with pytest.raises(ValueError, match="id"):
        store.update_task("t", id="x")
    with pytest.raises(NotFoundError, match="task 'missing'"):
        store.update_task("missing", stage="done")


def test_update_task_with_owner_requires_the_lease(store: Store) -> None:
    _task(store, "t")
    store.claim_next_task("w1", lease_s=10, now=100.0)
    store.update_task("t", owner="w1", stage="parsing")
    # w1's lease expires; w2 resumes the task; w1 must not overwrite w2's progress.
    assert store.claim_next_task("w2", lease_s=10, now=111.0).id == "t"
    with pytest.raises(Conflict, match="task 't'.*lost the lease"):
        store.update_task("t", owner="w1", stage="done", state=TASK_SUCCEEDED)
    task = store.get_task("t")
    assert (task.state, task.stage, task.owner) == (TASK_RUNNING, "parsing", "w2")
    assert store.update_task("t", owner="w2", stage="chunking").stage == "chunking"


def test_request_cancel(store: Store) -> None:
    _task(store, "queued", created=1.0)
    _task(store, "running", created=2.0)
    _task(store, "done", created=3.0, state=TASK_SUCCEEDED, stage="done")
    store.update_task("queued", stage="parsing")
    assert store.claim_next_task("w", lease_s=10, now=100.0).id == "queued"
    # "queued" is now running; make a fresh queued one to cancel at once
    _task(store, "fresh", created=4.0, stage="received")

    fresh = store.request_cancel("fresh")
    assert (fresh.state, fresh.error, fresh.stage) == (TASK_CANCELLED, "cancelled", "received")
    running = store.request_cancel("queued")
    assert running.state == TASK_RUNNING and running.cancel_requested and running.stage == "parsing"
    done = store.request_cancel("done")
    assert done.state == TASK_SUCCEEDED and not done.cancel_requested
    assert store.get_task("done") == done
    with pytest.raises(NotFoundError, match="task 'missing'"):
        store.request_cancel("missing")
    # A cancelled task is never claimed.
    assert store.claim_next_task("w", lease_s=10, now=100.0).id == "running"
    assert store.claim_next_task("w", lease_s=10, now=100.0) is None


def test_cancelling_a_task_put_back_with_something_stored_leaves_the_clean_up_to_a_worker_at_once(store: Store) -> None:
    _task(store, "held", created=1.0)
    store.claim_next_task("w1", lease_s=10, now=100.0)
    store.update_task("held", owner="w1", stage="embedding", checkpoint={"version": 3})
    store.requeue_task("held", "w1", now=101.0, delay_s=60.0, attempt_failed=True, error="retriever tier unavailable")
    cancelled = store.request_cancel("held")
    # It holds version 3: not cancelled here, where nothing could remove its chunks ...
    assert (cancelled.state, cancelled.cancel_requested) == (TASK_QUEUED, True)
    # ... but claimable at once (not after its 60 s delay) by a worker that cleans up.
    claimed = store.claim_next_task("w2", lease_s=10, now=102.0)
    assert (claimed.id, claimed.cancel_requested, claimed.checkpoint) == ("held", True, {"version": 3})


def test_claim_takes_oldest_queued_and_sets_the_lease(store: Store) -> None:
    assert store.claim_next_task("w", lease_s=30, now=100.0) is None
    _task(store, "newer", created=2.0)
    _task(store, "older", created=1.0)
    _task(store, "finished", created=0.5, state=TASK_SUCCEEDED)
    _task(store, "failed", created=0.6, state=TASK_FAILED)
    claimed = store.claim_next_task("w", lease_s=30, now=100.0)
    assert (claimed.id, claimed.state, claimed.owner, claimed.lease_until) == ("older", TASK_RUNNING, "w", 130.0)
    assert claimed.updated_at == 100.0
    assert store.get_task("older") == claimed
    assert store.claim_next_task("w2", lease_s=30, now=100.0).id == "newer"
    assert store.claim_next_task("w3", lease_s=30, now=129.0) is None  # both leases live
    with pytest.raises(ValueError):
        store.claim_next_task("", lease_s=30, now=100.0)


def test_claim_resumes_a_task_whose_worker_died(store: Store) -> None:
    _task(store, "t", spec={"file": "x"})
    store.claim_next_task("dead", lease_s=10, now=100.0)
    store.update_task("t", owner="dead", stage="embedding", chunks_stored=7, checkpoint={"batch": 3})
    assert store.claim_next_task("w2", lease_s=10, now=110.0) is None  # lease_until == now: alive
    resumed = store.claim_next_task("w2", lease_s=10, now=110.5)
    assert (resumed.id, resumed.owner, resumed.lease_until) == ("t", "w2", 120.5)
    assert (resumed.stage, resumed.chunks_stored, resumed.checkpoint, resumed.spec) == (
        "embedding", 7, {"batch": 3}, {"file": "x"})  # fmt: skip


def test_claim_filters_by_kind(store: Store) -> None:
    _task(store, "rebuild", kind=KIND_REBUILD, kb="a", created=1.0)
    _task(store, "ingest", kind=KIND_INGEST_FILE, kb="b", created=2.0)
    assert store.claim_next_task("w", lease_s=10, now=100.0, kinds=[KIND_INGEST_FILE]).id == "ingest"
    assert store.claim_next_task("w", lease_s=10, now=100.0, kinds=["other"]) is None
    assert store.claim_next_task("w", lease_s=10, now=100.0, kinds=[KIND_REBUILD, "x"]).id == "rebuild"


def test_no_document_work_while_a_rebuild_runs(store: Store) -> None:
    _task(store, "rebuild", kind=KIND_REBUILD, created=1.0)
    _task(store, "ingest", created=2.0)
    _task(store, "ingest-other-kb", kb="other", created=3.0)
    assert store.claim_next_task("w1", lease_s=10, now=100.0).id == "rebuild"
    # The ingest of the same knowledge base waits; another knowledge base's does not.
    assert store.claim_next_task("w2", lease_s=10, now=105.0).id == "ingest-other-kb"
    assert store.claim_next_task("w2", lease_s=10, now=105.0) is None
    # Once the rebuild's lease expires, it (oldest) is resumed first, which blocks the ingest again.
    resumed = store.claim_next_task("w2", lease_s=10, now=111.0)
    assert resumed.id == "rebuild" and resumed.owner == "w2"
    assert store.claim_next_task("w3", lease_s=10, now=112.0) is None
    store.update_task("rebuild", owner="w2", state=TASK_SUCCEEDED, stage="done")
    assert store.claim_next_task("w3", lease_s=10, now=113.0).id == "ingest"


def test_ingest_blocked_by_running_rebuild_also_when_resuming(store: Store) -> None:
    _task(store, "ingest", created=1.0)
    _task(store, "rebuild", kind=KIND_REBUILD, created=2.0)
    assert store.claim_next_task("w1", lease_s=10, now=100.0).id == "ingest"
    assert store.requeue_task("ingest", "w1", now=100.5)  # its worker shut down: handed back
    # A rebuild is not blocked by a task without a live lease (a worker asking for rebuilds).
    assert store.claim_next_task("w2", lease_s=10, now=101.0, kinds=[KIND_REBUILD]).id == "rebuild"
    # Now the handed-back ingest must not be resumed under the running rebuild.
    assert store.claim_next_task("w3", lease_s=10, now=102.0) is None


def test_rebuild_waits_for_running_work_of_its_knowledge_base(store: Store) -> None:
    _task(store, "ingest", created=1.0)
    _task(store, "rebuild", kind=KIND_REBUILD, created=2.0)
    _task(store, "rebuild-other", kind=KIND_REBUILD, kb="other", created=3.0)
    assert store.claim_next_task("w1", lease_s=10, now=100.0).id == "ingest"
    # The rebuild of kb waits while the ingest runs; the other knowledge base's does not.
    assert store.claim_next_task("w2", lease_s=10, now=101.0).id == "rebuild-other"
    assert store.claim_next_task("w2", lease_s=10, now=101.0) is None
    store.update_task("ingest", owner="w1", state=TASK_SUCCEEDED, stage="done")
    assert store.claim_next_task("w2", lease_s=10, now=102.0).id == "rebuild"


def test_renew_lease(store: Store) -> None:
    _task(store, "t")
    store.claim_next_task("w1", lease_s=10, now=100.0)
    assert store.renew_lease("t", "w1", lease_s=10, now=105.0)
    assert store.get_task("t").lease_until == 115.0
    assert store.claim_next_task("w2", lease_s=10, now=112.0) is None  # renewed: still alive
    assert not store.renew_lease("t", "w2", lease_s=10, now=105.0)
    assert not store.renew_lease("missing", "w1", lease_s=10, now=105.0)
    assert store.get_task("t").lease_until == 115.0
    store.update_task("t", owner="w1", state=TASK_SUCCEEDED)
    assert not store.renew_lease("t", "w1", lease_s=10, now=106.0)  # finished tasks have no lease


def test_a_task_handed_back_by_its_stopping_worker_keeps_its_place_and_its_attempt(store: Store) -> None:
    _task(store, "t", created=1.0)
    _task(store, "later", created=2.0)
    assert store.claim_next_task("w1", lease_s=60, now=100.0).attempts == 1
    assert not store.requeue_task("t", "w2", now=101.0)  # not the owner: nothing happens
    assert store.get_task("t").owner == "w1"
    assert store.requeue_task("t", "w1", now=101.0)
    task = store.get_task("t")
    assert (task.owner, task.lease_until, task.state, task.attempts, task.available_at) == ("", 0.0, TASK_QUEUED, 0, 1.0)
    resumed = store.claim_next_task("w2", lease_s=60, now=101.5)  # long before 160, and before "later"
    assert (resumed.id, resumed.owner, resumed.attempts) == ("t", "w2", 1)
    assert not store.requeue_task("t", "w1", now=102.0)  # w1 let it go: it cannot hand it back again


def test_every_claim_counts_an_attempt_and_a_dead_worker_keeps_it_counted(store: Store) -> None:
    _task(store, "t", created=1.0)
    for attempt in (1, 2, 3):
        now = 100.0 + 20 * attempt  # the previous claimant's 10 s lease has run out
        claimed = store.claim_next_task(f"w{attempt}", lease_s=10, now=now)
        assert (claimed.id, claimed.attempts, claimed.owner) == ("t", attempt, f"w{attempt}")
        assert store.get_task("t").attempts == attempt
    assert store.claim_next_task("w4", lease_s=10, now=165.0) is None  # w3's lease holds


def test_a_failed_attempt_is_retried_after_its_delay_behind_the_others(store: Store) -> None:
    _task(store, "a", created=1.0)
    _task(store, "b", created=2.0)
    assert store.claim_next_task("w1", lease_s=10, now=100.0).id == "a"
    assert store.requeue_task(
        "a", "w1", now=101.0, delay_s=5.0, attempt_failed=True, error="embedder tier unavailable: restarting"
    )  # fmt: skip
    failed = store.get_task("a")
    assert (failed.state, failed.owner, failed.attempts, failed.available_at) == (TASK_QUEUED, "", 1, 106.0)
    assert failed.error == "embedder tier unavailable: restarting"
    assert store.claim_next_task("w1", lease_s=10, now=102.0).id == "b"
    assert store.claim_next_task("w1", lease_s=10, now=105.9) is None  # "a" waits out its delay
    retried = store.claim_next_task("w1", lease_s=10, now=106.0)
    assert (retried.id, retried.attempts, retried.error) == ("a", 2, "embedder tier unavailable: restarting")


def test_a_task_put_back_behind_another_write_does_not_starve_the_others(store: Store) -> None:
    # "blocked" is the oldest, and its document is being written by someone else for as long as
    # this test runs: every claim of it is handed straight back (no delay at all). The others
    # must all be claimed, each at its first try, and the waits are not failed attempts.
    _task(store, "blocked", created=1.0)
    for index in range(5):
        _task(store, f"other-{index}", created=2.0 + index)
    claims: list[str] = []
    now = 100.0
    while len(claims) < 12:
        task = store.claim_next_task("w", lease_s=10, now=now)
        assert task is not None
        claims.append(task.id)
        if task.id == "blocked":
            assert store.requeue_task(task.id, "w", now=now, delay_s=0.0, stage="received")
        else:
            store.update_task(task.id, owner="w", state=TASK_SUCCEEDED, stage="done")
        now += 1.0
    assert claims[:6] == ["blocked", *(f"other-{i}" for i in range(5))], claims
    assert set(claims[6:]) == {"blocked"}  # only it is left, and it is still claimable
    assert store.get_task("blocked").attempts == 0  # a wait is not a failed attempt: each gave its claim back


# -- several threads, several stores ----------------------------------------------------------


def test_two_stores_on_one_database_see_each_others_writes(backend: Backend) -> None:
    a, b = backend.open(), backend.open()
    _kb(a)
    assert b.get_knowledge_base("kb") is not None
    version = _begin(b, "doc")
    with pytest.raises(Conflict):
        _begin(a, "doc")
    a.commit_document_version("kb", "doc", version, chunk_count=1, size_bytes=1, now=2.0)
    assert b.get_document("kb", "doc").version == 1
    _task(a, "t")
    assert b.claim_next_task("wb", lease_s=10, now=100.0).id == "t"
    assert a.claim_next_task("wa", lease_s=10, now=100.0) is None
    assert not a.renew_lease("t", "wa", lease_s=10, now=101.0)
    assert a.get_task("t").owner == "wb"


def test_racing_stores_never_claim_one_task_twice(backend: Backend) -> None:
    # On PostgreSQL the claimers run side by side (FOR UPDATE SKIP LOCKED); on SQLite one at a
    # time. Either way, each task goes to exactly one of them.
    stores = [backend.open(), backend.open()]
    total = 120
    for i in range(total):
        _task(stores[0], f"t{i:03d}", kb=f"kb{i % 7}", created=(i + 1) / 100)
    claims: list[tuple[str, str]] = []
    guard = threading.Lock()

    def worker(index: int) -> None:
        name = f"w{index}"
        while (task := stores[index % 2].claim_next_task(name, lease_s=1000, now=100.0)) is not None:
            with guard:
                claims.append((task.id, name))

    assert _in_threads(6, worker) == []
    ids = [task_id for task_id, _ in claims]
    assert len(ids) == len(set(ids)) == total
    for task_id, name in claims:  # the store agrees with every claimant
        assert stores[1].get_task(task_id).owner == name
    assert len({name for _, name in claims}) > 1


def test_racing_claims_never_run_a_rebuild_beside_other_work_of_its_knowledge_base(backend: Backend) -> None:
    # Each knowledge base has an ingest and a rebuild, all claimable at once: whoever wins,
    # at most one of each pair may be running, also when two claimers pick the pair together.
    stores = [backend.open(), backend.open()]
    bases = 12
    for i in range(bases):
        _task(stores[0], f"ingest-{i:02d}", kb=f"kb{i:02d}", created=1.0 + i)
        _task(stores[0], f"rebuild-{i:02d}", kb=f"kb{i:02d}", kind=KIND_REBUILD, created=1.0 + i)
    claimed: list[TaskRecord] = []
    guard = threading.Lock()

    def worker(index: int) -> None:
        while (task := stores[index % 2].claim_next_task(f"w{index}", lease_s=1000, now=100.0)) is not None:
            with guard:
                claimed.append(task)

    assert _in_threads(6, worker) == []
    per_base = [task.knowledge_base for task in claimed]
    assert sorted(per_base) == sorted(set(per_base)) and len(per_base) == bases, [t.id for t in claimed]
    running = stores[1].list_tasks(states=[TASK_RUNNING], limit=1000)
    assert sorted(t.id for t in running) == sorted(t.id for t in claimed)


def test_racing_first_writes_of_one_document_reserve_one_version(backend: Backend) -> None:
    # The document has no row, before its first write and again after a delete: the writers
    # are serialised on its version counter, and all but one are refused.
    stores = [backend.open(), backend.open()]
    _kb(stores[0])
    versions: list[int] = []

    def writer(index: int) -> None:
        store = stores[index % 2]
        owner = f"w{index}"
        versions.append(
            store.begin_document_version(
                "kb", "doc", title=owner, metadata={}, file_name="", content_type="", now=1.0, owner=owner, lease_s=60.0
            )
        )

    for expected in (1, 2):
        versions.clear()
        errors = _in_threads(6, writer)
        assert versions == [expected]
        assert len(errors) == 5 and all(isinstance(e, Conflict) for e in errors), errors
        stores[1].commit_document_version("kb", "doc", expected, chunk_count=1, size_bytes=1, now=2.0)
        stores[1].begin_document_delete("kb", "doc")
        stores[1].finish_document_delete("kb", "doc")


def test_one_store_is_safe_from_many_threads(store: Store) -> None:
    _kb(store)

    def writer(n: int) -> None:
        for i in range(20):
            doc = f"d{n}-{i}"
            version = _begin(store, doc)
            store.save_source("kb", doc, version, [{"text": doc}])
            store.commit_document_version("kb", doc, version, chunk_count=1, size_bytes=2, now=3.0)
            _task(store, doc)
            store.save_upload_part(doc, 0, doc.encode(), now=3.0)

    assert _in_threads(8, writer) == []
    assert store.knowledge_base_stats("kb") == (160, 160, 320)
    assert len(store.list_tasks(limit=1000)) == 160
    assert store.upload_size("d7-19") == len(b"d7-19")


def test_a_commit_keeps_readers_pinned_until_old_versions_are_gone_and_moves_the_epoch(store: Store) -> None:
    store.create_knowledge_base(KnowledgeBaseRecord(name="kb"))
    epochs = [store.visibility_epoch("kb")]

    def write(version_expected: int) -> None:
        version = store.begin_document_version("kb", "d", title="t", metadata={}, file_name="", content_type="", now=1.0)
        assert version == version_expected
        epochs.append(store.visibility_epoch("kb"))
        store.commit_document_version("kb", "d", version, chunk_count=1, size_bytes=1, now=2.0)
        epochs.append(store.visibility_epoch("kb"))

    write(1)
    assert store.visibility("kb") == (epochs[-1], [("d", 1)])  # settling: pinned to the new version
    store.finish_settling("kb", "d")
    epochs.append(store.visibility_epoch("kb"))
    assert store.visibility("kb") == (epochs[-1], [])
    write(2)
    assert store.visibility_pins("kb") == [("d", 2)]
    store.finish_settling("kb", "d")
    store.finish_settling("kb", "d")  # idempotent, and it does not move the epoch again
    epochs.append(store.visibility_epoch("kb"))
    assert epochs == sorted(set(epochs)), f"every change moves the epoch once: {epochs}"
    store.begin_document_delete("kb", "d")
    assert store.visibility_pins("kb") == [("d", 0)] and store.visibility_epoch("kb") > epochs[-1]


# -- uploaded bytes -------------------------------------------------------------------------------

MIB = 1024 * 1024


def test_an_upload_round_trips_in_part_order(store: Store) -> None:
    data = os.urandom(3 * MIB + 12345)
    parts = [data[i : i + MIB] for i in range(0, len(data), MIB)]
    for number in (2, 0, 3, 1):  # stored in any order, read back in part order
        store.save_upload_part("t", number, parts[number], now=1.0)
    assert store.upload_size("t") == len(data)
    read = store.upload_parts("t")
    assert not isinstance(read, list)
    assert b"".join(read) == data
    assert store.upload_size("other") == 0 and list(store.upload_parts("other")) == []


def test_upload_parts_are_read_one_at_a_time(store: Store) -> None:
    store.save_upload_part("t", 0, b"a", now=1.0)
    store.save_upload_part("t", 5, b"b", now=1.0)  # numbers need not be contiguous
    reading = store.upload_parts("t")
    assert next(reading) == b"a"
    store.save_upload_part("t", 7, b"c", now=2.0)  # stored while the reader works on part 0
    store.save_upload_part("t", 5, b"B", now=2.0)  # a part saved again is replaced
    assert list(reading) == [b"B", b"c"]
    store.save_upload_part("t", 9, b"", now=2.0)  # an empty part is a part
    assert list(store.upload_parts("t")) == [b"a", b"B", b"c", b""] and store.upload_size("t") == 3


def test_delete_upload(store: Store) -> None:
    for number in range(3):
        store.save_upload_part("t", number, b"x" * 10, now=1.0)
    store.save_upload_part("keep", 0, b"k", now=1.0)
    store.delete_upload("t")
    store.delete_upload("t")  # idempotent
    assert list(store.upload_parts("t")) == [] and store.upload_size("t") == 0
    assert list(store.upload_parts("keep")) == [b"k"]


def test_uploads_to_sweep_are_those_of_ended_tasks_and_old_orphans(store: Store) -> None:
    for task_id, state in (("queued", TASK_QUEUED), ("running", TASK_RUNNING), ("succeeded", TASK_SUCCEEDED),
                           ("failed", TASK_FAILED), ("cancelled", TASK_CANCELLED)):  # fmt: skip
        _task(store, task_id, state=state)
        store.save_upload_part(task_id, 0, b"x", now=100.0)
    _task(store, "no-upload", state=TASK_SUCCEEDED)
    store.save_upload_part("orphan-old", 0, b"x", now=10.0)
    store.save_upload_part("orphan-young", 0, b"x", now=10.0)
    store.save_upload_part("orphan-young", 1, b"x", now=95.0)  # still being uploaded
    assert store.uploads_to_sweep(now=100.0, orphan_age_s=60.0) == ["cancelled", "failed", "orphan-old", "succeeded"]
    assert store.uploads_to_sweep(now=200.0, orphan_age_s=60.0) == [
        "cancelled", "failed", "orphan-old", "orphan-young", "succeeded"]  # fmt: skip
    store.update_task("running", state=TASK_SUCCEEDED)  # a task that ends makes its upload sweepable
    assert "running" in store.uploads_to_sweep(now=100.0, orphan_age_s=60.0)
    for task_id in store.uploads_to_sweep(now=200.0, orphan_age_s=60.0):
        store.delete_upload(task_id)
    assert store.uploads_to_sweep(now=200.0, orphan_age_s=60.0) == []
    assert store.upload_size("queued") == 1


def test_tasks_ended_without_a_worker_leave_no_upload(store: Store) -> None:
    _kb(store)
    _kb(store, "other")
    for task_id, kb in (("a", "kb"), ("b", "kb"), ("c", "other"), ("fresh", "other"), ("held", "other")):
        _task(store, task_id, kb=kb)
        store.save_upload_part(task_id, 0, b"bytes", now=1.0)
    _task(store, "done", state=TASK_SUCCEEDED)
    store.save_upload_part("done", 0, b"bytes", now=1.0)
    assert store.claim_next_task("w", lease_s=10, now=100.0).id == "a"
    store.delete_knowledge_base("kb")  # cancels a (running) and b (queued)
    assert store.upload_size("a") == store.upload_size("b") == 0
    assert store.upload_size("done") == 5  # a finished task's upload is the sweeper's
    store.update_task("held", checkpoint={"version": 1})
    store.request_cancel("fresh")  # cancelled at once: nobody will read its upload
    store.request_cancel("held")  # left to a worker, who still has its upload
    assert (store.upload_size("fresh"), store.upload_size("held"), store.upload_size("c")) == (0, 5, 5)
    store.begin_knowledge_base_delete("other", lease_s=10.0, now=100.0)
    assert store.upload_size("c") == store.upload_size("held") == 0


# -- intents: leases, the abandoned versions, what the reconciler finishes ------------------------


def test_a_write_whose_lease_ran_out_is_superseded_and_its_version_left_to_clean_up(store: Store) -> None:
    _kb(store)
    first = store.begin_document_version(
        "kb", "doc", title="t", metadata={}, file_name="", content_type="", now=10.0, owner="dead", lease_s=30.0
    )
    with pytest.raises(Conflict, match="being written by another request"):  # its lease holds
        store.begin_document_version("kb", "doc", title="t", metadata={}, file_name="", content_type="", now=39.0)
    second = store.begin_document_version(
        "kb", "doc", title="t", metadata={}, file_name="", content_type="", now=41.0, owner="alive", lease_s=30.0
    )
    assert second == first + 1
    assert store.abandoned_versions() == [("kb", "doc", first)]
    # The dead writer cannot take its version back; the new one renews its own.
    assert not store.renew_document_lease("kb", "doc", first, owner="dead", lease_s=30.0, now=42.0)
    assert store.renew_document_lease("kb", "doc", second, owner="alive", lease_s=30.0, now=42.0)
    store.forget_abandoned_versions_below("kb", "doc", first)  # not below itself
    assert store.abandoned_versions() == [("kb", "doc", first)]
    store.forget_abandoned_versions_below("kb", "doc", second)  # the new version settled: gone
    assert store.abandoned_versions() == []
    # An aborted write is recorded too (its chunks may be stored).
    store.abort_document_version("kb", "doc", second)
    assert store.abandoned_versions() == [("kb", "doc", second)]
    assert store.get_document("kb", "doc") is None


def test_stale_intents_are_listed_for_the_reconciler_except_writes_of_live_tasks(store: Store) -> None:
    _kb(store)
    for doc in ("written", "settled", "deleted", "tasked"):
        _add_doc(store, doc)

    def begin(doc: str, owner: str) -> int:
        return store.begin_document_version(
            "kb", doc, title=doc, metadata={}, file_name="", content_type="", now=100.0, owner=owner, lease_s=10.0
        )

    begin("written", "request-1")
    version = begin("settled", "request-2")
    store.commit_document_version("kb", "settled", version, chunk_count=1, size_bytes=1, now=100.0, lease_s=10.0)
    store.begin_document_delete("kb", "deleted", owner="request-3", lease_s=10.0, now=100.0)
    store.create_task(TaskRecord(id="task-1", kind="ingest_file", knowledge_base="kb", document_id="tasked", created_at=1.0))
    begin("tasked", "task-1")
    assert store.stale_documents(now=105.0) == []  # every lease holds
    stale = {d.id: d for d in store.stale_documents(now=111.0)}
    assert set(stale) == {"written", "settled", "deleted"}  # the task resumes its own write
    assert stale["written"].pending_version == 2 and stale["settled"].settling and stale["deleted"].deleting


def test_a_knowledge_base_delete_is_a_tombstone_first(store: Store) -> None:
    _kb(store)
    _add_doc(store, "a")
    assert store.begin_knowledge_base_delete("kb", lease_s=10.0, now=50.0) == 1
    assert store.get_knowledge_base("kb").state == "deleting"
    with pytest.raises(NotFoundError):  # nothing may be written into it any more
        _begin(store, "b")
    assert store.begin_knowledge_base_delete("kb", lease_s=10.0, now=51.0) == 1  # idempotent
    assert store.stale_knowledge_bases(now=55.0) == []
    assert [kb.name for kb in store.stale_knowledge_bases(now=70.0)] == ["kb"]
    assert store.lease_knowledge_base("kb", state="deleting", lease_s=10.0, now=70.0)
    assert not store.lease_knowledge_base("kb", state="deleting", lease_s=10.0, now=71.0)  # held now
    store.finish_knowledge_base_delete("kb")
    store.finish_knowledge_base_delete("kb")
    assert store.get_knowledge_base("kb") is None and store.get_document("kb", "a") is None

# -- SQLite only: the file itself (its pragmas, its lock across processes, older files) ------------


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "gateway.db"


@pytest.fixture
def sqlite_store(db_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(db_path)
    yield s
    s.close()


def test_sqlite_open_sets_wal_foreign_keys_busy_timeout_and_schema_version(sqlite_store: SqliteStore, db_path: Path) -> None:
    conn = sqlite_store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    raw = sqlite3.connect(db_path)
    # Kept in step with schema_migrations: an askmesh from before it reads only this.
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"knowledge_bases", "documents", "document_versions", "sources", "tasks", "upload_parts", "schema_migrations"} <= tables
    indexes = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"documents_in_flight", "tasks_by_state", "tasks_by_knowledge_base"} <= indexes
    raw.close()


def test_sqlite_refuses_a_file_whose_user_version_is_newer(db_path: Path) -> None:
    SqliteStore(db_path).close()
    raw = sqlite3.connect(db_path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(StoreError, match="newer"):
        SqliteStore(db_path)


def test_sqlite_visibility_pins_uses_the_in_flight_index(sqlite_store: Store) -> None:
    store = sqlite_store
    from services.ingestor.sql_documents import PINS_QUERY as _PINS_QUERY

    _kb(store)
    for i in range(50):
        _add_doc(store, f"d{i}")
    _begin(store, "d7")
    store._conn.execute("ANALYZE")
    plan = " ".join(row[3] for row in store._conn.execute(f"EXPLAIN QUERY PLAN {_PINS_QUERY}", ("kb",)))
    assert "COVERING INDEX documents_in_flight" in plan and "SCAN" not in plan
    assert store.visibility_pins("kb") == [("d7", 1)]


_CLAIMER = """
import json, sys, time
from pathlib import Path
from services.ingestor.store import SqliteStore
path, go, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
store = SqliteStore(path)
while not go.exists():
    time.sleep(0.005)
claimed = []
while (task := store.claim_next_task(name, lease_s=1000, now=100.0)) is not None:
    claimed.append(task.id)
    store.update_task(task.id, owner=name, state="succeeded", stage="done")
print(json.dumps(claimed))
"""


def test_sqlite_racing_processes_never_claim_one_task_twice(db_path: Path, tmp_path: Path) -> None:
    store = SqliteStore(db_path)
    total = 150
    for i in range(total):
        _task(store, f"t{i:03d}", kb=f"kb{i % 5}", created=(i + 1) / 100)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIMER, str(db_path), str(go), f"p{i}"],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(3)
    ]
    time.sleep(0.3)
    go.touch()
    results = {}
    for i, proc in enumerate(procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results[f"p{i}"] = json.loads(out)
    ids = [task_id for claimed in results.values() for task_id in claimed]
    assert len(ids) == len(set(ids)) == total
    for name, claimed in results.items():
        for task_id in claimed:
            task = store.get_task(task_id)
            assert (task.owner, task.state) == (name, TASK_SUCCEEDED)
    store.close()


def test_sqlite_writes_wait_for_another_process_holding_the_lock(sqlite_store: SqliteStore, db_path: Path) -> None:
    store = sqlite_store
    _kb(store)
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("UPDATE knowledge_bases SET description = 'from other' WHERE name = 'kb'")
    timer = threading.Timer(0.4, lambda: other.execute("COMMIT"))
    timer.start()
    started = time.monotonic()
    # Blocked by the other writer, the store waits (busy timeout) instead of failing.
    updated = store.update_knowledge_base("kb", generation=5)
    waited = time.monotonic() - started
    timer.join()
    other.close()
    assert waited >= 0.3
    assert (updated.description, updated.generation) == ("from other", 5)


# The tasks table as askmesh's schema version 2 made it, before attempts and queue places.
_TASKS_V2 = """CREATE TABLE tasks (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, knowledge_base TEXT NOT NULL,
    document_id TEXT NOT NULL DEFAULT '', file_name TEXT NOT NULL DEFAULT '', state TEXT NOT NULL,
    stage TEXT NOT NULL, bytes INTEGER NOT NULL DEFAULT 0, documents_total INTEGER NOT NULL DEFAULT 0,
    documents_done INTEGER NOT NULL DEFAULT 0, chunks_total INTEGER NOT NULL DEFAULT 0,
    chunks_stored INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '',
    cancel_requested INTEGER NOT NULL DEFAULT 0, spec TEXT NOT NULL DEFAULT '{}',
    checkpoint TEXT NOT NULL DEFAULT '{}', owner TEXT NOT NULL DEFAULT '',
    lease_until REAL NOT NULL DEFAULT 0, created_at REAL NOT NULL, updated_at REAL NOT NULL)"""


def test_sqlite_tasks_of_an_older_store_file_are_kept_claimed_in_order_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "gateway.sqlite3"
    old = sqlite3.connect(path)
    old.execute(_TASKS_V2)
    rows = [  # (id, state, owner, lease_until, created_at), in the order they were created
        ("old-running", TASK_RUNNING, "dead-worker", 50.0, 3.0),  # its worker died under the old version
        ("old-queued", TASK_QUEUED, "", 0.0, 4.0),
        ("old-done", TASK_SUCCEEDED, "w", 0.0, 5.0),
    ]
    for task_id, state, owner, lease_until, created in rows:
        old.execute(
            "INSERT INTO tasks (id, kind, knowledge_base, state, stage, owner, lease_until, checkpoint, created_at, updated_at)"
            " VALUES (?, 'ingest_file', 'kb', ?, 'embedding', ?, ?, '{\"batches_done\": 2}', ?, ?)",
            (task_id, state, owner, lease_until, created, created),
        )
    old.execute("PRAGMA user_version = 2")
    old.commit()
    old.close()

    store = SqliteStore(path)
    try:
        _task(store, "new", created=6.0)
        assert store.get_task("old-queued").attempts == 0
        claimed = [store.claim_next_task("w", lease_s=10, now=100.0) for _ in range(4)]
        assert [t.id if t else None for t in claimed] == ["old-running", "old-queued", "new", None]
        assert claimed[0].checkpoint == {"batches_done": 2} and all(t.attempts == 1 for t in claimed[:3])
        assert store.get_task("old-done").state == TASK_SUCCEEDED
    finally:
        store.close()
    reopened = SqliteStore(path)  # opening a migrated file again changes nothing
    try:
        assert reopened.get_task("old-running").attempts == 1
    finally:
        reopened.close()


def test_sqlite_an_older_store_file_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE knowledge_bases (name TEXT PRIMARY KEY, description TEXT NOT NULL DEFAULT '',"
        " metadata_schema TEXT NOT NULL DEFAULT '[]', chunk_size INTEGER NOT NULL, chunk_overlap INTEGER NOT NULL,"
        " embedding_model TEXT NOT NULL DEFAULT '', dimension INTEGER NOT NULL DEFAULT 0,"
        " generation INTEGER NOT NULL DEFAULT 1, rebuilding_generation INTEGER NOT NULL DEFAULT 0,"
        " created_at REAL NOT NULL, updated_at REAL NOT NULL)"
    )
    old.execute("INSERT INTO knowledge_bases (name, chunk_size, chunk_overlap, created_at, updated_at) VALUES ('kb', 800, 100, 1, 1)")
    old.execute("PRAGMA user_version = 2")
    old.commit()
    old.close()
    store = SqliteStore(path)
    try:
        record = store.get_knowledge_base("kb")
        assert record is not None and record.state == "ready" and record.ready
        _add_doc(store, "doc")
        assert store.get_document("kb", "doc").visible
    finally:
        store.close()
