"""Uploads and the background workers that turn them (and rebuilds) into stored chunks.

A task's record lives in the store, so any ingestor replica can report it, and a worker that
dies (kill -9) leaves a lease that expires: the next worker to claim the task resumes it from its
last checkpoint (the parsed text is saved after parsing; every embedded batch is recorded),
and deterministic chunk ids make the re-upsert of a half-done batch harmless.

Every task ends. Each claim is an attempt; an attempt whose worker died, or that met a passing
problem (a tier unavailable), counts as failed, and after task_max_attempts of them the task
fails with the reason. A file is parsed in a child process under time and memory limits
(parse_worker), so a hostile one fails its own task instead of the ingestor.

The uploaded bytes are kept in the store, in parts, never only on the disk of the replica that
received them: a task accepted by one ingestor is resumed by any other, on any machine, after a
kill -9 of the first. However a task ends, its upload is removed; a sweep removes those of tasks
that ended without a worker, and of uploads that never became a task.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import grpc
from google.protobuf import json_format

from askmesh.runtime import metrics
from askmesh.runtime.crashpoints import crash_point
from askmesh.runtime.errors import AskmeshError, FailedPrecondition, InvalidArgument, NotFound
from askmesh.v1 import common_pb2, ingestion_pb2, retriever_pb2
from askmesh.runtime.validation import check_document_id, clip_title
from askmesh.upstream import Deadline, Upstreams
from services.ingestor.chunking import TooManyChunks
from services.ingestor.config import IngestorSettings
from services.ingestor.knowledge import (
    DocumentWrite,
    about,
    KnowledgeEngine,
    sections_from_json,
    sections_to_json,
    stored_search_mode,
    timestamp,
)
from services.ingestor.parse_worker import ParseLimits, parse_file
from services.ingestor.parsing import ParseError, detect_format
from services.ingestor.repository import Repository
from services.ingestor.store import (
    KIND_INGEST_FILE,
    KIND_REBUILD,
    STAGE_RECEIVED,
    TASK_CANCELLED,
    TASK_FAILED,
    TASK_QUEUED,
    TASK_RUNNING,
    TASK_SUCCEEDED,
    TERMINAL_STATES,
    TaskRecord,
)

log = logging.getLogger("askmesh.ingestor.ingestion")

STATES = {
    TASK_QUEUED: ingestion_pb2.TASK_STATE_QUEUED,
    TASK_RUNNING: ingestion_pb2.TASK_STATE_RUNNING,
    TASK_SUCCEEDED: ingestion_pb2.TASK_STATE_SUCCEEDED,
    TASK_FAILED: ingestion_pb2.TASK_STATE_FAILED,
    TASK_CANCELLED: ingestion_pb2.TASK_STATE_CANCELLED,
}
STATE_NAMES = {value: key for key, value in STATES.items()}
STAGES = {
    "received": ingestion_pb2.TASK_STAGE_RECEIVED,
    "parsing": ingestion_pb2.TASK_STAGE_PARSING,
    "chunking": ingestion_pb2.TASK_STAGE_CHUNKING,
    "embedding": ingestion_pb2.TASK_STAGE_EMBEDDING,
    "finalizing": ingestion_pb2.TASK_STAGE_FINALIZING,
    "done": ingestion_pb2.TASK_STAGE_DONE,
}
KINDS = {KIND_INGEST_FILE: ingestion_pb2.TASK_KIND_INGEST_FILE, KIND_REBUILD: ingestion_pb2.TASK_KIND_REBUILD}
MAX_FILE_NAME = 255
# Upload bytes are stored in parts of about this size: large enough to be few rows, small enough
# that neither the receiving replica nor the store holds a whole 64 MiB file in one value.
UPLOAD_PART_BYTES = 1024 * 1024
# Upload parts without a task are an upload still arriving or one whose ingestor died before it
# queued the task: removed once this old.
ORPHAN_UPLOAD_AGE_S = 3600.0
# How often a worker that lets questions go first asks the generator tier again, and how long
# one answer may take.
QUESTIONS_POLL_INTERVAL_S = 0.1
QUESTIONS_POLL_TIMEOUT_S = 1.0
# Statuses of a passing problem: an attempt that meets one is retried (from its checkpoint).
PASSING_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
)


class TaskCancelled(Exception):
    pass


class LostLease(Exception):
    pass


class WaitForOtherWrite(Exception):
    """The document is being written by another task (or a rebuild runs): try again later."""


def task_message(task: TaskRecord, max_attempts: int) -> ingestion_pb2.Task:
    return ingestion_pb2.Task(
        id=task.id,
        kind=KINDS.get(task.kind, ingestion_pb2.TASK_KIND_UNSPECIFIED),
        knowledge_base=task.knowledge_base,
        document_id=task.document_id,
        file_name=task.file_name,
        state=STATES.get(task.state, ingestion_pb2.TASK_STATE_UNSPECIFIED),
        stage=STAGES.get(task.stage, ingestion_pb2.TASK_STAGE_UNSPECIFIED),
        progress=ingestion_pb2.TaskProgress(
            bytes=task.bytes,
            documents_total=task.documents_total,
            documents_done=task.documents_done,
            chunks_total=task.chunks_total,
            chunks_stored=task.chunks_stored,
        ),
        error=task.error,
        cancel_requested=task.cancel_requested,
        created_at=timestamp(task.created_at),
        updated_at=timestamp(task.updated_at),
        attempts=task.attempts,
        max_attempts=max_attempts,
    )


def file_label(file_name: str) -> str:
    """A client's file name is only a label: its last path part, printable, never a path we open."""
    base = PureWindowsPath(PurePosixPath(file_name).name).name
    cleaned = "".join(c for c in base if c.isprintable()).strip()
    if not cleaned or cleaned in (".", ".."):
        raise InvalidArgument("header.file_name", f"{file_name!r} does not name a file")
    return cleaned[:MAX_FILE_NAME]


