"""Dense, keyword and hybrid search: what each mode asks of Milvus, without a connection.

Keyword search is Milvus's own BM25: a collection's `text` field is analyzed (Milvus's standard
tokenizer, lowercased, English stop words dropped) and a BM25 function fills a sparse vector
field from it on every insert, so the retriever never tokenizes anything itself. A query is sent
as text, analyzed the same way, and scored by Milvus.

Hybrid search is one Milvus `hybrid_search`: a dense request and a BM25 request, each with the
same filter expression (metadata filters and version pins), fused by Milvus's RRFRanker or
WeightedRanker. Each half fetches `hybrid_candidates` chunks (at least top_k), so a chunk both
halves rank well can beat one that only one half ranks first.

Found on Milvus Lite 3.2.2, a Python reimplementation of Milvus (checked by
tests/test_retriever_modes.py where it matters):
- BM25 distances come back negative (the negated score, best first); Milvus servers return
  them positive. BM25 scores are never negative, so the score is the distance's magnitude.
- A range search's `radius` is honoured by a plain dense search but ignored inside
  `hybrid_search`, which is one reason a score threshold is refused with KEYWORD and HYBRID.
- Its standard tokenizer is `\w+`, lowercased. Of the analyzer filters it applies only `stop`
  with an explicit list (`_english_` is read as one word); stemmers and unknown filters are
  accepted and ignored, and the `english` analyzer type is refused.
- Its BM25 walks posting lists in Python: a search costs about the summed document frequency of
  the query's words, which stop words dominate (benchmarks/results/*-hybrid.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pymilvus import AnnSearchRequest, DataType, Function, FunctionType, RRFRanker, WeightedRanker
from pymilvus.milvus_client.index import IndexParams

from askmesh.runtime.errors import FailedPrecondition, shown
from askmesh.v1 import common_pb2
from services.retriever.config import RetrieverSettings

DENSE = common_pb2.SEARCH_MODE_DENSE
KEYWORD = common_pb2.SEARCH_MODE_KEYWORD
HYBRID = common_pb2.SEARCH_MODE_HYBRID

DENSE_FIELD = "vector"
TEXT_FIELD = "text"
SPARSE_FIELD = "sparse"
BM25_FUNCTION = "text_bm25"

# Lucene's English stop words, which Milvus calls `_english_`, spelled out because Milvus Lite
# takes only an explicit list. In nearly every chunk and every question, they tell nothing apart
# and were most of a keyword search's cost: at 10k chunks they made it 2.4x slower.
ENGLISH_STOP_WORDS = (
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no", "not",
    "of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this", "to", "was",
    "will", "with",
)
# What Milvus servers read too: their standard tokenizer needs `lowercase` said.
ANALYZER_PARAMS = {"tokenizer": "standard", "filter": ["lowercase", {"type": "stop", "stop_words": list(ENGLISH_STOP_WORDS)}]}


@dataclass(frozen=True)
class ModePlan:
    """The mode a search runs in, and what to tell the caller when it is not the one asked."""

    mode: int
    notice: str = ""


def plan_mode(requested: int, knowledge_base: str, keyword_index: bool) -> ModePlan:
    """UNSPECIFIED is DENSE (a knowledge base's own default is resolved by the gateway). A
    collection made before keyword search has no BM25 index: HYBRID falls back to DENSE and
    says so, KEYWORD is FAILED_PRECONDITION; both name the knowledge base and the cure."""
    mode = requested or DENSE
    if mode == DENSE or keyword_index:
        return ModePlan(mode)
    cure = "rebuild it (askmesh kb rebuild) to add keyword search"
    if mode == KEYWORD:
        raise FailedPrecondition(
            f"search_mode: knowledge base {shown(knowledge_base)} was built before keyword search and has no keyword index; {cure}"
        )
    return ModePlan(
        DENSE,
        f"knowledge base {shown(knowledge_base)} was built before keyword search, so it was searched by meaning only (dense); {cure}",
    )


def add_keyword_index(schema: Any, index_params: IndexParams) -> None:
    """The BM25 sparse field Milvus fills from `text`, and its index (on a schema whose `text`
    field was added with enable_analyzer=True)."""
    schema.add_field(SPARSE_FIELD, DataType.SPARSE_FLOAT_VECTOR)
    schema.add_function(
        Function(
            name=BM25_FUNCTION,
            function_type=FunctionType.BM25,
            input_field_names=[TEXT_FIELD],
            output_field_names=[SPARSE_FIELD],
        )
    )
    index_params.add_index(field_name=SPARSE_FIELD, index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")


def has_keyword_index(description: dict[str, Any]) -> bool:
    """Whether a described collection has the BM25 sparse field (it was made since keyword search)."""
    return any(f["name"] == SPARSE_FIELD for f in description["fields"]) and any(
        f.get("name") == BM25_FUNCTION for f in description.get("functions") or ()
    )


def dense_params(settings: RetrieverSettings, limit: int) -> dict[str, Any]:
    return {"metric_type": "COSINE", "params": {"ef": max(settings.hnsw_ef_search, limit)}}


KEYWORD_PARAMS: dict[str, Any] = {"metric_type": "BM25"}


def keyword_score(distance: float) -> float:
    """A BM25 score from Milvus's distance: Milvus Lite negates it, servers do not."""
    return abs(distance)


def hybrid_candidates(settings: RetrieverSettings, top_k: int) -> int:
    return max(top_k, settings.hybrid_candidates)


def ranker(settings: RetrieverSettings) -> RRFRanker | WeightedRanker:
    if settings.hybrid_fusion == "weighted":
        return WeightedRanker(settings.hybrid_dense_weight, 1.0 - settings.hybrid_dense_weight)
    return RRFRanker(settings.rrf_k)


def hybrid_requests(
    settings: RetrieverSettings, vector: list[float], query_text: str, expression: str, top_k: int
) -> list[AnnSearchRequest]:
    """The two halves of a hybrid search, each filtered by the same expression."""
    limit = hybrid_candidates(settings, top_k)
    return [
        AnnSearchRequest(data=[vector], anns_field=DENSE_FIELD, param=dense_params(settings, limit), limit=limit, expr=expression),
        AnnSearchRequest(data=[query_text], anns_field=SPARSE_FIELD, param=KEYWORD_PARAMS, limit=limit, expr=expression),
    ]


def create_text_field(schema: Any, max_length: int) -> None:
    """The chunk's text, analyzed for BM25."""
    schema.add_field(TEXT_FIELD, DataType.VARCHAR, max_length=max_length, enable_analyzer=True, analyzer_params=ANALYZER_PARAMS)

