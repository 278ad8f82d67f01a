"""Finishes or undoes what crashed requests left half done, so nothing waits for a human.

Every change that spans the store and the retriever records its intent in the store before its
side effects, under a lease its request renews (knowledge.py). When a request dies, its intent's
lease runs out, and this reconciler, which every ingestor replica runs at start-up and then every
`reconcile_interval_s`, drives it to an end, the way a Kubernetes controller drives a finalizer:

- a knowledge base left creating: its collection is created (idempotent) and it turns ready;
- a knowledge base left deleting (a tombstone): its collections are dropped, then its records;
- a document write whose writer died: the version is given up (recorded as abandoned);
- an abandoned version: its chunks are removed from the retriever, then its record;
- a committed version still settling: the older versions' chunks are removed, then it is unpinned;
- a document delete that stopped: its chunks are removed, then its record;
- a rebuild mark left without a rebuild task to finish it: cleared.

Every step is idempotent, so two ingestors reconciling at once, or a reconciler racing the retry
of the very call that crashed, do the same work twice at worst and never undo each other's.
Writes of ingestion tasks that are still queued or running are left to their tasks, which resume
from their checkpoints.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from askmesh.runtime.errors import AskmeshError
from askmesh.upstream import Deadline
from services.ingestor.config import IngestorSettings
from services.ingestor.knowledge import KnowledgeEngine
from services.ingestor.repository import Repository
from services.ingestor.store import KB_CREATING, KB_DELETING, KIND_REBUILD, TASK_QUEUED, TASK_RUNNING

log = logging.getLogger("askmesh.ingestor.reconciler")


@dataclass
class Reconciled:
    """What one pass finished or undid."""

    knowledge_bases_created: int = 0
    knowledge_bases_deleted: int = 0
    writes_given_up: int = 0
    versions_removed: int = 0
    documents_settled: int = 0
    documents_deleted: int = 0
    rebuilds_cleared: int = 0

    @property
    def total(self) -> int:
        return sum(vars(self).values())


class Reconciler:
    def __init__(self, settings: IngestorSettings, store: Repository, knowledge: KnowledgeEngine) -> None:
        self.settings = settings
        self.store = store
        self.knowledge = knowledge
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run_forever(), name="reconciler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reconcile_interval_s)
            await self.run_once_logged()

    async def run_once_logged(self) -> Reconciled | None:
        """One pass; a failure (a tier away) is logged and left to the next pass."""
        try:
            return await self.run_once()
        except AskmeshError as error:
            log.warning("[RECONCILE] unfinished: %s; trying again in %g s", error.message, self.settings.reconcile_interval_s)
            return None

    async def run_once(self) -> Reconciled:
        done = Reconciled()
        deadline = Deadline(None, self.settings.upstream_timeout_s)
        await self._knowledge_bases(done, deadline)
        await self._documents(done, deadline)
        await self._abandoned_versions(done, deadline)
        await self._rebuild_marks(done)
        if done.total:
            log.info("[RECONCILE] %s", ", ".join(f"{name.replace('_', ' ')}: {count}" for name, count in vars(done).items() if count))
        return done

    async def _knowledge_bases(self, done: Reconciled, deadline: Deadline) -> None:
        for record in await self.store.stale_knowledge_bases(time.time()):
            # Taken over with a fresh lease first, so one reconciler at a time works on it.
            if not await self.store.lease_knowledge_base(record.name, state=record.state, lease_s=self.settings.write_lease_s, now=time.time()
            ):
                continue
            if record.state == KB_CREATING:
                await self.knowledge.finish_create(record, deadline)
                done.knowledge_bases_created += 1
            elif record.state == KB_DELETING:
                await self.knowledge.finish_delete(record, deadline)
                done.knowledge_bases_deleted += 1

    async def _documents(self, done: Reconciled, deadline: Deadline) -> None:
        for document in await self.store.stale_documents(time.time()):
            knowledge_base = await self.store.get_knowledge_base(document.knowledge_base)
            if knowledge_base is None or not knowledge_base.ready:
                continue  # the knowledge base's own create or delete takes care of its documents
            if document.deleting:
                await self.knowledge.finish_document_delete(document.knowledge_base, document.id, deadline)
                done.documents_deleted += 1
                continue
            if document.pending_version:
                await self.store.abort_document_version(document.knowledge_base, document.id, document.pending_version)
                done.writes_given_up += 1
            if document.settling:
                await self.knowledge.settle(document.knowledge_base, document.id, document.version, deadline)
                done.documents_settled += 1

    async def _abandoned_versions(self, done: Reconciled, deadline: Deadline) -> None:
        for knowledge_base, document_id, version in await self.store.abandoned_versions():
            record = await self.store.get_knowledge_base(knowledge_base)
            if record is None or not record.ready:
                # Being deleted (its collections go with it) or gone.
                if record is None:
                    await self.store.forget_abandoned_version(knowledge_base, document_id, version)
                continue
            try:
                await self.knowledge.forget_version(knowledge_base, document_id, version, deadline)
            except AskmeshError as error:
                if error.code != grpc.StatusCode.NOT_FOUND:
                    raise
                await self.store.forget_abandoned_version(knowledge_base, document_id, version)
            done.versions_removed += 1

    async def _rebuild_marks(self, done: Reconciled) -> None:
        for record in await self.store.list_knowledge_bases():
            if not record.rebuilding_generation:
                continue
            live = await self.store.list_tasks(knowledge_base=record.name, states=[TASK_QUEUED, TASK_RUNNING], limit=1000
            )
            if not any(task.kind == KIND_REBUILD for task in live):
                await self.store.update_knowledge_base(record.name, rebuilding_generation=0)
                done.rebuilds_cleared += 1
