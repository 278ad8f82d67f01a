"""A small synchronous client of the gateway tier (Gateway, KnowledgeBases, Ingestion), used by
the CLI, `askmesh up` and the tests."""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import grpc
from google.protobuf import struct_pb2

from askmesh.runtime.auth import with_credential
from askmesh.runtime.channels import CHANNEL_OPTIONS
from askmesh.runtime.config import DEFAULT_MAX_MESSAGE_BYTES, check_address
from askmesh.runtime.validation import SEARCH_MODE_BY_NAME
from askmesh.v1 import (
    common_pb2,
    embedder_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    generator_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    knowledge_pb2,
    knowledge_pb2_grpc,
)

TEXT_SUFFIXES = {".md": "markdown", ".markdown": "markdown", ".txt": "text"}


def connect(
    address: str, credential: str | None = None, tenant: str | None = None, tls_ca: Path | None = None
) -> grpc.Channel:
    """A channel to `address` whose calls carry `credential` (an API key, or the mesh's internal
    token for its own RPCs) and, for the operator's key, the tenant it acts in. With `tls_ca` (a
    PEM file of the certificates to trust) the channel speaks TLS, else plaintext."""
    try:
        check_address(address)
    except ValueError as error:
        raise ValueError(f"--address: {error}") from error
    if tls_ca is None:
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=read_tls_ca(tls_ca))
        channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
    return with_credential(channel, credential, tenant)


def read_tls_ca(path: Path) -> bytes:
    """The PEM certificates of `path`; ValueError naming the file when it holds none."""
    try:
        pem = path.read_bytes()
    except OSError as error:
        raise ValueError(f"--tls-ca: cannot read {path} ({error.strerror or error})") from error
    # grpc would otherwise fail every call later with a vague handshake error.
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ValueError(f"--tls-ca: {path} holds no PEM certificate")
    return pem


