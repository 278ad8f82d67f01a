"""A Chatchat-style baseline: Langchain-Chatchat's kb_chat flow as one process.

What it imitates (Langchain-Chatchat 0.3, `chatchat/server/chat/kb_chat.py` and its knowledge
base service):

- FastAPI with `sse_starlette.EventSourceResponse`; the retrieval runs in the thread pool
  (`run_in_threadpool(search_docs, ...)` in Chatchat), the event loop only streams.
- Documents split with LangChain's `RecursiveCharacterTextSplitter` at Chatchat's defaults
  (CHUNK_SIZE 250, OVERLAP_SIZE 50), embedded with sentence-transformers all-MiniLM-L6-v2
  (normalized), stored in Milvus (here Milvus Lite, one file under --data-dir) with an HNSW
  index on cosine similarity; VECTOR_SEARCH_TOP_K 3.
- The prompt: Chatchat's default `rag` template translated to English, filled by LangChain's
  `ChatPromptTemplate` as the one user turn (no history), the chunks joined by blank lines as
  Chatchat does (`"\\n\\n".join(page_content)`); with no chunk found, Chatchat's `empty`
  template.
- The stream: first one event with the docs (`data: {"docs": [...]}`, formatted as Chatchat's
  `format_reference` does, "Source [i] title" then the chunk), then one OpenAI
  `chat.completion.chunk` event per token (`{"choices": [{"delta": {"content": ...}}]}`), as
  Chatchat 0.3 streams through its OpenAIChatOutput.
- One generation at a time, as one llama.cpp model serves one at a time: every other request
  waits in line for it (FIFO), none is refused. Embedding and search are serialized too (one
  worker thread each, so torch and Milvus Lite are never called from two threads at once).

Where it differs from real Chatchat:

- The LLM runs in this process on llama-cpp-python (the same SmolLM2-135M-Instruct Q4_1 GGUF
  askmesh's generator uses, n_ctx 4096, one thread per core) rather than behind Xinference /
  Ollama / an OpenAI-compatible server reached through `langchain_openai.ChatOpenAI`; so there
  is no HTTP hop to a model server and no LangChain callback handler between the tokens and
  the stream. The embedding model is in-process too (Chatchat also reaches it over HTTP).
- The prompt is the English translation of the Chinese template; there is no chat history,
  no reranker, no score threshold (Chatchat's default 2.0 lets everything through anyway) and
  no knowledge-base management API: one collection, documents uploaded as JSON rather than
  multipart files (re-uploading a document id replaces its chunks, like override=True).
- The stream ends with OpenAI's last chunks (one with the finish reason, "stop" or "length",
  then `{"choices": [], "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}`)
  and `data: [DONE]`, so a client can tell a finished answer from one cut off; Chatchat sends
  neither. A failure mid-stream is sent as `{"error": ...}` without [DONE].
- Startup embeds one text and generates one token before /health answers, so the first
  measured request does not pay for lazy initialization (askmesh's services warm up too).
- completion_tokens counts the streamed content deltas (llama-cpp-python sends one per token,
  except that it holds back bytes of an unfinished UTF-8 character).

Run: python -m benchmarks.baseline.chatchat --host 127.0.0.1 --port 8777 --data-dir DIR
Ask it from Python with `benchmarks.baseline.client` (ask, start_server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fastapi import FastAPI  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

log = logging.getLogger("baseline.chatchat")

COLLECTION = "chatchat_baseline"
DIMENSION = 384
CHUNK_SIZE = 250
CHUNK_OVERLAP = 50
TOP_K = 3
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1"

# Chatchat's default `rag` prompt (prompt_settings.yaml, rag.default), in English.
RAG_TEMPLATE = (
    "【Instruction】Answer the question concisely and professionally based on the known information. "
    "If the answer cannot be obtained from it, say 'The question cannot be answered based on the known "
    "information'; fabrication is not allowed.\n\n"
    "【Known information】{context}\n\n"
    "【Question】{question}\n"
)
# Chatchat's `rag.empty`, used when nothing was found.
EMPTY_TEMPLATE = "Please answer my question:\n{question}\n\n"


class Document(BaseModel):
    id: str
    title: str = ""
    text: str


class UploadRequest(BaseModel):
    documents: list[Document]


class ChatRequest(BaseModel):
    query: str
    top_k: int = Field(default=TOP_K, ge=1, le=100)
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)


class Baseline:
    """The models, the store and the one-at-a-time generation line."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.embedder: Any = None
        self.llm: Any = None
        self.formatter: Any = None
        self.milvus: Any = None
        self.splitter: Any = None
        self.rag_prompt: Any = None
        self.empty_prompt: Any = None
        # One worker each: torch/Milvus Lite never run from two threads, llama.cpp runs one
        # generation at a time; the asyncio.Lock keeps waiting generations in arrival order.
        self.retrieval_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baseline-retrieval")
        self.llm_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baseline-llm")
        self.generation_lock = asyncio.Lock()

    # -- start and stop ---------------------------------------------------------------------
    def load(self) -> None:
        from langchain_core.prompts import ChatPromptTemplate
        from langchain_text_splitters import RecursiveCharacterTextSplitter
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        from pymilvus import DataType, MilvusClient
        from sentence_transformers import SentenceTransformer

        from services.embedder.config import bundled_model_path as embedder_path
        from services.generator.config import bundled_model_path as generator_path

        started = time.perf_counter()
        self.rag_prompt = ChatPromptTemplate.from_messages([("user", RAG_TEMPLATE)])
        self.empty_prompt = ChatPromptTemplate.from_messages([("user", EMPTY_TEMPLATE)])
        self.splitter = RecursiveCharacterTextSplitter(chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP)
        self.embedder = SentenceTransformer(str(embedder_path()), device="cpu", local_files_only=True)
        self.llm = Llama(
            model_path=str(generator_path()),
            n_ctx=4096,
            n_threads=os.cpu_count(),
            verbose=False,
        )
        # The same chat template create_chat_completion applies, to count the prompt's tokens.
        llm = self.llm
        self.formatter = Jinja2ChatFormatter(
            template=llm.metadata["tokenizer.chat_template"],
            eos_token=llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace"),
            bos_token=llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace")
            if llm.token_bos() >= 0
            else "",
        )

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.milvus = MilvusClient(str(self.data_dir / "baseline.db"))
        if not self.milvus.has_collection(COLLECTION):
            schema = MilvusClient.create_schema(auto_id=True, enable_dynamic_field=False)
            schema.add_field("pk", DataType.INT64, is_primary=True)
            schema.add_field("doc_id", DataType.VARCHAR, max_length=512)
            schema.add_field("title", DataType.VARCHAR, max_length=1024)
            schema.add_field("text", DataType.VARCHAR, max_length=8192)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIMENSION)
            index = MilvusClient.prepare_index_params()
            index.add_index(
                field_name="vector", index_type="HNSW", metric_type="COSINE", params={"M": 16, "efConstruction": 200}
            )
            self.milvus.create_collection(COLLECTION, schema=schema, index_params=index, consistency_level="Strong")
        self.milvus.load_collection(COLLECTION)

        # Warm-up: one embedding, one generated token.
        self.rag_prompt.format_messages(context="warm up", question="warm up")
        self.embed(["warm up"])
        for _ in self.llm.create_chat_completion(
            messages=[{"role": "user", "content": "Hi"}], max_tokens=1, stream=True
        ):
            pass
        log.info("[READY] models loaded and warmed up in %.1f s", time.perf_counter() - started)

    def close(self) -> None:
        self.llm_thread.shutdown(wait=True, cancel_futures=True)
        self.retrieval_thread.shutdown(wait=True, cancel_futures=True)
        if self.milvus is not None:
            self.milvus.close()
        if self.llm is not None:
            self.llm.close()

    # -- retrieval (on the retrieval thread) ----------------------------------------------------
    def embed(self, texts: list[str]) -> list[list[float]]:
        vectors = self.embedder.encode(texts, normalize_embeddings=True, batch_size=32, show_progress_bar=False)
        return vectors.tolist()

    def ingest(self, documents: list[Document]) -> dict[str, int]:
        rows: list[dict[str, Any]] = []
        for document in documents:
            for chunk in self.splitter.split_text(document.text):
                rows.append({"doc_id": document.id, "title": document.title[:1000], "text": chunk})
        if documents:
            ids = json.dumps([d.id for d in documents])
            self.milvus.delete(COLLECTION, filter=f"doc_id in {ids}")
        if rows:
            for row, vector in zip(rows, self.embed([row["text"] for row in rows])):
                row["vector"] = vector
            self.milvus.insert(COLLECTION, rows)
        self.milvus.flush(COLLECTION)
        return {"documents": len(documents), "chunks": len(rows)}

    def search(self, query: str, top_k: int) -> list[dict[str, Any]]:
        vector = self.embed([query])[0]
        hits = self.milvus.search(
            COLLECTION,
            data=[vector],
            anns_field="vector",
            limit=top_k,
            output_fields=["doc_id", "title", "text"],
            search_params={"metric_type": "COSINE", "params": {"ef": max(64, top_k)}},
        )
        return [
            {"doc_id": hit["entity"]["doc_id"], "title": hit["entity"]["title"], "text": hit["entity"]["text"],
             "score": float(hit["distance"])}
            for hit in hits[0]
        ]

    # -- generation (on the llm thread) ----------------------------------------------------
    def generate(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                 emit: Any, cancelled: threading.Event) -> None:
        """Streams tokens to `emit` as ("token", text); ends with ("usage", {"finish_reason", "usage"})
        or ("error", str)."""
        try:
            formatted = self.formatter(messages=messages)
            prompt_tokens = len(self.llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=False, special=True))
            completion_tokens = 0
            finish_reason = None
            stream = self.llm.create_chat_completion(
                messages=messages, stream=True, max_tokens=max_tokens, temperature=temperature
            )
            try:
                for chunk in stream:
                    if cancelled.is_set():
                        break
                    choice = chunk["choices"][0]
                    content = choice["delta"].get("content")
                    if content:
                        completion_tokens += 1
                        emit(("token", content))
                    finish_reason = choice.get("finish_reason") or finish_reason
            finally:
                stream.close()
            emit(("usage", {"finish_reason": finish_reason,
                            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                      "total_tokens": prompt_tokens + completion_tokens}}))
        except Exception as error:  # sent to the client as an error event
            log.exception("generation failed")
            emit(("error", f"{type(error).__name__}: {error}"))

    # -- one kb_chat request ---------------------------------------------------------------
    async def kb_chat(self, request: ChatRequest) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            docs = await loop.run_in_executor(self.retrieval_thread, self.search, request.query, request.top_k)
            searched = time.perf_counter()
        except Exception as error:
            log.exception("search failed")
            yield json.dumps({"error": f"{type(error).__name__}: {error}"})
            return
        context = "\n\n".join(doc["text"] for doc in docs)
        prompt = self.rag_prompt if docs else self.empty_prompt
        rendered = prompt.format_messages(context=context, question=request.query)
        messages = [{"role": "user", "content": rendered[0].content}]
        source_documents = [
            f"Source [{i + 1}] {doc['title'] or doc['doc_id']}\n\n{doc['text']}\n\n" for i, doc in enumerate(docs)
        ] or ["No relevant documents were found; this answer is the model's own."]

        completion_id = f"chat{uuid.uuid4()}"

        def chunk(content: str) -> str:
            return json.dumps({
                "id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": MODEL_NAME,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": None}],
            })

        yield json.dumps({"id": completion_id, "object": "chat.completion.chunk", "model": MODEL_NAME,
                          "docs": source_documents})

        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: tuple[str, Any]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        first_token: float | None = None
        async with self.generation_lock:  # one generation at a time; the rest wait in line
            admitted = time.perf_counter()
            future = loop.run_in_executor(
                self.llm_thread, self.generate, messages, request.max_tokens, request.temperature, emit, cancelled
            )
            try:
                while True:
                    kind, value = await queue.get()
                    if kind == "token":
                        if first_token is None:
                            first_token = time.perf_counter()
                        yield chunk(value)
                    elif kind == "usage":
                        log.info(
                            "chat: search %.3f s, waited %.3f s, first token %.3f s after admission, "
                            "total %.3f s, %s",
                            searched - started, admitted - searched,
                            (first_token or time.perf_counter()) - admitted, time.perf_counter() - started,
                            value["usage"],
                        )
                        # OpenAI's last chunks: the finish reason, then the usage with no choices.
                        yield json.dumps({"id": completion_id, "object": "chat.completion.chunk",
                                          "model": MODEL_NAME, "choices": [
                                              {"index": 0, "delta": {}, "finish_reason": value["finish_reason"]}]})
                        yield json.dumps({"id": completion_id, "object": "chat.completion.chunk",
                                          "model": MODEL_NAME, "choices": [], "usage": value["usage"]})
                        yield "[DONE]"
                        break
                    else:
                        yield json.dumps({"error": value})
                        break
            finally:
                # A client that left stops its generation; the next one starts only after this
                # one has let go of the model (the one llm thread would queue it anyway).
                cancelled.set()
                try:
                    await asyncio.shield(future)
                except BaseException:
                    pass


def create_app(data_dir: Path) -> FastAPI:
    from sse_starlette import EventSourceResponse

    baseline = Baseline(data_dir)
    ready = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("[STARTUP] loading models, data in %s", data_dir)
        await asyncio.get_running_loop().run_in_executor(baseline.llm_thread, baseline.load)
        ready.set()
        yield
        log.info("[SHUTDOWN]")
        await asyncio.to_thread(baseline.close)

    app = FastAPI(title="Chatchat-style baseline", lifespan=lifespan)

    @app.get("/health")
    async def health() -> Any:
        from fastapi.responses import JSONResponse

        if not ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.post("/knowledge_base/upload_docs")
    async def upload_docs(request: UploadRequest) -> dict[str, int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(baseline.retrieval_thread, baseline.ingest, request.documents)

    @app.post("/chat/kb_chat")
    async def kb_chat(request: ChatRequest) -> EventSourceResponse:
        return EventSourceResponse(baseline.kb_chat(request))

    app.state.baseline = baseline
    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Chatchat-style kb_chat baseline (one process)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8777)
    parser.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(
        create_app(args.data_dir),
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=5,
        # Many waiting clients are the point: do not cap connections below the benchmark's.
        backlog=2048,
    )


if __name__ == "__main__":
    main()
