"""How a tenant's knowledge bases are named in the store.

A knowledge base's name is a label inside its tenant. The store keys each knowledge base (and
so its documents and tasks) by `<tenant>/<name>`; the default tenant's keep their bare names, so
a store from before tenants existed needs no rewrite: its knowledge bases are the default
tenant's. Names and tenants cannot hold '/', so no name of one tenant is a key of another.

Only the ingestor's gRPC edge turns names into keys and back; below it, everything works on keys.
"""

from __future__ import annotations

from askmesh.runtime.auth import DEFAULT_TENANT


def store_key(tenant: str, name: str) -> str:
    return name if tenant in ("", DEFAULT_TENANT) else f"{tenant}/{name}"


def tenant_of(key: str) -> str:
    tenant, slash, _ = key.partition("/")
    return tenant if slash else DEFAULT_TENANT


def name_of(key: str) -> str:
    return key.rpartition("/")[2]


def belongs_to(key: str, tenant: str) -> bool:
    return tenant_of(key) == (tenant or DEFAULT_TENANT)


def key_range(tenant: str) -> tuple[str, str] | None:
    """The keys of `tenant`'s knowledge bases as a range [low, high) (None for the default
    tenant, whose keys are those without a '/'): '0' is the character after '/'."""
    if tenant in ("", DEFAULT_TENANT):
        return None
    return f"{tenant}/", f"{tenant}0"
