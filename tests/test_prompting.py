"""Context passages fitted to a budget of prompt tokens (a word count stands in for a tokenizer)."""

from __future__ import annotations

from askmesh.v1 import generator_pb2
from services.generator.prompting import fit_passages, with_context


def words(text: str) -> int:
    return len(text.split())


def passage(number: int, text: str, title: str = "") -> generator_pb2.ContextPassage:
    return generator_pb2.ContextPassage(number=number, title=title, text=text)


def test_passages_are_taken_in_order_while_they_fit_and_one_too_long_is_skipped() -> None:
    passages = [passage(1, "a b c", "One"), passage(2, "x " * 30, "Two"), passage(3, "d e", "Three")]
    placed = fit_passages(passages, budget=13, count_tokens=words)
    assert [p.index for p in placed] == [0, 2]
    assert placed[0].text == "[1] One\na b c"


def test_when_not_even_the_best_fits_it_is_shortened_to_fit() -> None:
    placed = fit_passages([passage(1, "w " * 100, "Big")], budget=10, count_tokens=words)
    assert [p.index for p in placed] == [0]
    assert placed[0].text.startswith("[1] Big\nw w") and words(placed[0].text) <= 9


def test_no_passages_leave_the_conversation_as_it_is() -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert fit_passages([], budget=100, count_tokens=words) == []
    assert with_context(messages, []) == messages


def test_the_instructions_stay_first_and_unchanged_with_the_passages_after_them() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]
    placed = fit_passages([passage(4, "Because.", "Reason")], budget=50, count_tokens=words)
    combined = with_context(messages, placed)
    assert combined[0] == {"role": "system", "content": "Be brief.\n\nSources:\n[4] Reason\nBecause."}
    assert combined[1:] == messages[1:]
    without_system = with_context(messages[1:], placed)
    assert without_system[0]["role"] == "system" and without_system[1:] == messages[1:]
