"""The model a tier serves, and swapping it for another without a restart (embedder and generator).

A swap loads the new model beside the serving one (the tier's loader runs off the event loop, so
the serving model keeps answering), warms it up, then switches one reference. Each call takes
the model it runs on once, at its start (`acquire` / `release`, or `use`), so calls in flight
finish on the old model and report its name; the old model is released (closed, when the tier
gives a `close_model`) once the last of them ends. One swap at a time, and a swap goes on to its
end even if its caller leaves (a half-swapped replica would serve nobody knows what).

The registry knows nothing of what a model is: a tier gives the loader (which loads and warms up
one model, and cleans up after itself when that fails) and, where a model holds resources that
garbage collection will not free in time (a llama.cpp context), the coroutine that closes one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from askmesh.runtime.errors import FailedPrecondition, InvalidArgument, Unavailable
from askmesh.runtime.solo import SoloJob
from askmesh.v1 import common_pb2


def allowed_model_path(requested: str, directories: Sequence[Path]) -> Path:
    """`requested` (made absolute, `..` folded) when it lies inside one of `directories` once
    symlinks and `..` are resolved; else the one refusal, the same whether the path exists or
    not, so a caller learns nothing about the replica's file system from it."""
    resolved = Path(requested).expanduser().resolve()
    for directory in directories:
        root = directory.expanduser().resolve()
        if resolved != root and resolved.is_relative_to(root):
            # The path as asked for, not its target: a model's default name comes from it.
            return Path(os.path.abspath(Path(requested).expanduser()))
    raise InvalidArgument("model_path", "not an allowed model; models are loaded from the configured model directory")


class ServableModel(Protocol):
    """What the registry needs of a tier's model. Models are told apart by identity (a
    `dataclass(eq=False)` is): two loads of the same files are two models."""

    @property
    def name(self) -> str:
        """What responses report."""
        ...

    def info(self) -> common_pb2.ModelInfo: ...


Model = TypeVar("Model", bound=ServableModel)

# Loads and warms up one model; raises if it cannot (after freeing whatever it made).
Loader = Callable[[], Awaitable[Model]]
# Refuses a loaded model before it replaces the serving one (new, old): raises an AskmeshError.
Check = Callable[[Model, Model], None]

# Enough of a loader's error to tell what went wrong, not a page of traceback in a status.
MAX_REASON_CHARS = 500


def failure_reason(error: BaseException) -> str:
    """A loader's error in a line: an error's own message where it has one (askmesh's errors and
    HTTP clients' carry the readable part there), else its type and text."""
    message = getattr(error, "message", None)
    reason = message if isinstance(message, str) and message else f"{type(error).__name__}: {error}"
    return reason.strip()[:MAX_REASON_CHARS]