# Terminal control sequences in text from a server or a model: CSI (colours, cursor moves), OSC
# (window titles, hyperlinks, clipboard writes) and DCS/SOS/PM/APC strings, in their 7-bit and
# 8-bit forms, and the short ESC sequences. What is left of a sequence cut in two (a streamed
# answer's deltas) loses its ESC to _CONTROL_CHARACTERS and prints as inert text.
_TERMINAL_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x9b[0-?]*[ -/]*[@-~]"
    r"|[\x1b][\]PX^_][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)|[\x90\x98\x9d\x9e\x9f][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)"
    r"|\x1b[ -/]+[0-~]|\x1b[0-OQ-WYZ\\`-~]"  # the short ones: not the introducers of those above
)
# Every other C0 control but newline and tab, DEL, and the C1 controls.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` without terminal control sequences or control characters (newlines and tabs
    kept): what a server or a model sent can then neither restyle nor retitle the terminal."""
    return _CONTROL_CHARACTERS.sub("", _TERMINAL_SEQUENCE.sub("", text))


class StreamedText:
    """`printable` for text that arrives in pieces (an answer's deltas): a control sequence cut
    between two pieces is held back until it is whole, so it is stripped as a whole too. A held
    piece longer than any real sequence is let go (its ESC stripped), so nothing waits forever."""

    _INTRODUCERS = "\x1b\x90\x98\x9b\x9d\x9e\x9f"
    _LONGEST_HELD = 4096

    def __init__(self) -> None:
        self._held = ""

    def feed(self, text: str) -> str:
        # Whole sequences go first; an introducer left after them starts one not finished yet.
        text, self._held = _TERMINAL_SEQUENCE.sub("", self._held + text), ""
        starts = [at for at in map(text.find, self._INTRODUCERS) if at >= 0]
        if starts and len(text) - min(starts) <= self._LONGEST_HELD:
            text, self._held = text[: min(starts)], text[min(starts) :]
        return printable(text)

    def flush(self) -> str:
        """What is still held, at the stream's end."""
        held, self._held = self._held, ""
        return printable(held)


def status_of(error: grpc.RpcError) -> grpc.StatusCode:
    """The status a caller should act on.

    A stream whose gateway replica died after the answer started cannot end with a status:
    Envoy can only reset it, and gRPC maps an HTTP/2 reset to INTERNAL ("Received RST_STREAM").
    That is a lost connection, not a server bug: it is reported (and can be retried) as
    UNAVAILABLE.
    """
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.INTERNAL and "RST_STREAM" in (error.details() or ""):  # type: ignore[attr-defined]
        return grpc.StatusCode.UNAVAILABLE
    return code


# What a person can do about a failure with this status; the others' messages already say what
# to fix (the field, the missing knowledge base, the conflicting write).
RPC_HINTS = {
    grpc.StatusCode.UNAVAILABLE: "try again in a moment; `askmesh replicas` shows which replicas are up",
    grpc.StatusCode.DEADLINE_EXCEEDED: "try again with a longer deadline",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "try again later, when fewer questions are waiting",
    grpc.StatusCode.INTERNAL: "this is a bug; the service's log says more",
    grpc.StatusCode.UNKNOWN: "this is a bug; the service's log says more",
    grpc.StatusCode.UNIMPLEMENTED: "the server there is not an askmesh service of this version",
}
NOT_CONNECTED_HINT = "is askmesh running there? `askmesh up` starts it"


def describe_rpc_error(error: grpc.RpcError, target: str = "") -> str:
    """A failed call as one line for a person: `CODE: what failed; what to do`.

    Never the error object itself, whose str() is a multi-line Python repr
    (`<_InactiveRpcError of RPC that terminated with: ...>`). `target` is the address called,
    named when nothing answered there.
    """
    code_of, details_of = getattr(error, "code", None), getattr(error, "details", None)
    if not callable(code_of) or not callable(details_of):  # an RpcError that carries no status
        return f"the call{f' to {target}' if target else ''} failed without a status; run again with --debug"
    code = status_of(error)
    details = " ".join(printable(str(details_of() or "")).split())  # one line, whatever the server sent
    hint = RPC_HINTS.get(code, "")
    if code == grpc.StatusCode.UNAVAILABLE and details.startswith("failed to connect to all addresses"):
        # grpc's own text: "failed to connect to all addresses; last error: UNKNOWN: ipv4:...:
        # Failed to connect to remote host: connect: Connection refused (111)"
        reason = details.rsplit(": ", 1)[-1]
        details = f"nothing answers at {target or 'that address'} ({reason})"
        hint = NOT_CONNECTED_HINT
    text = f"{code.name}: {details or 'no details given'}"
    return f"{text}; {hint}" if hint else text


def document_from_file(path: Path, root: Path | None = None) -> gateway_pb2.Document:
    """A text or Markdown file as a document: id from its name, title from its first heading."""
    text = path.read_text(encoding="utf-8")
    title = next((line.lstrip("#").strip() for line in text.splitlines() if line.startswith("# ")), path.stem)
    metadata = struct_pb2.Struct()
    source = str(path.relative_to(root)) if root else path.name
    metadata.update({"source": source, "format": TEXT_SUFFIXES.get(path.suffix.lower(), "text")})
    return gateway_pb2.Document(id=path.stem, title=title, text=text, metadata=metadata)


# One AddDocuments request stays below the servers' message limit (room left for the knowledge
# base's name and the framing) and within the ingestor's default count of documents a call.
ADD_REQUEST_BYTES = DEFAULT_MAX_MESSAGE_BYTES - 64 * 1024
ADD_REQUEST_DOCUMENTS = 256


def document_batches(
    documents: Sequence[gateway_pb2.Document],
    max_bytes: int = ADD_REQUEST_BYTES,
    max_documents: int = ADD_REQUEST_DOCUMENTS,
) -> list[list[gateway_pb2.Document]]:
    """The documents in order, in batches that each fit one request; raises ValueError (naming
    the file) for a document too large for any request, before anything is sent."""
    batches: list[list[gateway_pb2.Document]] = []
    size = 0
    for document in documents:
        # A repeated field's element costs its bytes plus a tag and a length prefix (at most 6).
        cost = document.ByteSize() + 6
        if cost > max_bytes:
            source = document.metadata.fields["source"].string_value if "source" in document.metadata.fields else ""
            raise ValueError(
                f"{source or document.id}: too large to add in one request ({cost / 2**20:.1f} MiB, the limit is "
                f"{max_bytes / 2**20:.1f} MiB); `askmesh ingest` uploads a file in parts"
            )
        if not batches or size + cost > max_bytes or len(batches[-1]) >= max_documents:
            batches.append([])
            size = 0
        batches[-1].append(document)
        size += cost
    return batches


def add_documents(
    channel: grpc.Channel, knowledge_base: str, documents: Sequence[gateway_pb2.Document], timeout_s: float = 600
) -> gateway_pb2.AddDocumentsResponse:
    """Adds the documents in as many requests as the message limit needs; the responses are
    summed into one. Each request is indexed as it arrives, so a failure leaves the earlier
    batches added (adding them again replaces them)."""
    stub = gateway_pb2_grpc.GatewayStub(channel)
    total = gateway_pb2.AddDocumentsResponse()
    for batch in document_batches(documents):
        request = gateway_pb2.AddDocumentsRequest(knowledge_base=knowledge_base, documents=batch)
        response: gateway_pb2.AddDocumentsResponse = stub.AddDocuments(request, timeout=timeout_s)
        total.documents.extend(response.documents)
        total.chunk_count += response.chunk_count
        total.embed_ms += response.embed_ms
        total.upsert_ms += response.upsert_ms
    return total


def load_samples(
    channel: grpc.Channel, samples_dir: Path, knowledge_base: str = "default", timeout_s: float = 600
) -> gateway_pb2.AddDocumentsResponse:
    paths = sorted(p for p in samples_dir.iterdir() if p.suffix.lower() in TEXT_SUFFIXES)
    documents = [document_from_file(p, samples_dir.parent) for p in paths]
    return add_documents(channel, knowledge_base, documents, timeout_s)


def parse_filter(text: str) -> common_pb2.MetadataFilter:
    """`key=value` as an equality filter; the value is typed as bool, int, float or string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--filter: {text!r} is not key=value")
    value = common_pb2.FilterValue()
    typed = typed_value(raw)
    if isinstance(typed, bool):
        value.bool_value = typed
    elif isinstance(typed, int):
        value.int_value = typed
    elif isinstance(typed, float):
        value.double_value = typed
    else:
        value.string_value = typed
    return common_pb2.MetadataFilter(field=key, equals=value)


def ask(
    channel: grpc.Channel, request: gateway_pb2.AskRequest, timeout_s: float | None = None
) -> Iterator[gateway_pb2.AskResponse]:
    stub = gateway_pb2_grpc.GatewayStub(channel)
    yield from stub.Ask(request, timeout=timeout_s)


# -- typed values from the command line ---------------------------------------------------------
def typed_value(raw: str) -> bool | int | float | str:
    """A command-line value typed as bool (true/false), int, float, or else string."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        try:
            return kind(raw)  # type: ignore[no-any-return]
        except ValueError:
            pass
    return raw


def parse_metadata(items: Sequence[str], option: str = "--metadata") -> struct_pb2.Struct:
    """`key=value` pairs as a Struct; values typed like `parse_filter` types them."""
    metadata = struct_pb2.Struct()
    for text in items:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option}: {text!r} is not key=value")
        metadata.update({key.strip(): typed_value(raw)})
    return metadata


