"""The committed generated code is exactly what `make protos` produces."""

from __future__ import annotations

from pathlib import Path

from askmesh import codegen


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    codegen.generate(tmp_path)
    generated = sorted((tmp_path / "askmesh" / "v1").glob("*_pb2*.py*"))
    assert generated, "protoc produced nothing"
    committed_dir = codegen.REPO_ROOT / "askmesh" / "v1"
    for fresh in generated:
        committed = committed_dir / fresh.name
        assert committed.exists(), f"{fresh.name} is not committed: run `make protos`"
        assert committed.read_bytes() == fresh.read_bytes(), f"{fresh.name} is stale: run `make protos`"
    stale_extra = {p.name for p in committed_dir.glob("*_pb2*.py*")} - {p.name for p in generated}
    assert not stale_extra, f"generated files without a proto: {stale_extra}"


def test_every_service_streams_end_with_an_explicit_final_message() -> None:
    from askmesh.v1 import gateway_pb2, generator_pb2

    for message in (gateway_pb2.AskResponse, generator_pb2.GenerateResponse):
        events = {field.name for field in message.DESCRIPTOR.oneofs_by_name["event"].fields}
        assert {"delta", "done", "error"} <= events
