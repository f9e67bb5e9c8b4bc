"""One writer per slide output folder.

``OUT/<slide-id>/.lock`` holds an exclusive ``flock`` for as long as a process works on
that slide, and says who holds it (pid, host, start time) so the second process can tell
the user. The kernel drops the lock when its holder dies, even by ``kill -9``, so a lock
file left by a dead process is stale by construction: the next run takes it over and says
so. On NFS, Linux emulates ``flock`` with byte-range locks, so this also holds between
cluster nodes.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import OutputNotWritable, SlideLocked

LOCK_NAME = ".lock"


def _holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(info: dict[str, Any]) -> str:
    """'pid 123 on host-a since 2026-11-23T10:00:00' (or what is known of it)."""
    if not info:
        return "another process"
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')} since "
            f"{info.get('since', '?')}")


@contextmanager
def slide_lock(folder: str | os.PathLike, *, wait_s: float = 0.0,
               poll_s: float = 0.5) -> Iterator[dict[str, Any]]:
    """Hold the lock of ``folder`` (created if needed) while the block runs.

    Waits up to ``wait_s`` seconds for another holder to finish, then raises
    :class:`SlideLocked` naming it. Yields ``{"stale": info}`` when it took over the lock
    file of a process that had died, else ``{}``.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OutputNotWritable(f"{folder}: cannot create the lock file ({exc})") from exc
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise SlideLocked(f"{folder}: in use by {describe_holder(_holder(fd))}; "
                                      "skipped (rerun later, or --lock-wait SECONDS)") from None
                time.sleep(poll_s)
        previous = _holder(fd)  # a holder's record with no lock behind it: it died
        taken = {"stale": previous} if previous.get("pid") else {}
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield taken
        finally:
            os.ftruncate(fd, 0)  # an empty file: nobody holds it
    finally:
        os.close(fd)  # releases the flock