METADATA_TYPES = {
    "string": common_pb2.METADATA_TYPE_STRING,
    "int": common_pb2.METADATA_TYPE_INT,
    "float": common_pb2.METADATA_TYPE_FLOAT,
    "bool": common_pb2.METADATA_TYPE_BOOL,
}


def parse_field(text: str) -> common_pb2.MetadataField:
    """`name:type` (type: string, int, float or bool) as a declared metadata field."""
    name, sep, kind = text.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"--field: {text!r} is not name:type")
    if kind.strip().lower() not in METADATA_TYPES:
        raise ValueError(f"--field: {text!r}: the type must be one of {', '.join(METADATA_TYPES)}")
    return common_pb2.MetadataField(name=name.strip(), type=METADATA_TYPES[kind.strip().lower()])


def chunking(chunk_size: int | None = None, chunk_overlap: int | None = None) -> common_pb2.ChunkingOptions:
    """Chunking options; what is None is left unset (the server's or knowledge base's default)."""
    options = common_pb2.ChunkingOptions(chunk_size=chunk_size or 0)
    if chunk_overlap is not None:
        options.chunk_overlap = chunk_overlap
    return options


# -- knowledge bases ------------------------------------------------------------------------------
def search(channel: grpc.Channel, query: gateway_pb2.SearchQuery, timeout_s: float = 60) -> gateway_pb2.SearchResults:
    """A knowledge base's best sources for a question, without an answer."""
    return gateway_pb2_grpc.GatewayStub(channel).Search(query, timeout=timeout_s)  # type: ignore[no-any-return]


