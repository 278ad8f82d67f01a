"""A GGUF model on llama.cpp (llama-cpp-python) inside the generator process.

One llama.cpp context runs one generation at a time and is not thread-safe, so every call to
it goes through a single-thread executor: generations queue there in arrival order, and the
event loop stays free to answer health checks while tokens are produced.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from askmesh.runtime.errors import InvalidArgument, Unavailable
from askmesh.v1 import common_pb2
from services.generator.backends.base import (
    warm_up,
    BackendEvent,
    FinishEvent,
    GenerationInput,
    StopSequenceMatcher,
    TokenEvent,
)
from services.generator.config import GeneratorSettings

if TYPE_CHECKING:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

log = logging.getLogger("askmesh.generator.local")

_DONE = object()


def _reused_prefix(llama: Llama, tokens: list[int]) -> int:
    """Prompt tokens llama.cpp will not compute again: the prefix this prompt shares with what
    its context holds now (the last prompt and answer), as `Llama.generate` reuses it; a prompt
    held whole recomputes its last token to get fresh logits."""
    shared = llama.longest_token_prefix(llama._input_ids.tolist(), tokens)
    return shared - 1 if shared == len(tokens) else shared


class LlamaCppBackend:
    def __init__(self, settings: GeneratorSettings) -> None:
        self.settings = settings
        self._llama: Llama | None = None
        self._formatter: Jinja2ChatFormatter | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generator-llama")
        # How the last generation went, and how many stopped because their caller left.
        self.last_completion_tokens = 0
        self.stopped_early_count = 0

    def _load(self) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        path = self.settings.resolved_model_path()
        log.info("loading %s", path)
        llama = Llama(
            model_path=str(path),
            n_ctx=self.settings.context_tokens,
            n_threads=self.settings.threads or os.cpu_count() or 1,
            verbose=False,
        )
        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{path} has no chat template in its metadata")
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(llama, llama.token_eos()),
            bos_token=self._token_text(llama, llama.token_bos()),
        )
        self._llama = llama

    @staticmethod
    def _token_text(llama: Llama, token: int) -> str:
        return llama.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)
        await warm_up(self, max_new_tokens=2)

    async def close(self) -> None:
        # Waited for off the event loop: a generation that was told to stop may still be
        # finishing its token. Then the model's memory is freed now, not whenever the garbage
        # collector gets to it (a swapped-out model must not linger beside the new one).
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        llama, self._llama = self._llama, None
        if llama is not None:
            llama.close()

    def count_tokens(self, text: str) -> int:
        # Tokenizing reads only the model's vocabulary, so it is safe beside a generation running
        # on the llama thread.
        if self._llama is None:
            raise Unavailable("generator: model is not loaded")
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def _prompt_tokens(self, request: GenerationInput) -> tuple[list[int], list[str]]:
        assert self._llama is not None and self._formatter is not None
        formatted = self._formatter(messages=request.messages)
        tokens = self._llama.tokenize(formatted.prompt.encode("utf-8"), add_bos=False, special=True)
        template_stops = formatted.stop if isinstance(formatted.stop, list) else [formatted.stop] if formatted.stop else []
        return tokens, template_stops

    def _run(self, request: GenerationInput, emit: Any, cancelled: threading.Event) -> None:
        """Runs on the llama thread; hands events to the event loop through `emit`."""
        llama = self._llama
        if llama is None:
            emit(Unavailable("generator: model is not loaded"))
            return
        try:
            tokens, template_stops = self._prompt_tokens(request)
            room = self.settings.context_tokens - len(tokens)
            if room < 1:
                emit(InvalidArgument(
                    "messages",
                    f"the prompt has {len(tokens)} tokens; the model's context holds {self.settings.context_tokens}",
                ))
                return
            max_tokens = min(request.max_new_tokens, room)
            cached = _reused_prefix(llama, tokens)
            matcher = StopSequenceMatcher(request.stop)
            completion_tokens = 0
            reason: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_LENGTH
            stream = llama.create_completion(
                prompt=tokens,
                max_tokens=max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                stop=template_stops or None,
                seed=request.seed,
                stream=True,
            )
            try:
                for chunk in stream:
                    if cancelled.is_set():
                        self.stopped_early_count += 1
                        break
                    choice = chunk["choices"][0]
                    if choice["text"]:
                        completion_tokens += 1
                        text, stopped = matcher.feed(choice["text"])
                        if text:
                            emit(TokenEvent(text))
                        if stopped:
                            reason = common_pb2.FINISH_REASON_STOP_SEQUENCE
                            break
                    if choice.get("finish_reason") == "stop":
                        reason = common_pb2.FINISH_REASON_EOS
                    elif choice.get("finish_reason") == "length":
                        reason = common_pb2.FINISH_REASON_LENGTH
            finally:
                stream.close()  # stops llama.cpp at once when we broke out early
            self.last_completion_tokens = completion_tokens
            if cancelled.is_set():
                return
            if reason != common_pb2.FINISH_REASON_STOP_SEQUENCE:
                rest = matcher.flush()
                if rest:
                    emit(TokenEvent(rest))
            emit(
                FinishEvent(
                    reason=reason,
                    completion_tokens=completion_tokens,
                    prompt_tokens=len(tokens),
                    cached_prompt_tokens=cached,
                )
            )
        except Exception as error:  # reported to the caller as a stream error
            emit(error)

    async def generate(self, request: GenerationInput) -> AsyncIterator[BackendEvent]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        def run() -> None:
            try:
                self._run(request, emit, cancelled)
            finally:
                emit(_DONE)

        worker = loop.run_in_executor(self._executor, run)
        try:
            while (item := await events.get()) is not _DONE:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            # The caller stopped reading (cancelled or done): the llama thread stops at its
            # next token. The single-thread executor keeps the next generation behind it.
            cancelled.set()
            worker.add_done_callback(lambda f: f.exception())
