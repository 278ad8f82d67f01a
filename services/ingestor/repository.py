"""The store for async code: one awaitable, typed method per store operation.

Every operation runs on one worker thread, off the event loop (both stores are blocking
DB-API drivers: sqlite3 and psycopg's sync API). The store's own errors become the statuses a
caller sees. A method here is declared once, from the Store protocol's own signature, so the two
cannot drift apart.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

import grpc

from askmesh.runtime.errors import AskmeshError, FailedPrecondition, NotFound
from services.ingestor.store import AlreadyExists, Conflict, NotFoundError, Store, StoreError

P = ParamSpec("P")
T = TypeVar("T")


def _mapped(error: StoreError) -> AskmeshError:
    if isinstance(error, AlreadyExists):
        return AskmeshError(str(error), code=grpc.StatusCode.ALREADY_EXISTS)
    if isinstance(error, NotFoundError):
        return NotFound(str(error))
    if isinstance(error, Conflict):
        return FailedPrecondition(str(error))
    return AskmeshError(str(error))


def _off_loop(
    operation: Callable[Concatenate[Store, P], T], *, read: bool = False
) -> Callable[Concatenate[Repository, P], Awaitable[T]]:
    """The store's `operation`, awaited on the repository's thread (`read`: on one of its
    reading threads)."""
    name = operation.__name__

    @functools.wraps(operation)
    async def run(self: Repository, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._run(functools.partial(getattr(self.store, name), *args, **kwargs), read=read)

    return run


class Repository:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingestor-store")
        # The reads every question makes (a knowledge base's record and visibility, for the
        # gateway's search view) do not queue behind ingestion's writes.
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ingestor-store-read")

    async def _run(self, work: Callable[[], T], *, read: bool = False) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._readers if read else self._executor, work)
        except StoreError as error:
            raise _mapped(error) from error

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self.store.close()

    # -- what a question reads -----------------------------------------------------------------
    read_knowledge_base = _off_loop(Store.get_knowledge_base, read=True)
    read_visibility = _off_loop(Store.visibility, read=True)

    # -- knowledge bases ---------------------------------------------------------------------
    create_knowledge_base = _off_loop(Store.create_knowledge_base)
    get_knowledge_base = _off_loop(Store.get_knowledge_base)
    list_knowledge_bases = _off_loop(Store.list_knowledge_bases)
    update_knowledge_base = _off_loop(Store.update_knowledge_base)
    delete_knowledge_base = _off_loop(Store.delete_knowledge_base)
    lease_knowledge_base = _off_loop(Store.lease_knowledge_base)
    begin_knowledge_base_delete = _off_loop(Store.begin_knowledge_base_delete)
    finish_knowledge_base_delete = _off_loop(Store.finish_knowledge_base_delete)
    stale_knowledge_bases = _off_loop(Store.stale_knowledge_bases)
    knowledge_base_stats = _off_loop(Store.knowledge_base_stats)

    # -- documents ---------------------------------------------------------------------------
    begin_document_version = _off_loop(Store.begin_document_version)
    renew_document_lease = _off_loop(Store.renew_document_lease)
    stale_documents = _off_loop(Store.stale_documents)
    abandoned_versions = _off_loop(Store.abandoned_versions)
    forget_abandoned_version = _off_loop(Store.forget_abandoned_version)
    forget_abandoned_versions_below = _off_loop(Store.forget_abandoned_versions_below)
    commit_document_version = _off_loop(Store.commit_document_version)
    abort_document_version = _off_loop(Store.abort_document_version)
    begin_document_delete = _off_loop(Store.begin_document_delete)
    finish_document_delete = _off_loop(Store.finish_document_delete)
    get_document = _off_loop(Store.get_document)
    list_documents = _off_loop(Store.list_documents)
    visibility = _off_loop(Store.visibility)
    visibility_epoch = _off_loop(Store.visibility_epoch)
    finish_settling = _off_loop(Store.finish_settling)
    all_documents_for_rebuild = _off_loop(Store.all_documents_for_rebuild)
    save_source = _off_loop(Store.save_source)
    load_source = _off_loop(Store.load_source)
    delete_sources = _off_loop(Store.delete_sources)

    # -- tasks -------------------------------------------------------------------------------
    create_task = _off_loop(Store.create_task)
    get_task = _off_loop(Store.get_task)
    list_tasks = _off_loop(Store.list_tasks)
    update_task = _off_loop(Store.update_task)
    request_cancel = _off_loop(Store.request_cancel)
    claim_next_task = _off_loop(Store.claim_next_task)
    renew_lease = _off_loop(Store.renew_lease)
    requeue_task = _off_loop(Store.requeue_task)
    # -- API keys (found on a reading thread: every call of a caller checks its key) ---------
    create_api_key = _off_loop(Store.create_api_key)
    find_api_key = _off_loop(Store.find_api_key, read=True)
    list_api_keys = _off_loop(Store.list_api_keys)
    revoke_api_key = _off_loop(Store.revoke_api_key)
    # -- uploaded files ----------------------------------------------------------------------
    save_upload_part = _off_loop(Store.save_upload_part)
    upload_size = _off_loop(Store.upload_size)
    delete_upload = _off_loop(Store.delete_upload)
    uploads_to_sweep = _off_loop(Store.uploads_to_sweep)

    async def copy_upload_to(self, task_id: str, path: Path) -> int:
        """Writes the task's uploaded bytes to `path` (for the parser, which reads a file);
        returns how many. The whole copy runs on the store's thread."""

        def copy() -> int:
            size = 0
            with path.open("wb") as file:
                for part in self.store.upload_parts(task_id):
                    file.write(part)
                    size += len(part)
            return size

        return await self._run(copy)