def search_mode(name: str | None) -> int:
    """A search mode by name (dense, keyword or hybrid); None or "" is UNSPECIFIED."""
    if not name:
        return common_pb2.SEARCH_MODE_UNSPECIFIED
    try:
        return SEARCH_MODE_BY_NAME[name.strip().lower()]
    except KeyError:
        raise ValueError(f"{name!r} is not a search mode: dense, keyword or hybrid") from None


def create_knowledge_base(
    channel: grpc.Channel,
    name: str,
    *,
    description: str = "",
    fields: Sequence[common_pb2.MetadataField] = (),
    chunking_options: common_pb2.ChunkingOptions | None = None,
    search_mode: int = common_pb2.SEARCH_MODE_UNSPECIFIED,
    timeout_s: float = 60,
) -> knowledge_pb2.KnowledgeBase:
    request = knowledge_pb2.CreateKnowledgeBaseRequest(
        name=name, description=description, metadata_schema=fields, chunking=chunking_options, search_mode=search_mode  # type: ignore[arg-type]
    )
    return knowledge_pb2_grpc.KnowledgeBasesStub(channel).CreateKnowledgeBase(request, timeout=timeout_s)  # type: ignore[no-any-return]


def list_knowledge_bases(channel: grpc.Channel, timeout_s: float = 30) -> list[knowledge_pb2.KnowledgeBase]:
    stub = knowledge_pb2_grpc.KnowledgeBasesStub(channel)
    return list(stub.ListKnowledgeBases(knowledge_pb2.ListKnowledgeBasesRequest(), timeout=timeout_s).knowledge_bases)


def get_knowledge_base(channel: grpc.Channel, name: str, timeout_s: float = 30) -> knowledge_pb2.KnowledgeBase:
    stub = knowledge_pb2_grpc.KnowledgeBasesStub(channel)
    return stub.GetKnowledgeBase(knowledge_pb2.GetKnowledgeBaseRequest(name=name), timeout=timeout_s)  # type: ignore[no-any-return]


def delete_knowledge_base(
    channel: grpc.Channel, name: str, timeout_s: float = 120
) -> knowledge_pb2.DeleteKnowledgeBaseResponse:
    stub = knowledge_pb2_grpc.KnowledgeBasesStub(channel)
    return stub.DeleteKnowledgeBase(knowledge_pb2.DeleteKnowledgeBaseRequest(name=name), timeout=timeout_s)  # type: ignore[no-any-return]


def rebuild_knowledge_base(
    channel: grpc.Channel,
    name: str,
    chunking_options: common_pb2.ChunkingOptions | None = None,
    timeout_s: float = 60,
    search_mode: int = common_pb2.SEARCH_MODE_UNSPECIFIED,
) -> ingestion_pb2.Task:
    stub = knowledge_pb2_grpc.KnowledgeBasesStub(channel)
    request = knowledge_pb2.RebuildKnowledgeBaseRequest(name=name, chunking=chunking_options, search_mode=search_mode)  # type: ignore[arg-type]
    return stub.RebuildKnowledgeBase(request, timeout=timeout_s)  # type: ignore[no-any-return]


def list_documents(
    channel: grpc.Channel, knowledge_base: str, page_size: int = 1000, timeout_s: float = 30
) -> Iterator[knowledge_pb2.DocumentInfo]:
    """Every document of a knowledge base, page after page."""
    stub = knowledge_pb2_grpc.KnowledgeBasesStub(channel)
    token = ""
    while True:
        request = knowledge_pb2.ListDocumentsRequest(
            knowledge_base=knowledge_base, page_size=page_size, page_token=token
        )
        page = stub.ListDocuments(request, timeout=timeout_s)
        yield from page.documents
        token = page.next_page_token
        if not token:
            return


