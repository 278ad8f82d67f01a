"""Generates the Python gRPC code (with .pyi stubs) from protos/: `make protos`.

The generated modules are committed under askmesh/v1/ so that services import them without a
build step; tests/test_protos.py regenerates into a temporary folder and fails when they differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc
import grpc_tools

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
WELL_KNOWN_TYPES = Path(grpc_tools.__file__).parent / "_proto"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Writes askmesh/v1/*_pb2.py, *_pb2.pyi and *_pb2_grpc.py under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{WELL_KNOWN_TYPES}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


def main() -> None:
    generate(REPO_ROOT)
    print(f"generated code for {len(proto_files())} proto files in askmesh/v1/", file=sys.stderr)


if __name__ == "__main__":
    main()
