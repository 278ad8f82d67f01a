"""`askmesh eval`: the scoring (askmesh/evaluation.py) on rankings worked out by hand, the
questions file's errors (one sentence naming the line), and the command itself, run as a
subprocess against real servers behind Envoy on a small knowledge base."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from askmesh import cli, evaluation
from askmesh.evaluation import Found, LabelledQuestion, ModeUnavailable, QuestionsError
from askmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, knowledge_pb2, knowledge_pb2_grpc
from tests.conftest import InProcessTiers, start_gateway

DENSE, KEYWORD, HYBRID = common_pb2.SEARCH_MODE_DENSE, common_pb2.SEARCH_MODE_KEYWORD, common_pb2.SEARCH_MODE_HYBRID

# -- scoring --------------------------------------------------------------------------------------

QUESTIONS = [
    LabelledQuestion("q1", "a", "the answer"),
    LabelledQuestion("q2", "b", "Second   ANSWER"),
    LabelledQuestion("q3", "c", None),
    LabelledQuestion("q4", "d", "never found"),
]
# Per mode: each question's citations (document, text), best first.
RANKINGS = {
    DENSE: {
        "q1": [("a", "x the answer y"), ("b", "")],  # document 1st, phrase 1st
        "q2": [("a", ""), ("x", ""), ("b", "the second\nanswer")],  # document 3rd, phrase 3rd (normalized)
        "q3": [("x", ""), ("y", ""), ("z", ""), ("w", ""), ("c", "")],  # document 5th
        "q4": [("x", ""), ("y", "")],  # nowhere
    },
    KEYWORD: {
        "q1": [("b", ""), ("a", "")],  # document 2nd, phrase nowhere
        "q2": [("b", "second answer")],
        "q3": [("c", "")],
        "q4": [("x", ""), ("d", "")],
    },
}


def scripted(question: str, mode: int, top_k: int) -> Found:
    if mode == HYBRID:
        raise ModeUnavailable("knowledge base 'kb' was built before keyword search")
    return Found(RANKINGS[mode][question][:top_k], mode)


def test_hits_mrr_and_phrase_hits_are_counted_per_mode() -> None:
    dense, keyword, hybrid = evaluation.evaluate(QUESTIONS, scripted, top_k=5)
    assert dense.hit_at == {1: 0.25, 3: 0.5, 5: 0.75}
    assert dense.mrr == pytest.approx((1 + 1 / 3 + 1 / 5 + 0) / 4)
    assert dense.phrase_questions == 3 and dense.phrase_hit_at == pytest.approx({1: 1 / 3, 3: 2 / 3, 5: 2 / 3})
    assert keyword.hit_at == {1: 0.5, 3: 1.0, 5: 1.0}
    assert keyword.mrr == pytest.approx((1 / 2 + 1 + 1 + 1 / 2) / 4)
    assert keyword.phrase_hit_at == pytest.approx({1: 1 / 3, 3: 1 / 3, 5: 1 / 3})
    assert hybrid.unavailable.startswith("knowledge base 'kb'") and not hybrid.hit_at and not hybrid.phrase_hit_at
    assert evaluation.notes([dense, keyword, hybrid]) == ["hybrid: not measured: knowledge base 'kb' was built before keyword search"]


def test_a_smaller_top_k_counts_only_what_was_retrieved() -> None:
    (dense,) = evaluation.evaluate(QUESTIONS, scripted, modes=["dense"], top_k=3)
    assert dense.hit_at == {1: 0.25, 3: 0.5}
    assert dense.mrr == pytest.approx((1 + 1 / 3) / 4)
    assert dense.phrase_hit_at == pytest.approx({1: 1 / 3, 3: 2 / 3})
    assert evaluation.hit_ks(2) == [1, 2] and evaluation.hit_ks(8) == [1, 3, 5, 8]


def test_searches_that_ran_in_another_mode_are_counted_and_explained() -> None:
    def falling_back(question: str, mode: int, top_k: int) -> Found:
        return Found(RANKINGS[DENSE][question], DENSE, "searched by meaning only; rebuild it")

    (hybrid,) = evaluation.evaluate(QUESTIONS, falling_back, modes=["hybrid"])
    assert hybrid.ran_as_other_mode == 4 and hybrid.hit_at[1] == 0.25
    assert evaluation.notes([hybrid]) == ["hybrid: 4 of 4 searches ran in another mode: searched by meaning only; rebuild it"]


def test_the_report_and_the_table_show_the_modes_side_by_side() -> None:
    scores = evaluation.evaluate(QUESTIONS, scripted, top_k=5)
    report = evaluation.report("kb", 5, QUESTIONS, scores)
    assert [m["mode"] for m in report["modes"]] == ["dense", "keyword", "hybrid"]
    assert report["modes"][0]["hit@3"] == 0.5 and report["modes"][1]["phrase_hit@5"] == pytest.approx(0.3333)
    table = evaluation.table("kb", 5, QUESTIONS, scores)
    assert [c.header for c in table.columns] == ["metric", "dense", "keyword", "hybrid"]
    assert [str(c) for c in table.columns[0].cells] == ["hit@1", "hit@3", "hit@5", "MRR", "phrase-hit@1", "phrase-hit@3", "phrase-hit@5"]
    assert [str(c) for c in table.columns[2].cells] == ["50.0%", "100.0%", "100.0%", "0.750", "33.3%", "33.3%", "33.3%"]
    assert [str(c) for c in table.columns[3].cells] == ["-"] * 7


BAD_FILES = [
    ('{"question": "q", "document": "d"}\n{"question": "q2", "document": \n', "q.jsonl line 2 is not valid JSON (Expecting value)"),
    ('{"question": "q", "document": "d"}\n\n{"question": "q3"}\n', 'q.jsonl line 3 has no "document" (each line needs question and document, and may have phrase)'),
    ('{"question": "", "document": "d"}\n', 'q.jsonl line 1 has an empty or non-text "question" (each line needs question and document, and may have phrase)'),
    ('["q", "d"]\n', "q.jsonl line 1 is not a JSON object with question and document"),
    ('{"question": "q", "document": "d", "phrase": 7}\n', 'q.jsonl line 1 has an empty or non-text "phrase"'),
    ("\n\n", "q.jsonl holds no questions"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_a_bad_questions_file_is_one_sentence_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(QuestionsError) as raised:
        evaluation.parse_questions(text, "q.jsonl")
    assert str(raised.value) == message


def test_the_command_refuses_bad_input_before_calling_anyone(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(cli.app, ["eval", str(tmp_path / "absent.jsonl"), "--kb", "kb", "--address", "127.0.0.1:1"])
    assert missing.exit_code == 2 and missing.stderr.strip() == f"error: {tmp_path / 'absent.jsonl'} does not exist"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "document": "d"}\n{"question": 1, "document": "d"}\n')
    refused = runner.invoke(cli.app, ["eval", str(bad), "--kb", "kb", "--address", "127.0.0.1:1"])
    assert refused.exit_code == 2
    assert refused.stderr.strip() == f'error: {bad} line 2 has an empty or non-text "question" (each line needs question and document, and may have phrase)'
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "q", "document": "d"}\n')
    odd_mode = runner.invoke(cli.app, ["eval", str(good), "--kb", "kb", "--mode", "fuzzy", "--address", "127.0.0.1:1"])
    assert odd_mode.exit_code == 2 and odd_mode.stderr.strip() == "error: 'fuzzy' is not a search mode: dense, keyword or hybrid"


# -- the command against real servers ---------------------------------------------------------------

DOCUMENTS = {
    "errno": "EADDRINUSE means the local address is already in use. ENOSPC means no space is left on the device.",
    "pipes": "A pipe is a unidirectional data channel; data written to the write end is read from the read end.",
    "signals": "SIGPIPE is sent to a process that writes to a pipe whose reading end has been closed.",
    "clocks": "CLOCK_MONOTONIC cannot be set and counts time since some unspecified starting point.",
}
LABELLED = [
    {"question": "What does EADDRINUSE mean?", "document": "errno", "phrase": "already in use"},
    {"question": "Which clock cannot be set?", "document": "clocks", "phrase": "CLOCK_MONOTONIC cannot be set"},
    {"question": "What is a unidirectional data channel?", "document": "pipes"},
    {"question": "What happens when I write to a pipe nobody reads?", "document": "signals", "phrase": "SIGPIPE is sent"},
]


@pytest.fixture(scope="module")
async def front_address(upstreams: InProcessTiers) -> AsyncIterator[str]:
    front, channel = await start_gateway(upstreams.addresses)
    await knowledge_pb2_grpc.KnowledgeBasesStub(channel).CreateKnowledgeBase(knowledge_pb2.CreateKnowledgeBaseRequest(name="tiny"))
    await gateway_pb2_grpc.GatewayStub(channel).AddDocuments(gateway_pb2.AddDocumentsRequest(
        knowledge_base="tiny", documents=[gateway_pb2.Document(id=i, title=i, text=t) for i, t in DOCUMENTS.items()]
    ))
    yield f"127.0.0.1:{front.port}"
    await channel.close()
    await front.stop()


async def run_cli(*args: str) -> tuple[int, str, str]:
    """The command in a process of its own (this one's event loop serves the tiers meanwhile)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "askmesh.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "200"},
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=180)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_eval_measures_the_three_modes_on_a_small_file(front_address: str, tmp_path: Path) -> None:
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in LABELLED))
    code, out, err = await run_cli("eval", str(questions), "--kb", "tiny", "--top-k", "3", "--json", "--address", front_address)
    assert code == 0, err
    report = json.loads(out)
    assert (report["knowledge_base"], report["top_k"], report["questions"]) == ("tiny", 3, 4)
    by_mode = {m["mode"]: m for m in report["modes"]}
    assert list(by_mode) == ["dense", "keyword", "hybrid"]
    for mode in by_mode.values():
        # Four documents, one sentence or two each: every mode finds each in its top 3.
        assert mode["hit@3"] == 1.0 and mode["phrase_hit@3"] == 1.0 and mode["phrase_questions"] == 3, mode
        assert 0.5 <= mode["mrr"] <= 1.0 and not mode["unavailable"] and mode["ran_as_other_mode"] == 0
    assert by_mode["keyword"]["hit@1"] >= 0.75  # the questions say the documents' own words

    code, out, err = await run_cli("eval", str(questions), "--kb", "tiny", "--address", front_address)
    assert code == 0, err
    header = next(line for line in out.splitlines() if "metric" in line)
    assert header.index("dense") < header.index("keyword") < header.index("hybrid")
    for metric in ("hit@1", "hit@3", "hit@5", "MRR", "phrase-hit@1", "phrase-hit@5"):
        assert any(line.strip("│ ").startswith(metric) for line in out.splitlines()), (metric, out)

    code, out, err = await run_cli("eval", str(questions), "--kb", "nowhere", "--address", front_address)
    assert code == 1 and err.strip() == "error: NOT_FOUND: knowledge_base: 'nowhere' does not exist", err