# -- files and tasks ------------------------------------------------------------------------------
SUPPORTED_FILE_SUFFIXES = (".pdf", ".docx", ".md", ".markdown", ".html", ".htm", ".txt")
# Far below the message limit (DEFAULT_MAX_MESSAGE_BYTES) whatever a file holds.
UPLOAD_PART_BYTES = 256 * 1024
def enum_word(enum: object, value: int, prefix: str) -> str:
    """An enum value as the word people read: TaskState RUNNING, say, as "running"."""
    return enum.Name(value).removeprefix(prefix).lower()  # type: ignore[attr-defined, no-any-return]


TERMINAL_TASK_STATES = frozenset(
    {ingestion_pb2.TASK_STATE_SUCCEEDED, ingestion_pb2.TASK_STATE_FAILED, ingestion_pb2.TASK_STATE_CANCELLED}
)


def files_to_ingest(paths: Sequence[Path]) -> list[Path]:
    """Files as named (whatever their type: the server judges it), and the supported files
    directly inside each directory (not its subdirectories)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_FILE_SUFFIXES)
            if not inside:
                raise ValueError(f"{path}: no supported files in this directory ({' '.join(SUPPORTED_FILE_SUFFIXES)})")
            files.extend(inside)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise ValueError(f"{path}: not a regular file")
        else:
            raise ValueError(f"{path}: no such file or directory")
    return files


def upload_header(
    path: Path,
    knowledge_base: str,
    *,
    metadata: struct_pb2.Struct | None = None,
    document_id: str = "",
    title: str = "",
    chunking_options: common_pb2.ChunkingOptions | None = None,
) -> ingestion_pb2.UploadFileHeader:
    return ingestion_pb2.UploadFileHeader(
        knowledge_base=knowledge_base,
        file_name=path.name,
        content_type=mimetypes.guess_type(path.name)[0] or "",
        document_id=document_id,
        title=title,
        metadata=metadata,
        chunking=chunking_options,
    )


def upload_requests(
    header: ingestion_pb2.UploadFileHeader, stream: BinaryIO, part_bytes: int = UPLOAD_PART_BYTES
) -> Iterator[ingestion_pb2.UploadFileRequest]:
    """The header, then the stream's bytes in `data` messages of at most `part_bytes`."""
    yield ingestion_pb2.UploadFileRequest(header=header)
    while data := stream.read(part_bytes):
        yield ingestion_pb2.UploadFileRequest(data=data)


def upload_file(
    channel: grpc.Channel, path: Path, header: ingestion_pb2.UploadFileHeader, timeout_s: float | None = None
) -> ingestion_pb2.Task:
    """Streams a file to the Ingestion service; returns the queued task at once.
    The file is opened before the call, so a local read problem is an OSError, not a gRPC error."""
    stub = ingestion_pb2_grpc.IngestionStub(channel)
    with path.open("rb") as stream:
        return stub.UploadFile(upload_requests(header, stream), timeout=timeout_s)  # type: ignore[no-any-return]


def get_task(channel: grpc.Channel, task_id: str, timeout_s: float = 30) -> ingestion_pb2.Task:
    stub = ingestion_pb2_grpc.IngestionStub(channel)
    return stub.GetTask(ingestion_pb2.GetTaskRequest(id=task_id), timeout=timeout_s)  # type: ignore[no-any-return]


def cancel_task(channel: grpc.Channel, task_id: str, timeout_s: float = 30) -> ingestion_pb2.Task:
    stub = ingestion_pb2_grpc.IngestionStub(channel)
    return stub.CancelTask(ingestion_pb2.CancelTaskRequest(id=task_id), timeout=timeout_s)  # type: ignore[no-any-return]


