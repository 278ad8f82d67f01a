"""Retriever: stores and searches chunks in Milvus (Milvus Lite embedded by default)."""
