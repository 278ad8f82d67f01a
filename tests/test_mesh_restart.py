"""The start-up that bricked every later `make run`: a mesh that loses power (kill -9 of every
process) while it loads the sample documents starts again on the same data and answers.

The first mesh's ingestor dies at a crash point in the middle of writing a sample document (a
batch of its chunks stored, the version pending), so the interruption falls where it once left a
document "being written" for good; then every other process of the mesh is killed too. The
second mesh, on the same data directory, must start (its ingestor's reconciler undoes the write
whose lease ran out, or the sample load takes it over once it has), load the samples again and answer an Ask that cites them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from askmesh import client
from askmesh.mesh import LocalMesh, MeshError, MeshLayout
from askmesh.runtime.crashpoints import CRASH_AT_ENV
from askmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, knowledge_pb2, knowledge_pb2_grpc
from services.ingestor.store_sqlite import SqliteStore
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.mesh
SAMPLES = REPO_ROOT / "samples"


def test_a_mesh_killed_while_it_loads_the_samples_starts_again_and_answers(tmp_path: Path) -> None:
    layout = MeshLayout.on_free_ports(tmp_path)
    # Several batches per document, so the crash falls between two. The leases are the
    # defaults: the second mesh starts while the dead write's lease still runs, and its sample
    # load waits for the lease to run out, then takes the write over.
    env = {"ASKMESH_INGESTOR_INGEST_BATCH_SIZE": "4"}
    interrupted = LocalMesh(layout, env={**env, CRASH_AT_ENV: "doc.write.batch"}, say=lambda _: None, samples_dir=SAMPLES)
    try:
        with pytest.raises(MeshError) as failed:
            interrupted.start()
        assert "\n" not in str(failed.value) and "Traceback" not in str(failed.value)
        for process in interrupted.processes:  # the power cut: everything else dies too
            process.popen.kill()
    finally:
        interrupted.stop()
    store = SqliteStore(layout.data_dir / "data" / "store.sqlite3")
    try:
        left = store.stale_documents(now=time.time() + 3600)
        assert left, "the first mesh's ingestor did not die in the middle of a sample document's write"
    finally:
        store.close()

    with LocalMesh(layout, env=env, say=lambda _: None, samples_dir=SAMPLES) as mesh:
        assert mesh.samples_loaded is not None and mesh.samples_loaded.documents
        with client.connect(layout.front_address) as channel:
            request = gateway_pb2.AskRequest(
                question="How much may a hotel in Paris cost per night?",
                parameters=common_pb2.GenerationParameters(max_new_tokens=4, temperature=0),
            )
            messages = list(gateway_pb2_grpc.GatewayStub(channel).Ask(request, timeout=120))
            assert messages[-1].HasField("done")
            sources = next(m.sources for m in messages if m.HasField("sources"))
            assert any(c.document_id == "travel-policy" for c in sources.citations)
            listed = knowledge_pb2_grpc.KnowledgeBasesStub(channel).ListDocuments(
                knowledge_pb2.ListDocumentsRequest(knowledge_base="default"), timeout=30
            )
            assert {d.id for d in listed.documents} == {d.id for d in mesh.samples_loaded.documents}
        store = SqliteStore(layout.data_dir / "data" / "store.sqlite3")
        try:
            assert store.stale_documents(now=time.time() + 3600) == [], "a sample document is still being written"
            assert store.abandoned_versions() == []
        finally:
            store.close()
