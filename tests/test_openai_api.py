"""The OpenAI-compatible API, end to end: the official `openai` SDK and a raw Server-Sent Events
reader against the real mesh (every tier a process, real models, Envoy's HTTP listener in front
of the web tier), with authentication on."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Iterator

import httpx2
import numpy as np
import openai
import pytest

from askmesh import client
from askmesh.v1 import embedder_pb2, embedder_pb2_grpc
from tests.conftest import WebMesh

pytestmark = pytest.mark.mesh

QUESTION = "How many days per year may I work from another country?"


def sdk(web: WebMesh, key: str) -> openai.OpenAI:
    # No retries: a test sees each answer as it came.
    return openai.OpenAI(base_url=web.api_url, api_key=key, max_retries=0, timeout=180)


def ask(question: str = QUESTION) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def streamed(web_mesh: WebMesh) -> list[openai.types.chat.ChatCompletionChunk]:
    chunks = sdk(web_mesh, web_mesh.admin_key).chat.completions.create(
        model="default", messages=ask(), stream=True, max_tokens=24, temperature=0,
        stream_options={"include_usage": True},
    )
    return list(chunks)


def test_a_streamed_answer_has_its_citations_in_the_first_chunk_then_tokens_then_usage(
    streamed: list[openai.types.chat.ChatCompletionChunk],
) -> None:
    first = streamed[0]
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    sources = first.model_extra["sources"]  # the extension field, before any token
    assert [source["number"] for source in sources] == list(range(1, len(sources) + 1))
    assert sources[0]["document_id"] == "remote-work-policy"
    assert {"title", "text", "score", "chunk_id", "in_prompt", "metadata"} <= set(sources[0])
    assert sources[0]["text"] and 0 < sources[0]["score"] <= 1
    assert any(source["in_prompt"] for source in sources)

    content = [c.choices[0].delta.content for c in streamed if c.choices and c.choices[0].delta.content]
    assert len(content) >= 3, "the answer streams token by token"
    finishing = [c for c in streamed if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason in ("stop", "length")
    # stream_options.include_usage: one last chunk with no choices and the usage.
    last = streamed[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens >= len(content) - 1 and last.usage.prompt_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in streamed[:-1])
    assert {c.id for c in streamed} == {first.id} and all(c.model == "default" for c in streamed)


def test_an_answer_without_streaming_has_its_text_sources_and_usage(web_mesh: WebMesh) -> None:
    completion = sdk(web_mesh, web_mesh.admin_key).chat.completions.create(
        model="default", messages=ask("What is the hotel limit in Paris?"), max_tokens=16, temperature=0, seed=7,
    )
    assert completion.object == "chat.completion"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 16
    sources = completion.model_extra["sources"]
    assert sources and sources[0]["document_id"] == "travel-policy"


def test_follow_up_questions_carry_the_conversation(web_mesh: WebMesh) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},  # left out: the gateway's instructions rule
        {"role": "user", "content": "What is the hotel limit in Paris?"},
        {"role": "assistant", "content": "The hotel limit in Paris is 220 EUR per night [1]."},
        {"role": "user", "content": [{"type": "text", "text": "And in Berlin?"}]},
    ]
    completion = sdk(web_mesh, web_mesh.admin_key).chat.completions.create(
        model="default", messages=messages, max_tokens=8, temperature=0,
    )
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.prompt_tokens > 0


def test_an_unknown_model_is_not_found(web_mesh: WebMesh) -> None:
    api = sdk(web_mesh, web_mesh.admin_key)
    for model in ("no-such-kb", "GPT-4o", "acme-handbook"):  # another tenant's is unknown too
        with pytest.raises(openai.NotFoundError) as raised:
            api.chat.completions.create(model=model, messages=ask(), max_tokens=4)
        error = raised.value.body
        assert error["code"] == "model_not_found" and error["param"] == "model", error
        assert error["message"].startswith("model: ") and "/v1/models" in error["message"]
    with pytest.raises(openai.NotFoundError):
        api.embeddings.create(model="no-such-kb", input="hello")


def test_a_bad_key_is_refused_with_401_and_no_key_too(web_mesh: WebMesh) -> None:
    with pytest.raises(openai.AuthenticationError) as raised:
        sdk(web_mesh, "amk_0123456789abcdef_" + "x" * 43).chat.completions.create(model="default", messages=ask())
    assert raised.value.body["type"] == "authentication_error"
    assert "not a valid API key" in raised.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        sdk(web_mesh, "nonsense").models.list()
    response = httpx2.get(f"{web_mesh.api_url}/models", timeout=30)
    assert response.status_code == 401 and "authorization: missing" in response.json()["error"]["message"]


def test_a_reader_asks_lists_and_embeds_but_cannot_upload(web_mesh: WebMesh) -> None:
    reader = sdk(web_mesh, web_mesh.reader_key)
    answer = reader.chat.completions.create(model="default", messages=ask(), max_tokens=4)
    assert answer.choices[0].message.content
    assert "default" in {model.id for model in reader.models.list()}
    assert len(reader.embeddings.create(model="default", input="a reader may embed").data[0].embedding) == 384
    refused = httpx2.post(
        f"{web_mesh.url}/api/knowledge-bases/default/files", params={"name": "note.txt"}, content=b"a reader may not write",
        headers={"Authorization": f"Bearer {web_mesh.reader_key}"}, timeout=30,
    )
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["type"] == "permission_error"
    assert "needs the role writer" in refused.json()["error"]["message"]


def test_models_are_the_callers_tenants_knowledge_bases(web_mesh: WebMesh) -> None:
    default = sdk(web_mesh, web_mesh.admin_key).models.list()
    assert "default" in {m.id for m in default} and "acme-handbook" not in {m.id for m in default}
    assert all(m.object == "model" and m.owned_by == "askmesh" and m.created > 0 for m in default)
    acme = sdk(web_mesh, web_mesh.acme_key)
    assert {m.id for m in acme.models.list()} == {"acme-handbook"}
    assert acme.models.retrieve("acme-handbook").id == "acme-handbook"
    with pytest.raises(openai.NotFoundError):
        acme.models.retrieve("default")


def test_embeddings_are_the_embedders_own_vectors(web_mesh: WebMesh) -> None:
    texts = ["How many days can I work from abroad?", "hotel limit in Paris"]
    # The SDK asks for base64 and decodes it; a raw request gets floats.
    created = sdk(web_mesh, web_mesh.reader_key).embeddings.create(model="default", input=texts)
    raw = httpx2.post(
        f"{web_mesh.api_url}/embeddings", json={"model": "default", "input": texts, "encoding_format": "float"},
        headers={"Authorization": f"Bearer {web_mesh.reader_key}"}, timeout=60,
    ).json()
    embedder = web_mesh.mesh.replicas["embedder"][0]
    assert embedder.address is not None
    with client.connect(embedder.address, web_mesh.mesh.internal_token) as channel:
        own = embedder_pb2_grpc.EmbedderStub(channel).Embed(embedder_pb2.EmbedRequest(texts=texts), timeout=60)
    for index, embedding in enumerate(own.embeddings):
        expected = np.asarray(embedding.values, dtype=np.float32)
        assert np.array_equal(np.asarray(created.data[index].embedding, dtype=np.float32), expected)
        assert np.array_equal(np.asarray(raw["data"][index]["embedding"], dtype=np.float32), expected)
    assert created.model == "default" and created.usage.prompt_tokens == own.token_count > len(texts)
    assert raw["object"] == "list" and [d["index"] for d in raw["data"]] == [0, 1]


def error_of(web: WebMesh, path: str, body: object) -> tuple[int, dict[str, object]]:
    response = httpx2.post(f"{web.api_url}{path}", json=body, headers={"Authorization": f"Bearer {web.admin_key}"}, timeout=60)
    return response.status_code, response.json()["error"]


def test_bad_requests_get_400_naming_the_openai_field(web_mesh: WebMesh) -> None:
    cases: list[tuple[str, object, str]] = [
        ("/chat/completions", {"model": "default"}, "messages: is required"),
        ("/chat/completions", {"model": "default", "messages": []}, "messages: List should have at least 1 item"),
        ("/chat/completions", {"model": "default", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role:"),
        ("/chat/completions", {"model": "default", "messages": ask(), "temperature": 7}, "temperature: 7 is out of range"),
        ("/chat/completions", {"model": "default", "messages": ask(), "top_p": 0}, "top_p: 0 is out of range"),
        ("/chat/completions", {"model": "default", "messages": ask(), "n": 2}, "n: must be 1"),
        ("/chat/completions", {"model": "default", "messages": ask(), "max_tokens": 0}, "max_tokens: "),
        ("/chat/completions", {"model": "default", "messages": ask(), "stop": [""]}, "stop[0]: must be 1 to"),
        ("/chat/completions", {"model": "default", "messages": ask(""), "max_tokens": 2}, "messages[0].content: "),
        ("/chat/completions", {"model": "default", "messages": [{"role": "assistant", "content": "hi"}]}, "messages[0]: the last"),
        (
            "/chat/completions",
            {"model": "default", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content: part 0 is 'image_url'",
        ),
        ("/embeddings", {"model": "default", "input": [[1, 2, 3]]}, "input: token arrays are not supported"),
        ("/embeddings", {"model": "default", "input": [""]}, "input[0]: is empty"),
        ("/embeddings", {"model": "default", "input": "x", "dimensions": 12}, "dimensions: 12 cannot be given"),
    ]
    for path, body, expected in cases:
        status, error = error_of(web_mesh, path, body)
        assert status == 400 and str(error["message"]).startswith(expected), (body, error)
        assert error["type"] == "invalid_request_error" and "\n" not in str(error["message"])
        assert error["param"] == str(error["message"]).split(": ")[0], error
    broken = httpx2.post(
        f"{web_mesh.api_url}/chat/completions", content=b"{not json", timeout=30,
        headers={"Authorization": f"Bearer {web_mesh.admin_key}", "Content-Type": "application/json"},
    )
    assert broken.status_code == 400 and broken.json()["error"]["message"] == (
        "body: is not valid JSON (expecting property name enclosed in double quotes at character 1)"
    )
    unknown = httpx2.get(f"{web_mesh.api_url}/completions", timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_url"


# -- the wire format, read raw ----------------------------------------------------------------------

EVENT = re.compile(rb"^data: (\{.*\}|\[DONE\])$", re.DOTALL)


def raw_events(web: WebMesh, question: str, max_tokens: int, started: threading.Event | None = None) -> Iterator[bytes]:
    """Each event block of a streamed answer, as bytes (split on the blank line that ends it)."""
    body = {"model": "default", "messages": ask(question), "stream": True, "max_tokens": max_tokens,
            "temperature": 0, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {web.admin_key}"}
    with httpx2.stream("POST", f"{web.api_url}/chat/completions", json=body, headers=headers, timeout=180) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        buffer = b""
        for data in response.iter_bytes():
            buffer += data
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                if started is not None and block.startswith(b"data: {"):
                    started.set()
                yield block
        assert buffer == b"", "the stream ends on a whole event"


def test_the_stream_is_well_formed_server_sent_events_ending_with_done(web_mesh: WebMesh) -> None:
    blocks = list(raw_events(web_mesh, QUESTION, 12))
    data = [b for b in blocks if not b.startswith(b":")]
    assert all(EVENT.match(block) for block in data), data
    assert data[-1] == b"data: [DONE]" and blocks[-1] == b"data: [DONE]"
    chunks = [json.loads(block[len(b"data: "):]) for block in data[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert "sources" in chunks[0] and all("sources" not in chunk for chunk in chunks[1:])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(b"\n" not in block for block in data), "one line per event"


def test_a_question_waiting_in_line_is_told_its_place_in_comments(web_mesh: WebMesh) -> None:
    """The mesh generates one answer at a time: a question asked while another is being
    answered waits, and its stream says so in comment lines before its first chunk."""
    generating = threading.Event()
    first: list[bytes] = []
    long_answer = threading.Thread(
        target=lambda: first.extend(raw_events(web_mesh, "Describe every rule of the travel policy.", 120, generating)),
    )
    long_answer.start()
    try:
        assert generating.wait(180), "the first answer never began"
        blocks = list(raw_events(web_mesh, QUESTION, 4))
    finally:
        long_answer.join(timeout=300)
    comments = [b for b in blocks if b.startswith(b":")]
    assert comments and comments[0].startswith(b": queued "), blocks[:3]
    where = json.loads(comments[0][len(b": queued "):])
    assert where["position"] >= 1 and where["estimated_wait_ms"] >= 0
    assert blocks.index(comments[-1]) < next(i for i, b in enumerate(blocks) if b.startswith(b"data: {"))
    assert blocks[-1] == b"data: [DONE]" and first[-1] == b"data: [DONE]"


def test_the_curl_command_askmesh_up_prints_streams_a_cited_answer(web_mesh: WebMesh) -> None:
    from askmesh.cli import _web_lines

    layout = web_mesh.mesh.layout
    printed = _web_lines(layout.http_url, web_mesh.admin_key, layout.admin_key_path)
    assert f"{layout.http_url}/#key={web_mesh.admin_key}" in printed  # the chat page's link
    command = next(line.strip() for line in printed.splitlines() if line.strip().startswith("curl "))
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("data: {") and '"sources":[{"number":1' in result.stdout
    assert result.stdout.rstrip().endswith("data: [DONE]")


def test_a_rolling_restart_of_the_web_tier_lets_an_answer_in_flight_finish(web_mesh: WebMesh) -> None:
    mesh = web_mesh.mesh
    old = list(mesh.replicas["web"])
    generating = threading.Event()
    blocks: list[bytes] = []
    answer = threading.Thread(target=lambda: blocks.extend(raw_events(web_mesh, "Describe the travel policy.", 64, generating)))
    answer.start()
    try:
        assert generating.wait(180), "the answer never began"
        mesh.restart_tier("web", say=lambda message, process: None)
    finally:
        answer.join(timeout=300)
    assert blocks and blocks[-1] == b"data: [DONE]", blocks[-3:]
    assert all(not process.alive for process in old)
    assert {p.name for p in mesh.replicas["web"]}.isdisjoint({p.name for p in old})
    after = sdk(web_mesh, web_mesh.reader_key).chat.completions.create(model="default", messages=ask(), max_tokens=4)
    assert after.choices[0].message.content
