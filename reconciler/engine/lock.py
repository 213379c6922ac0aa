"""One apply at a time: an exclusive lock file in the state directory (flock, released by the kernel on exit).

A second apply waits up to `wait` seconds, then fails with a message that
names the process holding the lock. A crash leaves no stale lock behind:
the kernel drops the flock with the process. A state directory that is a
file, or cannot be made, is a StateError naming it (never a traceback).
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from reconciler.errors import StateError, TemporaryError

__all__ = ["ensure_state_dir", "state_lock"]


def ensure_state_dir(state_dir: Path) -> None:
    """Make the state directory if it is missing. StateError, naming it and what to do, when it cannot be one."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StateError(
            f"the state directory {state_dir} is a file, not a folder",
            hint="point --state-dir (or RECONCILER_STATE_DIR) at a folder, or move that file aside",
        ) from None
    except OSError as exc:
        raise StateError(
            f"the state directory {state_dir} cannot be made: {exc.strerror or type(exc).__name__}",
            hint="point --state-dir (or RECONCILER_STATE_DIR) at a folder this user may write",
        ) from None


@contextmanager
def state_lock(state_dir: Path, *, wait: float = 0.0, poll: float = 0.2, holder: str = "") -> Iterator[None]:
    """Hold the state directory; `holder` says who in the lock file (`reconciler run`), for the refusal.

    StateError when the directory or the lock file cannot be used.
    """
    ensure_state_dir(state_dir)
    path = state_dir / "apply.lock"
    try:
        handle = path.open("a+")
    except OSError as exc:
        raise StateError(
            f"the lock file {path} cannot be opened: {exc.strerror or type(exc).__name__}",
            hint="it must be a file this user may write; move whatever is there aside",
        ) from None
    if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):  # a device or a FIFO: its holder cannot be written
        handle.close()
        raise StateError(
            f"the lock file {path} cannot be used: it is not a regular file",
            hint="move whatever is there aside",
        )
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    current = handle.read().strip() or "another process"
                    raise TemporaryError(
                        f"another apply is running ({current})",
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
