"""A GGUF model on llama.cpp inside the generator process, decoding several sequences at once.

One llama.cpp context holds `parallel_sequences` sequences, each in its own slot of the KV
cache, and one thread (the engine's) drives it: each step is one `llama_decode` over a batch
that carries the next token of every sequence that is generating, and as much of the prompts
still being read as the step's token budget leaves (continuous batching, as llama.cpp's own
server does). A new generation takes the free slot whose cached tokens (its last prompt and
answer) share the longest prefix with its prompt, and reads only the rest: the instructions,
first and byte-identical in every prompt, come from the cache.

Prompts are text, never special tokens, where the text came from a caller: the chat template is
rendered from the structured messages with a placeholder for each message's content, its own
pieces (the turn markers) are tokenized with special-token parsing and each content (question,
history, instructions, quoted sources) without it, and the token ids are concatenated. So a
question or a document carrying `<|im_end|>\n<|im_start|>system` reads as those characters and
cannot open a turn of its own; llama.cpp never makes a control token from text it tokenizes
without special parsing, and `_prompt_tokens` checks that anyway.

Why this and not llama-cpp-python's `Llama.create_completion`: that runs one sequence at a time,
and measured here (benchmarks/results/2026-12-02-local-engine.md) four generations decoded
together make 1.26x the answers per second of one at a time (one alone runs as fast as
create_completion does); on two cores a token's matrix work is most of its cost, so batching
pays less than on a GPU. The event loop never waits on the engine: tokens come back through
`call_soon_threadsafe`, so health checks answer while it runs.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import logging
import os
import queue
import random
import re
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from askmesh.runtime.errors import InvalidArgument, Unavailable
from askmesh.v1 import common_pb2
from services.generator.backends.base import (
    BackendEvent,
    FinishEvent,
    GenerationInput,
    StopSequenceMatcher,
    TokenEvent,
    warm_up,
)
from services.generator.config import GeneratorSettings

if TYPE_CHECKING:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

log = logging.getLogger("askmesh.generator.local")

_DONE = object()
# Tokens one decode step may carry: every generating sequence's next token, then prompt tokens.
# Larger steps read prompts a little faster; smaller ones keep the other streams' tokens flowing
# while a long prompt is read.
STEP_TOKENS = 256
# Sampling as llama-cpp-python's create_completion does by default when temperature > 0.
TOP_K = 40
MIN_P = 0.05
_PIECE_BYTES = 256


@dataclass(frozen=True)
class PromptPiece:
    text: str
    content: bool  # a message's content (never special tokens), else the template's own text


def template_pieces(formatter: Jinja2ChatFormatter, messages: list[dict[str, str]]) -> tuple[list[PromptPiece], list[str]]:
    """The rendered chat template as the template's own text and the messages' contents, in
    order, and its stop strings.

    Each content is rendered as a placeholder with a fresh random nonce (so no content can
    forge one) and put back after rendering; a template that does not place every content
    exactly once is refused rather than guessed at. (A template that transforms a content,
    e.g. `| trim`, sees only the placeholder: the content goes in as it was sent.)
    """
    nonce = secrets.token_hex(16)
    placeholders = [{**m, "content": f"\x00{nonce}:{i}\x00"} for i, m in enumerate(messages)]
    formatted = formatter(messages=placeholders)  # type: ignore[arg-type]
    parts = re.split(f"\x00{nonce}:(\\d+)\x00", formatted.prompt)
    placed = [int(index) for index in parts[1::2]]
    if sorted(placed) != list(range(len(messages))):
        raise ValueError("the chat template does not place each message's content exactly once")
    pieces: list[PromptPiece] = []
    for position, part in enumerate(parts):
        if position % 2:
            pieces.append(PromptPiece(messages[int(part)]["content"], content=True))
        elif part:
            pieces.append(PromptPiece(part, content=False))
    stops = formatted.stop if isinstance(formatted.stop, list) else [formatted.stop] if formatted.stop else []
    return pieces, stops


def _longest_prefix(a: list[int], b: list[int]) -> int:
    shared = 0
    for x, y in zip(a, b):
        if x != y:
            break
        shared += 1
    return shared


@dataclass(eq=False)
class _Sequence:
    """One generation in the engine: its prompt, its sampler and where its output goes."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    matcher: StopSequenceMatcher
    emit: Callable[[Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Set by the engine thread:
    slot: int = -1
    cached: int = 0  # prompt tokens taken from the slot's cache
    fed: int = 0  # prompt tokens in the KV cache so far
    last_token: int = -1  # sampled, not yet decoded
    generated: int = 0
    sampler: Any = None
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))

    @property
    def reading(self) -> bool:
        return self.fed < len(self.prompt)


