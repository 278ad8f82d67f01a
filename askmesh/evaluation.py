"""Retrieval quality of a knowledge base on labelled questions, mode by mode (`askmesh eval`).

The questions are JSON lines, one object each: `question`, the `document` (its id in the knowledge
base) that answers it, and optionally a `phrase`, a short verbatim span of that document that
states the answer. Each question is searched in each mode, and its citations scored:

- hit@k: the expected document is among the documents of the top k citations (k = 1, 3, 5);
- MRR: the mean over questions of 1 / the rank of the first citation from the expected document
  (0 when none is among those retrieved);
- phrase-hit@k: the phrase is inside one of the top k citations' texts, compared lowercased with
  whitespace collapsed (over the questions that have a phrase; k = 1, 3, 5). With a short
  context budget the first citation or two are what the answer is written from.

Nothing here talks to a server: `evaluate` takes the search as a function, so the CLI passes the
gateway's Search RPC, and tests and benchmarks may pass anything that searches.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from askmesh.runtime.validation import SEARCH_MODE_BY_NAME as MODES
HIT_AT = (1, 3, 5)
_WHITESPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lowercased, every run of whitespace one space: how phrases are matched."""
    return _WHITESPACE.sub(" ", text).strip().lower()


class QuestionsError(ValueError):
    """The questions file cannot be used; the message is one sentence naming the file and line."""


@dataclass(frozen=True)
class LabelledQuestion:
    question: str
    document: str
    phrase: str | None = None
    line: int = 0


def parse_questions(text: str, source: str) -> list[LabelledQuestion]:
    """The questions of a JSON-lines text (blank lines skipped); QuestionsError names the line."""
    questions = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            row = json.loads(line)
        except ValueError as error:
            message = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
            raise QuestionsError(f"{where} is not valid JSON ({message})") from None
        if not isinstance(row, dict):
            raise QuestionsError(f"{where} is not a JSON object with question and document")
        for key in ("question", "document"):
            value = row.get(key)
            if not isinstance(value, str) or not value.strip():
                problem = "has no" if value is None else "has an empty or non-text"
                raise QuestionsError(f'{where} {problem} "{key}" (each line needs question and document, and may have phrase)')
        phrase = row.get("phrase")
        if phrase is not None and (not isinstance(phrase, str) or not phrase.strip()):
            raise QuestionsError(f'{where} has an empty or non-text "phrase"')
        questions.append(LabelledQuestion(row["question"], row["document"], phrase, number))
    if not questions:
        raise QuestionsError(f"{source} holds no questions")
    return questions


def load_questions(path: Path) -> list[LabelledQuestion]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QuestionsError(f"{path} does not exist") from None
    except UnicodeDecodeError:
        raise QuestionsError(f"{path} is not UTF-8 text") from None
    except OSError as error:
        raise QuestionsError(f"cannot read {path}: {error.strerror or error}") from None
    return parse_questions(text, str(path))


@dataclass(frozen=True)
class Found:
    """One search's answer: its citations as (document id, text), best first, and the mode that ran."""

    citations: list[tuple[str, str]]
    mode: int
    notice: str = ""


class ModeUnavailable(Exception):
    """The knowledge base cannot be searched in this mode (FAILED_PRECONDITION): the mode is
    reported with the reason and the others still measured."""


# (question, mode, top_k) -> what the search found.
Search = Callable[[str, int, int], Found]


@dataclass(frozen=True)
class Outcome:
    """Where one question's answer was found: the rank (from 1) of the first citation of the
    expected document and of the first holding the phrase; None when not found (or no phrase)."""

    document_rank: int | None
    phrase_rank: int | None
    has_phrase: bool


def outcome(question: LabelledQuestion, citations: Sequence[tuple[str, str]]) -> Outcome:
    document_rank = next((rank for rank, (document, _) in enumerate(citations, start=1) if document == question.document), None)
    phrase_rank = None
    if question.phrase is not None:
        phrase = normalize(question.phrase)
        phrase_rank = next((rank for rank, (_, text) in enumerate(citations, start=1) if phrase in normalize(text)), None)
    return Outcome(document_rank, phrase_rank, question.phrase is not None)


@dataclass
class ModeScores:
    mode: str
    questions: int = 0
    hit_at: dict[int, float] = field(default_factory=dict)
    mrr: float = 0.0
    phrase_hit_at: dict[int, float] = field(default_factory=dict)  # empty: no question has a phrase
    phrase_questions: int = 0
    # Searches that ran in another mode (a knowledge base made before keyword search answers
    # hybrid densely) and what the server said of it.
    ran_as_other_mode: int = 0
    notice: str = ""
    unavailable: str = ""  # why the mode could not be measured at all

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "questions": self.questions,
            **{f"hit@{k}": round(v, 4) for k, v in self.hit_at.items()},
            "mrr": round(self.mrr, 4),
            **{f"phrase_hit@{k}": round(v, 4) for k, v in self.phrase_hit_at.items()},
            "phrase_questions": self.phrase_questions,
            "ran_as_other_mode": self.ran_as_other_mode,
            "notice": self.notice,
            "unavailable": self.unavailable,
        }


