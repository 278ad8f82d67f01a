"""The real local mesh with TLS on its front door, as `askmesh up --tls-cert-file ... --tls-key-file
...` runs it: the CLI with --tls-ca calls the public API through it, a plaintext client cannot,
and the tiers keep calling one another over the plaintext internal listener."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from askmesh import client
from askmesh.mesh import LocalMesh, MeshLayout
from tests.fakes.certs import make_certificates

pytestmark = pytest.mark.mesh
ASKMESH = str(Path(sys.executable).parent / "askmesh")


def test_the_mesh_serves_its_public_api_over_tls_only(tmp_path: Path) -> None:
    certificates = make_certificates(tmp_path / "tls")
    layout = MeshLayout.on_free_ports(
        tmp_path / "mesh", auth=True, tls_cert_file=certificates.cert_file, tls_key_file=certificates.key_file
    )
    front = f"localhost:{layout.front_port}"  # the certificate's name
    with LocalMesh(layout, say=lambda _: None) as mesh:
        cli = [ASKMESH, "--data-dir", str(layout.data_dir)]
        plain_env = {k: v for k, v in os.environ.items() if k != "ASKMESH_TLS_CA"}
        created = subprocess.run(
            [*cli, "--tls-ca", str(certificates.ca_file), "kb", "create", "over-tls", "--address", front],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        # KnowledgeBases/CreateKnowledgeBase: the front door, then the ingestor, which calls the
        # embedder through the internal listener.
        assert created.returncode == 0, created.stderr
        listed = subprocess.run(
            [*cli, "kb", "list", "--address", front],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            env={**plain_env, "ASKMESH_TLS_CA": str(certificates.ca_file), "COLUMNS": "200"},
        )
        assert listed.returncode == 0 and "over-tls" in listed.stdout, listed.stderr
        plaintext = subprocess.run(
            [*cli, "kb", "list", "--address", front],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            env=plain_env,
        )
        assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr, plaintext.stderr
        with client.connect(front, tls_ca=certificates.ca_file) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(layout.internal_address) as channel:  # the tiers' listener: plaintext
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="askmesh.v1.Embedder"),
                timeout=10,
                metadata=[("askmesh-health-service", "askmesh.v1.Embedder")],
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert mesh.envoy_hosts()["gateway"]  # the admin API, read on 127.0.0.1
