"""Ingestion speed end to end: `askmesh ingest` on the real local mesh vs the Chatchat-style baseline.

    .venv/bin/python -m benchmarks.ingest_speed [--dir FOLDER] [--mesh-env KEY=VALUE ...]

One directory of text files (by default the labelled man-page corpus of benchmarks/corpus, one
.txt file per page) is ingested three ways, one after the other so none shares the cores:
- the embedding model alone: the mesh's embedder model and settings (EmbedderSettings from the
  same environment) loaded in this process, encoding the chunks the mesh makes of those files
  (the ingestor's chunking at the knowledge base's chunk size and overlap) in one sorted call:
  what the mesh's ingestion could do at best on this machine;
- the Chatchat-style baseline (benchmarks/baseline/chatchat.py): its start (both models loaded,
  warmed up) and then one upload_docs request with every file, as Chatchat's upload takes them;
- askmesh: the local mesh started on free ports (not timed: a service is already up), a
  knowledge base created, then the `askmesh ingest FOLDER --kb NAME` command run as a child
  process, from its start until it exits (it waits for every file's task to end).
Only the public client API (askmesh.client) and the CLI touch the mesh, so this keeps working
whichever tier runs ingestion. Prints a table and writes benchmarks/results/<date>-ingest-speed.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from askmesh import client
from askmesh.mesh import LocalMesh, MeshLayout
from askmesh.v1 import ingestion_pb2
from benchmarks.common import machine, markdown_table, rich_table, save

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
KNOWLEDGE_BASE = "ingest_speed"
# The ingestor's default chunking (600/150), set on the knowledge base so the model-alone
# figure encodes exactly the chunks the mesh makes.
CHUNK_SIZE = 600
CHUNK_OVERLAP = 150


@dataclass(frozen=True)
class Measured:
    label: str
    seconds: float
    chunks: int
    note: str = ""


def write_corpus(folder: Path) -> list[Path]:
    """The man-page corpus as one .txt file per page."""
    from benchmarks.corpus.manpages import build_corpus

    paths = []
    for document in build_corpus():
        path = folder / f"{document.id}.txt"
        path.write_text(document.text, encoding="utf-8")
        paths.append(path)
    return paths


def mesh_chunks(paths: list[Path]) -> list[str]:
    """The chunks the ingestor makes of plain-text files (its parser, then its chunking)."""
    from services.ingestor.chunking import chunk_sections
    from services.ingestor.parsing import parse_document

    chunks: list[str] = []
    for path in paths:
        parsed = parse_document(path.read_bytes(), path.name, "text/plain")
        chunks.extend(chunk.text for chunk in chunk_sections(parsed.sections, CHUNK_SIZE, CHUNK_OVERLAP))
    return chunks


def model_alone(texts: list[str], env: dict[str, str]) -> Measured:
    """The mesh's embedder model with its settings, in this process, on every chunk at once."""
    from services.embedder.config import EmbedderSettings
    from services.embedder.models import load_model

    saved = dict(os.environ)
    os.environ.update({key: value for key, value in env.items() if key.startswith("ASKMESH_EMBEDDER_")})
    try:
        settings = EmbedderSettings()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    model = load_model(settings.resolved_model_path(), settings.model_name, settings.backend, settings)
    model.encode(texts[:64])  # warm-up at a real size
    started = time.perf_counter()
    model.encode(texts)
    seconds = time.perf_counter() - started
    backend = f"{settings.backend}{' int8' if settings.backend == 'onnx' and settings.onnx_quantize else ''}"
    return Measured("embedding model alone", seconds, len(texts), f"{backend}, model batches of {settings.encode_batch_size}, sorted by length")


def baseline(paths: list[Path], folder: Path) -> tuple[Measured, float]:
    """The baseline's start (models loaded and warmed up) and one upload of every file."""
    import httpx

    from benchmarks.baseline.client import start_server, upload_documents

    documents = [{"id": path.name, "title": path.stem, "text": path.read_text(encoding="utf-8")} for path in paths]

    async def upload(base_url: str) -> dict[str, int]:
        async with httpx.AsyncClient(timeout=None) as http:
            return await upload_documents(http, base_url, documents)

    started = time.perf_counter()
    server = start_server(folder)
    load_s = time.perf_counter() - started
    try:
        counts = asyncio.run(upload(server.base_url))
    finally:
        server.stop()
    seconds = time.perf_counter() - started
    return Measured("Chatchat-style baseline", seconds, counts["chunks"], f"its start {load_s:.1f} s included; 250/50 chunks"), load_s


