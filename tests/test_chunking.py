from __future__ import annotations

import pytest

from services.ingestor.chunking import chunk_text, split_blocks, split_sentences

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
