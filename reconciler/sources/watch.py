"""Watch a local repository's refs, so a new commit on the branch starts a pass within a second.

Who calls it: the reconcile loop, for a local repository (a remote one is fetched instead).
The only module that imports watchfiles. It watches the git directory for the files a
commit, a reset or a `git gc` touch (`HEAD`, `packed-refs`, `refs/heads/...`) and ignores
everything else there (objects, the index, `refs/notes`, which the loop itself writes).
The callback runs on the watcher's own thread; it must only queue work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import watchfiles

__all__ = ["RefWatcher"]

_WATCHED_FILES = frozenset({"HEAD", "packed-refs"})


class RefWatcher:
    """A thread that calls `on_change` when a branch ref may have moved. `close()` stops it."""

    def __init__(self, git_dir: Path, on_change: Callable[[], None]) -> None:
        self.git_dir = git_dir.resolve()
        self.on_change = on_change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ref-watcher", daemon=True)
        self._thread.start()

    def _relevant(self, _change: watchfiles.Change, path: str) -> bool:
        try:
            relative = Path(path).resolve().relative_to(self.git_dir).as_posix()
        except ValueError:
            return False
        if relative.endswith(".lock"):
            return False
        return relative in _WATCHED_FILES or relative.startswith("refs/heads/")

    def _run(self) -> None:
        # step: changes are delivered 50 ms after the last one; rust_timeout bounds how long close() waits.
        for _changes in watchfiles.watch(
            self.git_dir,
            watch_filter=self._relevant,
            stop_event=self._stop,
            step=50,
            rust_timeout=500,
            raise_interrupt=False,
        ):
            self.on_change()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
