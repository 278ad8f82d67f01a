"""The `askmesh` command: run services and the local mesh, ask questions, manage knowledge bases,
ingest files and follow ingestion tasks."""

from __future__ import annotations

import importlib
import json
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import grpc
import typer
from google.protobuf import timestamp_pb2
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from askmesh import client, tiers
from askmesh.v1 import common_pb2, gateway_pb2, ingestion_pb2, keys_pb2, knowledge_pb2

app = typer.Typer(help="askmesh: question answering over private documents, as gRPC microservices.", no_args_is_help=True)
console = Console()
errors = Console(stderr=True)
REPO_ROOT = Path(__file__).resolve().parent.parent


class _Options:
    # --debug: a failure also shows the error in full (status, debug string, traceback).
    debug = False
    api_key: str | None = None
    tenant: str | None = None
    data_dir = Path(".askmesh")
    tls_ca: Path | None = None


@app.callback()
def options(
    debug: Annotated[bool, typer.Option("--debug", help="On a failure, also show its full details and traceback.")] = False,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key", envvar="ASKMESH_API_KEY", show_envvar=True,
            help="The API key to call with (default: $ASKMESH_API_KEY, else the operator's key in .askmesh/admin-key).",
        ),
    ] = None,
    as_tenant: Annotated[
        Optional[str], typer.Option("--as-tenant", help="With the operator's key: the tenant to act in (default: default).")
    ] = None,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="The local mesh's folder: its admin-key and internal-token files.")
    ] = Path(".askmesh"),
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            "--tls-ca",
            envvar="ASKMESH_TLS_CA",
            show_envvar=True,
            help="Call the front door over TLS, trusting the certificates in this PEM file (default: plaintext).",
        ),
    ] = None,
) -> None:
    """askmesh: question answering over private documents, as gRPC microservices."""
    _Options.debug = debug
    _Options.api_key = api_key
    _Options.tenant = as_tenant
    _Options.data_dir = data_dir
    _Options.tls_ca = tls_ca


def _file_secret(name: str) -> str | None:
    path = _Options.data_dir / name
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _connect(address: str) -> grpc.Channel:
    """A channel to the public API, with the caller's key (over TLS with --tls-ca)."""
    return client.connect(address, _Options.api_key or _file_secret("admin-key"), _Options.tenant, _Options.tls_ca)


def _connect_internal(address: str) -> grpc.Channel:
    """A channel to the mesh's own RPCs (models, the control port), with the local mesh's token:
    always plaintext, as these listen on loopback only."""
    return client.connect(address, _file_secret("internal-token"))


def _one_line(text: str) -> str:
    """A message as one line (a server's or a tool's text may hold newlines)."""
    return " ".join(text.split())


def _plain(text: str) -> str:
    """Server-provided text for a Rich markup string: shown literally, without control sequences."""
    return escape(client.printable(text))


def _show_debug(error: BaseException) -> None:
    """With --debug: the error in full, after its one-line summary."""
    if _Options.debug:
        errors.print("".join(traceback.format_exception(error)), markup=False, highlight=False, soft_wrap=True)


Service = Enum("Service", {name: name for name in tiers.ALL_NAMES}, type=str)  # type: ignore[misc]


@app.command()
def serve(service: Service) -> None:  # type: ignore[valid-type]
    """Run one service alone (what a container runs). Settings come from ASKMESH_* variables."""
    importlib.import_module(f"services.{service.value}.main").main()


class MilvusChoice(str, Enum):
    auto = "auto"
    embedded = "embedded"
    server = "server"


