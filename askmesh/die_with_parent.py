"""`python -m askmesh.die_with_parent COMMAND...`: runs COMMAND so that it gets SIGTERM when the
process that started it dies (Linux's PR_SET_PDEATHSIG, which survives exec).

A trampoline rather than `preexec_fn`: the mesh starts replicas while gRPC threads run, and no
Python code may run between fork and exec in a multi-threaded parent (a replica started that way
crashed with SIGSEGV before its first line of output). Here the setting is made in a fresh
process, which then becomes the command.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent = int(os.environ.pop("ASKMESH_PARENT_PID", "0"))
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: the mesh still stops its processes itself
    if parent and os.getppid() != parent:
        sys.exit(1)  # the parent died before the setting took effect
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
