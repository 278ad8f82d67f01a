"""The embedding model, without gRPC, behind a dynamic batcher.

Concurrent `embed` calls are gathered into one model batch (HuggingFace TEI's design): each call
is queued with its token count (the model's fast tokenizer, truncated at the model's
max_seq_length); one batcher task waits for the first call, then takes calls in arrival order
while the batch's tokens stay within `max_batch_tokens` and its texts within `max_batch_texts`,
waiting at most `max_wait_ms` after the first call was queued for more to come (a call that
waited longer, behind the previous batch, starts at once with whatever else is queued). A call
larger than the budget alone is taken alone; calls are never split. Calls whose caller has gone
(its task was cancelled: the gRPC call was cancelled or its deadline passed) are dropped before
encoding. Each batch is one model call in the single model thread, off the event loop, so health
checks keep answering; its vectors are then split back per call.

The model can be swapped while serving (`swap`): the new one is loaded and warmed up in a worker
thread beside the old, then one reference is switched. Each batch takes the model it runs on at
its start, so a batch started on the old model finishes on it; the old model is dropped when no
batch uses it any more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from askmesh.runtime import metrics
from askmesh.runtime.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable, shown
from askmesh.runtime.models import ModelRegistry, allowed_model_path
from askmesh.v1 import common_pb2
from services.embedder.config import EmbedderSettings
from services.embedder.models import LoadedModel, load_model

log = logging.getLogger("askmesh.embedder")

# Calls with more characters than this are token-counted in a worker thread, not on the loop.
_COUNT_INLINE_CHARS = 16_384


@dataclass(frozen=True)
class EmbeddingBatch:
    vectors: np.ndarray  # shape (len(texts), dimension), float32, unit length
    model: str
    dimension: int
    queue_ms: float  # from queued to the start of the model batch it rode in
    inference_ms: float  # that batch's model time
    batch_texts: int = 0  # texts in that batch (this call's and the others')
    batch_requests: int = 0  # calls in that batch
    tokens: int = 0  # tokens the model read for this call's texts


@dataclass
class BatcherStats:
    """Counters for tests and metrics; monotonic except the `last_*` windows."""

    batches: int = 0  # model calls made for batches
    requests_encoded: int = 0
    texts_encoded: int = 0
    tokens_encoded: int = 0
    requests_dropped: int = 0  # caller gone before its batch started: never encoded
    requests_rejected: int = 0  # queue full
    last_batch_texts: deque[int] = field(default_factory=lambda: deque(maxlen=256))
    last_batch_requests: deque[int] = field(default_factory=lambda: deque(maxlen=256))


@dataclass(eq=False)
class _Pending:
    texts: list[str]
    tokens: int
    future: asyncio.Future[EmbeddingBatch]
    enqueued_at: float


class EmbeddingEngine:
    def __init__(self, settings: EmbedderSettings) -> None:
        self.settings = settings
        # The serving model, those swapped out that still run a batch, and swaps. A model is
        # only memory, so a swapped-out one is dropped, not closed.
        self.models: ModelRegistry[LoadedModel] = ModelRegistry("embedder")
        # One model call at a time, off the event loop (torch uses every core for one batch).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder-model")
        self._queue: deque[_Pending] = deque()
        self._queued_texts = 0
        self._arrived = asyncio.Event()
        self._batcher: asyncio.Task[None] | None = None
        self.stats = BatcherStats()

    @property
    def ready(self) -> bool:
        return self.models.loaded and self._batcher is not None

    @property
    def model(self) -> LoadedModel:
        return self.models.current

    @property
    def backend(self) -> str:
        return self.model.backend

    @property
    def queued_texts(self) -> int:
        return self._queued_texts

    @property
    def dimension(self) -> int:
        return self.model.dimension

    # -- loading -----------------------------------------------------------------------------

    def _load(self) -> LoadedModel:
        path = self.settings.resolved_model_path()
        return load_model(path, self.settings.model_name, self.settings.backend, self.settings)

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens the serving model will see for `texts` (special tokens included, truncated)."""
        return self.model.count_tokens(texts)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.models.load(lambda: loop.run_in_executor(self._executor, self._load))
        self._arrived = asyncio.Event()
        self._batcher = asyncio.create_task(self._run_batches(), name="embedder-batcher")
        self._batcher.add_done_callback(self._batcher_ended)

    def _batcher_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A bug, never the model (a failed model call fails its batch only): say so, fail the
        # queued calls rather than leave them waiting; embed() answers UNAVAILABLE from now on.
        log.error("the embedder's batcher stopped", exc_info=task.exception())
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(Unavailable("embedder: batcher stopped"))
        self._queue.clear()
        self._count_queued(-self._queued_texts)

    async def close(self) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.cancel()
            try:
                await batcher
            except asyncio.CancelledError:
                pass
        gone = Unavailable("embedder: shutting down")
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(gone)
        self._queue.clear()
        self._count_queued(-self._queued_texts)
        self._executor.shutdown(wait=False, cancel_futures=True)
        # A swap under way is cancelled: its worker thread finishes loading; the result is dropped.
        await self.models.close()

    # -- the model ---------------------------------------------------------------------------

    def _encode(self, texts: Sequence[str], model: LoadedModel | None = None) -> np.ndarray:
        """Runs in the model thread, on `model` (a batch's snapshot) or else the serving one."""
        return (model or self.model).encode(texts)

    # -- swaps -------------------------------------------------------------------------------

    def model_info(self) -> common_pb2.ModelInfo:
        return self.models.info()

    async def swap(
        self, path: Path, *, name: str = "", backend: str = "", allow_dimension_change: bool = False
    ) -> common_pb2.ModelInfo:
        """Serves the model folder at `path` from the next batch on (the old one keeps serving
        until then, and for good if the new one fails). One swap at a time; a swap goes on to
        its end even if its caller leaves (GetModel shows the outcome)."""
        serving = self.model
        if self._batcher is None:
            raise Unavailable("embedder: model is still loading")
        self.models.refuse_if_swapping()
        path = allowed_model_path(str(path), self.settings.model_directories())
        if not path.exists():
            raise InvalidArgument("model_path", f"{shown(str(path))} does not exist on this replica")
        if not path.is_dir():
            raise InvalidArgument("model_path", f"{shown(str(path))} is not a folder (a sentence-transformers model)")
        name, backend = name or self._name_for(path), backend or serving.backend

        async def loader() -> LoadedModel:
            # A worker thread of its own: the model thread keeps encoding batches meanwhile.
            return await asyncio.to_thread(load_model, path, name, backend, self.settings)

        def check(new: LoadedModel, old: LoadedModel) -> None:
            if new.dimension != old.dimension and not allow_dimension_change:
                raise FailedPrecondition(
                    f"model_path: {shown(str(path))} makes {new.dimension}-dimension vectors but the serving model "
                    f"{old.name} makes {old.dimension}: "
                    f"knowledge bases built with {old.name} could not be searched or written until rebuilt; "
                    "set allow_dimension_change to swap anyway"
                )

        return await self.models.swap(str(path), loader, check=check)

    def _name_for(self, path: Path) -> str:
        configured = self.settings.resolved_model_path()
        return self.settings.model_name if path.absolute() == configured.absolute() else path.absolute().name

    # -- calls -------------------------------------------------------------------------------

    async def embed(self, texts: Sequence[str]) -> EmbeddingBatch:
        """Embeds already-validated texts (see servicer.validate_texts)."""
        if not self.models.loaded or self._batcher is None:
            raise Unavailable("embedder: model is still loading")
        if self._batcher.done():
            raise Unavailable("embedder: batcher stopped")
        texts = list(texts)
        if self._queued_texts + len(texts) > self.settings.max_queue_texts:
            self._forget_cancelled()
            if self._queued_texts + len(texts) > self.settings.max_queue_texts:
                self.stats.requests_rejected += 1
                metrics.EMBED_REJECTED.labels("embedder").inc()
                raise ResourceExhausted(
                    f"embedder: queue is full ({self._queued_texts} texts waiting, limit "
                    f"{self.settings.max_queue_texts}); retry later"
                )
        if sum(len(text) for text in texts) > _COUNT_INLINE_CHARS:
            tokens = await asyncio.to_thread(self.count_tokens, texts)
        else:
            tokens = self.count_tokens(texts)
        pending = _Pending(texts, tokens, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._queue.append(pending)
        self._count_queued(len(texts))
        self._arrived.set()
        # A cancelled caller cancels this future too; the batcher then drops the call.
        return await pending.future

    def _count_queued(self, change: int) -> None:
        self._queued_texts += change
        metrics.EMBED_QUEUE.labels("embedder").inc(change)

    def _forget_cancelled(self) -> None:
        kept: deque[_Pending] = deque()
        for pending in self._queue:
            if pending.future.cancelled():
                self._dropped(pending)
            else:
                kept.append(pending)
        self._queue = kept

    def _dropped(self, pending: _Pending) -> None:
        self._count_queued(-len(pending.texts))
        self.stats.requests_dropped += 1

    def _plan(self) -> tuple[int, bool]:
        """How many queued calls (from the front, after dropping cancelled ones) the next batch
        takes, and whether it is full: nothing queued could be added, however long we wait."""
        while self._queue and self._queue[0].future.cancelled():
            self._dropped(self._queue.popleft())
        if not self.settings.batching:
            return min(1, len(self._queue)), True
        count = texts = tokens = 0
        for pending in self._queue:
            if pending.future.cancelled():
                continue  # dropped when taken
            if count and (
                texts + len(pending.texts) > self.settings.max_batch_texts
                or tokens + pending.tokens > self.settings.max_batch_tokens
            ):
                return count, True
            count, texts, tokens = count + 1, texts + len(pending.texts), tokens + pending.tokens
        full = texts >= self.settings.max_batch_texts or tokens >= self.settings.max_batch_tokens
        return count, full

    def _take(self, count: int) -> list[_Pending]:
        batch: list[_Pending] = []
        while len(batch) < count and self._queue:
            pending = self._queue.popleft()
            if pending.future.cancelled():
                self._dropped(pending)
                continue
            self._count_queued(-len(pending.texts))
            batch.append(pending)
        return batch

    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        wait_s = self.settings.max_wait_ms / 1000
        while True:
            count, full = self._plan()
            if count == 0:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            deadline = self._queue[0].enqueued_at + wait_s
            while not full and (remaining := deadline - time.perf_counter()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    pass
                count, full = self._plan()
            batch = self._take(count)
            if batch:
                await self._run(batch, loop)

    async def _run(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> None:
        texts = [text for pending in batch for text in pending.texts]
        model = self.models.acquire()  # this batch's model, even if a swap happens while it runs
        started_at = time.perf_counter()
        try:
            vectors = await loop.run_in_executor(self._executor, self._encode, texts, model)
        except asyncio.CancelledError:  # close(): the calls of this batch get no answer
            gone = Unavailable("embedder: shutting down")
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(gone)
            raise
        except Exception as error:  # the model failed: every call of the batch fails with it
            log.exception("embedding a batch of %d texts failed", len(texts))
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        finally:
            self.models.release(model)
        finished_at = time.perf_counter()
        inference_ms = (finished_at - started_at) * 1000
        stats = self.stats
        stats.batches += 1
        stats.requests_encoded += len(batch)
        stats.texts_encoded += len(texts)
        stats.tokens_encoded += sum(pending.tokens for pending in batch)
        metrics.EMBED_BATCH_SIZE.labels("embedder").observe(len(texts))
        metrics.EMBED_BATCH_TOKENS.labels("embedder").observe(sum(pending.tokens for pending in batch))
        stats.last_batch_texts.append(len(texts))
        stats.last_batch_requests.append(len(batch))
        log.debug("batch: %d calls, %d texts in %.1f ms", len(batch), len(texts), inference_ms)
        offset = 0
        for pending in batch:
            end = offset + len(pending.texts)
            if not pending.future.done():  # its caller may have gone while the batch ran
                pending.future.set_result(
                    EmbeddingBatch(
                        vectors=vectors[offset:end],
                        model=model.name,
                        dimension=int(vectors.shape[1]),
                        queue_ms=(started_at - pending.enqueued_at) * 1000,
                        inference_ms=inference_ms,
                        batch_texts=len(texts),
                        batch_requests=len(batch),
                        tokens=pending.tokens,
                    )
                )
            offset = end
