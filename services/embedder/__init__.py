"""Embedder: texts to normalized vectors with a sentence-transformers model."""