def document_id_from_file(label: str) -> str:
    stem = label.rsplit(".", 1)[0] if "." in label.strip(".") else label
    return stem or label


class Ingestion:
    def __init__(self, settings: IngestorSettings, store: Repository, knowledge: KnowledgeEngine, upstreams: Upstreams) -> None:
        self.settings = settings
        self.store = store
        self.knowledge = knowledge
        self.upstreams = upstreams
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._workers: list[asyncio.Task[None]] = []
        self._current: dict[str, str] = {}  # worker name -> task id it holds

    # -- uploads ---------------------------------------------------------------------------
    async def receive_upload(
        self, header: ingestion_pb2.UploadFileHeader, parts: AsyncIterator[bytes], deadline: Deadline
    ) -> TaskRecord:
        """Stores the bytes (in the store, in parts), then queues the task."""
        record = await self.knowledge.require(header.knowledge_base)
        label = file_label(header.file_name)
        document_id = check_document_id(header.document_id or document_id_from_file(label), "header.document_id")
        metadata = dict(_struct_dict(header.metadata))
        self.knowledge.check_metadata(record, metadata, "header.metadata")
        chunk_size, chunk_overlap = self.knowledge.chunking_for(record, header.chunking, "header.chunking")
        task_id = uuid.uuid4().hex
        try:
            size = await self._store_upload(task_id, parts)
        except BaseException:
            await self.store.delete_upload(task_id)
            raise
        task = TaskRecord(
            id=task_id,
            kind=KIND_INGEST_FILE,
            knowledge_base=record.name,
            document_id=document_id,
            file_name=label,
            bytes=size,
            documents_total=1,
            spec={
                "title": header.title,
                "metadata": metadata,
                "content_type": header.content_type,
                "chunk_size": chunk_size,
                "chunk_overlap": chunk_overlap,
            },
        )
        try:
            created = await self.store.create_task(task)
        except BaseException:
            await self.store.delete_upload(task_id)
            raise
        log.info("task %s: %s (%d bytes) queued for %s", task_id, label, size, record.name)
        return created

    async def queue_rebuild(
        self, name: str, chunking: common_pb2.ChunkingOptions, search_mode: int = common_pb2.SEARCH_MODE_UNSPECIFIED
    ) -> TaskRecord:
        new_mode = stored_search_mode(search_mode)  # checked before anything is queued
        record = await self.knowledge.require(name)
        chunk_size, overlap = self.knowledge.chunking_for(record, chunking)
        spec: dict[str, Any] = {"chunk_size": chunk_size, "chunk_overlap": overlap}
        if new_mode:
            spec["search_mode"] = new_mode  # applied when the rebuild switches, with the index it needs
        task = TaskRecord(id=uuid.uuid4().hex, kind=KIND_REBUILD, knowledge_base=name, spec=spec)
        return await self.store.create_task(task)

    # -- workers ---------------------------------------------------------------------------
    def start(self) -> None:
        for index in range(self.settings.ingest_workers):
            self._workers.append(asyncio.create_task(self._work(f"worker-{index}"), name=f"ingest-{index}"))
        if self.settings.ingest_workers:
            self._workers.append(asyncio.create_task(self._sweep_periodically(), name="upload-sweep"))

    async def stop(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        # Hand unfinished tasks back at once (the attempt is not counted: it did not fail), so
        # another replica resumes them without waiting for the lease to expire.
        for task_id in list(self._current.values()):
            await self.store.requeue_task(task_id, self.worker_id, now=time.time())
        self._workers.clear()

    async def _work(self, name: str) -> None:
        while True:
            try:
                task = await self.store.claim_next_task(self.worker_id, lease_s=self.settings.task_lease_s, now=time.time()
                )
            except Exception:
                log.exception("claiming a task failed")
                task = None
            if task is None:
                await asyncio.sleep(self.settings.task_poll_interval_s)
                continue
            self._current[name] = task.id
            metrics.INGESTION_TASKS_RUNNING.labels("ingestor").inc()
            try:
                await self.run_task(task)
            finally:
                self._current.pop(name, None)
                metrics.INGESTION_TASKS_RUNNING.labels("ingestor").dec()

    async def run_task(self, task: TaskRecord) -> None:
        """One attempt at a claimed task, its lease renewed every task_lease_s / 3 while it runs
        (a long parse too, not only between batches). If the lease is lost all the same (the
        task was cancelled with its knowledge base, or another worker took it over after a
        stall), the attempt stops at once."""
        work = asyncio.create_task(self._attempt(task), name=f"task-{task.id}")
        heartbeat = asyncio.create_task(self._heartbeat(task.id), name=f"lease-{task.id}")
        try:
            done, _ = await asyncio.wait({work, heartbeat}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                log.warning("task %s is no longer held by this worker; its attempt stops here", task.id)
        finally:
            work.cancel()
            heartbeat.cancel()
            await asyncio.gather(work, heartbeat, return_exceptions=True)
        if not work.cancelled() and work.exception() is not None:
            log.error("task %s: its attempt failed unexpectedly", task.id, exc_info=work.exception())

    async def _heartbeat(self, task_id: str) -> None:
        """Renews the task's lease every task_lease_s / 3; returns once this worker no longer
        holds it (a failed renewal is tried again: it may be the store being busy)."""
        while True:
            await asyncio.sleep(self.settings.task_lease_s / 3)
            try:
                renewed = await self.store.renew_lease(task_id, self.worker_id, lease_s=self.settings.task_lease_s, now=time.time()
                )
            except Exception:
                log.warning("task %s: renewing its lease failed", task_id, exc_info=True)
                continue
            if not renewed:
                return

    async def _attempt(self, task: TaskRecord) -> None:
        """Runs the task and records how this attempt ended: done; failed or cancelled (what
        it stored is removed); handed back to wait for another write (not counted); or, for a
        passing problem, handed back to be retried, until task_max_attempts attempts failed."""
        limit = self.settings.task_max_attempts
        if task.checkpoint:
            log.info(
                "task %s (%s) resumed at stage %s (attempt %d of %d) after batch %s",
                task.id, task.kind, task.stage, task.attempts, limit, task.checkpoint.get("batches_done", 0),
            )  # fmt: skip
        else:
            log.info("task %s (%s) started (attempt %d of %d)", task.id, task.kind, task.attempts, limit)
        try:
            await self._run_and_record(task)
        except LostLease as error:  # also while recording the end: the new owner records it
            log.warning("task %s: %s; leaving it to its new owner", task.id, error)

    async def _run_and_record(self, task: TaskRecord) -> None:
        try:
            if task.cancel_requested:
                raise TaskCancelled()
            if task.attempts > self.settings.task_max_attempts:  # every attempt's worker died
                await self._end(task, TASK_FAILED, self._stopped_reason(task))
            elif task.kind == KIND_REBUILD:
                await self._rebuild(task)
            else:
                await self._ingest(task)
        except LostLease:
            raise
        except TaskCancelled:
            await self._end(task, TASK_CANCELLED, "cancelled")
        except WaitForOtherWrite as error:
            # Back in the queue, behind the tasks waiting already, so that it cannot hold the
            # head of the queue while the other write goes on.
            log.info("task %s waits: %s", task.id, error)
            await self._requeue(task, delay_s=self.settings.task_poll_interval_s * 4, stage=STAGE_RECEIVED)
        except ParseError as error:
            await self._end(task, TASK_FAILED, str(error))
        except AskmeshError as error:
            if error.code in PASSING_CODES:
                await self._retry_or_end(task, error.message)
            else:
                await self._end(task, TASK_FAILED, error.message)
        except Exception as error:
            log.exception("task %s: attempt %d failed unexpectedly", task.id, task.attempts)
            await self._retry_or_end(task, f"{type(error).__name__}: {error}")

    def _stopped_reason(self, task: TaskRecord) -> str:
        stops = task.attempts - 1
        if task.error:  # an earlier one failed with an error of its own
            return (
                f"the worker processing it stopped (crashed or was killed) on its last attempt, "
                f"after an earlier attempt failed: {task.error}"
            )
        return f"the worker processing it stopped {stops} times (crashed or was killed)"

    async def _retry_or_end(self, task: TaskRecord, reason: str) -> None:
        if task.attempts >= self.settings.task_max_attempts:
            await self._end(task, TASK_FAILED, f"{reason} (gave up after {task.attempts} attempts)")
            return
        delay = self.settings.task_retry_delay_s * 2 ** (task.attempts - 1)
        log.warning(
            "task %s: attempt %d of %d failed (%s); it resumes in %g s",
            task.id, task.attempts, self.settings.task_max_attempts, reason, delay,
        )  # fmt: skip
        await self._requeue(task, delay_s=delay, attempt_failed=True, error=reason)

    async def _requeue(self, task: TaskRecord, **how: Any) -> None:
        requeued = await self.store.requeue_task(task.id, self.worker_id, now=time.time(), **how)
        if not requeued:
            log.warning("task %s was no longer held by this worker when it was handed back", task.id)

    async def _end(self, task: TaskRecord, state: str, reason: str) -> None:
        """Removes what the task stored (its spooled upload first: it is never read again), then
        records its end. If the removal fails, the attempt counts as failed and the task ends
        on a later one; on its last attempt it ends regardless (the reconciler removes a version
        it left behind)."""
        await self.store.delete_upload(task.id)
        try:
            await self._clean_up(task)
        except (LostLease, asyncio.CancelledError):
            raise
        except Exception as error:
            problem = error.message if isinstance(error, AskmeshError) else f"{type(error).__name__}: {error}"
            if task.attempts < self.settings.task_max_attempts:
                await self._retry_or_end(task, f"removing what it stored failed: {problem}")
                return
            log.warning("task %s: removing what it stored failed (%s); it ends all the same", task.id, problem)
        log.log(logging.INFO if state == TASK_CANCELLED else logging.WARNING, "task %s %s: %s", task.id, state, reason)
        await self._update(task, state=state, error=reason)

    async def _update(self, task: TaskRecord, **changes: Any) -> TaskRecord:
        try:
            return await self.store.update_task(task.id, owner=self.worker_id, **changes)
        except AskmeshError as error:  # the store's Conflict: another worker owns it now
            raise LostLease(str(error)) from error

    async def _checkpoint(self, task: TaskRecord, **changes: Any) -> TaskRecord:
        """Records progress, renews the lease, stops here if a cancel was asked for, and lets
        questions being answered go first."""
        await self._yield_to_questions()
        renewed = await self.store.renew_lease(task.id, self.worker_id, lease_s=self.settings.task_lease_s, now=time.time())
        if not renewed:
            raise LostLease(f"task {task.id} is held by another worker now")
        updated = await self._update(task, **changes)
        if updated.cancel_requested:
            raise TaskCancelled()
        return updated

    async def _yield_to_questions(self) -> None:
        """Waits while the generator tier has questions in flight, at most
        ingest_yield_to_questions_s; a generator that does not answer is not waited for."""
        limit = self.settings.ingest_yield_to_questions_s
        give_up_at = time.monotonic() + limit
        while time.monotonic() < give_up_at:
            try:
                load = await self.upstreams.generator_load(Deadline(None, QUESTIONS_POLL_TIMEOUT_S))
            except AskmeshError:
                return
            if not load.running and not load.waiting:
                return
            await asyncio.sleep(QUESTIONS_POLL_INTERVAL_S)

    async def _clean_up(self, task: TaskRecord) -> None:
        """Removes what an unfinished task stored; what was visible before stays visible."""
        latest = await self.store.get_task(task.id) or task
        deadline = Deadline(None, self.settings.upstream_timeout_s)
        if latest.kind == KIND_INGEST_FILE:
            version = int(latest.checkpoint.get("version", 0))
            record = await self.store.get_knowledge_base(latest.knowledge_base)
            if version and record is not None and latest.stage != "done":
                write = self._write_for(latest, record, [])
                await self.knowledge.abandon_version(write, version, deadline)
        elif latest.kind == KIND_REBUILD:
            generation = int(latest.checkpoint.get("generation", 0))
            record = await self.store.get_knowledge_base(latest.knowledge_base)
            if record is not None and generation and record.rebuilding_generation == generation:
                await self.store.update_knowledge_base(record.name, rebuilding_generation=0)

    async def cancel(self, task_id: str) -> TaskRecord:
        """Asks for the task to be cancelled. One that nobody works on and that stored nothing
        ends at once, and its upload goes with it; a running one ends when its worker notices,
        which removes what it stored."""
        task = await self.store.request_cancel(task_id)
        if task.state == TASK_CANCELLED:
            await self.store.delete_upload(task.id)
        return task

    async def _store_upload(self, task_id: str, parts: AsyncIterator[bytes]) -> int:
        """The upload's bytes into the store in parts of UPLOAD_PART_BYTES; returns its size."""
        size = part = 0
        pending = bytearray()
        async for data in parts:
            size += len(data)
            if size > self.settings.max_upload_bytes:
                raise InvalidArgument("data", f"the file is larger than the limit of {self.settings.max_upload_bytes} bytes")
            pending += data
            while len(pending) >= UPLOAD_PART_BYTES:
                await self.store.save_upload_part(task_id, part, bytes(pending[:UPLOAD_PART_BYTES]), time.time())
                del pending[:UPLOAD_PART_BYTES]
                part += 1
        if size == 0:
            raise InvalidArgument("data", "the file is empty")
        if pending:
            await self.store.save_upload_part(task_id, part, bytes(pending), time.time())
        return size

    # -- the sweep ---------------------------------------------------------------------------
    async def sweep_uploads(self, now: float | None = None) -> list[str]:
        """Removes the uploads whose task has ended (a task cancelled while queued, or with its
        knowledge base, ends without a worker), or that never became a task and are older than
        ORPHAN_UPLOAD_AGE_S (a younger one may be an upload still arriving); returns the task
        ids whose upload it removed."""
        removed = await self.store.uploads_to_sweep(time.time() if now is None else now, ORPHAN_UPLOAD_AGE_S)
        for task_id in removed:
            await self.store.delete_upload(task_id)
        return removed

    async def _sweep_periodically(self) -> None:
        while True:
            try:
                removed = await self.sweep_uploads()
            except Exception:
                log.exception("sweeping the uploads of ended tasks failed")
            else:
                if removed:
                    log.info("removed %d uploads of ended tasks", len(removed))
            await asyncio.sleep(self.settings.upload_sweep_interval_s)

    def _write_for(self, task: TaskRecord, record: Any, sections: list[Any]) -> DocumentWrite:
        spec = task.spec
        return DocumentWrite(
            knowledge_base=record,
            document_id=task.document_id,
            title=clip_title(spec.get("title") or task.checkpoint.get("title") or task.file_name),
            metadata=spec.get("metadata", {}),
            sections=sections,
            chunk_size=int(spec["chunk_size"]),
            chunk_overlap=int(spec["chunk_overlap"]),
            file_name=task.file_name,
            content_type=task.checkpoint.get("content_type", spec.get("content_type", "")),
        )

    def _parse_limits(self, task: TaskRecord) -> ParseLimits:
        chunk_size = int(task.spec["chunk_size"])
        most = self.settings.max_chunks_per_task
        return ParseLimits(
            timeout_s=self.settings.parse_timeout_s,
            max_memory_bytes=self.settings.parse_max_memory_bytes,
            max_chars=most * chunk_size,
            max_chars_meaning=f"{most} chunks of {chunk_size} characters, max_chunks_per_task",
        )

    async def _ingest(self, task: TaskRecord) -> None:
        record = await self.knowledge.require(task.knowledge_base)
        deadline = Deadline(None, self.settings.upstream_timeout_s)
        checkpoint = dict(task.checkpoint)
        version = int(checkpoint.get("version", 0))
        saved = await self.store.load_source(record.name, task.document_id, version) if version else None

        if saved is None:
            task = await self._checkpoint(task, stage="parsing")
            crash_point("task.parsing")
            content_type = task.spec.get("content_type", "")
            with tempfile.TemporaryDirectory(prefix="askmesh-parse-") as scratch:
                path = Path(scratch) / "upload"
                await self.store.copy_upload_to(task.id, path)
                parsed = await parse_file(path, task.file_name, content_type, self._parse_limits(task))
            checkpoint["title"] = parsed.title or ""
            checkpoint["content_type"] = content_type or detect_format(task.file_name, content_type)
            sections = parsed.sections
            task.checkpoint = checkpoint
            write = self._write_for(task, record, sections)
            try:
                version = await self.knowledge.begin_version(write, task.id)
            except FailedPrecondition as error:  # another write of this document is under way
                raise WaitForOtherWrite(error.message) from error
            checkpoint["version"] = version
            await self.store.save_source(record.name, task.document_id, version, sections_to_json(sections))
            crash_point("task.source_saved")
            task = await self._checkpoint(task, checkpoint=checkpoint, stage="chunking")
        else:
            sections = sections_from_json(saved)
            task.checkpoint = checkpoint
            write = self._write_for(task, record, sections)

        # Off the event loop (a big file is seconds of CPU), and stopped as soon as the task's
        # chunk limit is exceeded rather than after every chunk exists.
        most = self.settings.max_chunks_per_task
        try:
            pieces = await asyncio.to_thread(self.knowledge.cut, write, most)
        except TooManyChunks:
            raise AskmeshError(f"{task.file_name!r} makes more than {most} chunks; the limit is {most} per task") from None
        chunks = self.knowledge.plan_chunks(write, version, pieces)
        task = await self._checkpoint(task, stage="embedding", chunks_total=len(chunks))

        async def after_batch(batches_done: int, chunks_stored: int) -> None:
            nonlocal task
            checkpoint["batches_done"] = batches_done
            task = await self._checkpoint(task, checkpoint=checkpoint, chunks_stored=chunks_stored)

        await self.knowledge.store_chunks(
            record, chunks, deadline, start_batch=int(checkpoint.get("batches_done", 0)), after_batch=after_batch
        )
        task = await self._checkpoint(task, stage="finalizing", chunks_stored=len(chunks))
        await self.knowledge.finish_version(write, version, len(chunks), deadline)
        await self.store.delete_upload(task.id)
        await self._update(task, state=TASK_SUCCEEDED, stage="done", documents_done=1, error="")
        log.info("task %s stored %s: %d chunks (version %d)", task.id, task.document_id, len(chunks), version)

    async def _rebuild(self, task: TaskRecord) -> None:
        record = await self.knowledge.require(task.knowledge_base)
        deadline = Deadline(None, self.settings.upstream_timeout_s)
        checkpoint = dict(task.checkpoint)
        generation = int(checkpoint.get("generation", 0))
        if not generation:
            # A cancelled or failed rebuild may have left its collection behind: never build
            # into it (it may hold chunks of documents deleted since). Leftovers are dropped by
            # the next successful switch.
            generation = record.generation + 1
            while await self._generation_exists(record.collection, generation, deadline):
                generation += 1
            model, dimension = await self.knowledge.probe_embedder(deadline)
            checkpoint.update(generation=generation, embedding_model=model, dimension=dimension, done=[])
            record = await self.store.update_knowledge_base(record.name, rebuilding_generation=generation)
            task = await self._checkpoint(task, checkpoint=checkpoint, stage="embedding")
            crash_point("rebuild.planned")
        schema = [common_pb2.MetadataField(name=n, type=t) for n, t in record.metadata_schema]  # type: ignore[arg-type]
        request = retriever_pb2.CreateCollectionRequest(
            knowledge_base=record.collection, generation=generation, dimension=int(checkpoint["dimension"]),
            embedding_model=checkpoint["embedding_model"], metadata_schema=schema,
        )
        await about(record, self.upstreams.create_collection(request, deadline))
        documents = await self.store.all_documents_for_rebuild(record.name)
        done: list[str] = list(checkpoint.get("done", []))
        task = await self._checkpoint(task, documents_total=len(documents), documents_done=len(done))
        for document in documents:
            if document.id in done:
                continue
            saved = await self.store.load_source(record.name, document.id, document.version)
            if saved is None:
                raise AskmeshError(f"document {document.id!r} has no saved source to rebuild from")
            write = DocumentWrite(
                knowledge_base=record, document_id=document.id, title=document.title, metadata=document.metadata,
                sections=sections_from_json(saved), chunk_size=int(task.spec["chunk_size"]),
                chunk_overlap=int(task.spec["chunk_overlap"]),
            )
            # Off the event loop; no limit: the document was stored within one already.
            pieces = await asyncio.to_thread(self.knowledge.cut, write, None)
            chunks = self.knowledge.plan_chunks(write, document.version, pieces)
            await self.knowledge.store_chunks(record, chunks, deadline, generation=generation)
            crash_point("rebuild.document")
            done.append(document.id)
            checkpoint["done"] = done
            task = await self._checkpoint(
                task, checkpoint=checkpoint, documents_done=len(done), chunks_stored=task.chunks_stored + len(chunks)
            )
        task = await self._checkpoint(task, stage="finalizing")
        switch = retriever_pb2.SwitchGenerationRequest(knowledge_base=record.collection, generation=generation)
        await about(record, self.upstreams.switch_generation(switch, deadline))
        crash_point("rebuild.switched")
        await self.store.update_knowledge_base(record.name,
            generation=generation,
            rebuilding_generation=0,
            chunk_size=int(task.spec["chunk_size"]),
            chunk_overlap=int(task.spec["chunk_overlap"]),
            embedding_model=checkpoint["embedding_model"],
            dimension=int(checkpoint["dimension"]),
            search_mode=task.spec.get("search_mode", record.search_mode),
        )
        await self._update(task, state=TASK_SUCCEEDED, stage="done", error="")
        log.info("task %s rebuilt %s into generation %d", task.id, record.name, generation)

    async def _generation_exists(self, knowledge_base: str, generation: int, deadline: Deadline) -> bool:
        request = retriever_pb2.DescribeCollectionRequest(knowledge_base=knowledge_base, generation=generation)
        try:
            await self.upstreams.describe_collection(request, deadline)
        except AskmeshError as error:
            if error.code != grpc.StatusCode.NOT_FOUND:
                raise
            return False
        return True

    async def watch(self, task_id: str) -> AsyncIterator[TaskRecord]:
        """The task now, then each change, until it ends (polled: the store may be shared)."""
        last = None
        while True:
            task = await self.store.get_task(task_id)
            if task is None:
                raise NotFound(f"id: task {task_id!r} does not exist")
            if last is None or task.updated_at != last:
                last = task.updated_at
                yield task
            if task.state in TERMINAL_STATES:
                return
            await asyncio.sleep(min(self.settings.task_poll_interval_s, 0.25))


def _struct_dict(value: Any) -> dict[str, Any]:
    return json_format.MessageToDict(value)
