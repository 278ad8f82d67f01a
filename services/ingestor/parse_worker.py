"""Parsing an upload in a process of its own, under limits: both ends of it.

Why a process: a hostile or broken file (a DOCX zip bomb, a pathological PDF, a file that sends
a parser into a loop or makes it crash) must fail its own task and nothing else. Parsed inside
the ingestor, it could take the process down with every task and call on it, and the task would be
claimed again after each crash. So every upload is parsed by
`python -m services.ingestor.parse_worker`, which first limits its own address space
(RLIMIT_AS) and CPU time (RLIMIT_CPU), then parses the spooled file and writes one JSON object
on stdout. The ingestor (`parse_file`) waits for it without blocking its event loop, kills it
when the time limit is up, and turns every way it can end into a one-sentence reason.

The child is started by exec (asyncio's subprocess, through `askmesh.die_with_parent` so that
it dies with the ingestor), never with `preexec_fn`: no Python code may run between fork and
exec in the multi-threaded ingestor. The CPU limit is the time limit and a second (CPU time
never runs ahead of wall-clock time here, so the ingestor's own limit speaks first): it ends a
child whose ingestor could not kill it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import resource
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.ingestor.parsing import ParsedDocument, ParseError, Section, display_name, parse_document

log = logging.getLogger("askmesh.ingestor.parsing")

# The command that runs the child half of this module; tests put a slow or crashing one here.
WORKER_COMMAND: list[str] = [sys.executable, "-m", "services.ingestor.parse_worker"]
# The child's exit status when it ran out of memory (a MemoryError, caught before anything else
# that would need memory runs).
EXIT_OUT_OF_MEMORY = 3
# What the ingestor keeps of a child's stderr for its log: the end, where a traceback says why.
STDERR_TAIL_BYTES = 4096
# JSON on stdout may take this many bytes per character of text (escapes, 4-byte UTF-8), plus
# room for the structure: more than that is a broken child, stopped before it fills memory.
JSON_BYTES_PER_CHAR = 6
JSON_OVERHEAD_BYTES = 1 << 20


@dataclass(frozen=True)
class ParseLimits:
    timeout_s: float  # wall-clock time, and CPU time, one parse may take
    max_memory_bytes: int  # the child's address space
    # Text beyond this could not be stored anyway (max_chunks_per_task chunks of chunk_size):
    # refused in the child, so a small file that expands to gigabytes of text never reaches the
    # ingestor's memory.
    max_chars: int
    # How a refusal for too much text names the limit, e.g. "50000 chunks of 600 characters".
    max_chars_meaning: str = ""


# ----------------------------------------------------------------------------- the ingestor's half


async def parse_file(path: Path, file_name: str, content_type: str, limits: ParseLimits) -> ParsedDocument:
    """Parses the file at `path` in a child process under `limits`; every failure (a bad file,
    a limit reached, the parser crashing) is a ParseError with a one-sentence reason."""
    name = display_name(file_name)
    command = [
        sys.executable, "-m", "askmesh.die_with_parent", *WORKER_COMMAND, str(path),
        f"--file-name={file_name}", f"--content-type={content_type}",
        f"--max-memory-bytes={limits.max_memory_bytes}", f"--max-cpu-s={limits.timeout_s}",
        f"--max-chars={limits.max_chars}",
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "ASKMESH_PARENT_PID": str(os.getpid())},
    )
    assert process.stdout is not None and process.stderr is not None
    errors = asyncio.create_task(_tail(process.stderr))
    try:
        async with asyncio.timeout(limits.timeout_s):
            output = await _read_at_most(process.stdout, limits.max_chars * JSON_BYTES_PER_CHAR + JSON_OVERHEAD_BYTES)
            if output is None:
                process.kill()
            code = await process.wait()
            stderr = await errors
    except TimeoutError:
        raise ParseError(f"{name} took longer to parse than the limit of {limits.timeout_s:g} s (parse_timeout_s)") from None
    finally:
        if process.returncode is None:  # timed out, or the task was cancelled: never leave it running
            process.kill()
            await process.wait()
        errors.cancel()
    if output is None:
        raise ParseError(f"{name} has more text than one task may store ({limits.max_chars_meaning or limits.max_chars})")
    if code != 0:
        log.warning("parsing %s ended with status %d; its stderr ends: %s", name, code, stderr.decode(errors="replace"))
    return _result(name, code, output, limits)


def _result(name: str, code: int, output: bytes, limits: ParseLimits) -> ParsedDocument:
    if code == EXIT_OUT_OF_MEMORY:
        mib = limits.max_memory_bytes / (1 << 20)
        raise ParseError(f"{name} needs more memory to parse than the limit of {mib:g} MiB (parse_max_memory_bytes)")
    if code == -signal.SIGXCPU:
        raise ParseError(f"{name} needs more CPU time to parse than the limit of {limits.timeout_s:g} s (parse_timeout_s)")
    if code < 0:
        raise ParseError(f"the parser was ended by {signal.Signals(-code).name} while reading {name}")
    if code != 0:
        raise ParseError(f"the parser stopped with exit status {code} while reading {name}")
    try:
        answer: dict[str, Any] = json.loads(output)
    except ValueError:
        raise ParseError(f"the parser gave no readable result for {name}") from None
    if "error" in answer:
        raise ParseError(str(answer["error"]))
    if "too_much_text" in answer:
        raise ParseError(
            f"{name} has {answer['too_much_text']} characters of text, more than one task may store "
            f"({limits.max_chars_meaning or limits.max_chars})"
        )
    return ParsedDocument(
        format=answer["format"], title=answer["title"], sections=[Section(**item) for item in answer["sections"]]
    )


async def _read_at_most(stream: asyncio.StreamReader, limit: int) -> bytes | None:
    """Everything until EOF, or None once it exceeds `limit` bytes."""
    parts: list[bytes] = []
    size = 0
    while data := await stream.read(1 << 16):
        size += len(data)
        if size > limit:
            return None
        parts.append(data)
    return b"".join(parts)


async def _tail(stream: asyncio.StreamReader) -> bytes:
    """The last STDERR_TAIL_BYTES of a stream, read to its end (a full pipe would stall the child)."""
    kept = b""
    while data := await stream.read(1 << 16):
        kept = (kept + data)[-STDERR_TAIL_BYTES:]
    return kept


# ----------------------------------------------------------------------------- the child's half


def main(argv: list[str] | None = None) -> int:
    arguments = argparse.ArgumentParser(description="Parses one spooled upload under limits (run by the ingestor).")
    arguments.add_argument("path", type=Path)
    arguments.add_argument("--file-name", default="")
    arguments.add_argument("--content-type", default="")
    arguments.add_argument("--max-memory-bytes", type=int, required=True)
    arguments.add_argument("--max-cpu-s", type=float, required=True)
    arguments.add_argument("--max-chars", type=int, required=True)
    args = arguments.parse_args(argv)
    limit_self(args.max_memory_bytes, args.max_cpu_s)
    try:
        answer = _parse(args.path, args.file_name, args.content_type, args.max_chars)
        text = json.dumps(answer, ensure_ascii=False)
        sys.stdout.write(text)
        sys.stdout.flush()
    except MemoryError:
        os._exit(EXIT_OUT_OF_MEMORY)  # at once: anything more (a traceback, a flush) may need memory
    return 0


def limit_self(max_memory_bytes: int, max_cpu_s: float) -> None:
    """Limits this process: no core files (a crash on a hostile file is expected), at most
    `max_memory_bytes` of address space, and a second more than `max_cpu_s` of CPU time (then
    SIGXCPU, and SIGKILL a second later should that be caught)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _lower(resource.RLIMIT_AS, max_memory_bytes)
    cpu = math.ceil(max_cpu_s) + 1
    _lower(resource.RLIMIT_CPU, cpu, hard=cpu + 1)


def _lower(which: int, soft: int, hard: int | None = None) -> None:
    """Sets a limit, never above the hard limit this process already has."""
    _, current_hard = resource.getrlimit(which)
    hard = soft if hard is None else hard
    if current_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(which, (soft, hard))


def _parse(path: Path, file_name: str, content_type: str, max_chars: int) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {"error": f"the upload of {display_name(file_name)} is gone from the spool"}
    try:
        parsed = parse_document(data, file_name, content_type)
    except ParseError as error:
        return {"error": str(error)}
    chars = sum(len(section.text) for section in parsed.sections)
    if chars > max_chars:
        return {"too_much_text": chars}
    return {"format": parsed.format, "title": parsed.title, "sections": [asdict(s) for s in parsed.sections]}


if __name__ == "__main__":
    sys.exit(main())
