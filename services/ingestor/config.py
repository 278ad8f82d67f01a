"""Ingestor: knowledge bases, documents, uploads and the tasks that turn them into chunks."""

from __future__ import annotations


from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from askmesh.runtime.config import ServiceSettings, check_address


class IngestorSettings(ServiceSettings):
    section = "ingestor"
    model_config = SettingsConfigDict(env_prefix="ASKMESH_INGESTOR_")

    port: int = Field(default=50065, ge=1, le=65535)
    # Where each tier is reached: Envoy's internal listener in the local mesh, a Kubernetes
    # Service in a cluster. host:port, no scheme.
    embedder_address: str = "127.0.0.1:50052"
    retriever_address: str = "127.0.0.1:50052"
    generator_address: str = "127.0.0.1:50052"
    # Deadline for each unary upstream call when the caller set none.
    upstream_timeout_s: float = Field(default=30.0, gt=0)
    default_knowledge_base: str = "default"
    # How a knowledge base's questions search when neither the question nor the knowledge base
    # says (those created without a mode follow this, so changing it changes them). Chosen by
    # measurement on the labelled man-pages set: benchmarks/results/*-hybrid.md.
    default_search_mode: Literal["dense", "keyword", "hybrid"] = "hybrid"

    # AddDocuments
    chunk_size: int = Field(default=600, ge=50)
    chunk_overlap: int = Field(default=150, ge=0)
    max_chunk_size: int = Field(default=8000, ge=50)
    max_documents: int = Field(default=256, ge=1)
    max_document_chars: int = Field(default=2_000_000, ge=1)
    max_chunks_per_request: int = Field(default=20_000, ge=1)
    embed_batch_size: int = Field(default=64, ge=1)
    upsert_batch_size: int = Field(default=512, ge=1)

    # Knowledge-base records, documents, ingestion tasks and uploaded files: a SQLite file (a
    # path, or sqlite:///path; shared only by the ingestor replicas of one machine) or a
    # PostgreSQL server (postgresql://user:password@host:port/database) for many machines.
    store_url: str = ".askmesh/data/store.sqlite3"
    # Ingestion tasks run at once on this replica.
    ingest_workers: int = Field(default=1, ge=0)
    # Chunks embedded and stored per checkpoint of an ingestion task: small batches let a
    # question's own embedding go through quickly.
    ingest_batch_size: int = Field(default=16, ge=1)
    # Between batches, ingestion waits while the generator tier has questions in flight (from
    # their admission to their last token), but never longer than this, so it always
    # progresses: where the tiers share a machine's cores, questions go first. 0: never waits
    # (tiers on machines of their own, as in Kubernetes).
    ingest_yield_to_questions_s: float = Field(default=5.0, ge=0)
    # A worker that stops renewing its lease (crashed) loses its task to another after this.
    task_lease_s: float = Field(default=30.0, gt=0)
    # A document write, a delete or a knowledge base's create/delete holds a lease this long,
    # renewed as it progresses; one whose lease ran out (its process died) is finished or undone
    # by the reconciler, which every ingestor runs at start-up and then every reconcile_interval_s.
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
    # Uploads whose task has ended (or that never became a task) are removed at start-up and
    # then this often, by every replica that runs workers.
    upload_sweep_interval_s: float = Field(default=60.0, gt=0)

    @field_validator("embedder_address", "retriever_address", "generator_address")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_address(value)
