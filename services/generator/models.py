"""The model a generator serves, and swapping it for another without a restart.

A swap builds a second backend beside the serving one and starts it (the local backend loads its
GGUF on its own llama.cpp thread, off the event loop, and makes one short warm-up generation;
a remote backend makes its warm-up generation on the server), then switches one reference. Each
generation takes the model it runs on when it gets its slot (`acquire`), so generations in flight
finish on the old model and report its name; the old backend is closed (its llama.cpp context
freed) once the last of them ends. Admission control is unchanged: the engine's slots bound the
generations of all models together.

Per backend:
- local: `model_path` is a GGUF file on the replica;
- openai: `model_path` is the name of another model the OpenAI-compatible server serves (vLLM
  and llama.cpp's server can serve several); it must answer a warm-up generation;
- tgi: refused (FAILED_PRECONDITION): TGI serves the one model it was started with, so the swap
  belongs to the TGI deployment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from askmesh.runtime.errors import FailedPrecondition, InvalidArgument, Unavailable
from askmesh.runtime.solo import SoloJob
from askmesh.v1 import common_pb2
from services.generator.backends import create_backend
from services.generator.backends.base import GenerationBackend
from services.generator.config import GeneratorSettings

log = logging.getLogger("askmesh.generator")


@dataclass(eq=False)
class ServingModel:
    backend: GenerationBackend
    name: str  # what GenerateDone.model reports
    path: str  # the GGUF file, or the remote server's URL
    kind: str  # local | tgi | openai
    load_seconds: float = 0.0
    loaded_at: float = 0.0  # wall clock (time.time())
    generations: int = 0  # running on it now (they keep a swapped-out model open)

    def info(self) -> common_pb2.ModelInfo:
        info = common_pb2.ModelInfo(name=self.name, path=self.path, backend=self.kind, load_seconds=self.load_seconds)
        info.loaded_at.FromNanoseconds(int(self.loaded_at * 1e9))
        return info


def _where(settings: GeneratorSettings) -> str:
    if settings.backend == "local":
        return str(settings.resolved_model_path())
    return f"{settings.url} ({settings.remote_model or 'default'})" if settings.backend == "openai" else settings.url


class ServingModels:
    def __init__(self, settings: GeneratorSettings, backend: GenerationBackend) -> None:
        self.settings = settings
        self.current = ServingModel(backend, settings.resolved_model_name(), "", settings.backend)
        self.swaps = 0
        self._retiring: list[ServingModel] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._swap: SoloJob[common_pb2.ModelInfo] = SoloJob("generator: a model swap")
        self._closed = False

    async def start(self) -> None:
        started = time.perf_counter()
        await self.current.backend.start()
        self.current.path = _where(self.settings)
        self.current.load_seconds = time.perf_counter() - started
        self.current.loaded_at = time.time()

    async def close(self) -> None:
        self._closed = True
        self._swap.cancel()
        for model in [self.current, *self._retiring]:
            await model.backend.close()
        self._retiring.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)

    # -- generations --------------------------------------------------------------------------
    def acquire(self) -> ServingModel:
        """The model a generation that got its slot runs on, to its end."""
        model = self.current
        model.generations += 1
        return model

    def release(self, model: ServingModel) -> None:
        model.generations -= 1
        if model.generations == 0 and model in self._retiring:
            self._retire(model)

    def info(self) -> common_pb2.ModelInfo:
        info = self.current.info()
        info.swaps = self.swaps
        info.retiring_calls = sum(model.generations for model in self._retiring)
        return info

    # -- swaps --------------------------------------------------------------------------------
    async def swap(self, model_path: str, name: str = "") -> common_pb2.ModelInfo:
        """Serves another model from the next generation on (the old one keeps serving until then,
        and for good if the new one fails). One swap at a time; a swap goes on to its end even if
        its caller leaves (GetModel shows the outcome)."""
        self._swap.refuse_if_running()
        settings = self._settings_for(model_path, name)
        return await self._swap.run(self._swap_to(settings, model_path), name="generator-model-swap")

    def _settings_for(self, model_path: str, name: str) -> GeneratorSettings:
        backend = self.settings.backend
        if backend == "tgi":
            raise FailedPrecondition(
                f"generator: the tgi backend serves the model the TGI server at {self.settings.url} was started with; "
                "swap it there (start TGI with the other --model-id), or point this generator at another server"
            )
        if backend == "openai":
            return self.settings.model_copy(update={"remote_model": model_path, "model_name": name})
        path = Path(model_path)
        if not path.exists():
            raise InvalidArgument("model_path", f"{model_path!r} does not exist on this replica")
        if not path.is_file():
            raise InvalidArgument("model_path", f"{model_path!r} is not a file (a GGUF model)")
        return self.settings.model_copy(update={"model_path": path, "model_name": name})

    async def _swap_to(self, settings: GeneratorSettings, model_path: str) -> common_pb2.ModelInfo:
        old = self.current
        started = time.perf_counter()
        backend = create_backend(settings)
        try:
            # Loads off the event loop (its own llama.cpp thread) and makes a warm-up generation.
            await backend.start()
        except BaseException as error:
            await backend.close()
            if not isinstance(error, Exception):
                raise
            log.warning("[MODEL] swap to %s failed, still serving %s: %r", model_path, old.name, error)
            reason = getattr(error, "message", None) or f"{type(error).__name__}: {error}"
            raise FailedPrecondition(
                f"model_path: {model_path!r} failed to load ({reason.strip()[:500]}); still serving {old.name}"
            ) from error
        if self._closed:
            await backend.close()
            raise Unavailable("generator: shutting down")
        new = ServingModel(
            backend,
            settings.resolved_model_name(),
            _where(settings),
            settings.backend,
            load_seconds=time.perf_counter() - started,
            loaded_at=time.time(),
        )
        self.current = new
        self.swaps += 1
        self._retiring.append(old)
        if old.generations == 0:
            self._retire(old)
        log.info(
            "[MODEL] generator serves %s (loaded and warmed up in %.1f s) in place of %s; %d generations finish on it",
            new.name, new.load_seconds, old.name, old.generations,
        )
        info = self.info()
        info.replaced = old.name
        return info

    def _retire(self, model: ServingModel) -> None:
        """Closes a swapped-out model's backend (its llama.cpp context is freed) in the background."""
        self._retiring.remove(model)
        task = asyncio.get_running_loop().create_task(self._close(model), name="generator-model-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, model: ServingModel) -> None:
        try:
            await model.backend.close()
            log.info("[MODEL] released %s", model.name)
        except Exception:
            log.exception("closing the swapped-out model %s failed", model.name)