class ModelRegistry(Generic[Model]):
    def __init__(
        self,
        tier: str,
        *,
        first: Model | None = None,
        close_model: Callable[[Model], Awaitable[None]] | None = None,
    ) -> None:
        """`tier` names the service in messages and logs ("embedder"). `first`: the model to
        serve from the start, where a tier names it before it loads (else `load` gives it).
        `close_model`: frees a model that is no longer served (None: dropping it is enough)."""
        self.tier = tier
        self.swaps = 0
        self._current = first
        self._close_model = close_model
        self._in_use: dict[Model, int] = {}  # calls running on a model now; absent: none
        self._retiring: list[Model] = []  # swapped out, still running calls
        self._closing: set[asyncio.Task[None]] = set()
        self._swap: SoloJob[common_pb2.ModelInfo] = SoloJob(f"{tier}: a model swap")
        self._closed = False
        self.log = logging.getLogger(f"askmesh.{tier}")

    # -- what is served -----------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._current is not None

    @property
    def current(self) -> Model:
        """The model new calls run on; Unavailable before the first is loaded and after close."""
        if self._current is None:
            raise Unavailable(f"{self.tier}: shutting down" if self._closed else f"{self.tier}: model is still loading")
        return self._current

    @property
    def swapping(self) -> bool:
        return self._swap.running

    @property
    def retiring_calls(self) -> int:
        """Calls still running on swapped-out models."""
        return sum(self._in_use.get(model, 0) for model in self._retiring)

    def models(self) -> list[Model]:
        """Every model held: the serving one first, then the swapped-out ones still in use."""
        return ([] if self._current is None else [self._current]) + list(self._retiring)

    def info(self) -> common_pb2.ModelInfo:
        info = self.current.info()
        info.swaps = self.swaps
        info.retiring_calls = self.retiring_calls
        return info

    async def load(self, loader: Loader[Model]) -> Model:
        """Loads the first model and serves it (a tier's start; swaps go through `swap`)."""
        model = await loader()
        self._current = model
        return model

    # -- calls --------------------------------------------------------------------------------
    def acquire(self) -> Model:
        """The model a call runs on, to its end; give it back with `release`."""
        model = self.current
        self._in_use[model] = self._in_use.get(model, 0) + 1
        return model

    def release(self, model: Model) -> None:
        left = self._in_use[model] - 1
        if left:
            self._in_use[model] = left
            return
        del self._in_use[model]  # no reference kept: a released model's memory can go
        if model in self._retiring:
            self._retiring.remove(model)
            self._drop(model)

    @contextlib.contextmanager
    def use(self) -> Iterator[Model]:
        model = self.acquire()
        try:
            yield model
        finally:
            self.release(model)

    # -- swaps --------------------------------------------------------------------------------
    def refuse_if_swapping(self) -> None:
        """FAILED_PRECONDITION while a swap runs: a tier calls it before its own checks of the
        request, so a second swap is told so whatever it asked for."""
        self._swap.refuse_if_running()

    async def swap(self, target: str, loader: Loader[Model], *, check: Check[Model] | None = None) -> common_pb2.ModelInfo:
        """Serves what `loader` loads from the next call on; the serving model keeps serving
        until then, and for good if the load fails (FAILED_PRECONDITION naming `target`, what
        the caller asked for) or `check(new, old)` refuses the new one. Returns the new model's
        info with `replaced` set."""
        self._swap.refuse_if_running()
        old = self.current
        return await self._swap.run(self._swap_to(target, loader, check, old), name=f"{self.tier}-model-swap")

    async def _swap_to(self, target: str, loader: Loader[Model], check: Check[Model] | None, old: Model) -> common_pb2.ModelInfo:
        try:
            new = await loader()
        except Exception as error:
            self.log.warning("[MODEL] swap to %s failed, still serving %s: %r", target, old.name, error)
            raise FailedPrecondition(
                f"model_path: {target!r} failed to load ({failure_reason(error)}); still serving {old.name}"
            ) from error
        if self._closed:
            await self._discard(new)
            raise Unavailable(f"{self.tier}: shutting down")
        if check is not None:
            try:
                check(new, old)
            except BaseException:
                await self._discard(new)
                raise
        self._current = new
        self.swaps += 1
        if self._in_use.get(old, 0):
            self._retiring.append(old)  # released by the last call that runs on it
        else:
            self._drop(old)
        info = self.info()
        info.replaced = old.name
        dimensions = f", {info.dimension} dimensions" if info.dimension else ""
        self.log.info(
            "[MODEL] %s serves %s (%s%s; loaded and warmed up in %.1f s) in place of %s; %d calls finish on it",
            self.tier, info.name, info.backend, dimensions, info.load_seconds, old.name, info.retiring_calls,
        )
        return info

    # -- releasing ----------------------------------------------------------------------------
    def _drop(self, model: Model) -> None:
        """Lets go of a model no call uses any more: closed in the background, or just dropped."""
        if self._close_model is None:
            self.log.info("[MODEL] released %s", model.name)
            return
        task = asyncio.get_running_loop().create_task(self._close_quietly(model), name=f"{self.tier}-model-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_quietly(self, model: Model) -> None:
        try:
            await self._discard(model)
            self.log.info("[MODEL] released %s", model.name)
        except Exception:
            self.log.exception("closing the swapped-out model %s failed", model.name)

    async def _discard(self, model: Model) -> None:
        if self._close_model is not None:
            await self._close_model(model)

    async def released(self) -> None:
        """Waits until swapped-out models released so far are closed."""
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def close(self) -> None:
        """Stops serving: a swap under way is cancelled (its result dropped) and every model
        held is closed, the swapped-out ones too, without waiting for their calls."""
        self._closed = True
        self._swap.cancel()
        held = self.models()
        self._current = None
        self._retiring.clear()
        for model in held:
            await self._discard(model)
        await self.released()
