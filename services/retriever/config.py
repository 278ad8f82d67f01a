from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from askmesh.runtime.config import ServiceSettings


class RetrieverSettings(ServiceSettings):
    section = "retriever"
    model_config = SettingsConfigDict(env_prefix="ASKMESH_RETRIEVER_")

    port: int = Field(default=50062, ge=1, le=65535)
    # A local path ending in .db runs Milvus Lite embedded in this process; otherwise a Milvus
    # server or cluster URI such as http://milvus:19530.
    milvus_uri: str = ".askmesh/data/milvus.db"
    milvus_token: str = ""
    default_top_k: int = Field(default=4, ge=1)
    max_top_k: int = Field(default=50, ge=1)
    max_filters: int = Field(default=16, ge=1)
    max_filter_values: int = Field(default=100, ge=1)
    max_upsert_chunks: int = Field(default=2048, ge=1)
    # HNSW build and search parameters.
    hnsw_m: int = Field(default=16, ge=2)
    hnsw_ef_construction: int = Field(default=200, ge=8)
    hnsw_ef_search: int = Field(default=64, ge=1)
    # Hybrid search: how the dense and keyword (BM25) halves are fused, by Milvus's WeightedRanker
    # (hybrid_dense_weight for the dense half's cosine, the rest for the keyword half's BM25, each
    # normalized to [0, 1]) or RRFRanker (reciprocal rank fusion with constant rrf_k), and how
    # many candidates each half offers the fusion (at least top_k). Chosen on the labelled
    # man-pages set (benchmarks/results/2026-12-07-hybrid.md): dense weights 0.6 to 0.8 beat
    # dense search and RRF at every depth; 0.5 falls off; 0.7 is the middle.
    hybrid_fusion: Literal["rrf", "weighted"] = "weighted"
    rrf_k: int = Field(default=60, ge=1, le=16384)
    hybrid_dense_weight: float = Field(default=0.7, ge=0.0, le=1.0)
    hybrid_candidates: int = Field(default=20, ge=1, le=1000)
    # The longest query text keyword and hybrid search take (the gateway's questions are shorter).
    max_query_chars: int = Field(default=8000, ge=1)
