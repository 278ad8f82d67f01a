"""The store's API keys, in SQL shared by SQLite and PostgreSQL."""

from __future__ import annotations

import time
from dataclasses import replace

from services.ingestor.sql_base import Row, SqlBase
from services.ingestor.store import ApiKeyRecord, NotFoundError

_COLUMNS = "id, key_hash, tenant, role, description, created_at, revoked_at"


def _key_from_row(row: Row) -> ApiKeyRecord:
    return ApiKeyRecord(
        id=row["id"], key_hash=row["key_hash"], tenant=row["tenant"], role=row["role"],
        description=row["description"], created_at=float(row["created_at"]), revoked_at=float(row["revoked_at"]),
    )


class KeySql(SqlBase):
    def create_api_key(self, record: ApiKeyRecord) -> ApiKeyRecord:
        stored = record if record.created_at else replace(record, created_at=time.time())
        with self._write() as tx:
            tx.execute(
                f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (stored.id, stored.key_hash, stored.tenant, stored.role, stored.description, stored.created_at, stored.revoked_at),
            )
        return stored

    def find_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        row = self._one(f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = ? AND revoked_at = 0", (key_hash,))
        return _key_from_row(row) if row is not None else None

    def list_api_keys(self, tenant: str | None, include_revoked: bool = False) -> list[ApiKeyRecord]:
        where = ["1 = 1"]
        params: list[object] = []
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)
        if not include_revoked:
            where.append("revoked_at = 0")
        rows = self._all(f"SELECT {_COLUMNS} FROM api_keys WHERE {' AND '.join(where)} ORDER BY created_at, id", params)
        return [_key_from_row(row) for row in rows]

    def revoke_api_key(self, key_id: str, tenant: str | None) -> ApiKeyRecord:
        with self._write() as tx:
            row = tx.one(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))
            if row is None or (tenant is not None and row["tenant"] != tenant):
                raise NotFoundError(f"API key {key_id!r} not found")
            if float(row["revoked_at"]) == 0:
                tx.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (time.time(), key_id))
            row = tx.one(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))
        assert row is not None
        return _key_from_row(row)
