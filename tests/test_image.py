"""The image, built and run for real: podman builds the Dockerfile on a base made from Debian's
packages (tools/image.py: no registry of base images is reachable here), then the local mesh runs
with every tier's replica in a container of that image (Envoy, as in local mode, on the host) and
answers a question through its front door.

Skipped where podman, runc or mmdebstrap is missing, or where the build's inputs are not on this
machine: the CPU torch wheel in pip's find-links folders and the llama-cpp-python wheel `make
install` built and pip cached (without it the build compiles llama.cpp for ~9 minutes).
podman keeps the layers: a second build redoes only what changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from askmesh import client, tiers
from askmesh.mesh import LocalMesh, MeshLayout
from askmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import REPO_ROOT
from tools import image as image_tools

# A cold build (no cached layers) takes 10-12 minutes on 2 cores, a warm one about 2; the
# fixture that builds runs under whichever test comes first.
pytestmark = [pytest.mark.mesh, pytest.mark.timeout(2400)]

TAG = "localhost/askmesh:test"
IMAGE_UID = 10001


def _why_not_buildable() -> str | None:
    if missing := image_tools.missing_tools():
        return f"{', '.join(missing)} not installed"
    try:
        inputs = image_tools.BuildInputs.find()
    except image_tools.ImageError as error:
        return str(error)
    if inputs.llama_wheel is None:
        return "no llama-cpp-python wheel in pip's cache: the build would compile it for ~9 minutes"
    return None


@pytest.fixture(scope="module")
def image() -> str:
    if reason := _why_not_buildable():
        pytest.skip(reason)
    image_tools.build(TAG, say=lambda _: None)
    return TAG


def podman(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(image_tools.podman_command(*args), capture_output=True, text=True, check=True)


def test_the_image_runs_a_tier_as_10001_offline_without_compilers(image: str) -> None:
    config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["Entrypoint"] == ["askmesh", "serve"] and config["Cmd"] == ["gateway"]
    assert "HF_HUB_OFFLINE=1" in config["Env"]
    # The compilers stayed in the builder stage; the models are inside.
    probe = subprocess.run(
        image_tools.podman_command(
            "run", "--rm", "--network=none", *image_tools.ulimit_options(), "--entrypoint=sh", image, "-c",
            "id -u; command -v gcc cmake || echo no-compilers; "
            "python -c 'from services.embedder.config import bundled_model_path as e; "
            "from services.generator.config import bundled_model_path as g; "
            "print(\"models\" if e().is_dir() and g().is_file() else \"no-models\")'",
        ),
        capture_output=True, text=True, timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == [str(IMAGE_UID), "no-compilers", "models"], probe.stdout


@dataclass
class ContainerMesh:
    mesh: LocalMesh
    replicas: image_tools.ContainerReplicas


@pytest.fixture(scope="module")
def container_mesh(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerMesh]:
    data_dir = tmp_path_factory.mktemp("image-mesh")
    layout = MeshLayout.on_free_ports(data_dir, auth=True)
    replicas = image_tools.ContainerReplicas(image, data_dir, f"test-{uuid.uuid4().hex[:12]}")
    mesh = LocalMesh(layout, say=lambda _: None, samples_dir=REPO_ROOT / "samples", replica_command=replicas)
    # The containers run as 10001, like a pod's user: they read the secrets the mesh makes (as a
    # pod reads its mounted Secrets) and write Milvus Lite's and SQLite's files in the folder.
    mesh.make_secrets()
    for path in [data_dir, *data_dir.rglob("*")]:
        os.chown(path, IMAGE_UID, IMAGE_UID)
    try:
        with mesh:
            yield ContainerMesh(mesh, replicas)
    finally:
        replicas.remove_all()
    assert not replicas.containers(), "a replica's container was left behind"


def _process_uid(pid: int) -> int:
    uid_line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:"))
    return int(uid_line.split()[1])


def test_a_mesh_of_containers_answers_through_envoy(container_mesh: ContainerMesh) -> None:
    mesh = container_mesh.mesh
    # Each replica is a container of the image, its tier's process running as 10001, and each
    # answers grpc.health.v1 SERVING for its own service (the model tiers once loaded and warm).
    containers = json.loads(podman("inspect", *container_mesh.replicas.containers()).stdout)
    assert sorted(c["Config"]["Cmd"][-1] for c in containers) == sorted(tiers.ALL_NAMES)
    assert {c["ImageName"] for c in containers} == {TAG}
    assert {_process_uid(c["State"]["Pid"]) for c in containers} == {IMAGE_UID}
    for spec in tiers.TIERS:
        (replica,) = mesh.replicas[spec.name]
        assert replica.address is not None
        with grpc.insecure_channel(replica.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=spec.health_service), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, spec.name
    (web,) = mesh.replicas[tiers.WEB.name]  # the HTTP tier: its own readiness check
    with urllib.request.urlopen(f"http://{web.address}{tiers.WEB.health_path}", timeout=5) as answer:
        assert answer.status == 200

    # The samples went in through the ingestor's container; a question comes back through the
    # gateway's, which called the embedder's, the retriever's and the generator's.
    assert mesh.samples_loaded is not None and mesh.samples_loaded.chunk_count > 0
    request = gateway_pb2.AskRequest(
        question="How many days per year may I work from another country?",
        parameters=common_pb2.GenerationParameters(max_new_tokens=16, temperature=0),
    )
    with client.connect(mesh.layout.front_address, mesh.admin_key) as channel:
        messages = list(gateway_pb2_grpc.GatewayStub(channel).Ask(request, timeout=180))
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds[0] == "sources" and kinds[-1] == "done" and set(kinds[1:-1]) == {"delta"}, kinds
    assert messages[0].sources.citations[0].document_id == "remote-work-policy"
    assert "".join(m.delta.text for m in messages if m.HasField("delta")).strip()
    assert messages[-1].done.usage.completion_tokens > 0
