from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from askmesh.runtime.config import ServiceSettings, check_address

DEFAULT_SYSTEM_PROMPT = (
    "You are askmesh, an assistant that answers questions using only the numbered sources below. "
    "Cite the sources you use as [1], [2], and so on. If the sources do not contain the answer, "
    "say that you do not know."
)


class GatewaySettings(ServiceSettings):
    section = "gateway"
    model_config = SettingsConfigDict(env_prefix="ASKMESH_GATEWAY_")

    port: int = Field(default=50064, ge=1, le=65535)
    # Where each tier is reached: Envoy's internal listener in the local mesh, a Kubernetes
    # Service in a cluster. host:port, no scheme.
    embedder_address: str = "127.0.0.1:50052"
    retriever_address: str = "127.0.0.1:50052"
    generator_address: str = "127.0.0.1:50052"
    # Deadline for each unary upstream call when the caller set none.
    upstream_timeout_s: float = Field(default=30.0, gt=0)

    default_knowledge_base: str = "default"
    # Candidates retrieved; the generator puts those that fit its context budget in the prompt,
    # and Sources lists them all (in_prompt says which). Chunking and top_k are chosen by
    # benchmarks.retrieval on the labelled man-pages set (README: "Many people asking at once").
    default_top_k: int = Field(default=5, ge=1)
    max_top_k: int = Field(default=20, ge=1)
    max_question_chars: int = Field(default=4000, ge=1)
    max_history_messages: int = Field(default=20, ge=0)
    max_history_chars: int = Field(default=8000, ge=0)
    # The most prompt tokens a question may give its sources (context_token_budget); the
    # generator's own limit may be lower, and its default applies when a question sets none.
    max_context_token_budget: int = Field(default=2048, ge=16)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT

    # Answer cache for repeated questions: off, memory (an LRU in each replica) or redis
    # (shared by replicas, at redis_url). A knowledge-base change invalidates its answers.
    answer_cache: Literal["off", "memory", "redis"] = "off"
    answer_cache_entries: int = Field(default=1024, ge=1)
    answer_cache_ttl_s: float = Field(default=3600.0, gt=0)
    redis_url: str = "redis://127.0.0.1:6379/0"

    # AddDocuments
    chunk_size: int = Field(default=600, ge=50)
    chunk_overlap: int = Field(default=150, ge=0)
    max_chunk_size: int = Field(default=8000, ge=50)
    max_documents: int = Field(default=256, ge=1)
    max_document_chars: int = Field(default=2_000_000, ge=1)
    max_chunks_per_request: int = Field(default=20_000, ge=1)
    embed_batch_size: int = Field(default=64, ge=1)
    upsert_batch_size: int = Field(default=512, ge=1)

    # Knowledge-base records, documents and ingestion tasks. A SQLite file may be shared by the
    # gateway replicas of one machine; the Store protocol is where a shared server store plugs in.
    store_path: Path = Path(".askmesh/data/gateway.sqlite3")
    # Uploaded files wait here until their task has stored them (shared by replicas that share
    # the store, e.g. a ReadWriteMany volume).
    spool_dir: Path = Path(".askmesh/data/uploads")
    # Ingestion tasks run at once on this replica; small, so ingestion cannot starve Ask.
    ingest_workers: int = Field(default=1, ge=0)
    # Chunks embedded and stored per checkpoint of an ingestion task: small batches let a
    # question's own embedding go through quickly.
    ingest_batch_size: int = Field(default=16, ge=1)
    # Between batches, ingestion waits while questions are being answered on this replica (the
    # tiers share the machine's cores), but never longer than this, so it always progresses.
    ingest_yield_to_questions_s: float = Field(default=5.0, ge=0)
    # A worker that stops renewing its lease (crashed) loses its task to another after this.
    task_lease_s: float = Field(default=30.0, gt=0)
    # A document write, a delete or a knowledge base's create/delete holds a lease this long,
    # renewed as it progresses; one whose lease ran out (its process died) is finished or undone
    # by the reconciler, which every gateway runs at start-up and then every reconcile_interval_s.
    write_lease_s: float = Field(default=30.0, gt=0)
    reconcile_interval_s: float = Field(default=30.0, gt=0)
    task_poll_interval_s: float = Field(default=0.5, gt=0)
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    max_chunks_per_task: int = Field(default=50_000, ge=1)
    # Attempts of one ingestion task or rebuild: each time a worker claims it is one. An attempt
    # fails when its worker dies (its lease expires) or meets a passing problem (a tier
    # unavailable or at capacity, an unexpected error); the task then resumes from its last
    # checkpoint after task_retry_delay_s, doubled for each failed attempt, and after
    # task_max_attempts failed attempts it ends FAILED with the reason. A file that cannot be
    # read fails at once: it would fail the same way again.
    task_max_attempts: int = Field(default=3, ge=1)
    task_retry_delay_s: float = Field(default=5.0, ge=0)
    # Every upload is parsed in a child process of its own under these limits (wall-clock time,
    # which is its CPU-time limit too, and address space), so a hostile file (a zip bomb, a
    # pathological PDF) fails its own task and nothing else. Generous: a legitimate 64 MiB file
    # parses well within them; they are there to end the ones that never would.
    parse_timeout_s: float = Field(default=300.0, gt=0)
    parse_max_memory_bytes: int = Field(default=1024 * 1024 * 1024, ge=128 * 1024 * 1024)
    # Spooled uploads whose task has ended (or that never became a task) are removed at start-up
    # and then this often, by every replica that runs workers.
    spool_sweep_interval_s: float = Field(default=60.0, gt=0)

    @field_validator("embedder_address", "retriever_address", "generator_address")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_address(value)
