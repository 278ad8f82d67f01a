"""Baselines that askmesh's benchmarks measure beside askmesh.

`chatchat`: a one-process imitation of Langchain-Chatchat's kb_chat flow (FastAPI + LangChain +
Milvus Lite + the same two models in-process, SSE streaming). `client`: an async client for it
and a helper that starts and stops it as a subprocess.
"""
