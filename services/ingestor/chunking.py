"""Sentence-aware splitting of document text into overlapping chunks."""

from __future__ import annotations

import re
from collections.abc import Sequence
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


def split_blocks(text: str) -> list[str]:
    """Paragraphs (separated by blank lines, soft line breaks joined) and Markdown headings."""
    blocks: list[str] = []
    lines: list[str] = []

    def flush() -> None:
        if lines:
            blocks.append(" ".join(lines))
            lines.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            flush()
        elif stripped.startswith("#"):
            flush()
            blocks.append(stripped)
        else:
            lines.append(stripped)
    flush()
    return blocks


def split_sentences(text: str) -> list[Sentence]:
    sentences: list[Sentence] = []
    for block in split_blocks(text):
        parts = [p.strip() for p in _SENTENCE_END.split(block) if p.strip()]
        sentences.extend(Sentence(part, index == 0) for index, part in enumerate(parts))
    return sentences


def _hard_split(sentence: Sentence, size: int) -> list[Sentence]:
    """A sentence longer than a chunk is cut at word boundaries (or anywhere, for one long word)."""
    pieces: list[str] = []
    current = ""
    for word in sentence.text.split():
        while len(word) > size:
            if current:
                pieces.append(current)
                current = ""
            pieces.append(word[:size])
            word = word[size:]
        candidate = f"{current} {word}" if current else word
        if len(candidate) > size:
            pieces.append(current)
            current = word
        else:
            current = candidate
    if current:
        pieces.append(current)
    return [Sentence(piece, sentence.starts_block and index == 0) for index, piece in enumerate(pieces)]


def _join(sentences: list[Sentence]) -> str:
    return "".join((s.separator if i else "") + s.text for i, s in enumerate(sentences))


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    """Packs whole sentences into chunks of at most `size` characters. Each chunk starts with
    the last sentences of the previous one, up to `overlap` characters, so that a fact split
    across a boundary is still found whole in one chunk. Paragraph breaks are kept."""
    if overlap >= size:
        raise ValueError("overlap must be smaller than size")
    sentences: list[Sentence] = []
    for sentence in split_sentences(text):
        sentences.extend(_hard_split(sentence, size) if len(sentence.text) > size else [sentence])

    chunks: list[str] = []
    current: list[Sentence] = []
    for sentence in sentences:
        if current and len(_join([*current, sentence])) > size:
            chunks.append(_join(current))
            carried: list[Sentence] = []
            for previous in reversed(current):
                candidate = [previous, *carried]
                if len(_join(candidate)) > overlap or len(_join([*candidate, sentence])) > size:
                    break
                carried = candidate
            current = carried
        current.append(sentence)
    if current:
        chunks.append(_join(current))
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


def chunk_sections(sections: Sequence[_SectionLike], size: int, overlap: int) -> list[SectionChunk]:
    """Chunks each section on its own with chunk_text: sections are never merged, so every chunk
    has exactly one page and one heading path (those of its section)."""
    if overlap >= size:
        raise ValueError("overlap must be smaller than size")
    return [
        SectionChunk(text, section.page, section.heading)
        for section in sections
        for text in chunk_text(section.text, size, overlap)
        if text.strip()
    ]