@app.command()
def up(
    data_dir: Annotated[Path, typer.Option(help="Where data, logs and generated configs go.")] = Path(".askmesh"),
    samples: Annotated[bool, typer.Option(help="Load the bundled sample documents.")] = True,
    telemetry: Annotated[str, typer.Option(help="Span exporter: none, console, file or otlp.")] = "none",
    replicas: Annotated[
        str, typer.Option(help="Replicas per tier, e.g. embedder=2,generator=2 (default 1 each).")
    ] = "",
    milvus: Annotated[
        MilvusChoice,
        typer.Option(
            help="Milvus Lite embedded in the retriever, or as its own server (auto: a server when retriever>1)."
        ),
    ] = MilvusChoice.auto,
    store: Annotated[
        str,
        typer.Option(
            help="Where knowledge bases, documents and tasks are kept: sqlite (a file in --data-dir), "
            "postgres (a local PostgreSQL server the mesh starts) or a postgresql:// URL."
        ),
    ] = "sqlite",
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Run WITHOUT authentication: anyone who reaches a port is an admin.")
    ] = False,
    tls_cert_file: Annotated[
        Path | None,
        typer.Option(help="Serve TLS on the front door with this PEM certificate chain ($ASKMESH_MESH_TLS_CERT_FILE)."),
    ] = None,
    tls_key_file: Annotated[
        Path | None,
        typer.Option(help="The front door's PEM private key, for --tls-cert-file ($ASKMESH_MESH_TLS_KEY_FILE)."),
    ] = None,
) -> None:
    """Start the whole local mesh (every service and Envoy) on 127.0.0.1 until Ctrl-C."""
    from askmesh.mesh import LocalMesh, MeshLayout, MeshSettings, parse_replicas
    from askmesh.mesh_control import ControlServer
    from askmesh.runtime.auth import AUTH_OFF_WARNING, AuthSettings

    try:
        counts = parse_replicas(replicas)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--replicas") from error
    layout = MeshLayout.with_replicas(data_dir.resolve(), counts)
    if milvus is MilvusChoice.embedded and len(layout.service_ports["retriever"]) > 1:
        raise typer.BadParameter(
            "embedded Milvus Lite serves one retriever replica; use --milvus server", param_hint="--milvus"
        )
    if milvus is not MilvusChoice.auto:
        layout.milvus = milvus.value  # type: ignore[assignment]
    if store not in ("sqlite", "postgres") and not store.startswith(("postgresql://", "postgres://")):
        raise typer.BadParameter(f"{store!r}: expected sqlite, postgres or a postgresql:// URL", param_hint="--store")
    layout.store = store
    layout.auth = not no_auth and AuthSettings().enabled
    settings = MeshSettings()
    cert, key = tls_cert_file or settings.tls_cert_file, tls_key_file or settings.tls_key_file
    # Envoy's config in data_dir names them absolutely: it reads the same from any directory.
    layout.tls_cert_file = cert.resolve() if cert is not None else None
    layout.tls_key_file = key.resolve() if key is not None else None
    # The samples are loaded before the front door opens: once it answers, they can be asked about.
    mesh = LocalMesh(layout, telemetry=telemetry, say=console.print, samples_dir=REPO_ROOT / "samples" if samples else None)
    control = ControlServer(mesh)
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()
        mesh.interrupted.set()  # a start-up still waiting gives up at once

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    console.print(f"[bold]Starting askmesh[/bold] (logs in {layout.data_dir / 'logs'}) ...")
    try:
        mesh.start()
        control_address = control.start()
        if mesh.samples_loaded is not None:
            added = mesh.samples_loaded
            console.print(
                f"Loaded {len(added.documents)} sample documents ({added.chunk_count} chunks) into 'default'."
            )
        if layout.auth:
            console.print(
                f"The operator's key (admin of every tenant) is in {layout.admin_key_path}; the CLI uses it "
                "unless given --api-key or $ASKMESH_API_KEY. Make keys for others with "
                "`askmesh keys create --tenant T --role reader`.",
                markup=False, highlight=False, soft_wrap=True,  # a path cut in two cannot be copied
            )
        else:
            errors.print(f"[bold red]{AUTH_OFF_WARNING}[/bold red]")
        # A client of a TLS front door trusts the CA that signed its certificate.
        tls_ca = " --tls-ca CA.pem" if layout.tls else ""
        grpcurl_tls = "-cacert CA.pem" if layout.tls else "-plaintext"
        console.print(
            "\n[bold green]askmesh is ready.[/bold green] In another terminal:\n"
            f'  .venv/bin/askmesh{tls_ca} ask "How many days can I work from abroad?"\n'
            f'  grpcurl {grpcurl_tls} -H "authorization: Bearer $(cat {layout.admin_key_path})" '
            f'-d \'{{"question": "What is the hotel limit in Paris?"}}\' {layout.front_address} askmesh.v1.Gateway/Ask\n'
            "  .venv/bin/askmesh replicas            (every replica, its health and metrics port)\n"
            "  .venv/bin/askmesh restart generator   (rolling restart of a tier)\n"
            f"Control channel on {control_address}.",
            highlight=False, soft_wrap=True,  # commands to copy stay whole lines
        )
        if mesh.replicas["web"]:
            key_file = layout.admin_key_path if layout.auth else None
            console.print(_web_lines(layout.http_url, mesh.admin_key, key_file), markup=False, highlight=False, soft_wrap=True)
        console.print("Press Ctrl-C to stop.")
        while not stop.is_set():
            control.run_pending(wait_s=0.5)
            for dead in mesh.reap():
                errors.print(f"{dead.name} exited with {dead.popen.returncode}; see {dead.log_path}", highlight=False)
    except Exception as error:
        if stop.is_set():
            errors.print("Interrupted during start-up.", markup=False, highlight=False)
        else:
            errors.print(f"[red]askmesh up failed:[/red] {escape(_up_failure(error))}", highlight=False, soft_wrap=True)
        _show_debug(error)
        raise typer.Exit(1) from error
    finally:
        console.print("Stopping every process ...")
        control.stop()
        mesh.stop()
        console.print("Stopped.")


def _web_lines(url: str, admin_key: str | None, key_file: Path | None) -> str:
    """Where the chat page and the OpenAI-compatible API are. The page's link carries the
    operator's key after `#`, as Jupyter's does: a fragment never leaves the browser, and the
    page moves the key into its session storage and out of the address bar."""
    page = f"{url}/#key={admin_key}" if admin_key else f"{url}/"
    header = f'-H "Authorization: Bearer $(cat {key_file})" ' if key_file else ""
    return (
        f"\nChat page (open it in a browser): {page}\n"
        f"OpenAI-compatible API: {url}/v1 (a model is a knowledge base: default), e.g.\n"
        f"  curl -N {url}/v1/chat/completions {header}-H 'Content-Type: application/json' "
        '-d \'{"model": "default", "stream": true, "messages": [{"role": "user", "content": "What is the hotel limit in Paris?"}]}\''
    )