def summarize(mode: str, outcomes: Sequence[Outcome], top_k: int) -> ModeScores:
    count = len(outcomes)
    scores = ModeScores(mode, questions=count)
    for k in hit_ks(top_k):
        scores.hit_at[k] = sum(o.document_rank is not None and o.document_rank <= k for o in outcomes) / count
    scores.mrr = sum(1 / o.document_rank for o in outcomes if o.document_rank is not None) / count
    with_phrase = [o for o in outcomes if o.has_phrase]
    scores.phrase_questions = len(with_phrase)
    for k in hit_ks(top_k) if with_phrase else ():
        scores.phrase_hit_at[k] = sum(o.phrase_rank is not None and o.phrase_rank <= k for o in with_phrase) / len(with_phrase)
    return scores


def hit_ks(top_k: int) -> list[int]:
    """1, 3 and 5 where the search retrieves that many, and top_k itself."""
    return sorted({k for k in HIT_AT if k <= top_k} | {top_k})


def evaluate(
    questions: Sequence[LabelledQuestion],
    search: Search,
    modes: Sequence[str] = tuple(MODES),
    top_k: int = 5,
    progress: Callable[[str, int], None] | None = None,
) -> list[ModeScores]:
    """Every question searched in every mode (its top_k citations), scored per mode."""
    results = []
    for mode in modes:
        wanted = MODES[mode]
        outcomes: list[Outcome] = []
        other_mode, notice = 0, ""
        try:
            for question in questions:
                found = search(question.question, wanted, top_k)
                if found.mode != wanted:
                    other_mode += 1
                    notice = notice or found.notice
                outcomes.append(outcome(question, found.citations[:top_k]))
                if progress is not None:
                    progress(mode, len(outcomes))
        except ModeUnavailable as reason:
            results.append(ModeScores(mode, unavailable=str(reason)))
            continue
        scores = summarize(mode, outcomes, top_k)
        scores.ran_as_other_mode, scores.notice = other_mode, notice
        results.append(scores)
    return results


def report(knowledge_base: str, top_k: int, questions: Sequence[LabelledQuestion], scores: Sequence[ModeScores]) -> dict[str, Any]:
    """What `askmesh eval --json` prints."""
    return {
        "knowledge_base": knowledge_base,
        "top_k": top_k,
        "questions": len(questions),
        "modes": [s.as_dict() for s in scores],
    }


def table(knowledge_base: str, top_k: int, questions: Sequence[LabelledQuestion], scores: Sequence[ModeScores]) -> Table:
    """The modes side by side, a metric per row, the best of each row in bold."""
    measured = [s for s in scores if not s.unavailable]
    grid = Table(title=Text(f"Retrieval on {len(questions)} questions in {knowledge_base!r} (top {top_k})"))
    grid.add_column("metric")
    for s in scores:
        grid.add_column(s.mode, justify="right")
    rows: list[tuple[str, Callable[[ModeScores], float | None]]] = [
        (f"hit@{k}", lambda s, k=k: s.hit_at.get(k)) for k in hit_ks(top_k)
    ]
    rows.append(("MRR", lambda s: s.mrr))
    if any(s.phrase_questions for s in measured):
        rows += [(f"phrase-hit@{k}", lambda s, k=k: s.phrase_hit_at.get(k)) for k in hit_ks(top_k)]
    for label, value in rows:
        best = max((v for s in measured if (v := value(s)) is not None), default=None)
        cells = []
        for s in scores:
            v = None if s.unavailable else value(s)
            if v is None:
                cells.append(Text("-"))
            else:
                shown = f"{v:.3f}" if label == "MRR" else f"{v:.1%}"
                cells.append(Text(shown, style="bold" if v == best and len(measured) > 1 else ""))
        grid.add_row(label, *cells)
    return grid


def notes(scores: Sequence[ModeScores]) -> list[str]:
    """Sentences about modes that could not run as asked."""
    lines = []
    for s in scores:
        if s.unavailable:
            lines.append(f"{s.mode}: not measured: {s.unavailable}")
        elif s.ran_as_other_mode:
            lines.append(f"{s.mode}: {s.ran_as_other_mode} of {s.questions} searches ran in another mode: {s.notice}")
    return lines
