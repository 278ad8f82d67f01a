"""Asking the Chatchat-style baseline (benchmarks/baseline/chatchat.py), and running it.

    server = start_server(data_dir)            # a subprocess on a free port, /health waited for
    async with httpx.AsyncClient(timeout=None) as http:
        await upload_documents(http, server.base_url, [{"id": ..., "title": ..., "text": ...}])
        answer = await ask(http, server.base_url, "How many days can I work from abroad?", 32)
    server.stop()                              # SIGTERM, then SIGKILL

Importing this module does not import the server's stack (torch, llama.cpp, FastAPI).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx

REPO = Path(__file__).resolve().parents[2]


class BaselineError(RuntimeError):
    """The baseline answered with an error, a non-200 status, or a stream cut off before [DONE]."""


@dataclass
class BaselineAnswer:
    ttft_s: float  # request start to the first token's event
    total_s: float  # request start to [DONE]
    text: str
    completion_tokens: int  # content events received
    prompt_tokens: int = 0  # from the usage event (0 if none came)
    finish_reason: str | None = None  # "stop" (end of answer) or "length" (max_tokens reached)
    docs: list[str] = field(default_factory=list)


async def ask(
    http: httpx.AsyncClient,
    base_url: str,
    question: str,
    max_tokens: int,
    *,
    top_k: int = 3,
    temperature: float = 0.7,
) -> BaselineAnswer:
    """One kb_chat request, its SSE stream read to the end."""
    started = time.perf_counter()
    ttft: float | None = None
    parts: list[str] = []
    tokens = 0
    prompt_tokens = 0
    docs: list[str] = []
    finish_reason: str | None = None
    done = False
    body = {"query": question, "top_k": top_k, "max_tokens": max_tokens, "temperature": temperature}
    async with http.stream("POST", f"{base_url}/chat/kb_chat", json=body, timeout=None) as response:
        if response.status_code != 200:
            detail = (await response.aread()).decode("utf-8", "replace")[:500]
            raise BaselineError(f"kb_chat answered {response.status_code}: {detail}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, ": ping" comments, event:/id: fields
            data = line[5:].lstrip(" ")
            if data == "[DONE]":
                done = True
                break
            event: dict[str, Any] = json.loads(data)
            if "error" in event:
                raise BaselineError(f"kb_chat failed: {event['error']}")
            if "docs" in event:
                docs = list(event["docs"])
            if event.get("usage"):
                prompt_tokens = int(event["usage"].get("prompt_tokens", 0))
            for choice in event.get("choices") or []:
                finish_reason = choice.get("finish_reason") or finish_reason
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if ttft is None:
                        ttft = time.perf_counter() - started
                    parts.append(content)
                    tokens += 1
    total = time.perf_counter() - started
    if not done:
        raise BaselineError(f"kb_chat stream ended without [DONE] after {tokens} tokens")
    return BaselineAnswer(
        ttft_s=ttft if ttft is not None else total,
        total_s=total,
        text="".join(parts),
        completion_tokens=tokens,
        prompt_tokens=prompt_tokens,
        finish_reason=finish_reason,
        docs=docs,
    )


async def upload_documents(http: httpx.AsyncClient, base_url: str, documents: list[dict[str, str]]) -> dict[str, int]:
    """Documents as {"id", "title", "text"}; returns {"documents": n, "chunks": m}."""
    response = await http.post(f"{base_url}/knowledge_base/upload_docs", json={"documents": documents}, timeout=None)
    if response.status_code != 200:
        raise BaselineError(f"upload_docs answered {response.status_code}: {response.text[:500]}")
    return response.json()


def markdown_documents(paths: list[Path]) -> list[dict[str, str]]:
    """Files as upload_documents takes them: id the path, title the first heading or the name."""
    documents = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), path.stem)
        documents.append({"id": str(path), "title": title, "text": text})
    return documents


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class BaselineServer:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after grace_s; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start_server(
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    timeout_s: float = 300.0,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
) -> BaselineServer:
    """Starts the baseline as a subprocess and waits until /health answers 200.

    Raises BaselineError with the log's tail if it exits or is not healthy within timeout_s
    (the process is stopped then)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    log_path = log_path or data_dir / "baseline.log"
    log_file = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.baseline.chatchat", "--host", host, "--port", str(port),
         "--data-dir", str(data_dir)],
        cwd=REPO,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )
    log_file.close()  # the child holds its own copy
    server = BaselineServer(process=process, base_url=f"http://{host}:{port}", log_path=log_path)
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as http:
        while True:
            if process.poll() is not None:
                raise BaselineError(
                    f"the baseline exited with status {process.returncode} before it was healthy; "
                    f"log {log_path}:\n{server.log_tail()}"
                )
            try:
                if http.get(f"{server.base_url}/health").status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                server.stop()
                raise BaselineError(
                    f"the baseline was not healthy within {timeout_s:.0f} s; log {log_path}:\n{server.log_tail()}"
                )
            time.sleep(0.5)


@contextlib.contextmanager
def running_server(data_dir: Path, **kwargs: Any) -> Iterator[BaselineServer]:
    """start_server ... stop, as a context manager."""
    server = start_server(data_dir, **kwargs)
    try:
        yield server
    finally:
        server.stop()


if __name__ == "__main__":  # the smoke run: samples/ in, two questions, TTFT and answers out
    import asyncio
    import tempfile

    async def smoke(base_url: str) -> None:
        async with httpx.AsyncClient(timeout=None) as http:
            counts = await upload_documents(http, base_url, markdown_documents(sorted((REPO / "samples").glob("*.md"))))
            print("uploaded:", counts)
            for question in ("How many days can I work from abroad?", "What is the hotel limit in Paris?"):
                answer = await ask(http, base_url, question, 32)
                print(f"\nQ: {question}\nTTFT {answer.ttft_s:.3f} s, total {answer.total_s:.3f} s, "
                      f"prompt {answer.prompt_tokens} tokens, completion {answer.completion_tokens} tokens "
                      f"({answer.finish_reason})")
                print("docs:", [d.split("\n", 1)[0] for d in answer.docs])
                print("A:", answer.text)

    with tempfile.TemporaryDirectory(prefix="baseline-smoke-") as tmp:
        started = time.perf_counter()
        with running_server(Path(tmp)) as server:
            print(f"healthy at {server.base_url} after {time.perf_counter() - started:.1f} s")
            asyncio.run(smoke(server.base_url))
