"""JWT bearer tokens checked against a JWKS file: real RSA, EC and Ed25519 keys from
`cryptography`, tokens signed by PyJWT, then the same through the ingestor's real gRPC server."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from askmesh.runtime.auth import AuthSettings, Caller, Role
from askmesh.runtime.errors import AskmeshError
from askmesh.runtime.jwt_auth import JwtVerifier
from askmesh.runtime.server import ServiceRunner
from askmesh.v1 import knowledge_pb2, knowledge_pb2_grpc
from services.ingestor.main import build as build_ingestor
from tests.conftest import ingestor_settings, start_runner

ISSUER = "https://id.example.com/"
AUDIENCE = "askmesh"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclasses.dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: str
    private: PrivateKey

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, claims: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
        return jwt.encode(claims, self.private, algorithm=self.algorithm, headers={"kid": self.kid, **(headers or {})})


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return SigningKey("rsa-1", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ec_key() -> SigningKey:
    return SigningKey("ec-1", "ES256", ec.generate_private_key(ec.SECP256R1()))


def write_jwks(path: Path, *keys: SigningKey | dict[str, Any]) -> None:
    """Replaces the file as a rotation should: a new file renamed over the old one."""
    entries = [key.jwk() if isinstance(key, SigningKey) else key for key in keys]
    staging = path.with_suffix(".new")
    staging.write_text(json.dumps({"keys": entries}))
    os.replace(staging, path)


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": now,
        "exp": now + 300,
        "tenant": "acme",
        "role": "writer",
    }
    values.update(overrides)
    return {name: value for name, value in values.items() if value is not None}


def settings_for(jwks: Path, **overrides: Any) -> AuthSettings:
    values: dict[str, Any] = {
        "enabled": True,
        "jwks_file": jwks,
        "jwt_issuer": ISSUER,
        "jwt_audience": AUDIENCE,
    }
    values.update(overrides)
    return AuthSettings(**values)


@pytest.fixture
def jwks(tmp_path: Path, rsa_key: SigningKey, ec_key: SigningKey) -> Path:
    path = tmp_path / "jwks.json"
    write_jwks(path, rsa_key, ec_key)
    return path


def refusal(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(AskmeshError) as refused:
        verifier(token)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    return refused.value.message


# -- the verifier on its own -------------------------------------------------------------------


def test_a_valid_token_makes_a_caller_of_its_tenant_and_role(
    jwks: Path, rsa_key: SigningKey, ec_key: SigningKey
) -> None:
    verifier = JwtVerifier(settings_for(jwks))
    assert verifier(rsa_key.sign(claims())) == Caller(tenant="acme", role=Role.WRITER, key_id="jwt:alice")
    by_ec = verifier(ec_key.sign(claims(sub=None, jti="token-7", tenant="globex", role="reader")))
    assert by_ec == Caller(tenant="globex", role=Role.READER, key_id="jwt:token-7", operator=False, internal=False)


def test_ed25519_keys_sign_with_eddsa(tmp_path: Path) -> None:
    key = SigningKey("ed-1", "EdDSA", ed25519.Ed25519PrivateKey.generate())
    write_jwks(tmp_path / "jwks.json", key)
    caller = JwtVerifier(settings_for(tmp_path / "jwks.json"))(key.sign(claims(role="admin")))
    assert caller.role is Role.ADMIN and caller.tenant == "acme"


def test_the_claims_names_are_settings(jwks: Path, rsa_key: SigningKey) -> None:
    verifier = JwtVerifier(settings_for(jwks, jwt_tenant_claim="org", jwt_role_claim="askmesh_role"))
    token = rsa_key.sign(claims(tenant=None, role=None, org="initech", askmesh_role="admin"))
    assert verifier(token) == Caller(tenant="initech", role=Role.ADMIN, key_id="jwt:alice")
    assert "no 'org' claim" in refusal(verifier, rsa_key.sign(claims()))


def test_an_expired_token_is_refused_past_a_small_leeway(jwks: Path, rsa_key: SigningKey) -> None:
    verifier = JwtVerifier(settings_for(jwks))
    now = int(time.time())
    assert refusal(verifier, rsa_key.sign(claims(exp=now - 120))) == "authorization: the token has expired"
    # A few seconds of clock difference are not the caller's fault.
    assert verifier(rsa_key.sign(claims(exp=now - 5))).tenant == "acme"
    assert "not valid yet" in refusal(verifier, rsa_key.sign(claims(nbf=now + 600)))


def test_a_token_needs_an_expiry(jwks: Path, rsa_key: SigningKey) -> None:
    verifier = JwtVerifier(settings_for(jwks))
    assert refusal(verifier, rsa_key.sign(claims(exp=None))) == "authorization: the token has no 'exp' claim"


def test_the_issuer_and_the_audience_must_be_the_configured_ones(jwks: Path, rsa_key: SigningKey) -> None:
    verifier = JwtVerifier(settings_for(jwks))
    assert refusal(verifier, rsa_key.sign(claims(iss="https://evil.example.com/"))) == (
        f"authorization: the token's issuer is not {ISSUER}"
    )
    # 2.10.0's substring match (CVE-2024-53861) would have let this one through.
    assert "issuer is not" in refusal(verifier, rsa_key.sign(claims(iss="https://id.example.com")))
    assert refusal(verifier, rsa_key.sign(claims(aud="another-app"))) == (
        f"authorization: the token's audience is not {AUDIENCE}"
    )
    assert refusal(verifier, rsa_key.sign(claims(aud=None))) == "authorization: the token has no 'aud' claim"
    assert refusal(verifier, rsa_key.sign(claims(iss=None))) == "authorization: the token has no 'iss' claim"
    assert verifier(rsa_key.sign(claims(aud=["another-app", AUDIENCE]))).tenant == "acme"


def test_a_key_the_jwks_file_does_not_hold_is_refused(jwks: Path, rsa_key: SigningKey) -> None:
    verifier = JwtVerifier(settings_for(jwks))
    stranger = SigningKey("rsa-2", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    assert "key (kid) is not one of the JWKS file's keys" in refusal(verifier, stranger.sign(claims()))
    # Someone else's key under a known kid: the signature does not match.
    impostor = SigningKey(rsa_key.kid, "RS256", stranger.private)
    assert refusal(verifier, impostor.sign(claims())) == "authorization: the token's signature does not match its key"
    # A token without a kid: only where the file holds one key is there no doubt which.
    assert "names no key (kid)" in refusal(verifier, jwt.encode(claims(), rsa_key.private, algorithm="RS256"))


def test_a_token_without_a_kid_uses_the_only_key(tmp_path: Path, rsa_key: SigningKey) -> None:
    write_jwks(tmp_path / "jwks.json", rsa_key)
    verifier = JwtVerifier(settings_for(tmp_path / "jwks.json"))
    assert verifier(jwt.encode(claims(), rsa_key.private, algorithm="RS256")).key_id == "jwt:alice"


def _unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part(header)}.{part(payload)}"


def test_alg_none_is_refused(jwks: Path, rsa_key: SigningKey) -> None:
    verifier = JwtVerifier(settings_for(jwks))
    token = jwt.encode(claims(), None, algorithm="none", headers={"kid": rsa_key.kid})
    assert token.endswith(".")  # truly unsigned
    assert "must be signed with RS256" in refusal(verifier, token)
    assert "must be signed with RS256" in refusal(
        verifier, _unsigned({"alg": "none", "kid": rsa_key.kid}, claims()) + "."
    )


def test_hs256_signed_with_the_public_key_is_refused(jwks: Path, rsa_key: SigningKey) -> None:
    """The algorithm-confusion attack: anyone has the public key, and a verifier that let the
    token choose HS256 would check an HMAC with that key as the secret."""
    verifier = JwtVerifier(settings_for(jwks))
    signing_input = _unsigned({"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid}, claims(role="admin"))
    mac = hmac.new(rsa_key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    assert "must be signed with RS256" in refusal(verifier, forged)
    # And where the kid is left out, with a one-key file: the key's algorithm still decides.
    signing_input = _unsigned({"alg": "HS256", "typ": "JWT"}, claims(role="admin"))
    mac = hmac.new(rsa_key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    one_key = jwks.with_name("one.json")
    write_jwks(one_key, rsa_key)
    assert "must be signed with RS256" in refusal(JwtVerifier(settings_for(one_key)), forged)


def test_the_tenant_claim_is_required_and_checked(jwks: Path, rsa_key: SigningKey) -> None:
    verifier = JwtVerifier(settings_for(jwks))
    assert refusal(verifier, rsa_key.sign(claims(tenant=None))) == "authorization: the token has no 'tenant' claim"
    for bad in ("Acme Corp", "../acme", "", 42):
        assert "'tenant' claim is not a tenant" in refusal(verifier, rsa_key.sign(claims(tenant=bad))), bad


def test_the_role_claim_must_be_reader_writer_or_admin(jwks: Path, rsa_key: SigningKey) -> None:
    verifier = JwtVerifier(settings_for(jwks))
    for bad in ("superuser", "", ["admin"], 3):
        message = refusal(verifier, rsa_key.sign(claims(role=bad)))
        assert message == "authorization: the token's 'role' claim must be reader, writer or admin", bad
    assert refusal(verifier, rsa_key.sign(claims(role=None))) == "authorization: the token has no 'role' claim"
    assert "neither a 'sub' nor a 'jti'" in refusal(verifier, rsa_key.sign(claims(sub=None)))


def test_garbage_is_refused_in_one_sentence(jwks: Path) -> None:
    verifier = JwtVerifier(settings_for(jwks))
    for garbage in ("a.b.c", "....", "eyJ.eyJ.sig"):
        assert refusal(verifier, garbage) == "authorization: the token is not a well-formed JWT", garbage


def test_keys_rotate_by_rewriting_the_jwks_file(jwks: Path, rsa_key: SigningKey, ec_key: SigningKey) -> None:
    verifier = JwtVerifier(settings_for(jwks))
    new_key = SigningKey("rsa-2026", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    assert "not one of the JWKS file's keys" in refusal(verifier, new_key.sign(claims()))
    write_jwks(jwks, new_key, ec_key)
    assert verifier(new_key.sign(claims())).tenant == "acme"
    assert "not one of the JWKS file's keys" in refusal(verifier, rsa_key.sign(claims()))
    # A broken file (half written, say) keeps the last good keys rather than locking everyone out.
    staging = jwks.with_suffix(".new")
    staging.write_text('{"keys": [')
    os.replace(staging, jwks)
    assert verifier(new_key.sign(claims())).tenant == "acme"
    jwks.unlink()
    assert verifier(ec_key.sign(claims())).tenant == "acme"


def test_start_up_refuses_a_missing_or_unusable_jwks_file(tmp_path: Path, rsa_key: SigningKey) -> None:
    path = tmp_path / "jwks.json"
    with pytest.raises(SystemExit, match="^cannot read the JWKS file"):
        JwtVerifier(settings_for(path))
    path.write_text("not json")
    with pytest.raises(SystemExit, match="is not JSON$"):
        JwtVerifier(settings_for(path))
    path.write_text('{"keys": []}')
    with pytest.raises(SystemExit, match="holds no signing key$"):
        JwtVerifier(settings_for(path))
    # A shared secret in a file of public keys would let anyone who reads it sign.
    write_jwks(path, rsa_key, {"kty": "oct", "kid": "shared", "k": "c2VjcmV0"})
    with pytest.raises(SystemExit, match="^key 'shared' .* is not a public key"):
        JwtVerifier(settings_for(path))
    write_jwks(path, {**rsa_key.jwk(), "alg": "HS256"})
    with pytest.raises(SystemExit, match="is not a public key"):
        JwtVerifier(settings_for(path))
    write_jwks(path, {"kty": "RSA", "kid": "broken", "n": "AQAB"})
    with pytest.raises(SystemExit, match="^key 'broken' .* is not a valid public key$"):
        JwtVerifier(settings_for(path))


def test_start_up_needs_the_issuer_and_the_audience(jwks: Path) -> None:
    for missing in ({"jwt_issuer": ""}, {"jwt_audience": ""}):
        with pytest.raises(SystemExit, match="ASKMESH_AUTH_JWT_ISSUER and ASKMESH_AUTH_JWT_AUDIENCE"):
            JwtVerifier(settings_for(jwks, **missing))


# -- through the ingestor's real gRPC server ---------------------------------------------------


async def _nothing() -> None:
    return None


@pytest.fixture
async def ingestor(tmp_path: Path, jwks: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ServiceRunner]:
    """The ingestor's servicers in the server every tier runs, with its authentication set as a
    deployment sets it, by environment. Its warm-up (which waits for the embedder and the
    retriever) is left out: the RPCs called here read only its store."""
    (tmp_path / "internal-token").write_text("the-internal-token\n")
    monkeypatch.setenv("ASKMESH_AUTH_ENABLED", "true")
    monkeypatch.setenv("ASKMESH_AUTH_INTERNAL_TOKEN_FILE", str(tmp_path / "internal-token"))
    monkeypatch.setenv("ASKMESH_AUTH_JWKS_FILE", str(jwks))
    monkeypatch.setenv("ASKMESH_AUTH_JWT_ISSUER", ISSUER)
    monkeypatch.setenv("ASKMESH_AUTH_JWT_AUDIENCE", AUDIENCE)
    unreachable = "127.0.0.1:1"
    addresses = {"embedder": unreachable, "retriever": unreachable, "generator": unreachable, "data": str(tmp_path)}
    definition = dataclasses.replace(build_ingestor(ingestor_settings(addresses)), start=_nothing)
    runner = await start_runner(definition)
    yield runner
    await runner.stop()


async def test_a_jwt_reader_may_read_but_not_administer_and_a_bad_jwt_is_unauthenticated(
    ingestor: ServiceRunner, rsa_key: SigningKey
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ingestor.port}") as channel:
        kbs = knowledge_pb2_grpc.KnowledgeBasesStub(channel)

        def bearer(token: str) -> list[tuple[str, str]]:
            return [("authorization", f"Bearer {token}")]

        reader = bearer(rsa_key.sign(claims(role="reader")))
        listed = await kbs.ListKnowledgeBases(knowledge_pb2.ListKnowledgeBasesRequest(), metadata=reader)
        assert list(listed.knowledge_bases) == []

        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await kbs.CreateKnowledgeBase(knowledge_pb2.CreateKnowledgeBaseRequest(name="docs"), metadata=reader)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert denied.value.details() == "this RPC needs the role admin; the key has the role reader"

        expired = bearer(rsa_key.sign(claims(role="admin", exp=int(time.time()) - 600)))
        stranger = SigningKey(rsa_key.kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))
        for metadata, details in (
            (expired, "authorization: the token has expired"),
            (
                bearer(stranger.sign(claims(role="admin"))),
                "authorization: the token's signature does not match its key",
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await kbs.ListKnowledgeBases(knowledge_pb2.ListKnowledgeBasesRequest(), metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert refused.value.details() == details
