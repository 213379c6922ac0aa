"""One apply at a time: an exclusive lock file in the state directory (flock, released by the kernel on exit).

A second apply waits up to `wait` seconds, then fails with a message that
names the process holding the lock. A crash leaves no stale lock behind:
the kernel drops the flock with the process.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from reconciler.errors import TemporaryError

__all__ = ["state_lock"]


@contextmanager
def state_lock(state_dir: Path, *, wait: float = 0.0, poll: float = 0.2, holder: str = "") -> Iterator[None]:
    """Hold the state directory; `holder` says who in the lock file (`reconciler run`), for the refusal."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "apply.lock"
    handle = path.open("a+")
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    raise TemporaryError(
                        f"another apply is running ({holder})",
                        resource=str(path),
                        hint="wait for it, or pass --wait SECONDS",
                    ) from None
                time.sleep(poll)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}" + (f", {holder}" if holder else "") + "\n")
        handle.flush()
        yield
    finally:
        handle.close()
