from __future__ import annotations

import random
import time

import pytest

from services.ingestor.chunking import (
    Sentence,
    TooManyChunks,
    _hard_split,
    _join,
    chunk_sections,
    chunk_text,
    split_blocks,
    split_sentences,
)
from services.ingestor.parsing import Section

TEXT = (
    "# Title\n\nFirst sentence here. Second sentence follows! Third one?\n"
    "A soft-wrapped line continues the paragraph.\n\n## Section\n\nAnother paragraph with words."
)


def test_blocks_keep_headings_apart_and_join_soft_wraps() -> None:
    assert split_blocks(TEXT) == [
        "# Title",
        "First sentence here. Second sentence follows! Third one? A soft-wrapped line continues the paragraph.",
        "## Section",
        "Another paragraph with words.",
    ]


def test_sentences_know_where_paragraphs_start() -> None:
    sentences = split_sentences(TEXT)
    assert [s.text for s in sentences][:4] == ["# Title", "First sentence here.", "Second sentence follows!", "Third one?"]
    assert [s.starts_block for s in sentences][:4] == [True, True, False, False]


def test_chunks_respect_size_and_never_split_a_short_sentence() -> None:
    text = " ".join(f"Sentence number {i} says something." for i in range(60))
    chunks = chunk_text(text, size=200, overlap=50)
    assert len(chunks) > 5
    assert all(len(c) <= 200 for c in chunks)
    for chunk in chunks:
        assert chunk.startswith("Sentence number") and chunk.endswith("something.")


def test_consecutive_chunks_overlap() -> None:
    text = " ".join(f"Fact {i} is true." for i in range(40))
    chunks = chunk_text(text, size=120, overlap=40)
    for previous, following in zip(chunks, chunks[1:]):
        shared = max(n for n in range(len(following) + 1) if previous.endswith(following[:n]))
        assert 0 < shared <= 40, (previous, following)
        assert following[:shared].startswith("Fact")  # whole sentences are carried over


def test_a_sentence_longer_than_a_chunk_is_cut_at_words() -> None:
    text = "word " * 100 + "x" * 250
    chunks = chunk_text(text, size=100, overlap=0)
    assert all(len(c) <= 100 for c in chunks)
    assert "".join(chunks).replace(" ", "") == text.replace(" ", "")


def test_paragraph_breaks_survive_in_chunks() -> None:
    chunks = chunk_text(TEXT, size=1000, overlap=0)
    assert chunks == [
        "# Title\n\nFirst sentence here. Second sentence follows! Third one? "
        "A soft-wrapped line continues the paragraph.\n\n## Section\n\nAnother paragraph with words."
    ]


def test_overlap_must_be_smaller_than_size() -> None:
    with pytest.raises(ValueError):
        chunk_text("text", size=100, overlap=100)


# -- bounds: the chunking bomb ------------------------------------------------------------------


def straightforward_chunks(text: str, size: int, overlap: int) -> list[str]:
    """The splitter as first written, re-joining the chunk for every sentence tried: quadratic,
    but plainly right; the linear one must cut every text the same."""
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


def test_the_linear_splitter_cuts_like_the_straightforward_one() -> None:
    rng = random.Random(7)
    words = ["a", "bb", "fact.", "end!", "why?", "x" * 30, "y" * 130, "z" * 300, "#", "\n", "\n\n", "\t", "Done.", "# Head\n"]
    for _ in range(400):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 200)))
        size = rng.choice([50, 60, 100, 200, 600])
        overlap = rng.randint(0, size // 2)
        assert chunk_text(text, size, overlap) == straightforward_chunks(text, size, overlap), (text, size, overlap)


def test_a_long_word_is_cut_into_whole_chunks() -> None:
    assert _hard_split(Sentence("ab " + "x" * 250 + " cd", True), 100) == [
        Sentence("ab", True), Sentence("x" * 100, False), Sentence("x" * 100, False), Sentence("x" * 50 + " cd", False),
    ]  # fmt: skip


def best_of_three(text: str, size: int, overlap: int) -> float:
    times = []
    for _ in range(3):
        started = time.perf_counter()
        chunk_text(text, size, overlap)
        times.append(time.perf_counter() - started)
    return min(times)


def sentences_of(chars: int) -> str:
    text = " ".join(f"Fact {i} is {'very ' * (i % 7)}true." for i in range(chars // 10))
    return text[:chars]


def test_chunking_is_linear_in_the_text_at_the_most_overlap_allowed() -> None:
    # Scaling, not a wall-clock bound (the machine is shared): 4x the text takes about 4x
    # the time, never the 16x of a quadratic splitter.
    large, small = sentences_of(2_000_000), sentences_of(500_000)
    assert best_of_three(large, 8000, 4000) < 6 * best_of_three(small, 8000, 4000)
    # And the chunk size does not multiply the work (re-joining a chunk per sentence did: an
    # 8000-character chunk of short sentences cost thousands of times more per sentence).
    assert best_of_three(large, 8000, 4000) < 3 * best_of_three(large, 200, 100)


def test_chunks_of_the_most_overlap_add_up_to_a_few_times_the_text() -> None:
    text = sentences_of(200_000)
    assert sum(map(len, chunk_text(text, 8000, 4000))) < 3 * len(text)


def test_an_overlap_over_half_the_size_is_refused() -> None:
    with pytest.raises(ValueError, match="at most half"):
        chunk_text("Some text.", 8000, 7999)
    with pytest.raises(ValueError, match="at most half"):
        chunk_sections([], 100, 51)
    assert chunk_text("Some text.", 100, 50) == ["Some text."]


def test_the_chunk_limit_stops_chunking_as_soon_as_it_is_exceeded() -> None:
    text = " ".join(f"Sentence {i} fills a chunk of its own." for i in range(100))
    assert len(chunk_text(text, 50, 0, max_chunks=100)) == 100
    with pytest.raises(TooManyChunks) as raised:
        chunk_text(text, 50, 0, max_chunks=99)
    assert raised.value.limit == 99 and str(raised.value) == "more than 99 chunks"
    # Across sections: the limit counts the chunks of all of them.
    sections = [Section(text), Section(text)]
    assert len(chunk_sections(sections, 50, 0, max_chunks=200)) == 200
    with pytest.raises(TooManyChunks):
        chunk_sections(sections, 50, 0, max_chunks=199)


def test_the_chunk_limit_makes_a_huge_text_cheap_to_refuse() -> None:
    text = "\n\n".join(sentences_of(2_000) for _ in range(1_000))
    started = time.perf_counter()
    with pytest.raises(TooManyChunks):
        chunk_text(text, 50, 0, max_chunks=10)
    refused = time.perf_counter() - started
    # Text is read a paragraph at a time and no chunk past the 11th is made.
    assert refused < best_of_three(text, 50, 0) / 10
