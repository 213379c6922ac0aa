"""Live progress of long waits on a terminal: which model, which health phase, how long so far.

`reconciler apply` wraps its pass in `live_progress(console)` and hands the sink to the applier's
HealthPolicy; the switch and the phased health checks (engine/switch.py, engine/health.py) call it at
every look. Off a terminal (a pipe, CI, a log) it gives no sink, so the printed output stays plain.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.text import Text

from reconciler.engine.health import Progress, ProgressSink

__all__ = ["live_progress", "progress_line"]


def progress_line(note: Progress) -> Text:
    """One line: `infer/qwen-32b  starting  42s  GET http://...: 503, still loading` (text, never markup)."""
    detail = "".join(c for c in note.detail if c.isprintable())[:160]
    return Text(f"{note.subject}  {note.phase}  {note.elapsed:.0f}s  {detail}".rstrip())


@contextmanager
def live_progress(console: Console) -> Iterator[ProgressSink | None]:
    """A progress sink that shows the latest note under a spinner until the block ends; None off a terminal."""
    if not console.is_terminal:
        yield None
        return
    status = console.status("")
    shown = False

    def show(note: Progress) -> None:
        nonlocal shown
        status.update(progress_line(note))
        if not shown:
            status.start()
            shown = True

    try:
        yield show
    finally:
        if shown:
            status.stop()
