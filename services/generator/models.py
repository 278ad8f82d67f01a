"""The model a generator serves, and what swapping it for another takes on this tier.

askmesh.runtime.models' registry does the swap; this file gives it the loading. A swap builds a
second backend beside the serving one and starts it (the local backend loads its GGUF on its own
llama.cpp thread, off the event loop, and makes one short warm-up generation; a remote backend
makes its warm-up generation on the server). Each generation takes the model it runs on when it
gets its slot, so generations in flight finish on the old model and report its name; the old
backend is closed (its llama.cpp context freed) once the last of them ends. Admission control is
unchanged: the engine's slots bound the generations of all models together.

Per backend:
- local: `model_path` is a GGUF file on the replica;
- openai: `model_path` is the name of another model the OpenAI-compatible server serves (vLLM
  and llama.cpp's server can serve several); it must answer a warm-up generation;
- tgi: refused (FAILED_PRECONDITION): TGI serves the one model it was started with, so the swap
  belongs to the TGI deployment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from askmesh.runtime.errors import FailedPrecondition, InvalidArgument, shown
from askmesh.runtime.models import allowed_model_path
from askmesh.v1 import common_pb2
from services.generator.backends import create_backend
from services.generator.backends.base import GenerationBackend
from services.generator.config import GeneratorSettings


@dataclass(eq=False)
class ServingModel:
    backend: GenerationBackend
    name: str  # what GenerateDone.model reports
    path: str  # the GGUF file, or the remote server's URL
    kind: str  # local | tgi | openai
    load_seconds: float = 0.0
    loaded_at: float = 0.0  # wall clock (time.time())

    def info(self) -> common_pb2.ModelInfo:
        info = common_pb2.ModelInfo(name=self.name, path=self.path, backend=self.kind, load_seconds=self.load_seconds)
        info.loaded_at.FromNanoseconds(int(self.loaded_at * 1e9))
        return info


def _where(settings: GeneratorSettings) -> str:
    if settings.backend == "local":
        return str(settings.resolved_model_path())
    return f"{settings.url} ({settings.remote_model or 'default'})" if settings.backend == "openai" else settings.url


def first_model(settings: GeneratorSettings, backend: GenerationBackend) -> ServingModel:
    """The configured model, named before it loads (`start_model` loads it)."""
    return ServingModel(backend, settings.resolved_model_name(), "", settings.backend)


async def start_model(model: ServingModel, settings: GeneratorSettings) -> ServingModel:
    """Loads and warms up the configured model (the backend does both in `start`)."""
    started = time.perf_counter()
    await model.backend.start()
    model.path = _where(settings)
    model.load_seconds = time.perf_counter() - started
    model.loaded_at = time.time()
    return model


async def close_model(model: ServingModel) -> None:
    """Frees a model no generation runs on (a local backend's llama.cpp context)."""
    await model.backend.close()


def settings_for_swap(settings: GeneratorSettings, model_path: str, name: str) -> GeneratorSettings:
    """The settings of the generator as it would serve `model_path`, or why it cannot."""
    backend = settings.backend
    if backend == "tgi":
        raise FailedPrecondition(
            f"generator: the tgi backend serves the model the TGI server at {settings.url} was started with; "
            "swap it there (start TGI with the other --model-id), or point this generator at another server"
        )
    if backend == "openai":
        return settings.model_copy(update={"remote_model": model_path, "model_name": name})
    path = allowed_model_path(model_path, settings.model_directories())
    if not path.exists():
        raise InvalidArgument("model_path", f"{shown(model_path)} does not exist on this replica")
    if not path.is_file():
        raise InvalidArgument("model_path", f"{shown(model_path)} is not a file (a GGUF model)")
    return settings.model_copy(update={"model_path": path, "model_name": name})


async def load_model(settings: GeneratorSettings) -> ServingModel:
    """A second backend, built, loaded and warmed up (a local one loads on its own llama.cpp
    thread, off the event loop). Raises what its start raises, after closing it."""
    started = time.perf_counter()
    backend = create_backend(settings)
    try:
        await backend.start()
    except BaseException:
        await backend.close()
        raise
    return ServingModel(
        backend,
        settings.resolved_model_name(),
        _where(settings),
        settings.backend,
        load_seconds=time.perf_counter() - started,
        loaded_at=time.time(),
    )