def _up_failure(error: Exception) -> str:
    """Why `askmesh up` failed, as one sentence that says what to do."""
    from askmesh.mesh import MeshError

    if isinstance(error, grpc.RpcError):
        return client.describe_rpc_error(error)
    if isinstance(error, (MeshError, OSError, ValueError)):
        first, _, rest = str(error).strip().partition("\n")
        return first + (" (run `askmesh --debug up` for the rest)" if rest.strip() else "")
    return f"unexpected {type(error).__name__}: {_one_line(str(error))}; run `askmesh --debug up` to see where"


ControlAddress = Annotated[str, typer.Option("--control", help="The control channel of `askmesh up`.")]


@app.command("replicas")
def replicas_command(control: ControlAddress = "127.0.0.1:50050") -> None:
    """List every replica of a running `askmesh up`, with Envoy's view of its health."""
    from askmesh.v1 import mesh_pb2, mesh_pb2_grpc

    with _reported_errors(control), _connect_internal(control) as channel:
        reply = mesh_pb2_grpc.MeshControlStub(channel).ListReplicas(mesh_pb2.ListReplicasRequest(), timeout=10)
    table = Table("tier", "replica", "address", "pid", "Envoy", "metrics")
    for replica in reply.replicas:
        state = "healthy" if replica.healthy else "UNHEALTHY"
        _add_row(
            table, replica.tier, replica.name, replica.address, str(replica.pid), state, replica.metrics_address or "-"
        )
    console.print(table)


@app.command()
def restart(tier: Service, control: ControlAddress = "127.0.0.1:50050") -> None:  # type: ignore[valid-type]
    """Rolling restart of one tier of a running `askmesh up`: a new replica is started and
    SERVING before each old one is taken out of Envoy and drained."""
    from askmesh.v1 import mesh_pb2, mesh_pb2_grpc

    with _reported_errors(control), _connect_internal(control) as channel:
        stub = mesh_pb2_grpc.MeshControlStub(channel)
        for event in stub.RestartTier(mesh_pb2.RestartTierRequest(tier=tier.value)):
            console.print(client.printable(f"{event.replica.name:<14} {event.message}"), markup=False, highlight=False)
    console.print(f"[green]{tier.value} restarted[/green]")


@app.command()
def ask(
    question: str,
    kb: Annotated[str, typer.Option(help="Knowledge base.")] = "default",
    top_k: Annotated[int, typer.Option(help="Sources to retrieve (0: server default).")] = 0,
    filter: Annotated[Optional[list[str]], typer.Option(help="Metadata filter key=value (repeatable).")] = None,
    mode: Annotated[
        Optional[str], typer.Option(help="How sources are searched: dense, keyword or hybrid (default: the knowledge base's).")
    ] = None,
    rerank: Annotated[
        Optional[bool], typer.Option("--rerank/--no-rerank", help="Rerank the sources with the mesh's reranker (default: the gateway's).")
    ] = None,
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
            search_mode=client.search_mode(mode),  # type: ignore[arg-type]
        )
        if rerank is not None:
            request.rerank = rerank
        channel = _connect(address)
    except ValueError as error:
        errors.print(f"error: {error}", markup=False)
        raise typer.Exit(2) from error

    citations: list[gateway_pb2.Citation] = []
    answer = client.StreamedText()
    try:
        with channel:
            for message in client.ask(channel, request, timeout):
                event = message.WhichOneof("event")
                if event == "queued":
                    errors.print(_waiting_line(message.queued), markup=False, highlight=False)
                elif event == "sources":
                    citations = [c for c in message.sources.citations if c.in_prompt]
                    if message.sources.search_notice:
                        errors.print(f"note: {client.printable(message.sources.search_notice)}", markup=False, highlight=False)
                elif event == "delta":
                    # A model's text is the caller's to steer: it is printed, never obeyed.
                    sys.stdout.write(answer.feed(message.delta.text))
                    sys.stdout.flush()
                elif event == "done":
                    sys.stdout.write(answer.flush() + "\n")
                    _print_sources(citations, message.done)
    except grpc.RpcError as error:
        sys.stdout.write(answer.flush() + "\n")
        _print_rpc_error(error, target=address)
        raise typer.Exit(1) from error


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def _waiting_line(status: common_pb2.QueueStatus) -> str:
    """`waiting: 3rd in line, about 8 s`"""
    return f"waiting: {_ordinal(status.position)} in line, about {status.estimated_wait_ms / 1000:.0f} s"


