"""Gateway: the public Ask stream, over the embedder, retriever, generator and ingestor tiers."""

from __future__ import annotations

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
    ingestor_address: str = "127.0.0.1:50052"
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

    # Reranking (README: "Reranking"): whether a question that does not set `rerank` is
    # reranked. auto: when the embedder tier serves a reranker (asked once, at start); on; off.
    # A question's own `rerank` always wins.
    rerank: Literal["auto", "on", "off"] = "auto"
    # A reranked question fetches top_k times this many chunks, at most rerank_max_candidates
    # (keep that at or below the retriever's max_top_k, 50 by default), and keeps the best top_k.
    rerank_fetch_factor: int = Field(default=4, ge=1, le=50)
    rerank_max_candidates: int = Field(default=50, ge=1)

    # Answer cache for repeated questions: off, memory (an LRU in each replica) or redis
    # (shared by replicas, at redis_url). A knowledge-base change invalidates its answers.
    answer_cache: Literal["off", "memory", "redis"] = "off"
    answer_cache_entries: int = Field(default=1024, ge=1)
    answer_cache_ttl_s: float = Field(default=3600.0, gt=0)
    redis_url: str = "redis://127.0.0.1:6379/0"

    @field_validator("embedder_address", "retriever_address", "generator_address", "ingestor_address")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_address(value)