def askmesh_ingest(folder: Path, data_dir: Path, env: dict[str, str], say: Console) -> tuple[Measured, float]:
    """`askmesh ingest FOLDER` on a fresh local mesh; the mesh's start is not timed."""
    layout = MeshLayout.on_free_ports(data_dir)
    started = time.perf_counter()
    with LocalMesh(layout, env=env, say=lambda _: None) as mesh:
        mesh_start_s = time.perf_counter() - started
        say.print(f"  mesh up in {mesh_start_s:.1f} s; ingesting ...")
        with client.connect(layout.front_address) as channel:
            client.create_knowledge_base(channel, KNOWLEDGE_BASE, chunking_options=client.chunking(CHUNK_SIZE, CHUNK_OVERLAP))
            command = [sys.executable, "-m", "askmesh.cli", "ingest", str(folder), "--kb", KNOWLEDGE_BASE,
                       "--address", layout.front_address]
            started = time.perf_counter()
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            seconds = time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(f"askmesh ingest exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
            tasks = client.list_tasks(channel, knowledge_base=KNOWLEDGE_BASE, limit=100_000)
    succeeded = [task for task in tasks if task.state == ingestion_pb2.TASK_STATE_SUCCEEDED]
    chunks = sum(task.progress.chunks_total for task in succeeded)
    note = f"{len(succeeded)} of {len(tasks)} tasks succeeded; {CHUNK_SIZE}/{CHUNK_OVERLAP} chunks"
    return Measured("askmesh ingest (local mesh)", seconds, chunks, note), mesh_start_s


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator:
            raise SystemExit(f"--mesh-env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="a folder of text files (default: the man-page corpus as .txt files)")
    parser.add_argument("--mesh-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the mesh's services (and the model-alone figure's embedder settings)")
    parser.add_argument("--skip-baseline", action="store_true", help="measure askmesh and the model alone only")
    args = parser.parse_args()
    console = Console()
    env = parse_env(args.mesh_env)

    with tempfile.TemporaryDirectory(prefix="ingest-speed-") as scratch:
        scratch_dir = Path(scratch)
        if args.dir is None:
            folder = scratch_dir / "corpus"
            folder.mkdir()
            write_corpus(folder)
        else:
            folder = args.dir
        paths = client.files_to_ingest([folder])
        characters = sum(len(path.read_text(encoding="utf-8")) for path in paths)
        console.print(f"{len(paths)} files, {characters:,} characters in {folder}")

        console.print("the embedding model alone ...")
        alone = model_alone(mesh_chunks(paths), env)
        console.print(f"  {alone.chunks} chunks in {alone.seconds:.1f} s")
        rows = [alone]
        base: Measured | None = None
        if not args.skip_baseline:
            console.print("the Chatchat-style baseline (start + one upload) ...")
            base, _ = baseline(paths, scratch_dir / "baseline")
            console.print(f"  {base.chunks} chunks in {base.seconds:.1f} s")
            rows.append(base)
        console.print("askmesh ingest on the local mesh ...")
        mesh, mesh_start_s = askmesh_ingest(folder, scratch_dir / "mesh", env, console)
        console.print(f"  {mesh.chunks} chunks in {mesh.seconds:.1f} s")
        rows.append(mesh)

    columns = ["", "seconds", "chunks", "chunks/s", "× baseline speed", "% of model alone", "notes"]
    cells: list[list[str]] = []
    for row in rows:
        ratio = f"{base.seconds / row.seconds:.2f}x" if base is not None else "-"
        # Of the model alone's time for the same chunks: the model-alone rate applied to its own count.
        share = f"{(row.chunks / alone.chunks * alone.seconds) / row.seconds:.0%}" if row is not base else "-"
        cells.append([row.label, f"{row.seconds:.1f}", str(row.chunks), f"{row.chunks / row.seconds:.1f}", ratio, share, row.note])
    console.print(rich_table(f"Ingesting {len(paths)} files ({characters:,} characters)", columns, cells))
    settings = " ".join(f"`{key}={value}`" for key, value in env.items()) or "none (defaults)"
    lines = [
        "# Ingestion speed: askmesh ingest vs the Chatchat-style baseline",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python -m benchmarks.ingest_speed"
        f"{f' --dir {args.dir}' if args.dir else ''}{''.join(f' --mesh-env {item}' for item in args.mesh_env)}"
        f"{' --skip-baseline' if args.skip_baseline else ''}`.",
        f"{len(paths)} files, {characters:,} characters; mesh settings: {settings}; the mesh's start ({mesh_start_s:.1f} s) is not "
        "in its time. `× baseline speed`: the baseline's seconds over the row's; `% of model alone`: the model alone's time for "
        "the row's chunk count over the row's time.",
        "",
        *markdown_table(columns, cells),
        "",
    ]
    console.print(f"saved to {save('ingest-speed', chr(10).join(lines))}")


if __name__ == "__main__":
    main()