def _print_sources(citations: list[gateway_pb2.Citation], done: gateway_pb2.AskDone) -> None:
    table = Table(title="Sources", show_lines=False)
    reranked = any(c.HasField("rerank_score") for c in citations)
    for column in ("#", "document", "title", "score", *(("rerank",) if reranked else ()), "excerpt"):
        table.add_column(column, overflow="fold")
    for c in citations:
        excerpt = c.text[:80].replace("\n", " ") + ("..." if len(c.text) > 80 else "")
        rerank_score = (f"{c.rerank_score:.3f}",) if reranked else ()
        _add_row(table, str(c.number), c.document_id, c.title, f"{c.score:.3f}", *rerank_score, excerpt)
    console.print(table)
    t = done.timings
    reason = common_pb2.FinishReason.Name(done.finish_reason).removeprefix("FINISH_REASON_").lower()
    waited = f"waited {t.queue_ms / 1000:.1f} s, " if t.queue_ms >= 100 else ""
    usage = done.usage
    reranked_in = f"rerank {t.rerank_ms:.0f} ms, " if t.rerank_ms else ""
    console.print(
        f"[dim]{_plain(done.model)}: {usage.completion_tokens} tokens from a {usage.prompt_tokens}-token prompt "
        f"({usage.cached_prompt_tokens} cached), finished by {reason}; {waited}"
        f"embed {t.embed_ms:.0f} ms, search {t.search_ms:.0f} ms, {reranked_in}first token {t.time_to_first_token_ms:.0f} ms, "
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
        with _connect(address) as channel:
            result = client.add_documents(channel, kb, documents)
    except (OSError, ValueError) as error:
        errors.print(f"error: {error}", markup=False)
        raise typer.Exit(2) from error
    except grpc.RpcError as error:
        _print_rpc_error(error, target=address)
        raise typer.Exit(1) from error
    for document in result.documents:
        console.print(client.printable(f"{document.id}: {document.chunk_count} chunks"), markup=False, highlight=False)


# -- shared helpers -----------------------------------------------------------------------------
Address = Annotated[str, typer.Option(help="The gateway (Envoy's front door).")]
ChunkSize = Annotated[Optional[int], typer.Option(help="Target chunk size in characters.")]
ChunkOverlap = Annotated[Optional[int], typer.Option(help="Characters shared by consecutive chunks.")]
SearchModeOption = Annotated[
    Optional[str], typer.Option(help="Default search mode of its questions: dense, keyword or hybrid (default: the server's).")
]


def _print_rpc_error(error: grpc.RpcError, prefix: str = "", target: str = "") -> None:
    """`error: CODE: details; what to do` on one line (client.describe_rpc_error)."""
    line = client.printable(f"{prefix}error: {client.describe_rpc_error(error, target)}")
    errors.print(line, markup=False, highlight=False, soft_wrap=True)
    _show_debug(error)


@contextmanager
def _reported_errors(target: str = "") -> Iterator[None]:
    """gRPC errors: `error: CODE: details`, exit 1. Bad local input: `error: ...`, exit 2."""
    try:
        yield
    except grpc.RpcError as error:
        _print_rpc_error(error, target=target)
        raise typer.Exit(1) from error
    except (OSError, ValueError) as error:
        errors.print(f"error: {_one_line(str(error))}", markup=False, highlight=False, soft_wrap=True)
        _show_debug(error)
        raise typer.Exit(2) from error


def _add_row(table: Table, *cells: str) -> None:
    """Cells as plain text: names, titles and errors never read as Rich markup."""
    table.add_row(*(Text(client.printable(cell)) for cell in cells))


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # unreachable


def _time(stamp: timestamp_pb2.Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return ""
    return datetime.fromtimestamp(stamp.seconds).strftime("%Y-%m-%d %H:%M:%S")


def _kb_state(kb: knowledge_pb2.KnowledgeBase) -> str:
    return client.enum_word(knowledge_pb2.KnowledgeBaseState, kb.state, "KNOWLEDGE_BASE_STATE_")


def _task_state(task: ingestion_pb2.Task) -> str:
    return client.enum_word(ingestion_pb2.TaskState, task.state, "TASK_STATE_")


def _task_stage(task: ingestion_pb2.Task) -> str:
    return client.enum_word(ingestion_pb2.TaskStage, task.stage, "TASK_STAGE_")


def _task_counts(task: ingestion_pb2.Task) -> tuple[int, int, str]:
    """(total, done, unit) of a task's progress: documents for a rebuild, chunks for a file."""
    p = task.progress
    if task.kind == ingestion_pb2.TASK_KIND_REBUILD:
        return p.documents_total, p.documents_done, "documents"
    return p.chunks_total, p.chunks_stored, "chunks"


def _plural(count: int, unit: str) -> str:
    return f"{count} {unit.removesuffix('s') if count == 1 else unit}"


class _TaskMarkColumn(SpinnerColumn):
    """A spinner while a task runs, then a mark for how it ended."""

    def render(self, task):  # type: ignore[no-untyped-def]
        mark = task.fields.get("mark")
        return Text(mark, style=task.fields.get("mark_style", "")) if mark else super().render(task)


MARKS = {
    ingestion_pb2.TASK_STATE_SUCCEEDED: ("✓", "green"),
    ingestion_pb2.TASK_STATE_FAILED: ("✗", "red"),
    ingestion_pb2.TASK_STATE_CANCELLED: ("-", "yellow"),
}


def _follow_tasks(channel: grpc.Channel, tasks: Sequence[tuple[str, ingestion_pb2.Task]]) -> list[ingestion_pb2.Task | grpc.RpcError]:
    """One progress bar per task, driven by WatchTask, until every task ends; the final task (or
    the error that cut its watch) for each, in order."""
    progress = Progress(
        _TaskMarkColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )

    def show(bar: int, label: str, task: ingestion_pb2.Task) -> None:
        total, done, _ = _task_counts(task)
        state = task.state
        phase = _task_stage(task) if state == ingestion_pb2.TASK_STATE_RUNNING else _task_state(task)
        mark, mark_style = MARKS.get(state, ("", ""))
        if state == ingestion_pb2.TASK_STATE_SUCCEEDED:
            total = done = max(total, done)
        progress.update(
            bar, description=f"{_plain(label)} ({phase})", total=total or None, completed=done, mark=mark, mark_style=mark_style
        )
        if mark:
            progress.stop_task(bar)

    def follow(bar: int, label: str, task: ingestion_pb2.Task) -> ingestion_pb2.Task | grpc.RpcError:
        try:
            for task in client.watch_task(channel, task.id):
                show(bar, label, task)
        except grpc.RpcError as error:
            progress.update(bar, mark="?", mark_style="red")
            progress.stop_task(bar)
            return error
        return task

    with progress:
        bars = [progress.add_task(_plain(label), total=None, mark="", mark_style="") for label, _ in tasks]
        for bar, (label, task) in zip(bars, tasks):
            show(bar, label, task)
        pool = ThreadPoolExecutor(max_workers=min(len(tasks), 8) or 1)
        futures = [pool.submit(follow, bar, label, task) for bar, (label, task) in zip(bars, tasks)]
        try:
            results = [future.result() for future in futures]
        except KeyboardInterrupt:
            channel.close()  # ends every watch; the tasks themselves keep running on the server
            pool.shutdown(wait=True)
            progress.stop()
            errors.print("Stopped watching; the tasks keep running (see `askmesh tasks`, `askmesh cancel`).")
            raise typer.Exit(130) from None
        pool.shutdown(wait=True)
    return results


def _report_outcomes(labels: Sequence[str], results: Sequence[ingestion_pb2.Task | grpc.RpcError]) -> bool:
    """A final line per task; True when every one succeeded."""
    all_succeeded = True
    for label, result in zip(labels, results):
        if isinstance(result, grpc.RpcError):
            all_succeeded = False
            _print_rpc_error(result, prefix=f"{label}: ")
            continue
        _, done, unit = _task_counts(result)
        if result.state == ingestion_pb2.TASK_STATE_SUCCEEDED:
            console.print(f"{_plain(label)}: [green]succeeded[/green] ({_plural(done, unit)})", highlight=False, soft_wrap=True)
        elif result.state == ingestion_pb2.TASK_STATE_CANCELLED:
            all_succeeded = False
            console.print(f"{_plain(label)}: [yellow]cancelled[/yellow]", highlight=False, soft_wrap=True)
        elif result.state != ingestion_pb2.TASK_STATE_FAILED:  # a watch that ended before the task did
            all_succeeded = False
            console.print(f"{_plain(label)}: still {_task_state(result)} (task {result.id})", highlight=False, soft_wrap=True)
        else:
            all_succeeded = False
            reason = _plain(result.error or "no reason given")
            console.print(f"{_plain(label)}: [red]failed[/red] ({reason})", highlight=False, soft_wrap=True)
    return all_succeeded


# -- knowledge bases ------------------------------------------------------------------------------
kb_app = typer.Typer(help="Create, list, inspect, rebuild and delete knowledge bases.", no_args_is_help=True)
app.add_typer(kb_app, name="kb")


@kb_app.command("create")
def kb_create(
    name: str,
    description: Annotated[str, typer.Option(help="What the knowledge base holds.")] = "",
    field: Annotated[
        Optional[list[str]],
        typer.Option(help="Declared metadata field name:type, type string|int|float|bool (repeatable)."),
    ] = None,
    chunk_size: ChunkSize = None,
    chunk_overlap: ChunkOverlap = None,
    search_mode: SearchModeOption = None,
    address: Address = "127.0.0.1:50051",
) -> None:
    """Create a knowledge base, with typed metadata fields (fast filters), default chunking and search mode."""
    with _reported_errors(address):
        fields = [client.parse_field(f) for f in field or []]
        options = client.chunking(chunk_size, chunk_overlap)
        mode = client.search_mode(search_mode)
        with _connect(address) as channel:
            kb = client.create_knowledge_base(
                channel, name, description=description, fields=fields, chunking_options=options, search_mode=mode
            )
    console.print(
        client.printable(f"Created knowledge base {kb.name!r} ({kb.embedding_model}, {kb.dimension} dimensions)."),
        markup=False, highlight=False,
    )


@kb_app.command("list")
def kb_list(address: Address = "127.0.0.1:50051") -> None:
    """List the knowledge bases."""
    with _reported_errors(address), _connect(address) as channel:
        kbs = client.list_knowledge_bases(channel)
    table = Table(title="Knowledge bases")
    for column in ("name", "documents", "chunks", "size", "model", "dimension", "generation", "state"):
        table.add_column(column, overflow="fold", justify="right" if column in ("documents", "chunks", "size", "dimension", "generation") else "left")
    for kb in kbs:
        _add_row(
            table, kb.name, str(kb.document_count), str(kb.chunk_count), _size(kb.size_bytes), kb.embedding_model,
            str(kb.dimension), str(kb.generation), _kb_state(kb),
        )
    console.print(table)


@kb_app.command("show")
def kb_show(name: str, address: Address = "127.0.0.1:50051") -> None:
    """Show one knowledge base: its counts, model, chunking and metadata fields."""
    with _reported_errors(address), _connect(address) as channel:
        kb = client.get_knowledge_base(channel, name)
    grid = Table(show_header=False, box=None, padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    fields = ", ".join(f"{f.name}:{client.enum_word(common_pb2.MetadataType, f.type, 'METADATA_TYPE_')}" for f in kb.metadata_schema)
    chunking = f"{kb.chunking.chunk_size} characters, overlap {kb.chunking.chunk_overlap}"
    for key, value in (
        ("name", kb.name),
        ("description", kb.description),
        ("state", _kb_state(kb)),
        ("documents", str(kb.document_count)),
        ("chunks", str(kb.chunk_count)),
        ("size", _size(kb.size_bytes)),
        ("model", kb.embedding_model),
        ("dimension", str(kb.dimension)),
        ("generation", str(kb.generation)),
        ("chunking", chunking),
        ("search mode", client.enum_word(common_pb2.SearchMode, kb.search_mode, "SEARCH_MODE_")),
        ("metadata fields", fields or "(none)"),
        ("created", _time(kb.created_at)),
        ("updated", _time(kb.updated_at)),
    ):
        _add_row(grid, key, value)
    console.print(grid, highlight=False)


@kb_app.command("delete")
def kb_delete(
    name: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    address: Address = "127.0.0.1:50051",
) -> None:
    """Delete a knowledge base with its documents and their chunks."""
    with _reported_errors(address), _connect(address) as channel:
        if not yes:
            kb = client.get_knowledge_base(channel, name)
            typer.confirm(
                f"Delete knowledge base {name!r} with {kb.document_count} documents ({kb.chunk_count} chunks)?", abort=True
            )
        deleted = client.delete_knowledge_base(channel, name)
    console.print(f"Deleted knowledge base {name!r} ({deleted.deleted_documents} documents).", markup=False, highlight=False)


@kb_app.command("rebuild")
def kb_rebuild(
    name: str,
    chunk_size: ChunkSize = None,
    chunk_overlap: ChunkOverlap = None,
    search_mode: Annotated[
        Optional[str], typer.Option(help="A new default search mode (dense, keyword or hybrid), from the switch on.")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Follow the rebuild until it ends.")] = False,
    address: Address = "127.0.0.1:50051",
) -> None:
    """Re-chunk and re-embed every document into a new generation (the current one keeps serving).
    A knowledge base made before keyword search gains it."""
    with _reported_errors(address):
        options = client.chunking(chunk_size, chunk_overlap)
        mode = client.search_mode(search_mode)
        channel = _connect(address)
    with _reported_errors(address), channel:
        task = client.rebuild_knowledge_base(channel, name, options, search_mode=mode)
        console.print(client.printable(f"Rebuild of {name!r} queued as task {task.id}."), markup=False, highlight=False)
        if not wait:
            return
        results = _follow_tasks(channel, [(name, task)])
        succeeded = _report_outcomes([name], results)
        if succeeded:
            kb = client.get_knowledge_base(channel, name)
            console.print(f"{name!r} now serves generation {kb.generation} ({kb.chunk_count} chunks).", markup=False, highlight=False)
    if not succeeded:
        raise typer.Exit(1)


@kb_app.command("docs")
def kb_docs(name: str, address: Address = "127.0.0.1:50051") -> None:
    """List the documents of a knowledge base."""
    with _reported_errors(address), _connect(address) as channel:
        documents = list(client.list_documents(channel, name))
    table = Table(title=Text(f"Documents in {client.printable(name)}"))
    for column in ("id", "title", "version", "chunks", "size", "file name"):
        table.add_column(column, overflow="fold", justify="right" if column in ("version", "chunks", "size") else "left")
    for d in documents:
        _add_row(table, d.id, d.title, str(d.version), str(d.chunk_count), _size(d.size_bytes), d.file_name)
    console.print(table)


# -- retrieval quality --------------------------------------------------------------------------------
@app.command("eval")
def eval_command(
    questions: Annotated[Path, typer.Argument(help='JSON lines, each {"question", "document", "phrase"?}.')],
    kb: Annotated[str, typer.Option(help="The knowledge base to search (documents named by their ids).")],
    top_k: Annotated[int, typer.Option(help="Sources retrieved per question: hit@k for k = 1, 3, 5 up to this.")] = 5,
    mode: Annotated[
        Optional[list[str]], typer.Option(help="A mode to measure: dense, keyword or hybrid (repeatable; default all three).")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the scores as JSON instead of a table.")] = False,
    address: Address = "127.0.0.1:50051",
) -> None:
    """Measure retrieval on labelled questions: hit@1/3/5, MRR and phrase-hit@1/3/5 of each search
    mode, side by side (each question searched through the gateway's Search, as Ask searches)."""
    from askmesh import evaluation

    with _reported_errors(address):
        labelled = evaluation.load_questions(questions)
        modes = [name.strip().lower() for name in mode or evaluation.MODES]
        for name in modes:
            client.search_mode(name)  # a ValueError names a mode that is not one
        if top_k < 1:
            raise ValueError(f"--top-k must be at least 1, not {top_k}")
        channel = _connect(address)

    def search(question: str, wanted: int, k: int) -> evaluation.Found:
        query = gateway_pb2.SearchQuery(question=question, knowledge_base=kb, top_k=k, search_mode=wanted)  # type: ignore[arg-type]
        try:
            found = client.search(channel, query)
        except grpc.RpcError as error:
            if client.status_of(error) == grpc.StatusCode.FAILED_PRECONDITION:
                raise evaluation.ModeUnavailable(error.details() or "refused") from error  # type: ignore[attr-defined]
            raise
        return evaluation.Found([(c.document_id, c.text) for c in found.citations], found.search_mode, found.search_notice)

    with _reported_errors(address), channel:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=errors, transient=True) as bar:
            tasks = {name: bar.add_task(f"searching ({name})", total=len(labelled)) for name in modes}
            scores = evaluation.evaluate(
                labelled, search, modes, top_k, progress=lambda name, done: bar.update(tasks[name], completed=done)
            )
    if json_output:
        print(json.dumps(evaluation.report(kb, top_k, labelled, scores), indent=2))
        return
    console.print(evaluation.table(kb, top_k, labelled, scores))
    for line in evaluation.notes(scores):
        console.print(client.printable(line), markup=False, highlight=False, soft_wrap=True)


# -- ingestion ------------------------------------------------------------------------------------
@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files, or directories whose supported files (not in subdirectories) are ingested.")],
    kb: Annotated[str, typer.Option(help="Knowledge base (must exist: `askmesh kb create`).")],
    metadata: Annotated[
        Optional[list[str]], typer.Option(help="Metadata key=value for every file; typed bool/int/float/string (repeatable).")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Follow each file's task until it ends.")] = True,
    address: Address = "127.0.0.1:50051",
) -> None:
    """Upload files (PDF, Word .docx, Markdown, HTML, plain text) to a knowledge base.

    Each file becomes a background task on the server; with --wait (the default) a progress bar follows each one, and the command exits 1 unless every file succeeded.
    """
    with _reported_errors(address):
        files = client.files_to_ingest(paths)
        for path in files:
            if path.stat().st_size == 0:
                raise ValueError(f"{path}: the file is empty")
        meta = client.parse_metadata(metadata or [])
        channel = _connect(address)
    queued: list[tuple[str, ingestion_pb2.Task]] = []
    with channel:
        for path in files:
            try:
                task = client.upload_file(channel, path, client.upload_header(path, kb, metadata=meta))
            except (grpc.RpcError, OSError) as error:
                if isinstance(error, grpc.RpcError):
                    _print_rpc_error(error, prefix=f"{path.name}: ", target=address)
                else:
                    errors.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
                if queued:
                    errors.print(
                        f"{len(queued)} file(s) already uploaded keep going: see `askmesh tasks --kb {kb}`.",
                        markup=False, highlight=False,
                    )
                raise typer.Exit(1 if isinstance(error, grpc.RpcError) else 2) from error
            queued.append((path.name, task))
            console.print(f"[dim]{_plain(path.name)}: uploaded, task {_plain(task.id)}[/dim]", highlight=False, soft_wrap=True)
        if not wait:
            return
        results = _follow_tasks(channel, queued)
    if not _report_outcomes([label for label, _ in queued], results):
        raise typer.Exit(1)


class TaskStateChoice(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


@app.command("tasks")
def tasks_command(
    kb: Annotated[Optional[str], typer.Option(help="Only this knowledge base's tasks.")] = None,
    state: Annotated[Optional[list[TaskStateChoice]], typer.Option(help="Only tasks in this state (repeatable).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Most tasks to show, newest first.")] = 20,
    address: Address = "127.0.0.1:50051",
) -> None:
    """List ingestion and rebuild tasks, newest first."""
    states = [ingestion_pb2.TaskState.Value(f"TASK_STATE_{s.value.upper()}") for s in state or []]
    with _reported_errors(address), _connect(address) as channel:
        found = client.list_tasks(channel, knowledge_base=kb or "", states=states, limit=limit)
    table = Table(title="Tasks")
    table.add_column("id", no_wrap=True, min_width=32)
    for column in ("kind", "kb", "document", "file", "state", "stage", "progress", "attempts", "error", "updated"):
        table.add_column(column, overflow="fold")
    for task in found:
        total, done, unit = _task_counts(task)
        _add_row(
            table, task.id, client.enum_word(ingestion_pb2.TaskKind, task.kind, "TASK_KIND_"), task.knowledge_base, task.document_id,
            task.file_name, _task_state(task), _task_stage(task), f"{done}/{total} {unit}" if total else "",
            f"{task.attempts} of {task.max_attempts}" if task.attempts else "", task.error, _time(task.updated_at),
        )
    console.print(table)


@app.command()
def cancel(task_id: str, address: Address = "127.0.0.1:50051") -> None:
    """Cancel a queued or running task; what it stored so far is removed."""
    with _reported_errors(address), _connect(address) as channel:
        task = client.cancel_task(channel, task_id)
    state = _task_state(task)
    pending = " (cancel requested)" if task.cancel_requested and task.state not in client.TERMINAL_TASK_STATES else ""
    console.print(client.printable(f"task {task.id}: {state}{pending}"), markup=False, highlight=False)


# -- models -------------------------------------------------------------------------------------
model_app = typer.Typer(
    help="Show or swap the model of embedder and generator replicas, without a restart.", no_args_is_help=True
)
app.add_typer(model_app, name="model")


class ModelTier(str, Enum):
    embedder = "embedder"
    generator = "generator"


# A swap is per replica: each is called at its own address, not through Envoy (which would pick one).
ReplicaAddresses = Annotated[
    Optional[list[str]],
    typer.Option(
        "--address", help="A replica's own host:port, not Envoy's (repeatable; default: every replica of `askmesh up`)."
    ),
]


def _replica_addresses(tier: str, addresses: list[str] | None, control: str) -> list[str]:
    """The addresses given, else every replica of the tier that `askmesh up` runs."""
    if addresses:
        return addresses
    from askmesh.v1 import mesh_pb2, mesh_pb2_grpc

    with _reported_errors(control), _connect_internal(control) as channel:
        reply = mesh_pb2_grpc.MeshControlStub(channel).ListReplicas(mesh_pb2.ListReplicasRequest(), timeout=10)
    return [replica.address for replica in reply.replicas if replica.tier == tier]


def _model_summary(info: common_pb2.ModelInfo) -> str:
    facts = [info.backend, *([f"{info.dimension} dimensions"] if info.dimension else [])]
    swaps = f"; {_plural(info.swaps, 'swaps')}" if info.swaps else ""
    retiring = f"; {info.retiring_calls} calls finishing on the replaced model" if info.retiring_calls else ""
    return (
        f"{info.name} ({', '.join(facts)}) from {info.path}, loaded {_time(info.loaded_at)} "
        f"in {info.load_seconds:.1f} s{swaps}{retiring}"
    )


@model_app.command("show")
def model_show(tier: ModelTier, address: ReplicaAddresses = None, control: ControlAddress = "127.0.0.1:50050") -> None:
    """Show the model each replica serves."""
    address = _replica_addresses(tier.value, address, control)
    failed = False
    for replica in address:
        try:
            with _connect_internal(replica) as channel:
                info = client.get_model(channel, tier.value)
        except grpc.RpcError as error:
            _print_rpc_error(error, prefix=f"{replica}: ", target=replica)
            failed = True
            continue
        except ValueError as error:
            errors.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from error
        console.print(client.printable(f"{replica}: {_model_summary(info)}"), markup=False, highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@model_app.command("swap")
def model_swap(
    tier: ModelTier,
    path: Annotated[
        str,
        typer.Argument(
            help="On the replicas' file system: a sentence-transformers folder (embedder) or a GGUF file (local "
            "generator); for a generator on an OpenAI-compatible server, a model name that server serves."
        ),
    ],
    address: ReplicaAddresses = None,
    control: ControlAddress = "127.0.0.1:50050",
    name: Annotated[str, typer.Option(help="The name responses report (default: from the path).")] = "",
    backend: Annotated[str, typer.Option(help="Embedder only: torch or onnx (default: keep the current one).")] = "",
    allow_dimension_change: Annotated[
        bool,
        typer.Option(help="Embedder only: accept another vector length (knowledge bases must then be rebuilt)."),
    ] = False,
) -> None:
    """Swap the model of each replica in turn: each loads the new model beside the old one, warms it
    up, then switches; calls in flight finish on the old model. Stops at the first replica that
    refuses or fails (it keeps its old model) and names those not tried; the replicas before it
    serve the new model: fix the cause and run the swap again, or swap them back."""
    address = _replica_addresses(tier.value, address, control)
    for index, replica in enumerate(address):
        try:
            with _connect_internal(replica) as channel:
                info = client.swap_model(
                    channel, tier.value, path, model_name=name, backend=backend,
                    allow_dimension_change=allow_dimension_change,
                )
        except grpc.RpcError as error:
            _print_rpc_error(error, prefix=f"{replica}: ", target=replica)
            for skipped in address[index + 1 :]:
                errors.print(f"{skipped}: not swapped (stopped after {replica} failed)", markup=False, highlight=False)
            raise typer.Exit(1) from error
        except ValueError as error:
            errors.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from error
        console.print(
            client.printable(
                f"{replica}: now serves {info.name} (replaced {info.replaced or 'nothing'}; loaded and warmed up "
                f"in {info.load_seconds:.1f} s)"
            ),
            markup=False, highlight=False, soft_wrap=True,
        )


keys_app = typer.Typer(help="Create, list and revoke API keys (an admin's key, or the operator's).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _key_row(table: Table, key: keys_pb2.ApiKey) -> None:
    revoked = _time(key.revoked_at) if key.HasField("revoked_at") else "-"
    _add_row(table, key.id, key.tenant, key.role, key.description, _time(key.created_at), revoked)


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="reader (ask, list, read), writer (and add, ingest, delete documents) or admin.")],
    tenant: Annotated[str, typer.Option(help="The key's tenant (default: the caller's; another one needs the operator's key).")] = "",
    description: Annotated[str, typer.Option(help="What the key is for, shown in listings.")] = "",
    address: Address = "127.0.0.1:50051",
) -> None:
    """Create a key. It is shown once, alone on the last line: only its hash is kept."""
    with _reported_errors(address), _connect(address) as channel:
        created = client.create_key(channel, tenant=tenant, role=role, description=description)
    key = created.key
    errors.print(
        client.printable(f"Created key {key.id} ({key.role} of tenant {key.tenant}); it is not shown again:"),
        markup=False, highlight=False,
    )
    sys.stdout.write(created.secret + "\n")


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str, typer.Option(help="Whose keys (default: the caller's tenant).")] = "",
    all: Annotated[bool, typer.Option("--all", help="Revoked keys too.")] = False,
    address: Address = "127.0.0.1:50051",
) -> None:
    """List keys (their ids, never the keys)."""
    with _reported_errors(address), _connect(address) as channel:
        keys = client.list_keys(channel, tenant=tenant, include_revoked=all)
    table = Table("id", "tenant", "role", "description", "created", "revoked")
    for key in keys:
        _key_row(table, key)
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, address: Address = "127.0.0.1:50051") -> None:
    """Revoke a key: calls with it are refused (by every gateway within its lookup TTL, 10 s by default)."""
    with _reported_errors(address), _connect(address) as channel:
        key = client.revoke_key(channel, key_id)
    console.print(client.printable(f"Revoked key {key.id} ({key.role} of tenant {key.tenant})."), markup=False, highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
