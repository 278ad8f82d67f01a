"""The `askmesh` command: run services, the local mesh, and ask questions."""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import grpc
import typer
from rich.console import Console
from rich.table import Table

from askmesh import client
from askmesh.v1 import common_pb2, gateway_pb2

app = typer.Typer(help="askmesh: question answering over private documents, as gRPC microservices.", no_args_is_help=True)
console = Console()
errors = Console(stderr=True)
REPO_ROOT = Path(__file__).resolve().parent.parent


class Service(str, Enum):
    embedder = "embedder"
    retriever = "retriever"
    generator = "generator"
    gateway = "gateway"


@app.command()
def serve(service: Service) -> None:
    """Run one service alone (what a container runs). Settings come from ASKMESH_* variables."""
    importlib.import_module(f"services.{service.value}.main").main()


@app.command()
def up(
    data_dir: Annotated[Path, typer.Option(help="Where data, logs and generated configs go.")] = Path(".askmesh"),
    samples: Annotated[bool, typer.Option(help="Load the bundled sample documents.")] = True,
    telemetry: Annotated[str, typer.Option(help="Span exporter: none, console, file or otlp.")] = "none",
) -> None:
    """Start the whole local mesh (four services and Envoy) on 127.0.0.1 until Ctrl-C."""
    from askmesh.mesh import LocalMesh, MeshError, MeshLayout

    layout = MeshLayout(data_dir=data_dir.resolve())
    mesh = LocalMesh(layout, telemetry=telemetry, say=console.print)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    console.print(f"[bold]Starting askmesh[/bold] (logs in {layout.data_dir / 'logs'}) ...")
    try:
        mesh.start()
        if samples:
            with client.connect(layout.front_address) as channel:
                added = client.load_samples(channel, REPO_ROOT / "samples")
            console.print(f"Loaded {len(added.documents)} sample documents ({added.chunk_count} chunks) into 'default'.")
        console.print(
            "\n[bold green]askmesh is ready.[/bold green] In another terminal:\n"
            '  .venv/bin/askmesh ask "How many days can I work from abroad?"\n'
            f"  grpcurl -plaintext -d '{{\"question\": \"What is the hotel limit in Paris?\"}}' "
            f"{layout.front_address} askmesh.v1.Gateway/Ask\n"
            "Press Ctrl-C to stop.",
            highlight=False,
        )
        while not stop.wait(0.5):
            pass
    except (MeshError, ValueError, grpc.RpcError) as error:
        errors.print(f"[red]askmesh up failed:[/red] {error}", markup=True, highlight=False)
        raise typer.Exit(1) from error
    finally:
        console.print("Stopping every process ...")
        mesh.stop()
        console.print("Stopped.")


@app.command()
def ask(
    question: str,
    kb: Annotated[str, typer.Option(help="Knowledge base.")] = "default",
    top_k: Annotated[int, typer.Option(help="Sources to retrieve (0: server default).")] = 0,
    filter: Annotated[Optional[list[str]], typer.Option(help="Metadata filter key=value (repeatable).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Longest answer, in tokens.")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="0 for greedy decoding.")] = None,
    address: Annotated[str, typer.Option(help="The gateway (Envoy's front door).")] = "127.0.0.1:50051",
    timeout: Annotated[Optional[float], typer.Option(help="Deadline in seconds.")] = None,
) -> None:
    """Ask a question: the answer streams token by token, then the sources it used."""
    try:
        parameters = common_pb2.GenerationParameters()
        if max_new_tokens is not None:
            parameters.max_new_tokens = max_new_tokens
        if temperature is not None:
            parameters.temperature = temperature
        request = gateway_pb2.AskRequest(
            question=question,
            knowledge_base=kb,
            top_k=top_k,
            filters=[client.parse_filter(f) for f in filter or []],
            parameters=parameters,
        )
        channel = client.connect(address)
    except ValueError as error:
        errors.print(f"error: {error}", markup=False)
        raise typer.Exit(2) from error

    citations: list[gateway_pb2.Citation] = []
    try:
        with channel:
            for message in client.ask(channel, request, timeout):
                event = message.WhichOneof("event")
                if event == "sources":
                    citations = list(message.sources.citations)
                elif event == "delta":
                    sys.stdout.write(message.delta.text)
                    sys.stdout.flush()
                elif event == "done":
                    sys.stdout.write("\n")
                    _print_sources(citations, message.done)
    except grpc.RpcError as error:
        sys.stdout.write("\n")
        errors.print(f"error: {error.code().name}: {error.details()}", markup=False)  # type: ignore[attr-defined]
        raise typer.Exit(1) from error


def _print_sources(citations: list[gateway_pb2.Citation], done: gateway_pb2.AskDone) -> None:
    table = Table(title="Sources", show_lines=False)
    for column in ("#", "document", "title", "score", "excerpt"):
        table.add_column(column, overflow="fold")
    for c in citations:
        excerpt = c.text[:80].replace("\n", " ") + ("..." if len(c.text) > 80 else "")
        table.add_row(str(c.number), c.document_id, c.title, f"{c.score:.3f}", excerpt)
    console.print(table)
    t = done.timings
    reason = common_pb2.FinishReason.Name(done.finish_reason).removeprefix("FINISH_REASON_").lower()
    console.print(
        f"[dim]{done.model}: {done.usage.completion_tokens} tokens, finished by {reason}; "
        f"embed {t.embed_ms:.0f} ms, search {t.search_ms:.0f} ms, first token {t.time_to_first_token_ms:.0f} ms, "
        f"total {t.total_ms:.0f} ms[/dim]",
        highlight=False,
    )


@app.command()
def add(
    paths: list[Path],
    kb: Annotated[str, typer.Option(help="Knowledge base (created when missing).")] = "default",
    address: Annotated[str, typer.Option(help="The gateway (Envoy's front door).")] = "127.0.0.1:50051",
) -> None:
    """Add text or Markdown files to a knowledge base (the file name is the document id)."""
    try:
        documents = [client.document_from_file(path) for path in paths]
        with client.connect(address) as channel:
            result = client.add_documents(channel, kb, documents)
    except (OSError, ValueError) as error:
        errors.print(f"error: {error}", markup=False)
        raise typer.Exit(2) from error
    except grpc.RpcError as error:
        errors.print(f"error: {error.code().name}: {error.details()}", markup=False)  # type: ignore[attr-defined]
        raise typer.Exit(1) from error
    for document in result.documents:
        console.print(f"{document.id}: {document.chunk_count} chunks")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
