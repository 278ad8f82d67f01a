"""A real Envoy serving TLS on its front door, in front of a small gRPC upstream: a client that
trusts the CA gets an answer, a plaintext one does not, and the admin port answers on loopback
only while the front door serves every interface."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from askmesh import cli, client, envoy
from askmesh.mesh import LocalMesh, MeshError, MeshLayout, Process, free_ports
from tests.fakes.certs import CertificateFiles, make_certificates

SERVICE = "askmesh.v1.Gateway"


@dataclass
class TlsFrontDoor:
    certificates: CertificateFiles
    front_port: int
    admin_port: int
    envoy: subprocess.Popen[bytes]
    log_path: Path

    @property
    def address(self) -> str:
        return f"localhost:{self.front_port}"  # the name the certificate is for


def check(channel: grpc.Channel, timeout_s: float = 2.0) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout_s)
    return int(reply.status)


def tls_channel(front: TlsFrontDoor) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=front.certificates.ca_file.read_bytes())
    return grpc.secure_channel(front.address, credentials)


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsFrontDoor]:
    folder = tmp_path_factory.mktemp("front-tls")
    certificates = make_certificates(folder / "tls")
    # The upstream: a gRPC server that answers health checks only, as a gateway replica would.
    upstream = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_servicer = health.HealthServicer()
    health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, upstream)
    upstream_port = upstream.add_insecure_port("127.0.0.1:0")
    upstream.start()

    front_port, admin_port = free_ports(2)
    layout = envoy.EnvoyLayout(
        front=[envoy.Tier("gateway", SERVICE, [f"127.0.0.1:{upstream_port}"], [SERVICE])],
        internal=[],
        host="0.0.0.0",  # every interface, as a public front door would: the admin must not follow
        front_port=front_port,
        admin_port=admin_port,
        endpoints_dir=folder / "endpoints",
        health_check_interval_s=0.2,
        tls_cert_file=certificates.cert_file,
        tls_key_file=certificates.key_file,
    )
    config = envoy.write_config(layout, folder / "envoy.yaml")
    log_path = folder / "envoy.log"
    process = subprocess.Popen(
        envoy.envoy_command(config, log_path), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    door = TlsFrontDoor(certificates, front_port, admin_port, process, log_path)
    try:
        give_up_at = time.monotonic() + 30
        with tls_channel(door) as channel:
            while True:  # until Envoy listens and finds the upstream healthy
                try:
                    if check(channel, timeout_s=1) == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert process.poll() is None, f"Envoy exited; see {log_path}"
                assert time.monotonic() < give_up_at, f"Envoy's TLS front door did not answer; see {log_path}"
                time.sleep(0.1)
        yield door
    finally:
        process.terminate()
        process.wait(timeout=10)
        upstream.stop(grace=None)


def test_a_client_that_trusts_the_ca_gets_an_answer_over_tls(front: TlsFrontDoor) -> None:
    with tls_channel(front) as channel:
        assert check(channel) == health_pb2.HealthCheckResponse.SERVING
    # The CLI's own channel (askmesh --tls-ca FILE).
    with client.connect(front.address, tls_ca=front.certificates.ca_file) as channel:
        assert check(channel) == health_pb2.HealthCheckResponse.SERVING


def test_a_plaintext_client_is_refused(front: TlsFrontDoor) -> None:
    with grpc.insecure_channel(front.address) as channel, pytest.raises(grpc.RpcError) as refused:
        check(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_ca_is_refused(front: TlsFrontDoor, tmp_path: Path) -> None:
    stranger = make_certificates(tmp_path / "other")  # another CA, which did not sign the front door's
    with client.connect(front.address, tls_ca=stranger.ca_file) as channel, pytest.raises(grpc.RpcError) as refused:
        check(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def answers_http(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/ready", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def accepts_tcp(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def other_addresses() -> list[str]:
    """Addresses of this machine that are not 127.0.0.1: another loopback address (Linux routes
    all of 127/8 to lo) and the address of the default route's interface, where there is one."""
    addresses = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET: picks the outgoing interface, sends nothing
            addresses.append(str(probe.getsockname()[0]))
        except OSError:
            pass
    return ["127.0.0.2", *(a for a in addresses if not a.startswith("127."))]


