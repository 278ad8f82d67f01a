"""The optional answer cache: a repeated question on an unchanged knowledge base is answered
from the cache, still streaming sources, then text, then done.

The key covers everything an answer depends on: the knowledge base's collection generation and
its visibility epoch (both move with any document change or rebuild, so a change invalidates
every cached answer of that knowledge base without a sweep), and the whole request (question,
top_k, threshold, filters, history, generation parameters).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections import OrderedDict
from typing import Protocol

from askmesh.v1 import gateway_pb2


def cache_key(knowledge_base: str, generation: int, epoch: int, request: gateway_pb2.AskRequest) -> str:
    normalized = gateway_pb2.AskRequest()
    normalized.CopyFrom(request)
    normalized.knowledge_base = knowledge_base
    digest = hashlib.sha256(normalized.SerializeToString(deterministic=True)).hexdigest()
    return f"askmesh:answer:{knowledge_base}:{generation}:{epoch}:{digest}"


def encode(messages: list[gateway_pb2.AskResponse]) -> bytes:
    return json.dumps([base64.b64encode(m.SerializeToString()).decode() for m in messages]).encode()


def decode(blob: bytes) -> list[gateway_pb2.AskResponse]:
    return [gateway_pb2.AskResponse.FromString(base64.b64decode(item)) for item in json.loads(blob)]


class AnswerCache(Protocol):
    async def get(self, key: str) -> list[gateway_pb2.AskResponse] | None: ...

    async def put(self, key: str, messages: list[gateway_pb2.AskResponse]) -> None: ...

    async def close(self) -> None: ...


class MemoryAnswerCache:
    """In this process, least recently used first out, entries expire after `ttl_s`."""

    def __init__(self, max_entries: int, ttl_s: float) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: str) -> list[gateway_pb2.AskResponse] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        stored_at, blob = entry
        if time.monotonic() - stored_at > self.ttl_s:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return decode(blob)

    async def put(self, key: str, messages: list[gateway_pb2.AskResponse]) -> None:
        self._entries[key] = (time.monotonic(), encode(messages))
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def close(self) -> None:
        self._entries.clear()


class RedisAnswerCache:
    """Shared by every gateway replica; Redis expires entries after `ttl_s`."""

    def __init__(self, url: str, ttl_s: float) -> None:
        import redis.asyncio as redis

        self._redis = redis.from_url(url)
        self.ttl_s = ttl_s

    async def get(self, key: str) -> list[gateway_pb2.AskResponse] | None:
        blob = await self._redis.get(key)
        return decode(blob) if blob is not None else None

    async def put(self, key: str, messages: list[gateway_pb2.AskResponse]) -> None:
        await self._redis.set(key, encode(messages), ex=max(int(self.ttl_s), 1))

    async def close(self) -> None:
        await self._redis.aclose()
