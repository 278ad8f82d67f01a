"""What the CLI prints of text it did not write (model output, titles, ids, server errors): shown
literally, never read as Rich markup, and without terminal control sequences; and how `add`
fits its documents into requests under the message limit. No mesh: the calls are faked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from askmesh import cli, client
from askmesh.v1 import common_pb2, gateway_pb2

HOSTILE_TITLE = "[bold red]x[/]"
HOSTILE_ANSWER = "Hotels cost \x1b]0;pwned\x07\x1b[31m120 euros\x1b[0m a night.\r\x9b2J"


class _Channel:
    def __enter__(self) -> _Channel:
        return self

    def __exit__(self, *_: object) -> None:
        pass


def _answer() -> Iterator[gateway_pb2.AskResponse]:
    citation = gateway_pb2.Citation(number=1, document_id="[link=file:///etc]doc[/link]", title=HOSTILE_TITLE, in_prompt=True)
    yield gateway_pb2.AskResponse(sources=gateway_pb2.Sources(citations=[citation]))
    for piece in (HOSTILE_ANSWER[:20], HOSTILE_ANSWER[20:]):
        yield gateway_pb2.AskResponse(delta=common_pb2.TokenDelta(text=piece))
    yield gateway_pb2.AskResponse(done=gateway_pb2.AskDone(model="[blink]m\x1b[5m"))


def _no_controls(text: str) -> bool:
    return not any(ord(c) < 32 and c not in "\n\t" or 0x7F <= ord(c) <= 0x9F for c in text)


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr(client, "connect", lambda address, *credentials: _Channel())
    return CliRunner()


def test_an_answer_and_its_sources_print_literally_without_control_sequences(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client, "ask", lambda channel, request, timeout: _answer())
    result = runner.invoke(cli.app, ["ask", "Hotel cost?"])
    assert result.exit_code == 0, result.output
    assert "Hotels cost 120 euros a night." in result.stdout
    assert HOSTILE_TITLE in result.stdout  # the markup as text, not bold red "x"
    assert "[link=file:///etc]doc[/link]" in result.stdout
    assert "[blink]m" in result.stdout
    assert "pwned" not in result.stdout and _no_controls(result.stdout)


def test_ask_sends_rerank_only_when_told_and_prints_the_rerankers_score_and_time(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[gateway_pb2.AskRequest] = []

    def reranked_answer(channel: object, request: gateway_pb2.AskRequest, timeout: float | None) -> Iterator[gateway_pb2.AskResponse]:
        sent.append(request)
        citation = gateway_pb2.Citation(number=1, document_id="travel", score=0.41, rerank_score=0.987, in_prompt=True)
        yield gateway_pb2.AskResponse(sources=gateway_pb2.Sources(citations=[citation]))
        yield gateway_pb2.AskResponse(done=gateway_pb2.AskDone(timings=gateway_pb2.AskTimings(rerank_ms=42)))

    monkeypatch.setattr(client, "ask", reranked_answer)
    assert runner.invoke(cli.app, ["ask", "Hotel cost?"]).exit_code == 0
    assert runner.invoke(cli.app, ["ask", "Hotel cost?", "--no-rerank"]).exit_code == 0
    result = runner.invoke(cli.app, ["ask", "Hotel cost?", "--rerank"])
    assert result.exit_code == 0, result.output
    assert [r.HasField("rerank") for r in sent] == [False, True, True] and [r.rerank for r in sent] == [False, False, True]
    assert "rerank" in result.stdout and "0.987" in result.stdout and "0.410" in result.stdout
    assert "rerank 42 ms" in result.stdout


def test_a_server_error_prints_as_one_line_without_control_sequences(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Failed(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.NOT_FOUND

        def details(self) -> str:
            return "knowledge base '[red]x\x1b]0;pwned\x07' does not exist"

    def fail(channel: object, request: object, timeout: object) -> Iterator[gateway_pb2.AskResponse]:
        raise Failed()
        yield  # a generator, as the real one

    monkeypatch.setattr(client, "ask", fail)
    result = runner.invoke(cli.app, ["ask", "Hotel cost?"])
    assert result.exit_code == 1
    assert "error: NOT_FOUND: knowledge base '[red]x' does not exist" in result.stderr
    assert _no_controls(result.stderr.strip())


class _Gateway:
    """Records each AddDocuments request and answers it with one chunk a document."""

    requests: list[gateway_pb2.AddDocumentsRequest] = []

    def __init__(self, channel: object) -> None:
        pass

    def AddDocuments(self, request: gateway_pb2.AddDocumentsRequest, timeout: float) -> gateway_pb2.AddDocumentsResponse:
        assert request.ByteSize() <= client.DEFAULT_MAX_MESSAGE_BYTES
        self.requests.append(request)
        return gateway_pb2.AddDocumentsResponse(
            documents=[gateway_pb2.DocumentResult(id=d.id, chunk_count=1) for d in request.documents],
            chunk_count=len(request.documents),
        )


def test_add_splits_documents_into_requests_under_the_message_limit(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(client.gateway_pb2_grpc, "GatewayStub", _Gateway)
    _Gateway.requests = []
    paths = []
    for index in range(5):
        path = tmp_path / f"[bold]doc{index}.txt"
        path.write_text("word " * 300_000)  # 1.5 MB each: 5 of them need 3 requests of 4 MiB
        paths.append(str(path))
    result = runner.invoke(cli.app, ["add", *paths])
    assert result.exit_code == 0, result.output
    assert len(_Gateway.requests) == 3
    assert [d.id for r in _Gateway.requests for d in r.documents] == [f"[bold]doc{i}" for i in range(5)]
    assert "[bold]doc4: 1 chunks" in result.stdout


def test_add_refuses_a_file_too_large_for_one_request_in_one_sentence(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(client.gateway_pb2_grpc, "GatewayStub", _Gateway)
    _Gateway.requests = []
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text("fine")
    large.write_text("é" * 2_500_000)  # 5 MB of UTF-8
    result = runner.invoke(cli.app, ["add", str(small), str(large)])
    assert result.exit_code == 2
    assert _Gateway.requests == []  # nothing sent: the set is judged whole first
    assert result.stderr.strip() == (
        "error: large.txt: too large to add in one request (4.8 MiB, the limit is 3.9 MiB); "
        "`askmesh ingest` uploads a file in parts"
    )


def test_many_small_documents_go_in_requests_of_at_most_the_ingestors_count() -> None:
    documents = [gateway_pb2.Document(id=f"d{i}", text="x") for i in range(600)]
    assert [len(batch) for batch in client.document_batches(documents)] == [256, 256, 88]


def test_a_streamed_answer_loses_its_control_sequences_wherever_the_pieces_are_cut() -> None:
    for cut in range(len(HOSTILE_ANSWER) + 1):
        text = client.StreamedText()
        shown = text.feed(HOSTILE_ANSWER[:cut]) + text.feed(HOSTILE_ANSWER[cut:]) + text.flush()
        assert shown == "Hotels cost 120 euros a night.", cut


def test_servers_and_channels_take_messages_of_at_most_4_mib_by_default() -> None:
    from askmesh.runtime.channels import CHANNEL_OPTIONS
    from askmesh.runtime.config import ServiceSettings

    assert ServiceSettings(port=50099).max_message_bytes == 4 * 1024 * 1024
    assert dict(CHANNEL_OPTIONS)["grpc.max_receive_message_length"] == 4 * 1024 * 1024
    assert dict(CHANNEL_OPTIONS)["grpc.max_send_message_length"] == 4 * 1024 * 1024
    assert client.UPLOAD_PART_BYTES < 4 * 1024 * 1024
