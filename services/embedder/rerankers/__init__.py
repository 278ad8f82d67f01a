"""Reranking backends behind one interface (see base.py), each imported only when configured."""

from __future__ import annotations

from services.embedder.config import EmbedderSettings
from services.embedder.rerankers.base import RerankBackend


def create_reranker(settings: EmbedderSettings) -> RerankBackend | None:
    """The configured reranker, not yet started; None when none is configured."""
    if settings.reranker == "cross-encoder":
        from services.embedder.rerankers.cross_encoder import CrossEncoderReranker

        return CrossEncoderReranker(settings)
    if settings.reranker == "tei":
        from services.embedder.rerankers.tei import TeiReranker

        return TeiReranker(settings)
    return None
