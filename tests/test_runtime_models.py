"""The runtime's model registry on its own: fake models, no gRPC, no real model files."""

from __future__ import annotations

import asyncio
import gc
import weakref
from dataclasses import dataclass

import pytest

from askmesh.runtime.errors import FailedPrecondition, InvalidArgument, Unavailable
from askmesh.runtime.models import ModelRegistry, failure_reason
from askmesh.v1 import common_pb2


@dataclass(eq=False)
class FakeModel:
    name: str
    dimension: int = 4
    closed: bool = False

    def info(self) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(name=self.name, backend="fake", dimension=self.dimension, load_seconds=0.5)


class Closer:
    """A close_model that records what it closed and can be held to keep a close running."""

    def __init__(self) -> None:
        self.closed: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, model: FakeModel) -> None:
        await self.gate.wait()
        model.closed = True
        self.closed.append(model.name)


def loader_of(model: FakeModel):  # type: ignore[no-untyped-def]
    async def load() -> FakeModel:
        return model

    return load


async def serving(name: str = "old", closer: Closer | None = None) -> ModelRegistry[FakeModel]:
    registry: ModelRegistry[FakeModel] = ModelRegistry("tier", close_model=closer)
    await registry.load(loader_of(FakeModel(name)))
    return registry


async def test_nothing_is_served_before_the_first_load_and_after_close() -> None:
    registry: ModelRegistry[FakeModel] = ModelRegistry("tier")
    assert not registry.loaded
    with pytest.raises(Unavailable, match="^tier: model is still loading$"):
        registry.acquire()
    await registry.load(loader_of(FakeModel("first")))
    assert registry.loaded and registry.current.name == "first"
    await registry.close()
    with pytest.raises(Unavailable, match="^tier: shutting down$"):
        registry.info()


async def test_a_model_given_at_construction_is_served_at_once() -> None:
    registry = ModelRegistry("tier", first=FakeModel("named"))
    assert registry.info().name == "named"


async def test_a_swap_serves_the_new_model_and_reports_what_it_replaced() -> None:
    registry = await serving()
    info = await registry.swap("/models/new", loader_of(FakeModel("new")))
    assert (info.name, info.replaced, info.swaps, info.retiring_calls) == ("new", "old", 1, 0)
    shown = registry.info()
    assert (shown.name, shown.swaps, shown.replaced) == ("new", 1, "")
    assert [model.name for model in registry.models()] == ["new"]


async def test_a_call_in_flight_finishes_on_the_old_model_which_is_closed_after_it() -> None:
    closer = Closer()
    registry = await serving(closer=closer)
    with registry.use() as during:
        info = await registry.swap("new", loader_of(FakeModel("new")))
        assert info.retiring_calls == 1
        assert during.name == "old" and not during.closed
        assert registry.acquire().name == "new"  # a call started now runs on the new model
        assert [model.name for model in registry.models()] == ["new", "old"]
    await registry.released()
    assert closer.closed == ["old"] and registry.info().retiring_calls == 0
    assert [model.name for model in registry.models()] == ["new"]


async def test_an_unused_old_model_is_released_at_once_and_not_kept_alive() -> None:
    registry = await serving()  # no close_model: dropping a model frees it
    old = weakref.ref(registry.current)
    with registry.use():
        pass
    await registry.swap("new", loader_of(FakeModel("new")))
    gc.collect()
    assert old() is None, "the registry kept a reference to a model no call uses"


async def test_a_load_that_fails_leaves_the_old_model_serving() -> None:
    registry = await serving()

    async def broken() -> FakeModel:
        raise OSError("no such file: weights.bin")

    with pytest.raises(FailedPrecondition) as error:
        await registry.swap("/models/broken", broken)
    assert error.value.message == (
        "model_path: '/models/broken' failed to load (OSError: no such file: weights.bin); still serving old"
    )
    assert (registry.info().name, registry.swaps, registry.swapping) == ("old", 0, False)
    assert (await registry.swap("again", loader_of(FakeModel("good")))).name == "good"


async def test_a_check_that_refuses_the_new_model_closes_it_and_keeps_the_old() -> None:
    closer = Closer()
    registry = await serving(closer=closer)

    def same_dimension(new: FakeModel, old: FakeModel) -> None:
        if new.dimension != old.dimension:
            raise FailedPrecondition(f"{new.dimension} is not {old.dimension}")

    with pytest.raises(FailedPrecondition, match="^8 is not 4$"):
        await registry.swap("wide", loader_of(FakeModel("wide", dimension=8)), check=same_dimension)
    assert closer.closed == ["wide"] and registry.info().name == "old"


async def test_one_swap_at_a_time_and_it_survives_its_caller_leaving() -> None:
    registry = await serving()
    loading = asyncio.Event()

    async def slow() -> FakeModel:
        await loading.wait()
        return FakeModel("slow")

    first = asyncio.create_task(registry.swap("slow", slow))
    await asyncio.sleep(0)
    assert registry.swapping
    with pytest.raises(FailedPrecondition, match="^tier: a model swap is already in progress$"):
        registry.refuse_if_swapping()
    with pytest.raises(FailedPrecondition, match="already in progress"):
        await registry.swap("other", loader_of(FakeModel("other")))

    first.cancel()  # the caller leaves; the swap goes on
    await asyncio.sleep(0)
    loading.set()
    while registry.swapping:
        await asyncio.sleep(0)
    assert (registry.info().name, registry.swaps) == ("slow", 1)


async def test_close_cancels_a_swap_and_closes_every_model_held() -> None:
    closer = Closer()
    registry = await serving(closer=closer)
    model = registry.acquire()
    await registry.swap("second", loader_of(FakeModel("second")))  # "old" still runs a call
    loading = asyncio.Event()

    async def never() -> FakeModel:
        await loading.wait()
        return FakeModel("never")

    swap = asyncio.create_task(registry.swap("never", never))
    await asyncio.sleep(0)
    await registry.close()
    assert sorted(closer.closed) == ["old", "second"]
    with pytest.raises(asyncio.CancelledError):
        await swap
    registry.release(model)  # a call that ends after close is fine


async def test_a_load_that_ends_after_close_is_closed_not_served() -> None:
    closer = Closer()
    registry = await serving(closer=closer)
    late, began, loading = FakeModel("late"), asyncio.Event(), asyncio.Event()

    async def load_to_the_end() -> FakeModel:
        # Like a model thread that finishes loading after its swap was cancelled.
        began.set()
        try:
            await loading.wait()
        except asyncio.CancelledError:
            pass
        return late

    swap = asyncio.create_task(registry.swap("late", load_to_the_end))
    await began.wait()
    await registry.close()
    with pytest.raises(Unavailable, match="^tier: shutting down$"):
        await swap
    assert late.closed and registry.models() == []


def test_a_failure_reason_prefers_the_errors_own_message_and_is_bounded() -> None:
    assert failure_reason(InvalidArgument("model", "is bad")) == "model: is bad"
    assert failure_reason(ValueError("spaced  \n")) == "ValueError: spaced"
    assert len(failure_reason(RuntimeError("x" * 2000))) == 500
