from __future__ import annotations

from services.generator.backends.base import StopSequenceMatcher, chatml_prompt


def feed_all(matcher: StopSequenceMatcher, tokens: list[str]) -> tuple[str, bool]:
    emitted = ""
    for token in tokens:
        text, stopped = matcher.feed(token)
        emitted += text
        if stopped:
            return emitted, True
    return emitted + matcher.flush(), False


def test_a_stop_sequence_split_across_tokens_is_caught_and_not_emitted() -> None:
    assert feed_all(StopSequenceMatcher(["END"]), ["Hello E", "N", "D world"]) == ("Hello ", True)


def test_a_false_start_is_released() -> None:
    assert feed_all(StopSequenceMatcher(["END"]), ["Hello E", "NOUGH"]) == ("Hello ENOUGH", False)


def test_the_earliest_of_several_stops_wins() -> None:
    assert feed_all(StopSequenceMatcher(["b", "###"]), ["a###b"]) == ("a", True)


def test_no_stops_passes_everything() -> None:
    assert feed_all(StopSequenceMatcher([]), ["a", "b"]) == ("ab", False)


def test_chatml_prompt() -> None:
    prompt = chatml_prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])
    assert prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
