"""JWT bearer tokens from an identity provider, checked against the public keys of a JWKS file.

A token is accepted when it is signed by one of the file's keys with that key's (asymmetric)
algorithm, has not expired, and names the configured issuer and audience; its tenant and role
claims then make the caller, as an API key's stored tenant and role do.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from askmesh.runtime.auth import AuthSettings, Caller, Role, check_tenant
from askmesh.runtime.errors import InvalidArgument, Unauthenticated

log = logging.getLogger("askmesh.auth")

# Only public-key signatures: a JWKS file holds what anyone may read, so a symmetric (HS*) key
# in it would let anyone sign, and `none` is no signature at all.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "ES256K", "EdDSA"}
)
# Clocks of the identity provider and of this machine are never quite the same.
LEEWAY_S = 30.0


class JwksError(Exception):
    """The JWKS file cannot be used; the message is one sentence naming why."""


@dataclass(frozen=True)
class _KeySet:
    by_kid: dict[str, jwt.PyJWK]
    keys: tuple[jwt.PyJWK, ...]


# (device, inode, mtime, size): a file replaced by a rename (as Kubernetes updates a mounted
# Secret) gets a new inode even when its time and size look the same.
_Stamp = tuple[int, int, int, int]


def _stamp(path: Path) -> _Stamp:
    status = os.stat(path)
    return (status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size)


def load_jwks(path: Path) -> _KeySet:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise JwksError(f"cannot read the JWKS file {path}: {error.strerror}") from None
    try:
        document: Any = json.loads(text)
    except ValueError:
        raise JwksError(f"the JWKS file {path} is not JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise JwksError(f"the JWKS file {path} must be a JSON object with a 'keys' list")
    keys: list[jwt.PyJWK] = []
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise JwksError(f"key {number} of the JWKS file {path} is not a JSON object")
        if entry.get("use", "sig") != "sig":
            continue  # an encryption key: never a signing one
        name = f"key '{entry['kid']}'" if isinstance(entry.get("kid"), str) else f"key {number}"
        if entry.get("kty") == "oct" or entry.get("alg", "") not in ("", *ASYMMETRIC_ALGORITHMS):
            raise JwksError(f"{name} of the JWKS file {path} is not a public key of RS*, PS*, ES* or EdDSA")
        try:
            key = jwt.PyJWK.from_dict(entry)
        except jwt.PyJWTError:
            raise JwksError(f"{name} of the JWKS file {path} is not a valid public key") from None
        if key.algorithm_name not in ASYMMETRIC_ALGORITHMS:
            raise JwksError(f"{name} of the JWKS file {path} is not a public key of RS*, PS*, ES* or EdDSA")
        keys.append(key)
    if not keys:
        raise JwksError(f"the JWKS file {path} holds no signing key")
    by_kid = {key.key_id: key for key in keys if key.key_id}
    return _KeySet(by_kid=by_kid, keys=tuple(keys))


class JwtVerifier:
    """Tells the caller of a JWT (a JwtCheck), or raises UNAUTHENTICATED."""

    def __init__(self, settings: AuthSettings) -> None:
        if settings.jwks_file is None:
            raise SystemExit("JWT authentication needs a JWKS file: set ASKMESH_AUTH_JWKS_FILE")
        if not settings.jwt_issuer or not settings.jwt_audience:
            # Without them a token that some other application of the same identity provider
            # was given would be good here too.
            raise SystemExit(
                "JWT authentication needs the issuer and the audience its tokens must name: "
                "set ASKMESH_AUTH_JWT_ISSUER and ASKMESH_AUTH_JWT_AUDIENCE"
            )
        self._path = settings.jwks_file
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._tenant_claim = settings.jwt_tenant_claim
        self._role_claim = settings.jwt_role_claim
        try:
            self._stamp: _Stamp | None = _stamp(self._path)
            self._keys = load_jwks(self._path)
        except OSError as error:
            raise SystemExit(f"cannot read the JWKS file {self._path}: {error.strerror}") from None
        except JwksError as error:
            raise SystemExit(str(error)) from None

    def _current_keys(self) -> _KeySet:
        """The file's keys, read again when it has changed: identity providers rotate their
        signing keys, and tokens signed by a new key must work (and an old key's stop) without
        restarting every tier. One stat per call is all it costs while nothing changes."""
        try:
            stamp = _stamp(self._path)
        except OSError as error:
            if self._stamp is not None:  # said once, not on every call
                log.warning(
                    "[AUTH] cannot read the JWKS file %s (%s); keeping its last keys", self._path, error.strerror
                )
                self._stamp = None
            return self._keys
        if stamp != self._stamp:
            # Recorded before reading, so that a bad file is reported once, not on every call.
            self._stamp = stamp
            try:
                self._keys = load_jwks(self._path)
                log.info("[AUTH] read %d keys from the JWKS file %s", len(self._keys.keys), self._path)
            except JwksError as error:
                log.warning("[AUTH] %s; keeping its last keys", error)
        return self._keys

    def _key_for(self, token: str) -> jwt.PyJWK:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("authorization: the token is not a well-formed JWT") from None
        keys = self._current_keys()
        kid = header.get("kid")
        if kid is None:
            if len(keys.keys) != 1:
                raise Unauthenticated("authorization: the token names no key (kid) and the JWKS file holds several")
            key = keys.keys[0]
        else:
            found = keys.by_kid.get(kid) if isinstance(kid, str) else None
            if found is None:
                raise Unauthenticated("authorization: the token's key (kid) is not one of the JWKS file's keys")
            key = found
        if header.get("alg") != key.algorithm_name:
            raise Unauthenticated(f"authorization: the token must be signed with {key.algorithm_name}, as its key says")
        return key

    def _claims(self, token: str, key: jwt.PyJWK) -> dict[str, Any]:
        try:
            # The algorithm is the key's, never the token's own choice.
            return jwt.decode(
                token,
                key,
                algorithms=[key.algorithm_name],
                issuer=self._issuer,
                audience=self._audience,
                leeway=LEEWAY_S,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("authorization: the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated(
                "authorization: the token is not valid yet (its nbf or iat is in the future)"
            ) from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(f"authorization: the token's issuer is not {self._issuer}") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(f"authorization: the token's audience is not {self._audience}") from None
        except jwt.MissingRequiredClaimError as error:
            raise Unauthenticated(f"authorization: the token has no '{error.claim}' claim") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("authorization: the token's signature does not match its key") from None
        except jwt.PyJWTError:
            raise Unauthenticated(
                "authorization: the token is not a valid JWT (malformed or with malformed claims)"
            ) from None

    def __call__(self, token: str) -> Caller:
        claims = self._claims(token, self._key_for(token))
        tenant = claims.get(self._tenant_claim)
        if tenant is None:
            raise Unauthenticated(f"authorization: the token has no '{self._tenant_claim}' claim")
        try:
            check_tenant(tenant if isinstance(tenant, str) else "", self._tenant_claim)
        except InvalidArgument:
            raise Unauthenticated(
                f"authorization: the token's '{self._tenant_claim}' claim is not a tenant "
                "(1-63 characters of a-z, 0-9, '_' and '-')"
            ) from None
        role = claims.get(self._role_claim)
        if role is None:
            raise Unauthenticated(f"authorization: the token has no '{self._role_claim}' claim")
        try:
            parsed = Role.parse(role) if isinstance(role, str) else None
        except ValueError:
            parsed = None
        if parsed is None:
            raise Unauthenticated(
                f"authorization: the token's '{self._role_claim}' claim must be reader, writer or admin"
            )
        subject = claims.get("sub") or claims.get("jti")
        if not subject:
            # The caller's id is what the rate limit counts and logs show.
            raise Unauthenticated("authorization: the token has neither a 'sub' nor a 'jti' claim")
        return Caller(tenant=tenant, role=parsed, key_id=f"jwt:{subject}", operator=False)