def watch_task(channel: grpc.Channel, task_id: str, reconnects: int = 3) -> Iterator[ingestion_pb2.Task]:
    """The task now, then each time it changes, until it ends. A stream cut with UNAVAILABLE
    (a proxy's idle timeout, a gateway restart) is opened again, up to `reconnects` times."""
    stub = ingestion_pb2_grpc.IngestionStub(channel)
    while True:
        try:
            for task in stub.WatchTask(ingestion_pb2.WatchTaskRequest(id=task_id)):
                if not task.id:  # the error message a failing stream ends with; its status follows
                    continue
                yield task
                if task.state in TERMINAL_TASK_STATES:
                    return
            return
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or reconnects <= 0:  # type: ignore[attr-defined]
                raise
            reconnects -= 1


def list_tasks(
    channel: grpc.Channel,
    *,
    knowledge_base: str = "",
    states: Sequence[int] = (),
    limit: int = 100,
    timeout_s: float = 30,
) -> list[ingestion_pb2.Task]:
    """The newest `limit` tasks (newest first), following pages as needed."""
    stub = ingestion_pb2_grpc.IngestionStub(channel)
    tasks: list[ingestion_pb2.Task] = []
    token = ""
    while len(tasks) < limit:
        request = ingestion_pb2.ListTasksRequest(
            knowledge_base=knowledge_base, states=states, page_size=min(limit - len(tasks), 1000), page_token=token
        )
        page = stub.ListTasks(request, timeout=timeout_s)
        tasks.extend(page.tasks)
        token = page.next_page_token
        if not token:
            break
    return tasks[:limit]


# -- models: each embedder or generator replica at its own address (a swap is per replica) --------
MODEL_TIERS = ("embedder", "generator")


def _model_stub(channel: grpc.Channel, tier: str) -> embedder_pb2_grpc.EmbedderStub | generator_pb2_grpc.GeneratorStub:
    if tier == "embedder":
        return embedder_pb2_grpc.EmbedderStub(channel)
    if tier == "generator":
        return generator_pb2_grpc.GeneratorStub(channel)
    raise ValueError(f"tier: {tier!r} must be one of {', '.join(MODEL_TIERS)}")


def get_model(channel: grpc.Channel, tier: str, timeout_s: float = 30) -> common_pb2.ModelInfo:
    """The model one replica serves."""
    return _model_stub(channel, tier).GetModel(common_pb2.GetModelRequest(), timeout=timeout_s)  # type: ignore[no-any-return]


def swap_model(
    channel: grpc.Channel,
    tier: str,
    model_path: str,
    *,
    model_name: str = "",
    backend: str = "",
    allow_dimension_change: bool = False,
    timeout_s: float = 900,
) -> common_pb2.ModelInfo:
    """Switches one replica to another model (loaded beside the old one, warmed up, then swapped);
    returns the replica's new model. A model that fails to load leaves the old one serving."""
    request = common_pb2.SwapModelRequest(
        model_path=model_path, model_name=model_name, backend=backend, allow_dimension_change=allow_dimension_change
    )
    return _model_stub(channel, tier).SwapModel(request, timeout=timeout_s)  # type: ignore[no-any-return]


def create_key(channel: grpc.Channel, *, tenant: str, role: str, description: str, timeout_s: float = 30) -> keys_pb2.CreatedKey:
    request = keys_pb2.CreateKeyRequest(tenant=tenant, role=role, description=description)
    return keys_pb2_grpc.ApiKeysStub(channel).CreateKey(request, timeout=timeout_s)  # type: ignore[no-any-return]


def list_keys(channel: grpc.Channel, *, tenant: str = "", include_revoked: bool = False, timeout_s: float = 30) -> list[keys_pb2.ApiKey]:
    request = keys_pb2.ListKeysRequest(tenant=tenant, include_revoked=include_revoked)
    return list(keys_pb2_grpc.ApiKeysStub(channel).ListKeys(request, timeout=timeout_s).keys)


def revoke_key(channel: grpc.Channel, key_id: str, timeout_s: float = 30) -> keys_pb2.ApiKey:
    return keys_pb2_grpc.ApiKeysStub(channel).RevokeKey(keys_pb2.RevokeKeyRequest(id=key_id), timeout=timeout_s)  # type: ignore[no-any-return]