def test_the_admin_port_answers_on_loopback_only(front: TlsFrontDoor) -> None:
    assert answers_http("127.0.0.1", front.admin_port)
    checked = 0
    for address in other_addresses():
        if not accepts_tcp(address, front.front_port):
            continue  # not an address of this machine that the front door's 0.0.0.0 reaches
        assert not accepts_tcp(address, front.admin_port), f"the admin port answers on {address}"
        checked += 1
    if not checked:
        pytest.skip("no address of this machine other than 127.0.0.1 to try the admin port on")


def test_the_mesh_waits_for_a_tls_front_door_by_its_handshake(front: TlsFrontDoor, tmp_path: Path) -> None:
    layout = MeshLayout(
        data_dir=tmp_path,
        front_port=front.front_port,
        tls_cert_file=front.certificates.cert_file,
        tls_key_file=front.certificates.key_file,
    )
    mesh = LocalMesh(layout, say=lambda _: None)
    mesh.envoy = Process("envoy", front.envoy, front.log_path)  # type: ignore[arg-type]
    mesh._wait_front_door(time.monotonic() + 10)  # returns once the handshake negotiates h2


def test_tls_with_only_one_of_its_files_fails_in_one_sentence(tmp_path: Path) -> None:
    certificates = make_certificates(tmp_path / "tls")
    with pytest.raises(MeshError) as only_cert:
        MeshLayout(data_dir=tmp_path, tls_cert_file=certificates.cert_file).check_tls()
    assert str(only_cert.value) == (
        "TLS on the front door needs a certificate and a key, but only the certificate file is set: "
        "set --tls-key-file (ASKMESH_MESH_TLS_KEY_FILE) too, or neither for plaintext"
    )
    with pytest.raises(MeshError, match="only the key file is set: set --tls-cert-file"):
        MeshLayout(data_dir=tmp_path, tls_key_file=certificates.key_file).check_tls()
    with pytest.raises(MeshError, match="cannot be read"):
        MeshLayout(
            data_dir=tmp_path, tls_cert_file=tmp_path / "missing.pem", tls_key_file=certificates.key_file
        ).check_tls()
    MeshLayout(data_dir=tmp_path, tls_cert_file=certificates.cert_file, tls_key_file=certificates.key_file).check_tls()
    MeshLayout(data_dir=tmp_path).check_tls()  # plaintext


def test_up_reads_the_tls_files_from_its_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from askmesh.mesh import MeshSettings

    monkeypatch.setenv("ASKMESH_MESH_TLS_CERT_FILE", str(tmp_path / "cert.pem"))
    monkeypatch.delenv("ASKMESH_MESH_TLS_KEY_FILE", raising=False)
    settings = MeshSettings()
    assert settings.tls_cert_file == tmp_path / "cert.pem" and settings.tls_key_file is None


def test_the_cli_names_a_tls_ca_file_it_cannot_use(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("hello")
    runner = CliRunner()
    for path, says in ((tmp_path / "missing.pem", "cannot read"), (not_pem, "holds no PEM certificate")):
        result = runner.invoke(cli.app, ["--tls-ca", str(path), "kb", "list", "--address", "127.0.0.1:1"])
        assert result.exit_code == 2, result.output
        assert "error: --tls-ca:" in result.output and says in result.output


def test_askmesh_up_with_only_a_certificate_stops_in_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certificates = make_certificates(tmp_path / "tls")
    monkeypatch.setenv("ASKMESH_MESH_TLS_CERT_FILE", str(certificates.cert_file))
    monkeypatch.delenv("ASKMESH_MESH_TLS_KEY_FILE", raising=False)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:  # `up` installs its own signal handlers
        result = CliRunner().invoke(cli.app, ["up", "--data-dir", str(tmp_path / "mesh")])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert result.exit_code == 1, result.output
    failures = [line for line in result.stderr.splitlines() if line.strip()]
    sentence = (
        "askmesh up failed: TLS on the front door needs a certificate and a key, but only the certificate file is "
        "set: set --tls-key-file (ASKMESH_MESH_TLS_KEY_FILE) too, or neither for plaintext"
    )
    assert failures == [sentence], result.stderr
