"""Named points between a write's steps where a test can kill the process, as a power cut or
`kill -9` would (the crash-point harness: tests/test_crash_matrix.py).

`crash_point("add.committed")` does nothing unless the process was started with that name in
$ASKMESH_CRASH_AT (comma-separated): then the process sends itself SIGKILL right there, with no
cleanup, no `finally`, no flush. Read once at import, so the cost in production is one set lookup.
"""

from __future__ import annotations

import os
import signal

CRASH_AT_ENV = "ASKMESH_CRASH_AT"
_ARMED = frozenset(name.strip() for name in os.environ.get(CRASH_AT_ENV, "").split(",") if name.strip())


def crash_point(name: str) -> None:
    if name in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
