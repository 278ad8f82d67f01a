"""Sentence-aware splitting of document text into overlapping chunks."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Sentence:
    text: str
    starts_block: bool  # first sentence of a paragraph or a heading line

    @property
    def separator(self) -> str:
        return "\n\n" if self.starts_block else " "


def _iter_blocks(text: str) -> Iterator[str]:
    lines: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            if lines:
                yield " ".join(lines)
                lines.clear()
            if stripped:
                yield stripped
        else:
            lines.append(stripped)
    if lines:
        yield " ".join(lines)


def split_blocks(text: str) -> list[str]:
    """Paragraphs (separated by blank lines, soft line breaks joined) and Markdown headings."""
    return list(_iter_blocks(text))


def _iter_sentences(text: str) -> Iterator[Sentence]:
    # One block at a time: a chunk limit reached early leaves the rest of the text unread.
    for block in _iter_blocks(text):
        parts = [p.strip() for p in _SENTENCE_END.split(block) if p.strip()]
        yield from (Sentence(part, index == 0) for index, part in enumerate(parts))


def split_sentences(text: str) -> list[Sentence]:
    return list(_iter_sentences(text))


def _hard_split(sentence: Sentence, size: int) -> list[Sentence]:
    """A sentence longer than a chunk is cut at word boundaries (or anywhere, for one long word).
    Lengths are counted, not rebuilt per word, and a long word is cut by index, not by slicing
    off its rest again and again: linear in the sentence's length."""
    pieces: list[str] = []
    current: list[str] = []
    current_len = 0  # len(" ".join(current))
    for word in sentence.text.split():
        start = 0
        while len(word) - start > size:
            if current:
                pieces.append(" ".join(current))
                current, current_len = [], 0
            pieces.append(word[start : start + size])
            start += size
        if start:
            word = word[start:]
        candidate_len = current_len + 1 + len(word) if current else len(word)
        if candidate_len > size:
            pieces.append(" ".join(current))
            current, current_len = [word], len(word)
        else:
            current.append(word)
            current_len = candidate_len
    if current:
        pieces.append(" ".join(current))
    return [Sentence(piece, sentence.starts_block and index == 0) for index, piece in enumerate(pieces)]


def _join(sentences: Sequence[Sentence]) -> str:
    return "".join((s.separator if i else "") + s.text for i, s in enumerate(sentences))


class TooManyChunks(ValueError):
    """The text makes more chunks than the caller allows; raised as soon as one chunk too many
    is made, so a huge text costs no more than the allowed chunks' worth of work."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} chunks")
        self.limit = limit


def check_chunking(size: int, overlap: int) -> None:
    """At most half a chunk may be carried over: that keeps every chunk at least half new, so
    the chunks of a text add up to a few times its length whatever size is chosen (an overlap
    of size - 1 would repeat almost every character size times)."""
    if overlap >= size:
        raise ValueError("overlap must be smaller than size")
    if overlap > size // 2:
        raise ValueError("overlap must be at most half the size")


def _pieces(text: str, size: int) -> Iterator[Sentence]:
    for sentence in _iter_sentences(text):
        if len(sentence.text) > size:
            yield from _hard_split(sentence, size)
        else:
            yield sentence


def _iter_chunks(text: str, size: int, overlap: int) -> Iterator[str]:
    """chunk_text's chunks, one at a time. The length of the chunk being filled is kept as a
    running sum, so each sentence costs O(1) to try, and the overlap is walked back once per
    chunk; with overlap <= size / 2 the whole is linear in the text's length."""
    current: list[Sentence] = []
    current_len = 0  # len(_join(current))
    for sentence in _pieces(text, size):
        added = len(sentence.separator) + len(sentence.text)
        if current and current_len + added > size:
            yield _join(current)
            # The longest tail of whole sentences within `overlap` that still leaves room for
            # the next sentence: walked from the end, so it costs the sentences carried.
            carried: list[Sentence] = []  # reversed
            carried_len = 0  # len(_join(carried[::-1]))
            for previous in reversed(current):
                candidate_len = len(previous.text) + (len(carried[-1].separator) + carried_len if carried else 0)
                if candidate_len > overlap or candidate_len + added > size:
                    break
                carried.append(previous)
                carried_len = candidate_len
            carried.reverse()
            current, current_len = carried, carried_len
        if current:
            current_len += added
        else:
            current_len = len(sentence.text)
        current.append(sentence)
    if current:
        yield _join(current)


def chunk_text(text: str, size: int, overlap: int, max_chunks: int | None = None) -> list[str]:
    """Packs whole sentences into chunks of at most `size` characters. Each chunk starts with
    the last sentences of the previous one, up to `overlap` characters (at most half the size),
    so that a fact split across a boundary is still found whole in one chunk. Paragraph breaks
    are kept. More than `max_chunks` chunks raises TooManyChunks as soon as the one too many is
    made."""
    check_chunking(size, overlap)
    chunks: list[str] = []
    for chunk in _iter_chunks(text, size, overlap):
        chunks.append(chunk)
        if max_chunks is not None and len(chunks) > max_chunks:
            raise TooManyChunks(max_chunks)
    return chunks


class _SectionLike(Protocol):
    """What chunk_sections needs; services.ingestor.parsing.Section fits."""

    @property
    def text(self) -> str: ...
    @property
    def page(self) -> int | None: ...
    @property
    def heading(self) -> str | None: ...


@dataclass(frozen=True)
class SectionChunk:
    text: str
    page: int | None
    heading: str | None


def chunk_sections(
    sections: Sequence[_SectionLike], size: int, overlap: int, max_chunks: int | None = None
) -> list[SectionChunk]:
    """Chunks each section on its own with chunk_text: sections are never merged, so every chunk
    has exactly one page and one heading path (those of its section). More than `max_chunks`
    chunks in all raises TooManyChunks as soon as the one too many is made."""
    check_chunking(size, overlap)
    chunks: list[SectionChunk] = []
    for section in sections:
        for text in _iter_chunks(section.text, size, overlap):
            if not text.strip():
                continue
            chunks.append(SectionChunk(text, section.page, section.heading))
            if max_chunks is not None and len(chunks) > max_chunks:
                raise TooManyChunks(max_chunks)
    return chunks