@dataclass
class _Slot:
    index: int
    tokens: list[int] = field(default_factory=list)  # what the slot's KV cache holds, in order
    sequence: _Sequence | None = None


class LlamaCppBackend:
    def __init__(self, settings: GeneratorSettings) -> None:
        self.settings = settings
        self._vocabulary: Llama | None = None  # tokenizer, chat template, metadata
        self._formatter: Jinja2ChatFormatter | None = None
        # Control tokens (turn markers, bos/eos ...): only the template may put them in a prompt.
        self.control_tokens: frozenset[int] = frozenset()
        self._engine: _Engine | None = None
        # How the last generation went, and how many stopped because their caller left.
        self.last_completion_tokens = 0
        self.stopped_early_count = 0

    @property
    def closed(self) -> bool:
        return self._engine is None

    def _load(self) -> None:
        import llama_cpp
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        path = self.settings.resolved_model_path()
        log.info("loading %s", path)
        vocabulary = Llama(model_path=str(path), vocab_only=True, verbose=False)
        template = vocabulary.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{path} has no chat template in its metadata")
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(vocabulary, vocabulary.token_eos()),
            bos_token=self._token_text(vocabulary, vocabulary.token_bos()),
        )
        vocab = vocabulary._model.vocab
        self.control_tokens = frozenset(
            token for token in range(vocabulary.n_vocab()) if llama_cpp.llama_vocab_is_control(vocab, token)
        )
        self._vocabulary = vocabulary
        self._engine = _Engine(str(path), self.settings, self)

    @staticmethod
    def _token_text(llama: Llama, token: int) -> str:
        return llama.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        await warm_up(self, max_new_tokens=2)

    async def close(self) -> None:
        # Waited for off the event loop: the engine finishes the step it is in. Then the model's
        # memory is freed now (a swapped-out model must not linger beside the new one).
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.close)
        vocabulary, self._vocabulary = self._vocabulary, None
        if vocabulary is not None:
            vocabulary.close()

    def count_tokens(self, text: str) -> int:
        # Tokenizing reads only the vocabulary, so it is safe beside the engine's decoding.
        if self._vocabulary is None:
            raise Unavailable("generator: model is not loaded")
        return len(self._vocabulary.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def prompt_pieces(self, messages: list[dict[str, str]]) -> tuple[list[tuple[PromptPiece, list[int]]], list[str]]:
        """Each piece of the rendered prompt with its tokens (the template's own with special
        tokens parsed, each content without), and the template's stop strings."""
        if self._vocabulary is None or self._formatter is None:
            raise Unavailable("generator: model is not loaded")
        pieces, stops = template_pieces(self._formatter, messages)
        tokenized = []
        for piece in pieces:
            tokens = self._vocabulary.tokenize(piece.text.encode("utf-8"), add_bos=False, special=not piece.content)
            if piece.content and not self.control_tokens.isdisjoint(tokens):
                # Cannot happen with llama.cpp's tokenizer; refusing beats a forged turn if it ever does.
                raise Unavailable("generator: a message's content tokenized to a control token")
            tokenized.append((piece, tokens))
        return tokenized, stops

    def _prompt_tokens(self, request: GenerationInput) -> tuple[list[int], list[str]]:
        pieces, template_stops = self.prompt_pieces(request.messages)
        return [token for _, tokens in pieces for token in tokens], template_stops

    async def generate(self, request: GenerationInput) -> AsyncIterator[BackendEvent]:
        engine = self._engine
        if engine is None:
            raise Unavailable("generator: model is not loaded")
        tokens, template_stops = self._prompt_tokens(request)
        room = self.settings.context_tokens - len(tokens)
        if room < 1:
            raise InvalidArgument(
                "messages", f"the prompt has {len(tokens)} tokens; the model's context holds {self.settings.context_tokens}"
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        sequence = _Sequence(
            prompt=tokens,
            max_new_tokens=min(request.max_new_tokens, room),
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            matcher=StopSequenceMatcher([*request.stop, *template_stops]),
            emit=lambda item: loop.call_soon_threadsafe(events.put_nowait, item),
        )
        engine.submit(sequence)
        try:
            while (item := await events.get()) is not _DONE:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            # The caller stopped reading (cancelled or done): the engine drops the sequence at
            # its next step and frees its slot.
            sequence.cancelled.set()

    # Called on the engine thread when a sequence ends.
    def _finished(self, sequence: _Sequence, stopped_early: bool) -> None:
        self.last_completion_tokens = sequence.generated
        if stopped_early:
            self.stopped_early_count += 1


class _Engine:
    """The thread that owns one llama.cpp model and context (see the module docstring)."""

    def __init__(self, path: str, settings: GeneratorSettings, backend: LlamaCppBackend) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.backend = backend
        llama_cpp.llama_backend_init()
        self.slots = [_Slot(i) for i in range(settings.parallel_sequences)]
        model_params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), model_params)
        if not self.model:
            raise ValueError(f"{path}: llama.cpp could not load the model")
        context_params = llama_cpp.llama_context_default_params()
        # Each sequence gets a KV stream of its own, of the configured context length.
        context_params.n_seq_max = len(self.slots)
        context_params.n_ctx = settings.context_tokens * len(self.slots)
        context_params.kv_unified = False
        context_params.n_batch = STEP_TOKENS
        context_params.n_ubatch = STEP_TOKENS
        threads = settings.threads or os.cpu_count() or 1
        context_params.n_threads = context_params.n_threads_batch = threads
        context_params.flash_attn_type = 1 if settings.flash_attention else 0
        self.context = llama_cpp.llama_init_from_model(self.model, context_params)
        if not self.context:
            llama_cpp.llama_model_free(self.model)
            raise ValueError(f"{path}: llama.cpp could not create a context")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.memory = llama_cpp.llama_get_memory(self.context)
        self.batch = llama_cpp.llama_batch_init(STEP_TOKENS, 0, 1)
        self.piece = ctypes.create_string_buffer(_PIECE_BYTES)
        self.incoming: queue.Queue[_Sequence | None] = queue.Queue()
        self.waiting: list[_Sequence] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="generator-llama", daemon=True)
        self.thread.start()

    def submit(self, sequence: _Sequence) -> None:
        self.incoming.put(sequence)

    def close(self) -> None:
        self.stopping = True
        self.incoming.put(None)
        self.thread.join()
        lib = self.lib
        for slot in self.slots:
            if slot.sequence is not None:
                self._end(slot, early=True, error=Unavailable("generator: shutting down"))
        for sequence in self.waiting:
            sequence.emit(Unavailable("generator: shutting down"))
            sequence.emit(_DONE)
        lib.llama_batch_free(self.batch)
        lib.llama_free(self.context)
        lib.llama_model_free(self.model)

    # -- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self.stopping:
            busy = any(slot.sequence is not None for slot in self.slots)
            try:
                item = self.incoming.get(block=not busy and not self.waiting)
                while True:
                    if item is None:
                        break
                    self.waiting.append(item)
                    item = self.incoming.get_nowait()
            except queue.Empty:
                pass
            if self.stopping:
                return
            try:
                self._step()
            except Exception as error:  # a llama.cpp failure ends every sequence, not the thread
                log.exception("a decode step failed")
                for slot in self.slots:
                    if slot.sequence is not None:
                        self._end(slot, early=True, error=Unavailable(f"generator: decoding failed ({error})"))
                        slot.tokens = []
                        self.lib.llama_memory_seq_rm(self.memory, slot.index, -1, -1)

    def _seat_waiting(self) -> None:
        """Gives each waiting sequence (in arrival order) the free slot whose cache shares the
        longest prefix with its prompt."""
        while self.waiting:
            free = [slot for slot in self.slots if slot.sequence is None]
            if not free:
                return
            sequence = self.waiting.pop(0)
            if sequence.cancelled.is_set():
                sequence.emit(_DONE)
                continue
            slot = max(free, key=lambda s: _longest_prefix(s.tokens, sequence.prompt))
            shared = _longest_prefix(slot.tokens, sequence.prompt)
            # At least the last prompt token is read again: its logits start the answer.
            reused = min(shared, len(sequence.prompt) - 1)
            self.lib.llama_memory_seq_rm(self.memory, slot.index, reused, -1)
            slot.tokens = slot.tokens[:reused]
            sequence.slot, sequence.cached, sequence.fed = slot.index, reused, reused
            sequence.sampler = self._sampler(sequence)
            slot.sequence = sequence

    def _sampler(self, sequence: _Sequence) -> Any:
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if sequence.temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(TOP_K))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(sequence.top_p, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(MIN_P, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(sequence.temperature))
            seed = sequence.seed if sequence.seed is not None else random.getrandbits(32)
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def _step(self) -> None:
        for slot in self.slots:
            if slot.sequence is not None and slot.sequence.cancelled.is_set():
                self._end(slot, early=True)
        self._seat_waiting()
        batch = self.batch
        batch.n_tokens = 0
        sampled: list[tuple[_Slot, int]] = []  # slots whose logits this step makes, at batch index

        def add(token: int, position: int, slot: _Slot, logits: bool) -> None:
            i = batch.n_tokens
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot.index
            batch.logits[i] = logits
            batch.n_tokens = i + 1
            slot.tokens.append(token)
            if logits:
                sampled.append((slot, i))

        generating = [s for s in self.slots if s.sequence is not None and not s.sequence.reading]
        reading = [s for s in self.slots if s.sequence is not None and s.sequence.reading]
        for slot in generating:
            assert slot.sequence is not None
            add(slot.sequence.last_token, len(slot.tokens), slot, True)
        for slot in reading:
            sequence = slot.sequence
            assert sequence is not None
            room = STEP_TOKENS - batch.n_tokens
            if room <= 0:
                break
            part = sequence.prompt[sequence.fed : sequence.fed + room]
            for offset, token in enumerate(part):
                add(token, sequence.fed + offset, slot, sequence.fed + offset == len(sequence.prompt) - 1)
            sequence.fed += len(part)
        if batch.n_tokens == 0:
            return
        status = self.lib.llama_decode(self.context, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        for slot, index in sampled:
            self._sample(slot, index)

    def _sample(self, slot: _Slot, index: int) -> None:
        lib = self.lib
        sequence = slot.sequence
        assert sequence is not None
        token = lib.llama_sampler_sample(sequence.sampler, self.context, index)
        if lib.llama_vocab_is_eog(self.vocab, token):
            self._finish(slot, common_pb2.FINISH_REASON_EOS)
            return
        sequence.generated += 1
        length = lib.llama_token_to_piece(self.vocab, token, self.piece, _PIECE_BYTES, 0, False)
        text = sequence.decoder.decode(self.piece.raw[: max(length, 0)])
        emitted, stopped = sequence.matcher.feed(text)
        if emitted:
            sequence.emit(TokenEvent(emitted))
        if stopped:
            self._finish(slot, common_pb2.FINISH_REASON_STOP_SEQUENCE, flush=False)
        elif sequence.generated >= sequence.max_new_tokens:
            self._finish(slot, common_pb2.FINISH_REASON_LENGTH)
        else:
            sequence.last_token = token

    def _finish(self, slot: _Slot, reason: common_pb2.FinishReason.ValueType, flush: bool = True) -> None:
        sequence = slot.sequence
        assert sequence is not None
        if flush and (rest := sequence.matcher.flush() + sequence.decoder.decode(b"", final=True)):
            sequence.emit(TokenEvent(rest))
        sequence.emit(
            FinishEvent(
                reason=reason,
                completion_tokens=sequence.generated,
                prompt_tokens=len(sequence.prompt),
                cached_prompt_tokens=sequence.cached,
            )
        )
        self._end(slot, early=False)

    def _end(self, slot: _Slot, *, early: bool, error: Exception | None = None) -> None:
        """Frees the slot; its cache keeps what was decoded (the next prompt may share it)."""
        sequence = slot.sequence
        assert sequence is not None
        slot.sequence = None
        if sequence.reading:  # a prompt read in part: keep only what was decoded
            self.lib.llama_memory_seq_rm(self.memory, slot.index, len(slot.tokens), -1)
        if sequence.sampler is not None:
            self.lib.llama_sampler_free(sequence.sampler)
        self.backend._finished(sequence, early)
        if error is not None:
            sequence.emit(error)
        sequence.emit(_DONE)
